"""XEP-0191 Blocking Command, enforced in the router's filter chain.

Enabled as ``urn:xmpp:blocking`` in ``[sm] plugins``.  Blocklists live in the
store (``blocklist/<bare JID>/<blocked JID>``; the value holds an optional
XEP-0377 spam report) and, for online users (in a cluster: with a session
on any node), in memory as a set, so the filter costs at most four set
look-ups per stanza (XEP-0016 §2.1 match order: full JID, bare JID,
domain/resource, domain) whatever the list length.

Enforcement, both directions, on every path through :meth:`Router.deliver`
(client stanzas, presence broadcasts, probes, subscription handling, offline
storage happens after the filter):

* user -> blocked: message/IQ bounced with ``<not-acceptable/>`` plus
  ``<blocked xmlns='urn:xmpp:blocking:errors'/>``; presence not sent;
* blocked -> user: presence dropped; message/IQ get/set answered with
  ``service-unavailable`` (or dropped when ``[blocking] bounce = false``).

Limits (``[blocking]``, read once at start-up), each checked before the
work it bounds, so a request costs time linear in its own size: items per
user (``max_items``), items per block/unblock request
(``max_items_per_request``, counted before any JID is parsed) and XEP-0377
reports per request (``max_reports_per_request``: each one is a store write
and a log line).  An over-limit request is refused whole
(``resource-constraint`` / ``policy-violation`` with a text naming the
limit) and changes nothing.  The blocklist result is serialised once per
list (lists are immutable), not per request.
"""
from __future__ import annotations

import time

from twisted.internet import defer
from twisted.logger import Logger
from twisted.words.xish import domish

from xmppd import jid as jidlib
from xmppd.jid import JID
from xmppd.handlers.presence import copy_to
from xmppd.plugin import Plugin, Request
from xmppd.router import DROP
from xmppd.serial import Serial
from xmppd.storage import StoreError
from xmppd.storefail import report as store_report
from xmppd.stanzas import NS_CLIENT, StanzaError, escape_attr
from xmppd.logfilter import log_observer

log = Logger(observer=log_observer)

NS_BLOCKING = "urn:xmpp:blocking"
NS_BLOCKING_ERRORS = "urn:xmpp:blocking:errors"
NS_REPORTING = "urn:xmpp:reporting:1"
STORE = "blocklist"
REPORTS = "spam_reports"


class Blocklist(frozenset):
    """A user's blocked JIDs, with what the matcher needs precomputed.

    Immutable: a change builds a new one (changes are rare, checks are on
    every stanza).  ``has_domain_resource`` says whether any item is of the
    ``domain/resource`` form, the only one whose check needs a new string.
    """

    __slots__ = ("has_domain_resource", "_xml")

    def __new__(cls, items=(), has_domain_resource: bool | None = None):
        self = super().__new__(cls, items)
        if has_domain_resource is None:
            has_domain_resource = any(_is_domain_resource(i) for i in self)
        self.has_domain_resource = has_domain_resource
        self._xml = None
        return self

    def with_items(self, new: "Blocklist") -> "Blocklist":
        """This list plus ``new``, in time linear in the result (no rescan of old items)."""
        return Blocklist(self | new, self.has_domain_resource or new.has_domain_resource)

    def xml(self) -> str:
        """The ``<item/>`` children of a blocklist result, made once per list."""
        if self._xml is None:
            self._xml = "".join(f"<item jid='{escape_attr(j)}'/>" for j in sorted(self))
        return self._xml


def _is_domain_resource(item: str) -> bool:
    return "/" in item and "@" not in item.split("/", 1)[0]


EMPTY = Blocklist()


def matches(blocked: Blocklist, other: JID) -> bool:
    """XEP-0016 §2.1: does an item of ``blocked`` cover ``other``?

    An item ``user@domain/resource`` matches that full JID only,
    ``user@domain`` every resource of it, ``domain/resource`` that resource
    of any user at the domain, ``domain`` everything at the domain.
    """
    if other.bare in blocked or other.host in blocked:
        return True
    if other.resource is None:
        return False
    if other.full in blocked:
        return True
    return (
        blocked.has_domain_resource
        and other.user is not None
        and f"{other.host}/{other.resource}" in blocked
    )


def _prepared(text: str) -> JID:
    """A JID the server prepared itself (a roster key): split, not parsed again.

    Parsing (PRECIS) costs tens of microseconds per new address; a block
    request walks the whole roster, which must stay cheap.
    """
    rest, slash, resource = text.partition("/")
    user, at, host = rest.partition("@")
    if not at:
        user, host = None, rest
    return JID(user, host, resource if slash else None, rest, text)


def _blocked_error() -> StanzaError:
    return StanzaError(
        "not-acceptable", "cancel",
        extra=domish.Element((NS_BLOCKING_ERRORS, "blocked")),
    )


class BlockingFilter:
    """The router filter; reads only in-memory sets for online users (a session
    on this node or, in a cluster, on another one).

    For a user with no list in memory (no session, not cached) on a
    networked store, ``load`` returns a Deferred: the router passes the
    stanza through again once it fires."""

    name = "blocking"

    def __init__(self, plugin: "BlockingPlugin") -> None:
        self.plugin = plugin

    def check(self, stanza: domish.Element, sender: JID, to: JID):
        lists = self.plugin.lists
        if sender.bare == to.bare or (to.user is None and to.resource is None and to.host == sender.host):
            return None  # to oneself or one's own server: never blocked
        out = lists.get(sender.bare)
        if out is None and sender.user is not None and sender.host in self.plugin.router.hosts:
            out = self.plugin.load(sender.bare)
            if isinstance(out, defer.Deferred):
                return out
        if out and matches(out, to):
            if stanza.name == "presence" or stanza.getAttribute("type") in ("error", "result"):
                return DROP
            return _blocked_error()
        if to.user is None or to.host not in self.plugin.router.hosts:
            return None
        inbound = lists.get(to.bare)
        if inbound is None:
            inbound = self.plugin.load(to.bare)
            if isinstance(inbound, defer.Deferred):
                return inbound
        if inbound and matches(inbound, sender):
            name = stanza.name
            kind = stanza.getAttribute("type")
            if name == "presence" or kind in ("error", "result"):
                return DROP
            if name == "message" and not self.plugin.bounce_messages:
                return DROP
            return StanzaError("service-unavailable")
        return None


def max_items(sec) -> int:
    """``[blocking] max_items``: read here for the plugin and for imports."""
    return sec.int("max_items", 5000, minimum=1)


class BlockingPlugin(Plugin):
    name = "urn:xmpp:blocking"
    features = (NS_BLOCKING,)

    def setup(self) -> None:
        sec = self.server.config.section("blocking")
        self.bounce_messages = sec.bool("bounce", True)
        self.max_items = max_items(sec)
        self.max_items_per_request = sec.int("max_items_per_request", 100, minimum=1)
        self.max_reports_per_request = sec.int("max_reports_per_request", 10, minimum=0)
        sec.reject_unknown()
        self.lists: dict[str, Blocklist] = {}
        self._offline_cache: dict[str, Blocklist] = {}
        self._loading: dict[str, defer.Deferred] = {}
        # Reads of a local user's list begun at bind, by bare JID -> token (_bound).
        self._reading: dict[str, object] = {}
        # Block/unblock of one user one after another (read, then write).
        self.serial = Serial()
        self.handle_iq("get", NS_BLOCKING, "blocklist", self.on_get)
        self.handle_iq("set", NS_BLOCKING, "block", self.on_block)
        self.handle_iq("set", NS_BLOCKING, "unblock", self.on_unblock)
        self.router.filters.append(BlockingFilter(self))
        self.router.on_bound.append(self._bound)
        self.router.on_released.append(self._closed)  # after presence's unavailable broadcast

    # -- the per-user sets -------------------------------------------------

    def _read(self, bare: str) -> defer.Deferred:
        def listed(rows) -> Blocklist:
            items = [k for k, _ in rows]
            return Blocklist(items) if items else EMPTY  # most users block nobody

        return self.store.items(STORE, bare).addCallback(listed)

    def load(self, bare: str) -> Blocklist | defer.Deferred:
        """The list of a user whose list is not in memory (read, then held).

        Held in ``lists`` when the user has a session, here or (in a
        cluster) on another node, as an online user's list is, until their
        last session ends (:meth:`_closed`; the cluster registry's
        ``_drop``): a message to a user on another node then costs the
        filter a set look-up, as a local one (bench/cluster_cost.py).  Else
        in a bounded cache, cleared on change.  The list itself when it can
        be had at once (held, cached, or an embedded store); else a
        Deferred that fires (with None) once it is.
        """
        cached = self._offline_cache.get(bare)
        if cached is not None:
            return cached
        waiters = self._loading.get(bare)
        if waiters is None:
            waiters = self._loading[bare] = []

            def loaded(blocklist: Blocklist) -> None:
                if self._loading.get(bare) is waiters:
                    del self._loading[bare]
                    if self.router.resources_of(bare):
                        self.lists.setdefault(bare, blocklist)
                    else:
                        if len(self._offline_cache) > 10000:
                            self._offline_cache.clear()
                        self._offline_cache[bare] = blocklist
                for waiter in waiters:
                    waiter.callback(None)

            def failed(failure) -> None:
                if self._loading.get(bare) is waiters:
                    del self._loading[bare]
                failed_now.append(failure)
                for waiter in waiters:
                    waiter.errback(failure)

            failed_now: list = []

            self._read(bare).addCallbacks(loaded, failed)
            now = self.lists.get(bare)  # an embedded store: loaded already
            if now is None:
                now = self._offline_cache.get(bare)
            if now is not None:
                return now
            if failed_now:  # an embedded store that failed
                return defer.fail(failed_now[0])
        waiter = defer.Deferred()
        waiters.append(waiter)
        return waiter

    def _bound(self, session) -> None:
        """A local session: its user's list read now, so the filter never waits for it."""
        bare = session.jid.bare
        if bare in self.lists:
            return
        token = self._reading[bare] = object()

        def loaded(blocklist: Blocklist) -> None:
            if self._reading.get(bare) is token:  # else a change overtook this read
                del self._reading[bare]
                if bare not in self.lists and self.router.resources_of(bare):
                    self.lists[bare] = blocklist

        def failed(failure) -> None:
            if self._reading.get(bare) is token:
                del self._reading[bare]
            failure.trap(StoreError)
            store_report(failure.value)  # the filter reads the store until a list is in

        self._read(bare).addCallbacks(loaded, failed)

    def reload(self, bare: str) -> None:
        """Another node changed ``bare``'s blocklist (xmppd.cluster): forget every copy.

        The in-memory list of a user with a session goes too, and reads in
        flight are discarded when they land: the next stanza the filter
        checks for the user waits for a new read (:meth:`load`), so a block
        made on another node holds from the moment its invalidation arrives.
        """
        self._offline_cache.pop(bare, None)
        self._loading.pop(bare, None)
        self._reading.pop(bare, None)
        self.lists.pop(bare, None)

    def _closed(self, session) -> None:
        if not self.router.resources_of(session.jid.bare):
            self.lists.pop(session.jid.bare, None)

    @defer.inlineCallbacks
    def _list(self, bare: str):
        """Deferred[Blocklist]."""
        current = self.lists.get(bare)
        if current is None:
            current = self.load(bare)
            if isinstance(current, defer.Deferred):
                yield current
                current = self.lists.get(bare)  # an empty list is falsy: no "or"
                if current is None:
                    current = self._offline_cache.get(bare, EMPTY)
        return current

    # -- IQ handlers -----------------------------------------------------------

    def _own(self, request: Request) -> str:
        if request.to is not None:
            raise StanzaError("forbidden", text="blocklists are private")
        return request.sender.bare

    def on_get(self, request: Request):
        bare = self._own(request)
        if request.session is not None:
            request.session.state["blocklist_interested"] = True
        def answer(blocklist: Blocklist) -> domish.Element:
            result = domish.Element((NS_BLOCKING, "blocklist"))
            items = blocklist.xml()
            if items:
                result.addChild(domish.SerializedXML(items))
            return result

        return self._list(bare).addCallback(answer)

    def _items(self, payload: domish.Element) -> list[tuple[str, domish.Element]]:
        """The request's (JID, element) pairs, counted before any JID is parsed."""
        elements = []
        reports = 0
        for el in payload.elements(NS_BLOCKING, "item"):
            if len(elements) >= self.max_items_per_request:
                raise StanzaError("policy-violation",
                                  text=f"at most {self.max_items_per_request} items per request",
                                  echo=False)
            for _report in el.elements(NS_REPORTING, "report"):
                reports += 1
                if reports > self.max_reports_per_request:
                    raise StanzaError("policy-violation",
                                      text=f"at most {self.max_reports_per_request} reports per request",
                                      echo=False)
            elements.append(el)
        items = []
        for el in elements:
            try:
                items.append((jidlib.parse(el.getAttribute("jid", "")).full, el))
            except jidlib.InvalidJID:
                raise StanzaError("jid-malformed", text=f"bad JID {el.getAttribute('jid')!r}") from None
        return items

    def on_block(self, request: Request):
        bare = self._own(request)
        items = self._items(request.payload)
        if not items:
            raise StanzaError("bad-request", text="block needs at least one item")
        return self.serial.run(bare, self._block, bare, items)

    @defer.inlineCallbacks
    def _block(self, bare: str, items: list):
        current = yield self._list(bare)
        new = list(dict.fromkeys(j for j, _ in items if j not in current))
        if len(current) + len(new) > self.max_items:
            raise StanzaError("resource-constraint", "cancel",
                              text=f"blocklist full: at most {self.max_items} items", echo=False)
        # Reports first, the blocklist last, memory after both: a failed
        # write (StoreError, answered by the router) leaves the list as it
        # was, on disk and in memory; at worst a report is kept without it.
        for j, el in items:
            yield self._record_report(bare, j, el)
        if new:
            yield self.store.put_many(STORE, bare, {j: {} for j in new})
        before = current
        added = Blocklist(new)
        self._update(bare, current.with_items(added))
        self.push(bare, "block", [j for j, _ in items])
        if new:
            log.info("{user} blocked {items}", user=bare, items=", ".join(new))
            yield self._presence_after_block(bare, before, added)
        return None

    def on_unblock(self, request: Request):
        bare = self._own(request)
        items = self._items(request.payload)
        return self.serial.run(bare, self._unblock, bare, items)

    @defer.inlineCallbacks
    def _unblock(self, bare: str, items: list):
        current = yield self._list(bare)
        removed = set(current) if not items else {j for j, _ in items if j in current}
        if removed:
            yield self.store.delete_many(STORE, bare, sorted(removed))
        remaining = Blocklist(current - removed)
        self._update(bare, remaining)
        self.push(bare, "unblock", [j for j, _ in items])
        if removed:
            log.info("{user} unblocked {items}", user=bare, items=", ".join(sorted(removed)))
            yield self._presence_after_unblock(bare, Blocklist(removed), remaining)
        return None

    def _update(self, bare: str, items: Blocklist) -> None:
        self._offline_cache.pop(bare, None)
        self._loading.pop(bare, None)
        # A read of the list in flight began before this change: this is newer.
        reading = self._reading.pop(bare, None) is not None
        if bare in self.lists or (reading and self.router.resources_of(bare)):
            self.lists[bare] = items

    @defer.inlineCallbacks
    def _record_report(self, bare: str, blocked: str, item: domish.Element):
        """XEP-0377: keep spam/abuse reports for the operator."""
        for report in item.elements(NS_REPORTING, "report"):
            reason = report.getAttribute("reason", "")
            text = " ".join(str(t) for t in report.elements(NS_REPORTING, "text"))
            record = {"reporter": bare, "reason": reason, "text": text,
                      "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            yield self.store.put(REPORTS, blocked, f"{time.time():.6f}-{bare}", record)
            log.warn("spam report by {reporter} against {jid}: {reason} {text}",
                     reporter=bare, jid=blocked, reason=reason, text=text)

    # -- pushes and presence consequences -----------------------------------

    def push(self, bare: str, action: str, items: list[str]) -> None:
        for session in self.router.resources_of(bare).values():
            if not session.state.get("blocklist_interested"):
                continue
            iq = domish.Element((NS_CLIENT, "iq"))
            iq["type"] = "set"
            iq["id"] = f"{action}-push-{int(time.time() * 1000)}"
            iq["to"] = session.jid.full
            payload = iq.addElement((NS_BLOCKING, action))
            for j in items:
                payload.addElement("item")["jid"] = j
            session.send(iq)

    @defer.inlineCallbacks
    def _presence_targets(self, bare: str):
        """Deferred: who receives this user's presence, (address, reason) pairs."""
        targets = []
        roster = self.server.plugin("roster")
        if roster is not None:
            for contact, item in (yield roster.rosters.get(bare)).items():
                if item.from_:
                    targets.append((_prepared(contact), "subscription"))
        for session in self.router.resources_of(bare).values():
            for target in session.state.get("directed", ()):
                try:
                    targets.append((jidlib.parse(target), "directed"))
                except jidlib.InvalidJID:
                    pass
        return targets

    @defer.inlineCallbacks
    def _presence_after_block(self, bare: str, before: Blocklist, new: Blocklist):
        """Unavailable presence, from each available resource, to newly blocked receivers."""
        sessions = [s for s in self.router.resources_of(bare).values() if s.available]
        if not sessions:
            return
        for target, _why in (yield self._presence_targets(bare)):
            if matches(new, target) and not matches(before, target):
                for session in sessions:
                    el = domish.Element((NS_CLIENT, "presence"))
                    el["type"] = "unavailable"
                    el["from"] = session.jid.full
                    el["to"] = target.full
                    # Bypass the filter on purpose: it would drop this.
                    self.router.deliver_unfiltered(el, session.jid, target)

    @defer.inlineCallbacks
    def _presence_after_unblock(self, bare: str, removed: Blocklist, remaining: Blocklist):
        """Current presence to unblocked contacts entitled by subscription."""
        sessions = [s for s in self.router.resources_of(bare).values()
                    if s.available and s.state.get("last_presence") is not None]
        for target, why in (yield self._presence_targets(bare)):
            if why != "subscription" or not matches(removed, target) or matches(remaining, target):
                continue
            for session in sessions:
                el = copy_to(session.state["last_presence"], target.full)
                self.router.deliver(el, session.jid, target)

"""RFC 6121 §3–4: presence subscriptions and presence broadcast.

Outbound processing (what the user's server does with a stanza from its
user) happens here; the stanza then crosses the router's filter chain with
:meth:`Router.deliver`, and inbound processing (what the contact's server
does) runs in :meth:`PresencePlugin.inbound`.  Both halves run in this
process for local contacts, but keeping them apart keeps every filter (the
domain filter, then the blocking command) on the path between them, as with s2s.

Remote contacts get broadcasts and probes like local ones: the router hands
them to the s2s service, which never bounces presence (a login does not
come back with one error per unreachable contact).  With federation off
(``[s2s] enabled = false``) they are skipped, for the same reason.  Inbound presence from
remote contacts arrives through the same filter chain into
:meth:`PresencePlugin.inbound`.

Subscription state is written outside any IQ, so a failed write
(:class:`~xmppd.storage.StoreError`) is handled here: the presence stanza
that caused it is bounced to its sender with the matching error, nothing is
sent on, and state that must change together changes in one transaction.
"""
from __future__ import annotations

from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.words.xish import domish

from xmppd import jid as jidlib
from xmppd.handlers.roster import Item, RosterFull, RosterPlugin, with_from, with_to
from xmppd.jid import JID
from xmppd.plugin import Plugin
from xmppd.stanzas import NS_CLIENT, StanzaError, serialize
from xmppd.storage import StoreError
from xmppd.storefail import report as store_report
from xmppd.storefail import stanza_error as store_failure
from xmppd.logfilter import log_observer

log = Logger(observer=log_observer)

SUBSCRIPTION_TYPES = frozenset(("subscribe", "subscribed", "unsubscribe", "unsubscribed"))


def presence(kind: str | None, sender: str, to: str) -> domish.Element:
    el = domish.Element((NS_CLIENT, "presence"))
    if kind:
        el["type"] = kind
    el["from"] = sender
    el["to"] = to
    return el


class PendingRequests:
    """Inbound subscription requests awaiting the user's answer.

    Kept apart from the roster: RFC 6121 §3.1.3 has no roster item for a
    mere request, but it must survive restarts and be shown at each login.
    """

    STORE = "pending"
    #: Bytes of one stored request: extended content is a nickname or a
    #: token, so a larger one (up to max_stanza_size, per contact) is kept
    #: without its content rather than let one sender fill the store.
    MAX_STORED = 4096

    def __init__(self, store) -> None:
        self.store = store

    def put(self, owner: str, contact: str, request: domish.Element) -> defer.Deferred:
        """Keep the whole request: its extended content (a nickname, a
        pre-authentication token) is the contact's to see at login."""
        return self.store.put(self.STORE, owner, contact, self.value(owner, contact, request))

    @classmethod
    def value(cls, owner: str, contact: str, request: domish.Element) -> str:
        """What is stored for ``request`` (also by imports): the request, or
        a bare one when its content is over :attr:`MAX_STORED` bytes."""
        data = serialize(request)
        if len(data) > cls.MAX_STORED:
            log.info("subscription request {contact} -> {owner} stored without its "
                     "{n}-byte content", contact=contact, owner=owner, n=len(data))
            data = serialize(presence("subscribe", contact, owner))
        return data.decode("utf-8")

    def has(self, owner: str, contact: str) -> defer.Deferred:
        return self.store.get(self.STORE, owner, contact).addCallback(lambda v: v is not None)

    def key(self, owner: str, contact: str) -> tuple[str, str, str]:
        """The entry, for removal in another write's transaction."""
        return (self.STORE, owner, contact)

    @defer.inlineCallbacks
    def pop(self, owner: str, contact: str):
        """Deferred[bool]: whether there was a request (now removed)."""
        if (yield self.store.get(self.STORE, owner, contact)) is None:
            return False
        yield self.store.delete(self.STORE, owner, contact)
        return True

    def requests(self, owner: str) -> defer.Deferred:
        """Deferred[list[bytes]]: the stored requests, serialised (older stores kept only True)."""
        return self.store.items(self.STORE, owner).addCallback(lambda rows: [
            value.encode("utf-8") if isinstance(value, str)
            else serialize(presence("subscribe", contact, owner))
            for contact, value in rows
        ])


class PresencePlugin(Plugin):
    name = "presence"

    def setup(self) -> None:
        roster = self.server.plugin("roster")
        if not isinstance(roster, RosterPlugin):
            raise self.server.config.section("sm").error(
                "plugins", "presence", "the presence plugin needs the roster plugin before it"
            )
        self.roster = roster
        self.rosters = roster.rosters
        self.serial = roster.serial  # one queue per owner for roster changes
        self.pending = PendingRequests(self.store)
        self.router.presence_handler = self.outbound
        self.router.presence_inbound = self.inbound
        self.router.on_closed.append(self._session_closed)
        roster.on_remove.append(self._item_removed)
        # Hooks run after a session's initial presence (offline messages).
        self.on_initial_presence: list[Callable] = []
        # Hooks run on each broadcast presence of a session, before it goes
        # out: (session, stanza, kind None|"unavailable") (entity caps).
        self.on_broadcast: list[Callable] = []
        # Hooks run on inbound available/unavailable presence to a local
        # account, after the filters: (stanza, sender, to) (PEP contacts).
        self.on_inbound: list[Callable] = []
        # Hooks run on each directed presence of a session, before it goes
        # out: (session, stanza, kind) (XEP-0398 avatar hash, e.g. in MUC joins).
        self.on_directed: list[Callable] = []

    # -- outbound: from the user's own client ----------------------------------

    def outbound(self, stanza: domish.Element, sender: JID, to: JID | None, session) -> None:
        kind = stanza.getAttribute("type")
        if to is None:
            if kind is None or kind == "unavailable":
                self._broadcast(stanza, session, kind)
            return  # probes/subscriptions without 'to' are meaningless
        if kind in SUBSCRIPTION_TYPES:
            def failed(failure) -> None:
                if failure.check(StoreError):
                    self.router.bounce(stanza, store_failure(failure.value), session)
                elif failure.check(RosterFull):
                    # A new contact would overflow [roster] limits: nothing changes.
                    self.router.bounce(stanza, StanzaError("resource-constraint", "cancel",
                                                           text=str(failure.value)), session)
                else:
                    log.failure("subscription handling failed", failure)

            self.serial.run(sender.bare, self._outbound_subscription, stanza, kind, sender,
                            to.bare_jid()).addErrback(failed)
        elif kind == "probe":
            return  # clients must not probe; the server does it for them
        else:
            self._directed(stanza, kind, sender, to, session)

    def _broadcast(self, stanza, session, kind) -> None:
        if kind is not None or session.state.get("sent_presence"):
            # Not the initial presence (nothing to wait for after the
            # broadcast): with the roster in memory, no generator and no
            # Deferred (every logout and presence change of an online user).
            roster = self.rosters.cached_items(session.jid.bare)
            if roster is not None:
                try:
                    self._broadcast_with(stanza, session, kind, roster)
                except Exception:
                    self._read_failed(Failure())
                return
        self._broadcast_to(stanza, session, kind).addErrback(self._read_failed)

    def _read_failed(self, failure) -> None:
        """A roster read failed where no stanza can carry the error: log it once."""
        if failure.check(StoreError):
            store_report(failure.value)
        else:
            log.failure("presence handling failed", failure)

    @defer.inlineCallbacks
    def _broadcast_to(self, stanza, session, kind):
        initial = kind is None and not session.state.get("sent_presence")
        roster = yield self.rosters.get(session.jid.bare)
        self._broadcast_with(stanza, session, kind, roster)
        if initial:
            self._probe_contacts(session, roster)
            yield self._redeliver_pending(session, roster)
            for hook in self.on_initial_presence:
                hook(session)

    def _broadcast_with(self, stanza, session, kind, roster) -> None:
        """The broadcast itself, once the user's roster is at hand."""
        owner = session.jid.bare
        if kind is None:
            session.state["sent_presence"] = True
            session.state["last_presence"] = stanza
        else:
            session.state["sent_presence"] = False
            session.state.pop("last_presence", None)
        for hook in self.on_broadcast:
            hook(session, stanza, kind)
        sender = session.jid
        for contact, item in roster.items():
            if item.from_:
                self._send_as(stanza, sender, contact)
        # All of the user's available resources see it, the sender included
        # (RFC 6121 §4.2.2, §4.4.2); unavailable goes to the others only.
        for other in self.router.resources_of(owner).values():
            if other.available and (other is not session or kind is None):
                other.send(copy_to(stanza, other.jid.full))
        if kind == "unavailable":
            self._unavailable_to_directed(session, stanza)

    def _send_as(self, stanza, sender: JID, contact: str) -> None:
        """Broadcast ``stanza`` from ``sender`` to ``contact``, through the filters."""
        try:
            to = jidlib.parse(contact)
        except jidlib.InvalidJID:
            return
        if self.router.remote is None and not self.router.is_local(to):
            return  # federation off: the contact is unreachable, say nothing
        self.router.deliver(copy_to(stanza, contact), sender, to)

    def _probe_contacts(self, session, roster) -> None:
        """Probe every contact the user is subscribed to, local or remote (RFC 6121 §4.3)."""
        for contact, item in roster.items():
            if not item.to:
                continue
            try:
                to = jidlib.parse(contact)
            except jidlib.InvalidJID:
                continue
            if self.router.remote is None and not self.router.is_local(to):
                continue  # federation off
            probe = presence("probe", session.jid.bare, contact)
            self.router.deliver(probe, session.jid.bare_jid(), to)

    @defer.inlineCallbacks
    def _redeliver_pending(self, session, roster):
        for request in (yield self.pending.requests(session.jid.bare)):
            session.send_bytes(request)

    def _directed(self, stanza, kind, sender: JID, to: JID, session) -> None:
        self._directed_checked(stanza, kind, sender, to, session).addErrback(self._read_failed)

    @defer.inlineCallbacks
    def _directed_checked(self, stanza, kind, sender: JID, to: JID, session):
        directed = session.state.setdefault("directed", set())
        if kind is None:
            item = yield self.rosters.item(sender.bare, to.bare)
            if item is None or not item.from_:
                directed.add(to.full)
        elif kind == "unavailable":
            directed.discard(to.full)
        for hook in self.on_directed:
            hook(session, stanza, kind)
        self.router.deliver(stanza, sender, to, session)

    def _unavailable_to_directed(self, session, stanza=None) -> None:
        for target in session.state.pop("directed", set()):
            try:
                to = jidlib.parse(target)
            except jidlib.InvalidJID:
                continue
            unavailable = presence("unavailable", session.jid.full, target)
            self.router.deliver(unavailable, session.jid, to)

    def _session_closed(self, session) -> None:
        """A session ended without unavailable presence: say so for it."""
        if session.state.get("sent_presence"):
            unavailable = presence("unavailable", session.jid.full, session.jid.bare)
            del unavailable["to"]
            session.available = False
            self._broadcast(unavailable, session, "unavailable")
        else:
            self._unavailable_to_directed(session)

    @defer.inlineCallbacks
    def _outbound_subscription(self, stanza, kind: str, sender: JID, contact: JID):
        owner = sender.bare
        item = yield self.rosters.item(owner, contact.bare)
        if item is None and kind in ("subscribe", "subscribed"):
            yield self.rosters.check(owner, contact.bare, Item.new())  # raises RosterFull
        changed = None
        answered = ()  # the pending request this change answers, removed with it
        unavailable_after = False
        if kind == "subscribe":
            item = Item(item) if item is not None else Item.new()
            if not item.to and not item.get("ask"):
                item["ask"] = "subscribe"
                changed = item
        elif kind == "unsubscribe" and item is not None:
            item = Item(item)
            if item.to or item.get("ask"):
                item["subscription"] = with_to(item["subscription"], False)
                item["ask"] = None
                changed = item
        elif kind == "subscribed":
            item = Item(item) if item is not None else Item.new()
            if (yield self.pending.has(owner, contact.bare)):
                item["subscription"] = with_from(item["subscription"], True)
                changed = item
                answered = (self.pending.key(owner, contact.bare),)
            elif not item.from_:
                if item.get("approved"):
                    return
                item["approved"] = True  # pre-approval (RFC 6121 §3.4)
                yield self.roster.update(owner, contact.bare, item)
                return
            else:
                return
        elif kind == "unsubscribed" and (item is not None
                                         or (yield self.pending.pop(owner, contact.bare))):
            item = item if item is not None else Item.new()
            item = Item(item)
            was_from = item.from_
            if was_from or item.get("approved"):
                item["subscription"] = with_from(item["subscription"], False)
                item["approved"] = False
                changed = item
            unavailable_after = was_from
        if changed is not None:
            yield self.roster.update(owner, contact.bare, changed, answered)
        if unavailable_after:
            self._send_unavailable_from_all(owner, contact.bare)
        out = presence(kind, owner, contact.bare)
        if kind == "subscribe":
            _keep_content(stanza, out)  # RFC 6121 §3.1.2: the request as the user wrote it
        self.router.deliver(out, sender.bare_jid(), contact)
        if kind == "subscribed" and changed is not None:
            # The new subscriber gets our current presence right away.
            for session in self.router.resources_of(owner).values():
                last = session.state.get("last_presence")
                if last is not None and session.available:
                    self.router.deliver(copy_to(last, contact.bare), session.jid, contact)

    def _send_unavailable_from_all(self, owner: str, contact: str) -> None:
        try:
            to = jidlib.parse(contact)
        except jidlib.InvalidJID:
            return
        for session in self.router.resources_of(owner).values():
            if session.available:
                self.router.deliver(presence("unavailable", session.jid.full, contact), session.jid, to)

    @defer.inlineCallbacks
    def _item_removed(self, owner: str, contact: str, item: Item):
        """Roster remove cancels subscriptions both ways (RFC 6121 §2.5)."""
        try:
            to = jidlib.parse(contact).bare_jid()
        except jidlib.InvalidJID:
            return
        owner_jid = jidlib.parse(owner)
        if (yield self.pending.pop(owner, contact)) or item.from_:
            if item.from_:
                self._send_unavailable_from_all(owner, contact)
            self.router.deliver(presence("unsubscribed", owner, contact), owner_jid, to)
        if item.to or item.get("ask"):
            self.router.deliver(presence("unsubscribe", owner, contact), owner_jid, to)

    # -- inbound: to a local account, after the filter chain ------------------

    def inbound(self, stanza: domish.Element, sender: JID, to: JID) -> None:
        if self.serial.busy(to.bare):
            # A subscription change of this user is being stored: what the
            # contact sent after it must not overtake it (RFC 6120 §10.1).
            self.serial.run(to.bare, self._inbound, stanza, sender, to).addErrback(
                self._read_failed)
            return
        self._inbound(stanza, sender, to)

    def _inbound(self, stanza: domish.Element, sender: JID, to: JID) -> None:
        kind = stanza.getAttribute("type")
        if kind in SUBSCRIPTION_TYPES:
            self._inbound_subscription(stanza, kind, sender.bare, to.bare_jid())
        elif kind == "probe":
            self._inbound_probe(sender, to.bare_jid())
        else:
            self._deliver_presence(stanza, to)
            for hook in self.on_inbound:
                hook(stanza, sender, to)

    def _deliver_presence(self, stanza, to: JID) -> None:
        resources = self.router.resources_of(to.bare)
        if to.resource is not None:
            target = resources.get(to.resource)
            if target is not None:
                target.send(stanza)
            return
        if resources:
            data = serialize(stanza)
            for target in resources.values():
                if target.available:
                    target.send_bytes(data)

    def _to_available(self, owner: str, stanza) -> None:
        data = serialize(stanza)
        for session in self.router.resources_of(owner).values():
            if session.available:
                session.send_bytes(data)

    def _inbound_probe(self, sender: JID, owner: JID) -> None:
        self.rosters.item(owner.bare, sender.bare).addCallback(
            self._probe_answer, sender, owner).addErrback(self._read_failed)

    def _probe_answer(self, item, sender: JID, owner: JID) -> None:
        if item is None or not item.from_:
            return  # not entitled: say nothing (RFC 6121 §4.3.2)
        for session in self.router.resources_of(owner.bare).values():
            last = session.state.get("last_presence")
            if last is not None and session.available:
                self.router.deliver(copy_to(last, sender.full), session.jid, sender)

    def _inbound_subscription(self, stanza, kind: str, contact: str, owner: JID) -> None:
        def failed(failure) -> None:
            if failure.check(StoreError):
                # The contact asked for a change we could not record: say so.
                self.router.bounce(stanza, store_failure(failure.value), None)
            else:
                log.failure("subscription handling failed", failure)

        # In the owner's queue from the start (the account look-up too), so
        # that what the contact sends next waits for it (see inbound).
        self.serial.run(owner.bare, self._inbound_subscription_step, stanza, kind, contact,
                        owner).addErrback(failed)

    @defer.inlineCallbacks
    def _inbound_subscription_step(self, stanza, kind: str, contact: str, owner: JID):
        exists = yield self.router.user_exists(owner)
        yield self._inbound_subscription_apply(exists, stanza, kind, contact, owner)

    @defer.inlineCallbacks
    def _inbound_subscription_apply(self, exists: bool, stanza, kind, contact: str, owner: JID):
        bare = owner.bare
        if not exists:
            if kind == "subscribe":
                reply = presence("unsubscribed", bare, contact)
                self.router.deliver_unfiltered(reply, owner, jidlib.parse(contact))
            return
        item = yield self.rosters.item(bare, contact)
        clean = presence(kind, contact, bare)
        if kind == "subscribe":
            _keep_content(stanza, clean)
            if item is not None and item.from_:
                self.router.deliver(presence("subscribed", bare, contact), owner, jidlib.parse(contact))
                return
            item = Item(item) if item is not None else None
            if item is not None and item.get("approved"):
                item["approved"] = False
                item["subscription"] = with_from(item["subscription"], True)
                yield self.roster.update(bare, contact, item)
                self.router.deliver(presence("subscribed", bare, contact), owner, jidlib.parse(contact))
                return
            # Remember the request (redelivered at login) and show it now.
            yield self.pending.put(bare, contact, clean)
            self._to_available(bare, clean)
        elif kind == "subscribed":
            if item is not None and item.get("ask"):
                item = Item(item)
                item["ask"] = None
                item["subscription"] = with_to(item["subscription"], True)
                yield self.roster.update(bare, contact, item)
                self._to_available(bare, clean)
        elif kind == "unsubscribe":
            if item is not None and item.from_:
                answered = ((self.pending.key(bare, contact),)
                            if (yield self.pending.has(bare, contact)) else ())
                item = Item(item)
                was_from = item.from_
                item["subscription"] = with_from(item["subscription"], False)
                yield self.roster.update(bare, contact, item, answered)
                self._to_available(bare, clean)
                if was_from:
                    self._send_unavailable_from_all(bare, contact)
            elif (yield self.pending.pop(bare, contact)):
                self._to_available(bare, clean)
        elif kind == "unsubscribed":
            if item is not None and (item.to or item.get("ask")):
                item = Item(item)
                item["ask"] = None
                item["subscription"] = with_to(item["subscription"], False)
                yield self.roster.update(bare, contact, item)
                self._to_available(bare, clean)


def _keep_content(original: domish.Element, clean: domish.Element) -> None:
    """
    Carry the child elements of a subscription request (RFC 6121 §3.1.3:
    its extended content, e.g. XEP-0172 nick, XEP-0379 pre-auth token) over
    to the re-addressed copy; the addresses stay the server's own.
    """
    clean.children = [c for c in original.children if isinstance(c, domish.Element)]


def copy_to(stanza: domish.Element, to: str) -> domish.Element:
    """A shallow copy of a presence stanza with another ``to``."""
    copy = domish.Element((NS_CLIENT, stanza.name))
    copy.attributes = dict(stanza.attributes)
    copy.attributes["to"] = to
    copy.children = list(stanza.children)
    return copy

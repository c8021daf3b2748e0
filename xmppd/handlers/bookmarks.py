"""XEP-0402 PEP Native Bookmarks, with the XEP-0048 views (``#compat``, ``#compat-pep``).

Enabled as ``urn:xmpp:bookmarks:1`` in ``[sm] plugins`` after ``pep`` and
``jabber:iq:private``.  The PEP node ``urn:xmpp:bookmarks:1`` (one item per
room, id = room JID) is the only copy.  A XEP-0048 client gets
``<storage xmlns='storage:bookmarks'/>`` built from those items, either from
private XML (XEP-0049, ``#compat``) or as item ``current`` of the PEP node
``storage:bookmarks`` (XEP-0223, ``#compat-pep``: a
:class:`~xmppd.handlers.pep.VirtualNode`, nothing stored under that name).
Storing or publishing one replaces the items in one transaction: rooms it no
longer lists are retracted, new or changed ones published, each with the
usual notification to the owner's XEP-0402 clients, and one notification of
``storage:bookmarks`` to the owner's XEP-0048 PEP clients; a XEP-0402
change notifies those too.  ``<url/>`` bookmarks of XEP-0048 have no
XEP-0402 form and are not kept.

A ``storage:bookmarks`` node stored by an older xmppd (before the view) is
merged into the XEP-0402 items (rooms not there yet) and removed at the
owner's next login, so nothing a client stored is lost.

Every read-modify-write of the items runs in the owner's PEP queue
(``PepStore.serial``, on the asynchronous store), like PEP's own requests.
"""
from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger
from twisted.words.xish import domish

from xmppd import jid as jidlib
from xmppd.handlers.pep import VirtualNode
from xmppd.logfilter import log_observer
from xmppd.pepstore import QuotaExceeded, default_config
from xmppd.plugin import Plugin
from xmppd.stanzas import StanzaError, serialize_fragment
from xmppd.xmlparser import Limits, XMLStreamError, parse_fragment

log = Logger(observer=log_observer)

NS_BOOKMARKS = "urn:xmpp:bookmarks:1"
NS_LEGACY = "storage:bookmarks"
NODE = NS_BOOKMARKS
# XEP-0402 §3.1: what the node must be configured with.
NODE_OPTIONS = {"pubsub#access_model": ["whitelist"], "pubsub#max_items": ["max"],
                "pubsub#persist_items": ["true"], "pubsub#send_last_published_item": ["never"]}
LEGACY_NODE = NS_LEGACY
LEGACY_ITEM = "current"
# XEP-0048 §3.3 / XEP-0223: private, one item; sent at login to +notify clients
# (XEP-0048 PEP clients rely on it rather than fetching).
LEGACY_CONFIG = {"access_model": "whitelist", "max_items": 1, "persist_items": True,
                 "send_last_published_item": "on_sub_and_presence",
                 "roster_groups_allowed": [], "notify_retract": False}
_NO_NS = "\x00"


def _text_of(el: domish.Element, name: str) -> str | None:
    for child in el.elements():
        if child.name == name:
            return "".join(c for c in child.children if isinstance(c, str))
    return None


def _truthy(value: str | None) -> bool:
    return value in ("1", "true")


def _conference(src: domish.Element, ns: str, room: str | None = None) -> domish.Element:
    """A ``<conference/>`` in namespace ``ns`` with ``room`` as its jid (XEP-0048
    only) and ``src``'s name, autojoin (normalised to true/false), nick and password."""
    out = domish.Element((ns, "conference"))
    if room is not None:
        out["jid"] = room
    if src.getAttribute("name"):
        out["name"] = src["name"]
    out["autojoin"] = "true" if _truthy(src.getAttribute("autojoin")) else "false"
    for name in ("nick", "password"):
        text = _text_of(src, name)
        if text is not None:
            out.addElement(name, content=text)
    return out


def to_legacy(room: str, conference: domish.Element) -> domish.Element:
    """A XEP-0048 ``<conference/>`` from a XEP-0402 item."""
    return _conference(conference, NS_LEGACY, room)


def from_legacy(el: domish.Element) -> domish.Element:
    """A XEP-0402 ``<conference/>`` payload from a XEP-0048 one."""
    return _conference(el, NS_BOOKMARKS)


class BookmarksPlugin(Plugin):
    name = "urn:xmpp:bookmarks:1"
    account_features = (NS_BOOKMARKS + "#compat", NS_BOOKMARKS + "#compat-pep")

    def setup(self) -> None:
        self.pep = self.server.plugin("pep")
        private = self.server.plugin("jabber:iq:private")
        if self.pep is None or private is None:
            raise self.server.config.section("sm").error(
                "plugins", self.name, "needs the pep and jabber:iq:private plugins before it")
        c2s = self.server.config.c2s
        self.limits = Limits(self.pep.quotas.item_bytes, c2s.max_depth,
                             c2s.max_stanza_nodes).for_stored(1024)
        private.virtual[(NS_LEGACY, "storage")] = (self.legacy_get, self.legacy_set)
        self.pep.virtual[LEGACY_NODE] = VirtualNode(LEGACY_CONFIG, self._has_node, self._legacy_items,
                                                    self._legacy_publish)
        self.pep.on_change.append(self._changed)
        # After pep's own on_bound (it pins the owner's nodes): older data to merge.
        self.router.on_bound.append(self._merge_stored_legacy)

    @defer.inlineCallbacks
    def _current(self, owner: str):
        """Deferred[room -> XEP-0402 ``<conference/>``]."""
        node = (yield self.pep.pep.nodes(owner)).get(NODE)
        if node is None:
            return {}
        out = {}
        for item_id, xml in (yield self.pep.pep.items(owner, node, None, None)):
            try:
                out[item_id] = parse_fragment(xml, self.limits)
            except XMLStreamError as e:
                log.warn("bookmark {id} of {user} skipped: {error}", id=item_id, user=owner, error=e)
        return out

    @defer.inlineCallbacks
    def legacy_get(self, owner: str):
        """Deferred[the XEP-0048 ``<storage/>``]."""
        storage = domish.Element((NS_LEGACY, "storage"))
        for room, conference in sorted((yield self._current(owner)).items()):
            storage.addChild(to_legacy(room, conference))
        return storage

    def legacy_set(self, owner: str, storage: domish.Element, merge: bool = False) -> defer.Deferred:
        """:meth:`legacy_set_queued` in the owner's PEP queue (private XML's ``#compat``)."""
        return self.pep.pep.serial.run(owner, self.legacy_set_queued, owner, storage, merge)

    @defer.inlineCallbacks
    def legacy_set_queued(self, owner: str, storage: domish.Element, merge: bool = False):
        """Make the XEP-0402 items what the XEP-0048 ``storage`` lists (``merge``: only add
        the rooms not there yet), in one transaction, then notify both kinds of client."""
        wanted: dict[str, str] = {}
        for el in storage.elements(NS_LEGACY, "conference"):
            try:
                room = jidlib.parse(el.getAttribute("jid", "")).bare
            except jidlib.InvalidJID:
                continue
            wanted[room] = serialize_fragment(from_legacy(el), _NO_NS)
        current = {room: serialize_fragment(c, _NO_NS)
                   for room, c in (yield self._current(owner)).items()}
        retracts = [] if merge else sorted(set(current) - set(wanted))
        puts = [(room, xml) for room, xml in sorted(wanted.items())
                if (room not in current if merge else current.get(room) != xml)]
        node = (yield self.pep.pep.nodes(owner)).get(NODE)
        try:
            if node is None and (puts or not merge):
                config = self.pep.parse_config(NODE_OPTIONS, default_config(self.pep.quotas))
                node = yield self.pep.pep.create(owner, NODE, config)
            if node is not None and (puts or retracts):
                yield self.pep.pep.replace(owner, node, puts, retracts)
        except QuotaExceeded as e:
            raise self.pep._quota(e) from None
        for room in retracts:
            yield self.pep.notify(owner, node, self.pep._event("items", NODE, retract=room))
        for room, xml in puts:
            yield self.pep.notify(owner, node, self.pep._items_event(NODE, [(room, xml)]))
        if node is not None:
            yield self.pep.notify_virtual(owner, LEGACY_NODE)

    # -- #compat-pep: the PEP node storage:bookmarks ---------------------------

    def _has_node(self, owner: str) -> defer.Deferred:
        return self.pep.pep.nodes(owner).addCallback(lambda nodes: NODE in nodes)

    def _legacy_items(self, owner: str) -> defer.Deferred:
        return self.legacy_get(owner).addCallback(
            lambda storage: [(LEGACY_ITEM, serialize_fragment(storage, _NO_NS))])

    def _legacy_publish(self, owner: str, item_id: str, payload: domish.Element) -> defer.Deferred:
        if (payload.uri, payload.name) != (NS_LEGACY, "storage"):
            raise StanzaError("bad-request", text="storage:bookmarks holds <storage xmlns='storage:bookmarks'/>")
        return self.legacy_set_queued(owner, payload)  # PEP's publish runs in the queue already

    def _changed(self, owner: str, name: str):
        """A XEP-0402 client changed the bookmarks: XEP-0048 PEP clients hear of it."""
        if name == NODE:
            return self.pep.notify_virtual(owner, LEGACY_NODE)
        return None

    def _merge_stored_legacy(self, session) -> None:
        owner = session.jid.bare
        # Queued after PEP's pin of the owner's nodes (its on_bound hook comes first).
        self.pep.pep.serial.run(owner, self._merge_queued, owner)

    @defer.inlineCallbacks
    def _merge_queued(self, owner: str):
        try:
            stored = (yield self.pep.pep.nodes(owner)).get(LEGACY_NODE)
            if stored is None:
                return
            last = yield self.pep.pep.last(owner, stored)
            if last is not None:
                storage = parse_fragment(last[1], self.limits)
                if (storage.uri, storage.name) == (NS_LEGACY, "storage"):
                    yield self.legacy_set_queued(owner, storage, merge=True)
            yield self.pep.pep.delete(owner, stored)
            log.info("stored storage:bookmarks of {user} merged into {node}", user=owner, node=NODE)
        except Exception as e:  # a login goes on whatever this finds
            log.warn("stored storage:bookmarks of {user} left as is: {error}", user=owner, error=e)

"""XEP-0402 PEP Native Bookmarks, with the XEP-0048 view in private XML (``#compat``).

Enabled as ``urn:xmpp:bookmarks:1`` in ``[sm] plugins`` after ``pep`` and
``jabber:iq:private``.  The PEP node ``urn:xmpp:bookmarks:1`` (one item per
room, id = room JID) is the only copy.  A XEP-0048 client reading
``<storage xmlns='storage:bookmarks'/>`` from private XML gets it built from
those items; storing one replaces them: rooms it no longer lists are
retracted, new or changed ones published, each with the usual notification
to the owner's XEP-0402 clients.  ``<url/>`` bookmarks of XEP-0048 have no
XEP-0402 form and are not kept.  The PEP node ``storage:bookmarks``
(XEP-0048 over PEP, ``#compat-pep``) is not converted: that feature is not
announced.
"""
from __future__ import annotations

from twisted.logger import Logger
from twisted.words.xish import domish

from xmppd import jid as jidlib
from xmppd.logfilter import log_observer
from xmppd.plugin import Plugin
from xmppd.stanzas import serialize_fragment
from xmppd.xmlparser import Limits, XMLStreamError, parse_fragment

log = Logger(observer=log_observer)

NS_BOOKMARKS = "urn:xmpp:bookmarks:1"
NS_LEGACY = "storage:bookmarks"
NODE = NS_BOOKMARKS
# XEP-0402 §3.1: what the node must be configured with.
NODE_OPTIONS = {"pubsub#access_model": ["whitelist"], "pubsub#max_items": ["max"],
                "pubsub#persist_items": ["true"], "pubsub#send_last_published_item": ["never"]}
_NO_NS = "\x00"


def _text_of(el: domish.Element, name: str) -> str | None:
    for child in el.elements():
        if child.name == name:
            return "".join(c for c in child.children if isinstance(c, str))
    return None


def _truthy(value: str | None) -> bool:
    return value in ("1", "true")


def to_legacy(room: str, conference: domish.Element) -> domish.Element:
    """A XEP-0048 ``<conference/>`` from a XEP-0402 item."""
    el = domish.Element((NS_LEGACY, "conference"))
    el["jid"] = room
    if conference.getAttribute("name"):
        el["name"] = conference["name"]
    el["autojoin"] = "true" if _truthy(conference.getAttribute("autojoin")) else "false"
    for name in ("nick", "password"):
        text = _text_of(conference, name)
        if text is not None:
            el.addElement(name, content=text)
    return el


def from_legacy(el: domish.Element) -> domish.Element:
    """A XEP-0402 ``<conference/>`` payload from a XEP-0048 one."""
    out = domish.Element((NS_BOOKMARKS, "conference"))
    if el.getAttribute("name"):
        out["name"] = el["name"]
    out["autojoin"] = "true" if _truthy(el.getAttribute("autojoin")) else "false"
    for name in ("nick", "password"):
        text = _text_of(el, name)
        if text is not None:
            out.addElement(name, content=text)
    return out


class BookmarksPlugin(Plugin):
    name = "urn:xmpp:bookmarks:1"
    account_features = (NS_BOOKMARKS + "#compat",)

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

    def _current(self, owner: str) -> dict[str, domish.Element]:
        node = self.pep.pep.nodes(owner).get(NODE)
        if node is None:
            return {}
        out = {}
        for item_id, xml in self.pep.pep.items(owner, node, None, None):
            try:
                out[item_id] = parse_fragment(xml, self.limits)
            except XMLStreamError as e:
                log.warn("bookmark {id} of {user} skipped: {error}", id=item_id, user=owner, error=e)
        return out

    def legacy_get(self, owner: str) -> domish.Element:
        storage = domish.Element((NS_LEGACY, "storage"))
        for room, conference in sorted(self._current(owner).items()):
            storage.addChild(to_legacy(room, conference))
        return storage

    def legacy_set(self, owner: str, storage: domish.Element) -> None:
        wanted: dict[str, str] = {}
        for el in storage.elements(NS_LEGACY, "conference"):
            try:
                room = jidlib.parse(el.getAttribute("jid", "")).bare
            except jidlib.InvalidJID:
                continue
            wanted[room] = serialize_fragment(from_legacy(el), _NO_NS)
        current = {room: serialize_fragment(c, _NO_NS) for room, c in self._current(owner).items()}
        node = self.pep.pep.nodes(owner).get(NODE)
        for room in sorted(set(current) - set(wanted)):
            if node is not None and self.pep.pep.retract(owner, node, room):
                self.pep.notify(owner, node, self.pep._event("items", NODE, retract=room))
        for room, xml in sorted(wanted.items()):
            if current.get(room) != xml:
                self.pep.publish_item(owner, NODE, room, xml, NODE_OPTIONS,
                                      options_are_preconditions=False)

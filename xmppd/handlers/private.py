"""XEP-0049 Private XML Storage (``jabber:iq:private``): a user's own XML, by namespace.

Enabled as ``jabber:iq:private`` in ``[sm] plugins``.  Only the account
itself reads and writes; each top-level child is kept as XML text under
``private/<bare JID>/<namespace> <name>`` and returned as stored (it was
serialised by the server from a parsed tree).  Reading a namespace that
holds nothing returns the empty element asked for (XEP-0049 §2.3).

Limits (``[private]``): ``max_bytes`` per stored element (checked on a walk
of the tree before it is serialised, as for vCards), ``max_entries``
namespaces per account, and at most 16 elements per set.  A set is one
transaction: all its elements are stored or none.

Other plugins may serve a namespace themselves (:attr:`PrivatePlugin.virtual`):
the XEP-0402 ``#compat`` view of bookmarks (:mod:`xmppd.handlers.bookmarks`).
"""
from __future__ import annotations

from typing import Callable

from twisted.internet import defer
from twisted.words.xish import domish

from xmppd.handlers.vcard import TooLarge, check_size
from xmppd.plugin import Plugin, Request
from xmppd.serial import Serial
from xmppd.stanzas import StanzaError, serialize_fragment

NS_PRIVATE = "jabber:iq:private"
STORE = "private"
MAX_PER_SET = 16
_NO_NS = "\x00"


class PrivatePlugin(Plugin):
    name = "jabber:iq:private"
    account_features = (NS_PRIVATE,)

    def setup(self) -> None:
        sec = self.server.config.section("private")
        self.max_bytes = sec.int("max_bytes", 65536, minimum=1024)
        self.max_entries = sec.int("max_entries", 100, minimum=1)
        sec.reject_unknown()
        # (namespace, name) -> (get(owner) -> Element or a Deferred of one,
        #                      set(owner, Element) -> None or a Deferred)
        self.virtual: dict[tuple[str, str], tuple[Callable, Callable]] = {}
        self.serial = Serial()  # one owner's sets one after another (count, then write)
        self.handle_iq("get", NS_PRIVATE, "query", self.on_get)
        self.handle_iq("set", NS_PRIVATE, "query", self.on_set)

    @staticmethod
    def _children(request: Request) -> list[domish.Element]:
        if request.to is not None:
            raise StanzaError("forbidden", text="private storage is your own")
        children = list(request.payload.elements())
        for child in children:
            if not child.uri or child.uri in ("jabber:client", "jabber:server", NS_PRIVATE):
                raise StanzaError("not-acceptable", text="reserved namespace")
        return children

    def on_get(self, request: Request):
        children = self._children(request)
        if len(children) != 1:
            raise StanzaError("bad-request", text="exactly one element per get")
        child = children[0]
        owner = request.sender.bare
        query = domish.Element((NS_PRIVATE, "query"))
        virtual = self.virtual.get((child.uri, child.name))
        if virtual is not None:
            # In the owner's queue: a get sees every set that came before it.
            def served(el: domish.Element) -> domish.Element:
                query.addChild(el)
                return query

            return self.serial.run(owner, virtual[0], owner).addCallback(served)
        def answer(stored: str | None) -> domish.Element:
            if stored is None:
                query.addElement((child.uri, child.name))
            else:
                query.addRawXml(stored)
            return query

        return self.store.get(STORE, owner, f"{child.uri} {child.name}").addCallback(answer)

    def on_set(self, request: Request):
        children = self._children(request)
        if not children or len(children) > MAX_PER_SET:
            raise StanzaError("not-acceptable", text=f"1 to {MAX_PER_SET} elements per set")
        owner = request.sender.bare
        puts, virtual = [], []
        for child in children:
            handler = self.virtual.get((child.uri, child.name))
            if handler is not None:
                virtual.append((handler[1], child))
                continue
            try:
                check_size(child, self.max_bytes, self.max_bytes // 16)
            except TooLarge as e:
                raise StanzaError("not-acceptable", text=str(e).replace("vCard", "element"),
                                  echo=False) from None
            xml = serialize_fragment(child, _NO_NS)
            if len(xml.encode("utf-8")) > self.max_bytes:
                raise StanzaError("not-acceptable", text=f"element larger than {self.max_bytes} bytes",
                                  echo=False)
            puts.append((STORE, owner, f"{child.uri} {child.name}", xml))
        return self.serial.run(owner, self._store, owner, puts, virtual)

    @defer.inlineCallbacks
    def _store(self, owner: str, puts: list, virtual: list):
        if puts:
            existing = {k for k, _ in (yield self.store.items(STORE, owner))}
            if len(existing | {p[2] for p in puts}) > self.max_entries and \
                    any(p[2] not in existing for p in puts):
                raise StanzaError("resource-constraint", "cancel",
                                  text=f"at most {self.max_entries} private namespaces")
            yield self.store.batch(puts=puts)
        for apply, child in virtual:
            yield apply(owner, child)  # None or a Deferred
        return None

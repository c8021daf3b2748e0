"""XEP-0030 Service Discovery for the server and for accounts.

Features are collected from the enabled plugins at start-up, so turning a
plugin off removes its feature.  Other plugins (ad-hoc commands) add nodes
through :meth:`DiscoPlugin.add_node`; a node provider may hide entries from a
requester (ACLs), which is why providers get the request.
"""
from __future__ import annotations

from typing import Callable

from twisted.internet import defer

from xmppd.plugin import Plugin, Request
from xmppd.stanzas import StanzaError
from xmppd.wokkel_compat import disco

NS_INFO = "http://jabber.org/protocol/disco#info"
NS_ITEMS = "http://jabber.org/protocol/disco#items"


class DiscoPlugin(Plugin):
    name = "disco"
    features = (NS_INFO, NS_ITEMS)
    account_features = (NS_INFO, NS_ITEMS)

    def setup(self) -> None:
        self.handle_iq("get", NS_INFO, "query", self.on_info)
        self.handle_iq("get", NS_ITEMS, "query", self.on_items)
        # node -> (info(request) -> DiscoInfo|None, items(request) -> list[DiscoItem])
        self.nodes: dict[str, tuple[Callable, Callable]] = {}
        self.server_items: list[Callable[[Request], list]] = []
        # Items of an account (PEP nodes): (request, owner bare) -> [DiscoItem]
        self.account_items: list[Callable[[Request, str], list | defer.Deferred]] = []
        self._server_info = None
        self._account_info = None

    def add_node(self, node: str, info: Callable, items: Callable) -> None:
        self.nodes[node] = (info, items)

    def _build(self) -> None:
        """Built on first use, once every plugin has attached."""
        info = disco.DiscoInfo()
        info.append(disco.DiscoIdentity("server", "im", "xmppd"))
        for p in self.server.plugins:
            for category, type_, name in p.identities:
                info.append(disco.DiscoIdentity(category, type_, name))
        for feature in sorted(set(self.server.disco_features())):
            info.append(disco.DiscoFeature(feature))
        self._server_info = info.toElement()
        account = disco.DiscoInfo()
        account.append(disco.DiscoIdentity("account", "registered"))
        for p in self.server.plugins:
            for category, type_, name in getattr(p, "account_identities", ()):
                account.append(disco.DiscoIdentity(category, type_, name))
        feats = {f for p in self.server.plugins for f in p.account_features}
        for feature in sorted(feats):
            account.append(disco.DiscoFeature(feature))
        self._account_info = account.toElement()

    def _target_is_account(self, request: Request) -> bool:
        to = request.to
        if to is None:
            return True
        if to.user is None:
            return False
        return True

    def on_info(self, request: Request):
        if self._server_info is None:
            self._build()
        node = request.payload.getAttribute("node")
        if node:
            provider = self.nodes.get(node)
            info = provider[0](request) if provider and request.to is not None and request.to.user is None else None
            if info is None:
                raise StanzaError("item-not-found")
            return info.toElement()
        if self._target_is_account(request):
            return self._account_info
        return self._server_info

    def on_items(self, request: Request):
        node = request.payload.getAttribute("node")
        items = disco.DiscoItems()
        if self._target_is_account(request):
            if node:
                raise StanzaError("item-not-found")
            owner = request.sender.bare if request.to is None else request.to.bare
            # A source returns a list or a Deferred of one (PEP reads the store).
            found = [defer.maybeDeferred(source, request, owner) for source in self.account_items]

            def answer(lists: list):
                for listed in lists:
                    for item in listed:
                        items.append(item)
                return items.toElement()

            return defer.gatherResults(found, consumeErrors=True).addCallbacks(
                answer, lambda f: f.value.subFailure if f.check(defer.FirstError) else f)
        if node:
            provider = self.nodes.get(node)
            if provider is None:
                raise StanzaError("item-not-found")
            items.nodeIdentifier = node
            for item in provider[1](request):
                items.append(item)
        else:
            for source in self.server_items:
                for item in source(request):
                    items.append(item)
        return items.toElement()

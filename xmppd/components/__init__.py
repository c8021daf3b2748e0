"""Components: other domains served through this server, and wokkel handlers on its own.

``[components."<domain>"]`` tables (:mod:`xmppd.components.settings`) make
three kinds of thing, all routed by the router like a local domain (its
``components`` dict, consulted before the remote case):

* in process (``handlers = [...]``): wokkel ``XMPPHandler`` objects in a
  :class:`~xmppd.components.internal.HandlerCollection`;
* external (``secret`` / ``secret_file``): an XEP-0114 stream accepted on
  ``[components] listen`` (:mod:`xmppd.components.external`);
* handlers added to a served host (the table's name is in ``server.hosts``):
  they get the IQs to the bare host that no xmppd plugin claims, and their
  disco#info features appear in the server's.

Traffic between users and components passes the filter chain both ways
(blocking, domain filter), because components send through
:meth:`Router.deliver` and users reach them through it.

``public = false`` is stored on the route (``route.public``) for s2s
(:meth:`xmppd.s2s.service.S2SService.federates`): other servers cannot open
streams to such a component, and what it sends to them bounces; the
server's disco#items hides it from requesters that are not on a served host
or a component domain.  Public components federate from their own domain.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from xmppd.components import settings as component_settings
from xmppd.components.external import ComponentFactory, ExternalRoute
from xmppd.components.internal import HandlerCollection
from xmppd.logfilter import log_observer

if TYPE_CHECKING:
    from xmppd.core import Server
    from xmppd.plugin import Request

log = Logger(observer=log_observer)


class Components:
    """Every component of the running server, built with it."""

    def __init__(self, server: "Server") -> None:
        self.server = server
        self.path = server.config.path
        self.settings = component_settings.read(server.config)
        self.collections: dict[str, HandlerCollection] = {}
        self.external: dict[str, ExternalRoute] = {}
        router = server.router
        for c in self.settings.components.values():
            if c.external:
                route = self.external[c.domain] = ExternalRoute(c)
                router.components[c.domain] = route
            else:
                collection = HandlerCollection(c, router, server.clock)
                collection.load(self.path)
                self.collections[c.domain] = collection
                router.components[c.domain] = collection.route
        disco = server.plugin("disco")
        if disco is not None and any(not c.served for c in self.settings.components.values()):
            disco.server_items.append(self._disco_items)

    def start(self) -> None:
        """Connect the in-process handlers (ConfigError naming the key of one that fails)."""
        for collection in self.collections.values():
            collection.start(self.path)

    def stop(self) -> None:
        for collection in self.collections.values():
            collection.stop()
        for route in self.external.values():
            if route.stream is not None:
                route.stream.stream_error("system-shutdown")

    def listeners(self) -> list[tuple[str, str, Any]]:
        """``("components.listen", endpoint, factory)``; none without an external component."""
        if not self.external:
            return []
        factory = ComponentFactory(self.server, self.external)
        return [("components.listen", desc, factory) for desc in self.settings.listen]

    def server_features(self) -> list[str]:
        """disco#info features of handlers added to served hosts."""
        out = []
        for collection in self.collections.values():
            if collection.served:
                out.extend(str(f) for f in collection.disco_info() if isinstance(f, str))
        return out

    def _disco_items(self, request: "Request") -> list:
        """The server's disco#items: component domains, named as in the config."""
        from twisted.words.protocols.jabber.jid import internJID

        from xmppd.wokkel_compat import disco

        requester = request.sender.host
        local = requester in self.server.router.hosts or requester in self.settings.components
        items = []
        for c in self.settings.components.values():
            if c.served or not (c.public or local):
                continue
            items.append(disco.DiscoItem(internJID(c.domain), name=c.name))
        return items

"""One cluster node: the Redis link, the bus and the registry wired into the server.

Built only when ``[cluster] redis`` is set (:func:`attach`); the hooks it
adds are ordinary ones (``Router.on_bound``/``on_closed``, the presence
plugin's ``on_broadcast``, wrappers around the roster and blocking plugins'
change paths, ``Server.login_gate``), so a stand-alone node runs none of
this code.

Filters run on the sending node, as for local delivery: the blocking
filter reads the recipient's blocklist from the shared store (held in
memory while the user has a session on any node, and dropped on every node
by an invalidation when it changes), so the recipient's node need not
check again.
"""
from __future__ import annotations

from twisted.logger import Logger

from xmppd.cluster.bus import ALL, Bus, node_channel
from xmppd.cluster.link import RedisLink
from xmppd.cluster.registry import Registry
from xmppd.cluster.settings import ClusterConfig
from xmppd.logfilter import log_observer
from xmppd.xmlparser import Limits

log = Logger(observer=log_observer)


class ClusterNode:
    def __init__(self, server, settings: ClusterConfig) -> None:
        self.server = server
        self.settings = settings
        self.name = settings.node
        c2s = server.config.c2s
        limits = Limits(c2s.max_stanza_size, c2s.max_depth, c2s.max_stanza_nodes).for_stored(4096)
        self.link = RedisLink(
            server.clock, settings.host, settings.port, settings.db, settings.password,
            [node_channel(self.name), ALL], None, self._up, self._down,
            retry=min(settings.heartbeat, 1.0),
            # a stanza, its JSON header, and a registry record's presence
            max_message=c2s.max_stanza_size + 65536)
        self.bus = Bus(self.name, self.link, server.router, limits, self._event)
        # Pushes go straight to the bus (no call in between: every stanza for
        # this node takes this path).
        self.link.on_message = self.bus.received
        self.registry = Registry(self.name, self.link, self.bus, server, settings.heartbeat,
                                 settings.expiry, limits)
        router = server.router
        router.on_bound.append(self.registry.bound)
        router.on_closed.append(self.registry.closed)
        presence = server.plugin("presence")
        if presence is not None:
            presence.on_broadcast.append(
                lambda s, _stanza, kind: self.registry.changed(s, kind != "unavailable"))
            presence.on_directed.append(lambda s, _stanza, _kind: self.registry.directed(s))
        self._wrap_invalidations()
        server.login_gate = self._login_gate

    # -- life cycle ----------------------------------------------------------

    def start(self) -> None:
        log.info("cluster: node {node}, Redis at {where}", node=self.name, where=self.link.where)
        self.link.start()
        self.registry.start()

    def stop(self):
        self.registry.stop()
        d = self.registry.leave()
        d.addBoth(lambda _: self.link.stop())
        return d

    def _up(self) -> None:
        self.registry.sync().addErrback(
            lambda f: log.warn("cluster: resync failed: {e}", e=f.getErrorMessage()))

    def _down(self) -> None:
        pass  # the link logged it; routing to remote sessions falls back per stanza

    def _login_gate(self) -> str | None:
        """Why a login must be refused now (SASL temporary-auth-failure), or None."""
        if self.link.up:
            return None
        return "the cluster registry (Redis) is unreachable; try again shortly"

    # -- the bus ---------------------------------------------------------------

    def _event(self, header: dict) -> None:
        kind = header["k"]
        node = header.get("n")
        registry = self.registry
        if kind == "b":
            import json

            registry.upsert(node, header["jid"], json.loads(header["r"]))
        elif kind == "u":
            registry.remove(node, header["jid"], header.get("t"))
        elif kind == "x":
            self._close_local(header)
        elif kind == "h":
            if node != self.name:
                registry.load(node).addErrback(lambda f: None)
        elif kind == "d":
            gone = header.get("node")
            if gone == self.name:
                log.warn("cluster: another node took us for dead: registering again")
                self._up()
            else:
                registry.node_gone(gone, announce=False)
        elif kind == "i":
            self._invalidate(header.get("what"), header.get("user"))

    def _close_local(self, header: dict) -> None:
        from xmppd import jid as jidlib

        try:
            to = jidlib.parse(header["to"])
        except (jidlib.InvalidJID, KeyError, TypeError):
            return
        target = self.server.router.sessions.get(to.bare, {}).get(to.resource)
        if target is None or getattr(target, "remote", False):
            return
        if header.get("t") is not None and getattr(target, "bound_at", None) != header["t"]:
            return  # a newer session of the same JID: not the one meant
        condition = header.get("cond")
        if condition not in ("conflict", "policy-violation", "reset"):
            return
        log.info("cluster: closing {jid} for node request ({cond})", jid=to.full, cond=condition)
        target.stream_error(condition, str(header.get("text", ""))[:1000])

    # -- cache invalidations ------------------------------------------------

    def _wrap_invalidations(self) -> None:
        """Roster and blocklist changes drop the other nodes' cached copies."""
        roster = self.server.plugin("roster")
        if roster is not None:
            push = roster.push

            def roster_push(owner, contact, item, version):
                self.bus.event({"k": "i", "what": "roster", "user": owner})
                push(owner, contact, item, version)

            roster.push = roster_push
        blocking = self.server.plugin("urn:xmpp:blocking")
        if blocking is not None:
            update = blocking._update

            def blocking_update(bare, items):
                self.bus.event({"k": "i", "what": "blocklist", "user": bare})
                update(bare, items)

            blocking._update = blocking_update

    def _invalidate(self, what, user) -> None:
        if not isinstance(user, str):
            return
        if what == "roster":
            plugin = self.server.plugin("roster")
            if plugin is not None:
                plugin.rosters.reload(user)
        elif what == "blocklist":
            plugin = self.server.plugin("urn:xmpp:blocking")
            if plugin is not None:
                plugin.reload(user)

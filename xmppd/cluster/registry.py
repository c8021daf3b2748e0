"""The cluster-wide session registry and the local cache of it.

In Redis (keys under ``xmppd:``):

* ``nodes``: the set of node names;
* ``alive:<node>``: exists while the node lives (TTL ``expiry``, refreshed
  every ``heartbeat``);
* ``s:<node>``: hash, full JID -> JSON record of one bound session
  (priority, availability, bind time, replicated flags, last presence),
  same TTL;
* ``reap:<node>``: the lock (SET NX) that makes one survivor, not all, act
  for a dead node.

Every node keeps the other nodes' sessions as :class:`RemoteSession` objects
in ``Router.sessions``; bus events (``b`` bound/changed, ``u`` unbound,
``d`` node gone, ``h`` node (re)registered) keep that cache current, and a
full reload from Redis follows every (re)connection.  The choice: routing
reads only memory (no Redis round trip per stanza); the price is that a
change reaches other nodes one pub/sub hop later (sub-millisecond on a
LAN).  A stanza routed on a stale entry is not lost: PUBLISH says nobody
took it, or the receiving node finds no session, and it takes the offline
path (:mod:`xmppd.cluster.bus`).
"""
from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from xmppd import jid as jidlib
from xmppd.cluster.bus import PREFIX
from xmppd.cluster.remote import FLAGS, RemoteSession, WatchedState
from xmppd.logfilter import log_observer
from xmppd.stanzas import serialize

log = Logger(observer=log_observer)

NODES = PREFIX + "nodes"


def alive_key(node: str) -> str:
    return f"{PREFIX}alive:{node}"


def sessions_key(node: str) -> str:
    return f"{PREFIX}s:{node}"


#: At most this many characters of directed-presence targets go in a record
#: (a client may send directed presence to any number of JIDs; the record
#: travels on the bus at every change and must stay far below its bound).
DIRECTED_CHARS = 16384
#: Where a local session's state keeps the directed targets last published.
PUBLISHED_DIRECTED = "cluster_directed"


def directed_targets(session) -> list[str]:
    """The JIDs the session sent directed presence to, as far as a record holds them."""
    out, size = [], 0
    for target in sorted(session.state.get("directed", ())):
        size += len(target) + 3
        if size > DIRECTED_CHARS:
            break
        out.append(target)
    return out


def record(session, directed: bool = True) -> str:
    """The registry record of a local session (JSON).

    ``d``: its directed-presence targets, so that the survivor announcing a
    dead node's sessions sends them unavailable too (``directed`` False: the
    session is sending them unavailable itself right now)."""
    last = session.state.get("last_presence")
    rec = {
        "p": session.priority, "a": bool(session.available),
        "t": getattr(session, "bound_at", 0.0), "ad": getattr(session, "peer", ""),
        "f": "".join(letter for key, letter in FLAGS.items() if session.state.get(key)),
        "pr": serialize(last).decode("utf-8") if last is not None else None,
    }
    targets = directed_targets(session) if directed else []
    if targets:
        rec["d"] = targets
    return json.dumps(rec, separators=(",", ":"))


class Registry:
    def __init__(self, node: str, link, bus, server, heartbeat: float, expiry: float,
                 limits) -> None:
        self.node = node
        self.link = link
        self.bus = bus
        self.server = server
        self.router = server.router
        self.heartbeat = heartbeat
        self.expiry_ms = int(expiry * 1000)
        self.limits = limits
        self.remote: dict[str, dict[str, RemoteSession]] = {}  # node -> full JID -> proxy
        self.presence = server.plugin("presence")
        self.carbons = server.plugin("urn:xmpp:carbons:2")
        self.rosters = server.plugin("roster")
        self.blocking = server.plugin("urn:xmpp:blocking")
        self._beat = task.LoopingCall(self._heartbeat)
        self._beat.clock = server.clock

    def start(self) -> None:
        self._beat.start(self.heartbeat, now=False)

    def stop(self) -> None:
        if self._beat.running:
            self._beat.stop()

    # -- local sessions ----------------------------------------------------

    def local_sessions(self):
        for resources in self.router.sessions.values():
            for s in resources.values():
                if not getattr(s, "remote", False):
                    yield s

    def bound(self, session) -> None:
        if getattr(session, "remote", False):
            return
        for proxies in self.remote.values():  # a remote session it replaced (a conflict)
            old = proxies.pop(session.jid.full, None)
            if old is not None:
                self._carbons(old, False)
        if not isinstance(session.state, WatchedState):
            session.state = WatchedState(session.state, lambda: self.changed(session))
        self.changed(session)

    def changed(self, session, directed: bool = True) -> None:
        """Publish a local session's new record (bind, presence, flags, directed presence).

        ``directed`` False: after its unavailable broadcast, the session's
        directed presences are being ended by the presence plugin itself."""
        if getattr(session, "remote", False) or not self.link.up:
            return
        current = self.router.sessions.get(session.jid.bare, {}).get(session.jid.resource)
        if current is not session:
            return
        session.state[PUBLISHED_DIRECTED] = (
            frozenset(session.state.get("directed", ())) if directed else frozenset())
        rec = record(session, directed)
        self.link.command("HSET", sessions_key(self.node), session.jid.full, rec).addErrback(
            lambda f: None)
        self.bus.event({"k": "b", "jid": session.jid.full, "r": rec})

    def directed(self, session) -> None:
        """After a directed presence: republish if the set of targets changed."""
        targets = frozenset(session.state.get("directed", ()))
        if targets != session.state.get(PUBLISHED_DIRECTED, frozenset()):
            self.changed(session)

    def closed(self, session) -> None:
        if getattr(session, "remote", False) or not self.link.up:
            return
        self.link.command("HDEL", sessions_key(self.node), session.jid.full).addErrback(
            lambda f: None)
        self.bus.event({"k": "u", "jid": session.jid.full, "t": getattr(session, "bound_at", 0)})

    # -- the cache of other nodes' sessions ------------------------------

    def upsert(self, node: str, full: str, rec: dict) -> None:
        try:
            jid = jidlib.parse(full)
        except jidlib.InvalidJID:
            return
        if jid.resource is None or jid.host not in self.router.hosts:
            return
        resources = self.router.sessions.setdefault(jid.bare, {})
        current = resources.get(jid.resource)
        t = float(rec.get("t", 0))
        if current is not None and not getattr(current, "remote", False):
            # The same full JID here: the newer session wins (ties: node name).
            if (getattr(current, "bound_at", 0), self.node) > (t, node):
                return  # ours is newer: the other node closes its own on our event
            log.info("cluster: {jid} bound again on node {node}: closing ours", jid=full, node=node)
            self.router.unbind(current)  # before the close: no unregistering of theirs
            current.stream_error("conflict", "replaced by a new session")
            current = None
        if current is None or getattr(current, "node", None) != node:
            if current is not None:
                self._drop(current)
            current = RemoteSession(self.bus, node, jid, t)
            current.state["sent_presence"] = False
            resources[jid.resource] = current
            self.remote.setdefault(node, {})[full] = current
        self._apply(current, rec)

    def _apply(self, proxy: RemoteSession, rec: dict) -> None:
        proxy.bound_at = float(rec.get("t", proxy.bound_at))
        proxy.priority = int(rec.get("p", 0))
        proxy.available = bool(rec.get("a"))
        proxy.address = str(rec.get("ad", ""))
        flags = rec.get("f", "")
        for key, letter in FLAGS.items():
            if key == "carbons":
                self._carbons(proxy, letter in flags)
            elif letter in flags:
                proxy.state[key] = True
            else:
                proxy.state.pop(key, None)
        targets = rec.get("d")
        proxy.state["directed"] = ({t for t in targets if isinstance(t, str)}
                                   if isinstance(targets, list) else set())
        presence = rec.get("pr")
        if presence:
            from xmppd.xmlparser import XMLStreamError, parse_fragment

            try:
                proxy.state["last_presence"] = parse_fragment(presence, self.limits)
                proxy.state["sent_presence"] = True
            except XMLStreamError:
                proxy.state.pop("last_presence", None)
        else:
            proxy.state.pop("last_presence", None)
            proxy.state["sent_presence"] = False

    def _carbons(self, proxy: RemoteSession, on: bool) -> None:
        if self.carbons is None or bool(proxy.state.get("carbons")) == on:
            return
        if on:
            proxy.state["carbons"] = True
            bare = proxy.jid.bare
            self.carbons.users[bare] = self.carbons.users.get(bare, 0) + 1
        else:
            self.carbons._drop(proxy)

    def remove(self, node: str, full: str, bound_at: float | None = None) -> RemoteSession | None:
        proxy = self.remote.get(node, {}).get(full)
        if proxy is None or (bound_at is not None and proxy.bound_at != bound_at):
            return None
        self._drop(proxy)
        return proxy

    def _drop(self, proxy: RemoteSession) -> None:
        nodes = self.remote.get(proxy.node)
        if nodes is not None:
            nodes.pop(proxy.jid.full, None)
            if not nodes:
                del self.remote[proxy.node]
        bare = proxy.jid.bare
        resources = self.router.sessions.get(bare)
        if resources is not None and resources.get(proxy.jid.resource) is proxy:
            del resources[proxy.jid.resource]
            if not resources:
                del self.router.sessions[bare]
                # What the plugins drop when a user's last local session ends.
                if self.rosters is not None:
                    self.rosters.rosters.unpin(bare)
                if self.blocking is not None:
                    self.blocking.lists.pop(bare, None)
        self._carbons(proxy, False)

    def node_gone(self, node: str, announce: bool) -> None:
        """Forget ``node``'s sessions; ``announce``: tell their contacts (one node does)."""
        proxies = list(self.remote.get(node, {}).values())
        for proxy in proxies:
            self._drop(proxy)
        if not announce or self.presence is None:
            return
        from xmppd.handlers.presence import presence as make_presence

        for proxy in proxies:
            # What the presence plugin does for a session that closed
            # without unavailable presence: its contacts and its directed
            # presences' targets (both in the broadcast), or the latter alone.
            if proxy.available and proxy.state.get("sent_presence"):
                unavailable = make_presence("unavailable", proxy.jid.full, proxy.jid.bare)
                del unavailable["to"]
                proxy.available = False
                self.presence._broadcast(unavailable, proxy, "unavailable")
            elif proxy.state.get("directed"):
                self.presence._unavailable_to_directed(proxy)
        if proxies:
            log.info("cluster: node {node} gone; {n} sessions reported unavailable",
                     node=node, n=len(proxies))

    # -- Redis: (re)registration, snapshot, heartbeat, reaping -----------

    @defer.inlineCallbacks
    def sync(self):
        """After a (re)connection: write our sessions, reload everyone else's."""
        cmd = self.link.command
        key = sessions_key(self.node)
        fields: list[Any] = []
        for s in self.local_sessions():
            fields += [s.jid.full, record(s)]
        yield cmd("DEL", key)
        if fields:
            yield cmd("HSET", key, *fields)
        yield self._refresh()
        self.bus.event({"k": "h"})
        nodes = yield cmd("SMEMBERS", NODES)
        for node in set(nodes) | set(self.remote):
            if node != self.node:
                yield self.load(node)

    @defer.inlineCallbacks
    def load(self, node: str):
        """Replace the cache of ``node``'s sessions with what Redis holds."""
        entries = yield self.link.command("HGETALL", sessions_key(node))
        entries = entries or {}
        for full in [f for f in self.remote.get(node, {}) if f not in entries]:
            self.remove(node, full)
        for full, raw in entries.items():
            try:
                self.upsert(node, full, json.loads(raw))
            except (ValueError, TypeError):
                continue

    def _refresh(self) -> defer.Deferred:
        cmd = self.link.command
        return defer.gatherResults([
            cmd("SET", alive_key(self.node), "1", "PX", self.expiry_ms),
            cmd("PEXPIRE", sessions_key(self.node), self.expiry_ms),
            cmd("SADD", NODES, self.node),
        ], consumeErrors=True)

    @defer.inlineCallbacks
    def _heartbeat(self):
        if not self.link.up:
            return
        try:
            yield self._refresh()
            nodes = yield self.link.command("SMEMBERS", NODES)
            for node in set(nodes) | set(self.remote):
                if node == self.node:
                    continue
                alive = yield self.link.command("EXISTS", alive_key(node))
                if not alive:
                    yield self._reap(node)
        except Exception:
            pass  # the link reports outages; the next beat tries again

    @defer.inlineCallbacks
    def _reap(self, node: str):
        won = yield self.link.command("SET", f"{PREFIX}reap:{node}", self.node, "NX",
                                      "PX", self.expiry_ms)
        if not won:
            self.node_gone(node, announce=False)
            return
        log.warn("cluster: node {node} missed its heartbeat: taking over its departure",
                 node=node)
        self.node_gone(node, announce=True)
        yield self.link.command("SREM", NODES, node)
        yield self.link.command("DEL", sessions_key(node))
        self.bus.event({"k": "d", "node": node})

    @defer.inlineCallbacks
    def leave(self):
        """Clean stop: the survivors announce what our closing sessions did not."""
        if not self.link.up:
            return
        try:
            # The survivors' next heartbeat finds us gone and announces
            # whatever our closing sessions did not.
            yield self.link.command("DEL", alive_key(self.node))
        except Exception:
            pass

"""Sessions bound on other nodes, as the router sees them.

A :class:`RemoteSession` sits in ``Router.sessions`` next to local streams,
so every existing rule (bare-JID routing by priority and availability,
presence to all resources, carbons, roster and blocking pushes) treats it
like a local one with no change to the router or the plugins: its
``send``/``send_bytes`` publish the serialised stanza to the owning node's
channel instead of writing to a socket.  Its attributes come from the
registry record (:mod:`xmppd.cluster.registry`), kept current by bus
events, so choosing it costs no Redis round trip.

:class:`WatchedState` replaces a *local* session's ``state`` dict when
clustering is on, so that the few state keys other nodes need to see
(carbons on, roster/blocklist asked for) are republished when a plugin
sets them; a node without ``[cluster]`` never uses it.
"""
from __future__ import annotations

from typing import Any, Callable

from twisted.words.xish import domish

from xmppd.jid import JID
from xmppd.stanzas import serialize

#: Session-state keys replicated to other nodes, by record flag letter.
FLAGS = {"carbons": "c", "roster_requested": "r", "blocklist_interested": "b"}


class WatchedState(dict):
    """A session's plugin state that calls ``changed`` when a replicated key changes."""

    __slots__ = ("changed",)

    def __init__(self, initial: dict, changed: Callable[[], None]) -> None:
        super().__init__(initial)
        self.changed = changed

    def __setitem__(self, key: str, value: Any) -> None:
        notify = key in FLAGS and bool(self.get(key)) != bool(value)
        super().__setitem__(key, value)
        if notify:
            self.changed()

    def pop(self, key: str, *default: Any) -> Any:
        notify = key in FLAGS and bool(self.get(key))
        value = super().pop(key, *default)
        if notify:
            self.changed()
        return value


class RemoteSession:
    """A session bound on node ``node``; stanzas to it go over the bus."""

    remote = True
    writable = True

    def __init__(self, bus, node: str, jid: JID, bound_at: float) -> None:
        self.bus = bus
        self.node = node
        self.jid = jid
        self.bound_at = bound_at
        self.priority = 0
        self.available = False
        self.address = ""
        self.state: dict = {}
        # What every stanza to it is published with, made once (Bus.heads).
        self.bus_head, self.bus_prefix = bus.heads(node, jid.full)

    @property
    def peer(self) -> str:
        return f"{self.address} on node {self.node}"

    def send(self, element: domish.Element) -> None:
        self.bus.to_session(self, serialize(element))

    def send_bytes(self, data: bytes) -> None:
        self.bus.to_session(self, data)

    def when_drained(self, callback: Callable[[], None]) -> None:
        callback()

    def stream_error(self, condition: str, text: str = "") -> None:
        """Close the real session on its node (a conflict, an admin kick)."""
        self.bus.close_session(self, condition, text)

    def describe(self) -> dict:
        """A row of ``xmppctl sessions``."""
        return {"jid": self.jid.full, "address": self.address, "port": None,
                "since": self.bound_at, "tls": None, "available": self.available,
                "priority": self.priority, "node": self.node}

"""TCP listeners bound with ``SO_REUSEPORT`` (``[c2s] reuse_port``).

Twisted's TCP endpoints (26.10) have no option for it: ``tcp:`` creates,
binds and listens its socket itself with ``SO_REUSEADDR`` only.  So the
socket is made here, the way Twisted's ``Port`` makes it plus
``SO_REUSEPORT``, bound, put in the listening state, and handed to the
reactor with ``adoptStreamPort`` (``IReactorSocket``, every POSIX reactor);
the reactor duplicates the descriptor, and ours is closed.  From then on
it is an ordinary Twisted listening port.

Why: several xmppd nodes on one machine (docs/cluster.rst) can then all
listen on 5222, and the kernel spreads new connections over them (by a
hash of the connection's addresses).  Linux accepts a second bind of the
port only from a socket that also sets ``SO_REUSEPORT`` *and* belongs to
the same effective user, so another user's process cannot take a share of
the connections.  Only TCP endpoints (``tcp:``/``tcp6:``) can be shared;
:func:`check` says so at start-up for anything else.
"""
from __future__ import annotations

import socket
from typing import Any

from twisted.internet import endpoints
from twisted.internet.interfaces import IListeningPort


def supported() -> bool:
    return hasattr(socket, "SO_REUSEPORT")


def check(reactor: Any, description: str) -> str | None:
    """Why ``description`` cannot be bound with SO_REUSEPORT, or None."""
    if not supported():
        return "SO_REUSEPORT is not available on this system"
    endpoint = endpoints.serverFromString(reactor, description)
    if not isinstance(endpoint, (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint)):
        return "reuse_port needs tcp: or tcp6: listeners"
    return None


def listen(reactor: Any, description: str, factory) -> IListeningPort:
    """Listen on the TCP endpoint ``description`` with SO_REUSEPORT (raises OSError)."""
    endpoint = endpoints.serverFromString(reactor, description)
    family = (socket.AF_INET6 if isinstance(endpoint, endpoints.TCP6ServerEndpoint)
              else socket.AF_INET)
    interface = endpoint._interface or ("::" if family == socket.AF_INET6 else "")
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, endpoint._port))
        sock.listen(endpoint._backlog)
        sock.setblocking(False)
        return reactor.adoptStreamPort(sock.fileno(), family, factory)
    finally:
        sock.close()  # the reactor holds its own duplicate

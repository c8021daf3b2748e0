"""Bind every client listener before the server counts as started.

``twistd`` runs ``makeService`` before it starts logging and before it
daemonizes, and exits 1 on the ``SystemExit`` raised there.  Binding the
listeners at that point, rather than in ``startService`` once the reactor
runs, turns a port that is taken (or invalid, or forbidden) into the same
one-line, non-zero exit as a config error, naming the key and the endpoint,
so that ``systemctl status`` shows the reason and ``Restart=on-failure``
fires.  A server that runs without one of its listeners is never started.
"""
from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.python.failure import Failure

from xmppd.config import ConfigError


def _reason(failure: Failure) -> str:
    err = failure.value
    if isinstance(err, CannotListenError) and err.socketError is not None:
        err = err.socketError
    if isinstance(err, OSError) and err.errno:
        text = os.strerror(err.errno)
    else:
        text = str(err).strip().rstrip(".") or type(err).__name__
    return text[:1].lower() + text[1:]


def listen_all(reactor: Any, path: str, listeners: list[tuple[str, str, Any]],
               reuse_port: bool = False) -> list[IListeningPort]:
    """Listen on each ``(config key, endpoint string, factory)``; all or none.

    ``reuse_port`` (``[c2s] reuse_port``): the c2s listeners are bound with
    SO_REUSEPORT (:mod:`xmppd.reuseport`).  Raises :class:`ConfigError`
    naming the first listener that cannot bind, after closing the ones
    already bound.
    """
    ports: list[IListeningPort] = []
    for key, description, factory in listeners:
        outcome: list = []
        if reuse_port and key.startswith("c2s."):
            from xmppd import reuseport

            d = defer.maybeDeferred(reuseport.listen, reactor, description, factory)
        else:
            d = endpoints.serverFromString(reactor, description).listen(factory)
        d.addBoth(outcome.append)
        problem = None
        if not outcome:
            # Endpoints of third-party plugins may bind later; a listener we
            # cannot confirm now could fail after "serving" and READY=1.
            d.cancel()
            d.addErrback(lambda _: None)
            problem = "cannot listen: this endpoint type does not bind at start-up"
        elif isinstance(outcome[0], Failure):
            problem = f"cannot listen: {_reason(outcome[0])}"
        if problem is not None:
            for port in ports:
                port.stopListening()
            raise ConfigError(path, key, description, problem)
        ports.append(outcome[0])
    return ports


def listeners(server) -> list[tuple[str, str, Any]]:
    """``(config key, endpoint string, factory)`` of every listener, not bound.

    ``xmppd.tap.build`` binds them; ``xmppctl check`` and a reload's
    validation only build them (the direct-TLS factory needs the
    certificates), so they refuse what start-up refuses short of a port that
    is taken.
    """
    from xmppd.c2s import C2SFactory

    config = server.config
    starttls = C2SFactory(server, direct_tls=False)
    out = [("c2s.listen", desc, starttls) for desc in config.c2s.listen]
    if config.c2s.listen_tls:
        direct = server.certs.direct_tls_factory(C2SFactory(server, direct_tls=True))
        out += [("c2s.listen_tls", desc, direct) for desc in config.c2s.listen_tls]
    if server.s2s is not None:
        out += server.s2s.listeners()  # [s2s] listen / listen_tls
    out += server.components.listeners()  # XEP-0114, when external components are configured
    if server.metrics is not None:  # [metrics] listen
        from xmppd import metrics

        out.append(("metrics.listen", server.metrics.listen, metrics.site(server)))
    return out

"""``twistd xmppd``: options and the service tree.

``makeService`` validates the whole config before anything listens; a bad
config prints one line (file, key, value, what is allowed) and exits 1, so
systemd shows the reason in ``systemctl status``.
"""
from __future__ import annotations

import os
import signal
import sys

from twisted.application import service
from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.python import usage

from xmppd.config import ConfigError, load

log = Logger()


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Run the xmppd XMPP server. Without --config it serves the virtual host "
        "'localhost' from ./var with a self-signed certificate."
    )
    optParameters = [["config", "c", None, "TOML configuration file."]]


class ServerService(service.MultiService):
    """Owns the :class:`Server`; wires SIGHUP, the pid file and cert polling."""

    def __init__(self, server) -> None:
        super().__init__()
        self.server = server
        self.pidfile = os.path.join(server.config.data_dir, "xmppd.pid")

    def startService(self) -> None:
        super().startService()
        from twisted.internet import reactor

        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(self._sighup))
        with open(self.pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
        # Close the store only after every connection's goodbye has run.
        reactor.addSystemEventTrigger("after", "shutdown", self.server.close)
        # Unreachable or misconfigured backends are reported now, not at the
        # first login (logins through them fail closed until they answer).
        from xmppd.auth.factory import log_problems

        log_problems(self.server.connectors.values())
        interval = self.server.config.tls.poll_interval
        if interval > 0:
            self.server.certs.start_polling(interval)
        log.info(
            "xmppd serving {hosts} (data in {data_dir})",
            hosts=", ".join(self.server.config.hosts), data_dir=self.server.config.data_dir,
        )

    def _sighup(self) -> None:
        log.info("SIGHUP: reloading certificates")
        self.server.reload()

    def stopService(self):
        self.server.certs.stop_polling()
        try:
            os.unlink(self.pidfile)
        except OSError:
            pass
        return super().stopService()


def build(config_path: str | None):
    """Build the service tree; raises ConfigError/StoreError/CertificateError."""
    from xmppd.core import Server

    return assemble(Server(load(config_path)))


def assemble(server) -> "ServerService":
    """
    The service tree around a built :class:`Server`: one service per listener,
    created but not listening until the tree starts.  ``xmppctl check`` runs
    this too (and never starts the tree), so it refuses what start-up refuses.
    """
    from twisted.internet import reactor

    from xmppd.c2s import C2SFactory

    config = server.config
    top = ServerService(server)
    starttls = C2SFactory(server, direct_tls=False)
    listeners = [(desc, starttls) for desc in config.c2s.listen]
    if config.c2s.listen_tls:
        direct = server.certs.direct_tls_factory(C2SFactory(server, direct_tls=True))
        listeners += [(desc, direct) for desc in config.c2s.listen_tls]
    for desc, factory in listeners:
        _EndpointService(endpoints.serverFromString(reactor, desc), factory, desc).setServiceParent(top)
    return top


class _EndpointService(service.Service):
    """Listen on an endpoint with an already wrapped factory (direct TLS)."""

    def __init__(self, endpoint, factory, description: str) -> None:
        self.endpoint, self.factory, self.description = endpoint, factory, description
        self._port = None

    def startService(self) -> None:
        super().startService()

        def listening(port):
            self._port = port

        def failed(f):
            log.error("cannot listen on {desc}: {err}", desc=self.description, err=f.getErrorMessage())
            from twisted.internet import reactor

            reactor.stop()

        self.endpoint.listen(self.factory).addCallbacks(listening, failed)

    def stopService(self):
        super().stopService()
        if self._port is not None:
            return self._port.stopListening()


def makeService(options: Options):
    from xmppd.certs import CertificateError
    from xmppd.storage import StoreError

    try:
        return build(options["config"])
    except (ConfigError, StoreError, CertificateError) as e:
        sys.stderr.write(f"xmppd: {e}\n")
        raise SystemExit(1)

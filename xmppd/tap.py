"""``twistd xmppd``: options and the service tree.

``makeService`` validates the whole config, locks the pid file and binds
every listener before twistd starts the reactor; a bad config, a data
directory in use by another xmppd or a listener that cannot bind prints one
line (file, key, value, what went wrong) and exits 1, so systemd shows the
reason in ``systemctl status`` and ``Restart=on-failure`` applies.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from xmppd.config import ConfigError, load
from xmppd.listen import listen_all
from xmppd.pidfile import PidFile, PidFileLocked
from xmppd.sdnotify import Notifier

log = Logger()


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Run the xmppd XMPP server. Without --config it serves the virtual host "
        "'localhost' from ./var with a self-signed certificate."
    )
    optParameters = [["config", "c", None, "TOML configuration file."]]


class ServerService(service.MultiService):
    """Owns the :class:`Server`, its bound listeners and the locked pid file.

    Wires SIGHUP, cert polling and the service manager's notifications.
    """

    def __init__(self, server, pidfile: PidFile, ports: list) -> None:
        super().__init__()
        self.server = server
        self.pidfile = pidfile
        self.ports = ports
        self.notifier = Notifier.from_environ()

    def startService(self) -> None:
        super().startService()
        from twisted.internet import reactor

        # Written here, not in build(): twistd may have forked since.
        self.pidfile.write()
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(self._sighup))
        # Close the store only after every connection's goodbye has run, and
        # give up the pid file (and its lock) last of all.
        reactor.addSystemEventTrigger("after", "shutdown", self.server.close)
        reactor.addSystemEventTrigger("after", "shutdown", self.pidfile.release)
        # Unreachable or misconfigured backends are reported now, not at the
        # first login (logins through them fail closed until they answer).
        from xmppd.auth.factory import log_problems

        log_problems(self.server.connectors.values())
        interval = self.server.config.tls.poll_interval
        if interval > 0:
            self.server.certs.start_polling(interval)
        # Every listener was bound by build(): this line and READY=1 are true.
        hosts = ", ".join(self.server.config.hosts)
        log.info("xmppd serving {hosts} (data in {data_dir})",
                 hosts=hosts, data_dir=self.server.config.data_dir)
        self.notifier.ready(f"serving {hosts}")

    def _sighup(self) -> None:
        self.notifier.reloading()
        log.info("SIGHUP: reloading certificates")
        try:
            self.server.reload()
        finally:
            self.notifier.ready()

    def stopService(self):
        self.notifier.stopping()
        self.server.certs.stop_polling()
        stopped = [defer.maybeDeferred(port.stopListening) for port in self.ports]
        self.ports = []
        return defer.gatherResults(stopped + [defer.maybeDeferred(super().stopService)])


def build(config_path: str | None):
    """Build the service tree with every listener bound.

    Order matters: the pid file is locked before anything in the data
    directory is touched, so a second instance on the same data directory
    stops here; the listeners are bound last, once the server they serve
    exists.  Raises ConfigError/StoreError/CertificateError.
    """
    from twisted.internet import reactor

    from xmppd.core import Server

    config = load(config_path)
    pidfile = PidFile(os.path.join(config.data_dir, "xmppd.pid"))
    try:
        stale = pidfile.acquire()
    except PidFileLocked as e:
        raise ConfigError(config.path, "server.data_dir", config.data_dir,
                          f"in use by another xmppd ({e})") from None
    except OSError as e:
        raise ConfigError(config.path, "server.data_dir", config.data_dir,
                          f"cannot lock {pidfile.path}: {e.strerror or e}") from None
    if stale is not None:
        log.warn("pid file {path} names pid {pid}, which holds no lock (not running): taking it over",
                 path=pidfile.path, pid=stale)
    try:
        server = Server(config)
        ports = listen_all(reactor, config.path, listeners(server))
    except BaseException:
        pidfile.release()
        raise
    return ServerService(server, pidfile, ports)


def listeners(server) -> list[tuple[str, str, Any]]:
    """``(config key, endpoint string, factory)`` of every listener, not bound.

    The c2s listeners, and the metrics page when ``[metrics] listen`` is set.

    ``xmppd.tap.build`` binds them; ``xmppctl check`` only builds them (the
    direct-TLS factory needs the certificates), so it refuses what start-up
    refuses short of a port that is taken.
    """
    from xmppd.c2s import C2SFactory

    config = server.config
    starttls = C2SFactory(server, direct_tls=False)
    out = [("c2s.listen", desc, starttls) for desc in config.c2s.listen]
    if config.c2s.listen_tls:
        direct = server.certs.direct_tls_factory(C2SFactory(server, direct_tls=True))
        out += [("c2s.listen_tls", desc, direct) for desc in config.c2s.listen_tls]
    if server.metrics is not None:
        from xmppd import metrics

        out.append(("metrics.listen", server.metrics.listen, metrics.site(server)))
    return out


def makeService(options: Options):
    from xmppd.certs import CertificateError
    from xmppd.storage import StoreError

    try:
        return build(options["config"])
    except (ConfigError, StoreError, CertificateError) as e:
        sys.stderr.write(f"xmppd: {e}\n")
        raise SystemExit(1)

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

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from xmppd import gcsettle
from xmppd.config import ConfigError, load
from xmppd.listen import listen_all, listeners
from xmppd.logfilter import log_observer, set_level
from xmppd.pidfile import PidFile, PidFileLocked
from xmppd.sdnotify import Notifier

log = Logger(observer=log_observer)


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
            signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(self.reload, "SIGHUP"))
        # Close the store only after every connection's goodbye has run, and
        # give up the pid file (and its lock) last of all.
        reactor.addSystemEventTrigger("after", "shutdown", self.server.close)
        reactor.addSystemEventTrigger("after", "shutdown", self.pidfile.release)
        # Unreachable or misconfigured backends are reported now, not at the
        # first login (logins through them fail closed until they answer).
        from xmppd.auth.factory import log_problems

        log_problems(self.server.connectors.values())
        if self.server.s2s is not None:
            self.server.s2s.start()
        if self.server.cluster is not None:
            self.server.cluster.start()
            reactor.addSystemEventTrigger("before", "shutdown", self.server.cluster.stop)
        interval = self.server.config.tls.poll_interval
        if interval > 0:
            self.server.certs.start_polling(interval)
        # Every listener was bound by build(): this line and READY=1 are true.
        hosts = ", ".join(self.server.config.hosts)
        log.info("xmppd serving {hosts} (data in {data_dir})",
                 hosts=hosts, data_dir=self.server.config.data_dir)
        self.notifier.ready(f"serving {hosts}")
        # Last: whatever start-up built lives as long as the process.
        gcsettle.settle()
        gcsettle.watch.install()

    def reload(self, how: str):
        """SIGHUP or ``xmppctl reload``: returns the :class:`~xmppd.reconfig.ReloadOutcome`."""
        self.notifier.reloading()
        log.info("{how}: reloading configuration and certificates", how=how)
        gcsettle.unsettle()
        try:
            return self.server.reload()
        finally:
            gcsettle.settle()
            self.notifier.ready()

    def stopService(self):
        self.notifier.stopping()
        self.server.certs.stop_polling()
        if self.server.s2s is not None:
            self.server.s2s.stop()
        stopped = [defer.maybeDeferred(port.stopListening) for port in self.ports]
        self.ports = []
        return defer.gatherResults(stopped + [defer.maybeDeferred(super().stopService)])


def build(config_path: str | None):
    """Build the service tree with every listener bound.

    Order matters: the pid file is locked before anything in the data
    directory is touched, so a second instance on the same data directory
    stops here (and the admin socket of a dead server may be replaced); the
    listeners are bound last, once the server they serve exists, and the
    admin socket after them.  Raises ConfigError/StoreError/CertificateError.
    """
    from twisted.internet import reactor

    from xmppd.core import Server

    config = load(config_path)
    set_level(config.log_level)
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
    ports = []
    try:
        server = Server(config)
        server.components.start()  # in-process handlers: a failure stops start-up here
        ports = listen_all(reactor, config.path, listeners(server), config.c2s.reuse_port)
        svc = ServerService(server, pidfile, ports)
        ports.append(_listen_admin(reactor, config, svc))
    except BaseException:
        for port in ports:
            port.stopListening()
        pidfile.release()
        raise
    return svc


def _listen_admin(reactor, config, svc: ServerService):
    """The admin socket ``data_dir/xmppd.ctl`` (:mod:`xmppd.admin`), bound now."""
    from twisted.internet.error import CannotListenError

    from xmppd import admin

    channel = admin.AdminChannel(svc.server, svc.reload)
    try:
        return admin.listen(reactor, config.data_dir, channel)
    except (OSError, CannotListenError) as e:
        reason = e.socketError if isinstance(e, CannotListenError) else e
        reason = getattr(reason, "strerror", None) or str(reason)
        raise ConfigError(config.path, "server.data_dir", config.data_dir,
                          f"cannot create the admin socket {admin.socket_path(config.data_dir)}: "
                          f"{reason}") from None


def makeService(options: Options):
    from xmppd.certs import CertificateError
    from xmppd.storage import StoreError

    try:
        return build(options["config"])
    except (ConfigError, StoreError, CertificateError) as e:
        sys.stderr.write(f"xmppd: {e}\n")
        raise SystemExit(1)

"""The node's two connections to Redis: commands, and pub/sub.

Both speak RESP through :mod:`xmppd.cluster.resp` (no blocking call on the
reactor, no reconnecting pool) so that the node knows exactly when it is cut off: while either connection is down
the link is *down* (``up`` False), commands fail at once instead of queueing
(a queued publish would deliver a stanza minutes late, or never), one line
is logged per outage, and both are re-opened every ``retry`` seconds until
Redis answers again; then ``on_up`` runs (the registry re-registers the
node's sessions and reloads the others').
"""
from __future__ import annotations

from typing import Callable

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.logger import Logger

from xmppd.cluster.resp import Commands, Subscriber
from xmppd.logfilter import log_observer

log = Logger(observer=log_observer)


class RedisLink:
    def __init__(self, reactor, host: str, port: int, db: int, password: str | None,
                 channels: list[str], on_message: Callable[[bytes, bytes], None] | None,
                 on_up: Callable[[], None], on_down: Callable[[], None], retry: float,
                 max_message: int) -> None:
        self.reactor = reactor
        self.endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=max(1, int(retry * 2)))
        self.where = f"{host}:{port}/{db}"
        self.db = db
        self.password = password
        self.channels = channels
        self.on_message = on_message
        self.on_up = on_up
        self.on_down = on_down
        self.retry = retry
        self.max_message = max_message  # the longest bus message accepted
        self.up = False
        self.cmd: Commands | None = None
        self.sub: Subscriber | None = None
        self._connecting = False
        self._stopped = False
        self._outage_logged = False
        self._timer = None

    # -- connection management -------------------------------------------

    def start(self) -> None:
        self._connect()

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        for conn in (self.cmd, self.sub):
            if conn is not None and conn.transport is not None:
                conn.transport.loseConnection()

    @defer.inlineCallbacks
    def _connect(self):
        if self._connecting or self._stopped:
            return
        self._connecting = True
        cmd = sub = None
        try:
            cmd = Commands(self.db, self.password, self.max_message, self.reactor)
            yield connectProtocol(self.endpoint, cmd)
            yield cmd.whenConnected()
            # Pub/sub channels are not per database: no SELECT.
            sub = Subscriber(self.channels, self.password, self.on_message, self.max_message)
            yield connectProtocol(self.endpoint, sub)
            yield sub.whenConnected()
        except Exception as e:
            for conn in (cmd, sub):
                if conn is not None and conn.transport is not None:
                    conn.transport.loseConnection()
            self._connecting = False
            self._outage(str(e) or type(e).__name__)
            return
        self._connecting = False
        if self._stopped:
            cmd.transport.loseConnection()
            sub.transport.loseConnection()
            return
        self.cmd, self.sub = cmd, sub
        for conn in (cmd, sub):
            conn.whenDisconnected().addCallback(self._lost)
        self.up = True
        if self._outage_logged:
            log.info("cluster: Redis at {where} is back", where=self.where)
        else:
            log.info("cluster: connected to Redis at {where}", where=self.where)
        self._outage_logged = False
        self.on_up()

    def _lost(self, conn) -> None:
        if conn is not self.cmd and conn is not self.sub:
            return
        for other in (self.cmd, self.sub):
            if other is not None and other is not conn and other.transport is not None:
                other.transport.loseConnection()
        self.cmd = self.sub = None
        was_up, self.up = self.up, False
        if self._stopped:
            return
        if was_up:
            self.on_down()
        self._outage("connection lost")

    def _outage(self, why: str) -> None:
        if not self._outage_logged:
            self._outage_logged = True
            log.error("cluster: Redis at {where} unreachable ({why}): new logins refused, "
                      "local routing goes on; retrying every {retry}s",
                      where=self.where, why=why, retry=self.retry)
        if not self._stopped and (self._timer is None or not self._timer.active()):
            self._timer = self.reactor.callLater(self.retry, self._connect)

    # -- commands ----------------------------------------------------------

    def command(self, *args) -> defer.Deferred:
        """One command; fails at once (ConnectionError) while the link is down.

        Bulk strings come back as str; HGETALL as a dict."""
        if not self.up or self.cmd is None:
            return defer.fail(ConnectionError("Redis link down"))
        d = self.cmd.execute(*args)
        if args[0] == "HGETALL":
            d.addCallback(lambda flat: dict(zip(flat[::2], flat[1::2])))
        return d

    def publish(self, channel: str, payload: bytes) -> defer.Deferred:
        """PUBLISH; the result is how many nodes were subscribed (0: nobody got it)."""
        return self.command("PUBLISH", channel, payload)

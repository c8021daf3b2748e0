"""The pub/sub connection to Redis: a small RESP2 reader of our own.

Why not txredisapi's ``SubscriberProtocol``: after every bulk string it
parses, its line reader pauses the transport and resumes it from a
``callLater(0)`` (``setLineMode(extra=...)``), so each message on the bus
costs two reactor turns and four ``epoll_ctl`` calls, and a burst of
messages is never handled in one read.  Under load that made a message
crossing nodes cost ~6x a local one (bench/RESULTS.md, cluster phase).
This reader takes whatever one read brings and hands every complete
message over in that same turn.

It only has to understand what a subscribed connection receives (RESP2
arrays of bulk strings and integers: ``subscribe`` confirmations and
``message`` pushes) and the reply to AUTH.  A bulk string longer than
``max_bulk`` (a stanza is bounded by ``[c2s] max_stanza_size``) closes the
connection: Redis is trusted, but nothing is buffered without a bound.
"""
from __future__ import annotations

from typing import Callable

from twisted.internet import defer, protocol
from twisted.logger import Logger

from xmppd.logfilter import log_observer

log = Logger(observer=log_observer)


class RESPError(Exception):
    """An error reply (``-ERR ...``) or a stream we cannot read."""


def command(*args: bytes | str) -> bytes:
    """One command in RESP2 (an array of bulk strings)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


_INCOMPLETE = object()


def parse(buf: bytearray | bytes, pos: int, max_bulk: int, depth: int = 0):
    """(value, next position) of the RESP2 value at ``pos``; (_INCOMPLETE, pos) if cut."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        if len(buf) - pos > 64 + max_bulk:
            raise RESPError("line too long")
        return _INCOMPLETE, pos
    kind, line = buf[pos:pos + 1], bytes(buf[pos + 1:end])
    after = end + 2
    if kind == b"$":
        n = int(line)
        if n < 0:
            return None, after
        if n > max_bulk:
            raise RESPError(f"bulk string of {n} bytes (limit {max_bulk})")
        if len(buf) < after + n + 2:
            return _INCOMPLETE, pos
        return bytes(buf[after:after + n]), after + n + 2
    if kind == b"*":
        n = int(line)
        if n < 0:
            return None, after
        if depth > 2 or n > 64:
            raise RESPError("array too deep or too long")
        items = []
        for _ in range(n):
            item, after = parse(buf, after, max_bulk, depth + 1)
            if item is _INCOMPLETE:
                return _INCOMPLETE, pos
            items.append(item)
        return items, after
    if kind == b":":
        return int(line), after
    if kind == b"+":
        return line, after
    if kind == b"-":
        return RESPError(line.decode("utf-8", "replace")), after
    raise RESPError(f"unexpected type byte {kind!r}")


class Subscriber(protocol.Protocol):
    """A connection subscribed to ``channels``; ``on_message(channel, payload)`` per message.

    The interface :class:`xmppd.cluster.link.RedisLink` uses: ``whenConnected()``
    (fires once every channel is subscribed, fails on an AUTH or SUBSCRIBE
    error) and ``whenDisconnected()``.
    """

    def __init__(self, channels: list[str], password: str | None,
                 on_message: Callable[[bytes, bytes], None], max_bulk: int) -> None:
        self.channels = channels
        self.password = password
        self.on_message = on_message
        self.max_bulk = max_bulk
        self.buf = bytearray()
        self.transport = None
        self._pending = len(channels)  # subscribe confirmations still to come
        self._auth = password is not None
        self._ready: defer.Deferred = defer.Deferred()
        self._gone: defer.Deferred = defer.Deferred()

    def whenConnected(self) -> defer.Deferred:
        return self._ready

    def whenDisconnected(self) -> defer.Deferred:
        return self._gone

    def connectionMade(self) -> None:
        out = command("AUTH", self.password) if self.password is not None else b""
        self.transport.write(out + command("SUBSCRIBE", *self.channels))

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        if not self._ready.called:
            self._ready.errback(reason)
        self._gone.callback(self)

    def dataReceived(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        try:
            while pos < len(buf):
                value, pos = parse(buf, pos, self.max_bulk)
                if value is _INCOMPLETE:
                    break
                self._reply(value)
        except (RESPError, ValueError) as e:
            self._fail(str(e))
            return
        del buf[:pos]

    def _reply(self, value) -> None:
        if isinstance(value, list) and len(value) == 3 and value[0] == b"message":
            try:
                self.on_message(value[1], value[2])
            except Exception:
                log.failure("cluster: bus message from {channel} failed", channel=value[1])
        elif isinstance(value, RESPError):
            raise RESPError(f"Redis refused: {value}")
        elif self._auth:
            self._auth = False  # +OK to AUTH
        elif isinstance(value, list) and value and value[0] == b"subscribe":
            self._pending -= 1
            if self._pending == 0 and not self._ready.called:
                self._ready.callback(self)

    def _fail(self, why: str) -> None:
        log.error("cluster: Redis pub/sub connection: {why}", why=why)
        if not self._ready.called:
            self._ready.errback(RESPError(why))
        self.buf.clear()
        if self.transport is not None:
            self.transport.loseConnection()

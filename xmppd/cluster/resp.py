"""The node's two Redis connections: a small RESP2 client of our own.

Why not txredisapi (used before): after every bulk string it parses, its
line reader pauses the transport and resumes it from a ``callLater(0)``
(``setLineMode(extra=...)``), so each message on the bus cost two reactor
turns and four ``epoll_ctl`` calls and a burst of messages was never
handled in one read; and each command cost ~5 us of argument encoding and
a Deferred.  Under load a message crossing nodes cost ~13x a local one
(bench/RESULTS.md, cluster phase).  These protocols take whatever one read
brings and handle every complete reply in that same turn; a PUBLISH is one
``bytes`` join and a callback in a deque.

:class:`Subscriber` understands what a subscribed connection receives
(arrays of bulk strings and integers: ``subscribe`` confirmations and
``message`` pushes); :class:`Commands` any RESP2 reply, in order.  A bulk
string longer than ``max_bulk`` (a stanza is bounded by ``[c2s]
max_stanza_size``) closes the connection: Redis is trusted, but nothing is
buffered without a bound.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable

from twisted.internet import defer, protocol
from twisted.logger import Logger

from xmppd.logfilter import log_observer

log = Logger(observer=log_observer)


def publish_command(channel: bytes, payload: bytes) -> bytes:
    """PUBLISH channel payload, in RESP2 (the hot path: one format)."""
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(channel), channel, len(payload), payload)


class RESPError(Exception):
    """An error reply (``-ERR ...``) or a stream we cannot read."""


def command(*args: bytes | str | int | float) -> bytes:
    """One command in RESP2 (an array of bulk strings; numbers in decimal)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if not isinstance(a, bytes):
            a = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


_INCOMPLETE = object()
#: How every message push starts: an array of 3, the bulk string "message".
COLON = ord(":")
MESSAGE = b"*3\r\n$7\r\nmessage\r\n"


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
        self.closed = False  # as Commands.closed

    def whenConnected(self) -> defer.Deferred:
        return self._ready

    def whenDisconnected(self) -> defer.Deferred:
        return self._gone

    def connectionMade(self) -> None:
        out = command("AUTH", self.password) if self.password is not None else b""
        self.transport.write(out + command("SUBSCRIBE", *self.channels))

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self.closed = True
        if not self._ready.called:
            self._ready.errback(reason)
        self._gone.callback(self)

    def dataReceived(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        end = len(buf)
        try:
            while pos < end and not self.closed:
                if buf.startswith(MESSAGE, pos):
                    # The hot path: a message push, read without the general parser.
                    message = self._message(buf, pos + len(MESSAGE))
                    if message is None:
                        break
                    channel, payload, pos = message
                    try:
                        self.on_message(channel, payload)
                    except Exception:
                        log.failure("cluster: bus message from {channel} failed", channel=channel)
                    continue
                value, pos = parse(buf, pos, self.max_bulk)
                if value is _INCOMPLETE:
                    break
                self._reply(value)
        except (RESPError, ValueError) as e:
            self._fail(str(e))
            return
        del buf[:pos]

    def _message(self, buf: bytearray, pos: int):
        """(channel, payload, next position) of a push whose head was read, or None if cut."""
        out = []
        for _ in range(2):
            if pos >= len(buf):
                return None
            if buf[pos:pos + 1] != b"$":
                raise RESPError("malformed message push")
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                if len(buf) - pos > 32:
                    raise RESPError("malformed message push")
                return None
            n = int(buf[pos + 1:eol])
            if not 0 <= n <= self.max_bulk:
                raise RESPError(f"bulk string of {n} bytes (limit {self.max_bulk})")
            start = eol + 2
            if len(buf) < start + n + 2:
                return None
            out.append(bytes(buf[start:start + n]))
            pos = start + n + 2
        return out[0], out[1], pos

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


def _text(value):
    """Bulk strings as str (UTF-8), recursively, as the registry expects them."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list):
        return [_text(v) for v in value]
    return value


class Commands(protocol.Protocol):
    """Commands and their replies, in order (Redis answers in order).

    ``whenConnected()`` fires once AUTH (with a password) and SELECT were
    accepted; ``whenDisconnected()`` when the connection is gone, after
    every command still waiting failed with ``ConnectionError``.
    """

    def __init__(self, db: int, password: str | None, max_bulk: int, clock=None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self._out: list[bytes] = []
        self.db = db
        self.password = password
        self.max_bulk = max_bulk
        self.buf = bytearray()
        self.transport = None
        self.waiting: deque[Callable[[Any], None]] = deque()
        # Set by connectionLost, which a reply's callback can cause at once
        # (the last reply before a shutdown runs the reactor's disconnectAll).
        self.closed = False
        self._ready: defer.Deferred = defer.Deferred()
        self._gone: defer.Deferred = defer.Deferred()

    def whenConnected(self) -> defer.Deferred:
        return self._ready

    def whenDisconnected(self) -> defer.Deferred:
        return self._gone

    def connectionMade(self) -> None:
        def check(reply) -> None:
            if isinstance(reply, RESPError):
                raise RESPError(f"Redis refused: {reply}")

        if self.password is not None:
            self.send(command("AUTH", self.password), check)

        def selected(reply) -> None:
            check(reply)
            self._ready.callback(self)
        self.send(command("SELECT", str(self.db)), selected)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self.closed = True
        waiting, self.waiting = self.waiting, deque()
        gone = ConnectionError("Redis connection lost")
        for callback in waiting:
            try:
                callback(gone)
            except Exception:
                pass
        if not self._ready.called:
            self._ready.errback(reason)
        self._gone.callback(self)

    def send(self, data: bytes, callback: Callable[[Any], None]) -> None:
        """Queue one encoded command; ``callback(reply)`` gets its reply (an
        exception instance for an error reply or a lost connection).

        The commands of one reactor turn go out in one write (a burst of
        stanzas for other nodes is one pipeline of PUBLISH)."""
        if self.closed:
            callback(ConnectionError("Redis connection lost"))
            return
        self.waiting.append(callback)
        if not self._out:
            self.clock.callLater(0, self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.transport is not None and out:
            self.transport.write(b"".join(out))

    def execute(self, *args: bytes | str | int | float) -> defer.Deferred:
        """One command; its reply with bulk strings as str, errors as failures."""
        d: defer.Deferred = defer.Deferred()

        def reply(value) -> None:
            if isinstance(value, Exception):
                d.errback(value)
            else:
                d.callback(_text(value))
        self.send(command(*args), reply)
        return d

    def dataReceived(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        try:
            end = len(buf)
            while pos < end and not self.closed:
                if buf[pos] == COLON:  # the hot path: PUBLISH answers an integer
                    eol = buf.find(b"\r\n", pos)
                    if eol < 0:
                        break
                    value, pos = int(buf[pos + 1:eol]), eol + 2
                else:
                    value, pos = parse(buf, pos, self.max_bulk)
                    if value is _INCOMPLETE:
                        break
                if not self.waiting:
                    raise RESPError("a reply to no command")
                callback = self.waiting.popleft()
                try:
                    callback(value)
                except RESPError:
                    raise
                except Exception:
                    log.failure("cluster: handling a Redis reply failed")
        except (RESPError, ValueError) as e:
            log.error("cluster: Redis command connection: {why}", why=str(e))
            if not self._ready.called:
                self._ready.errback(RESPError(str(e)))
            self.buf.clear()
            self.transport.loseConnection()
            return
        del buf[:pos]

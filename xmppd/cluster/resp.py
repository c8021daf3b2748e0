"""The node's two Redis connections: a small RESP2 client of our own.

Why not txredisapi (used before): after every bulk string it parses, its
line reader pauses the transport and resumes it from a ``callLater(0)``
(``setLineMode(extra=...)``), so each message on the bus cost two reactor
turns and four ``epoll_ctl`` calls and a burst of messages was never
handled in one read; and each command cost ~5 us of argument encoding and
a Deferred.  Under load a message crossing nodes cost ~13x a local one
(bench/RESULTS.md, cluster phase).  These protocols take whatever one read
brings and handle every complete reply in that same turn.  A stanza's PUBLISH
(:meth:`Commands.publish`) is a few parts appended to the turn's output and
a tuple in the reply queue (no Deferred, no closure); a burst of ``:1``
replies is taken in bulk; a message push on the node's own channel is
sliced out of the received bytes after one prefix match (bench/cluster_cost.py).

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


def publish_head(channel: bytes) -> bytes:
    """A PUBLISH on ``channel`` up to its payload's length (:meth:`Commands.publish`).

    Made once per channel (the bus keeps it per node)."""
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$" % (len(channel), channel)


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
#: A PUBLISH reply: one subscriber got the message.
ONE = b":1\r\n"
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
        self.buf = b""  # the start of a push cut by the end of a read
        first = channels[0].encode() if channels else b""
        self._first_channel = first
        self._first = MESSAGE + b"$%d\r\n%s\r\n$" % (len(first), first)
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
        # Read from the bytes as received (a burst of whole pushes, usually):
        # slices of them are the payloads, with no copy into a buffer first.
        # What is left of a cut push waits in ``buf``, bounded by the parsers.
        if self.buf:
            data = self.buf + data
        pos = 0
        end = len(data)
        first, channel = self._first, self._first_channel
        try:
            while pos < end and not self.closed:
                if data.startswith(first, pos):
                    # The hottest path: a push on the first channel (a node's
                    # own: every stanza for it), its head known in full.
                    p = pos + len(first)
                    eol = data.find(b"\r\n", p, p + 22)
                    if eol < 0:
                        if end - p >= 22:
                            raise RESPError("malformed message push")
                        break
                    n = int(data[p:eol])
                    if not 0 <= n <= self.max_bulk:
                        raise RESPError(f"bulk string of {n} bytes (limit {self.max_bulk})")
                    start = eol + 2
                    stop = start + n
                    if stop + 2 > end:
                        break  # cut: kept from this push's start
                    pos = stop + 2
                    try:
                        self.on_message(channel, data[start:stop])
                    except Exception:
                        log.failure("cluster: bus message from {channel} failed", channel=channel)
                    continue
                if data.startswith(MESSAGE, pos):
                    # A message push on another channel, read without the general parser.
                    message = self._message(data, pos + len(MESSAGE))
                    if message is None:
                        break
                    other, payload, pos = message
                    try:
                        self.on_message(other, payload)
                    except Exception:
                        log.failure("cluster: bus message from {channel} failed", channel=other)
                    continue
                value, pos = parse(data, pos, self.max_bulk)
                if value is _INCOMPLETE:
                    break
                self._reply(value)
        except (RESPError, ValueError) as e:
            self._fail(str(e))
            return
        self.buf = data[pos:] if pos < end else b""

    def _message(self, buf: bytes, pos: int):
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
            out.append(buf[start:start + n])
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
        self.buf = b""
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
        # Per command sent: its callback, or for a publish (missed, context, data).
        self.waiting: deque = deque()
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
                if callback.__class__ is tuple:  # a publish (see publish)
                    callback[0](gone, callback[1], callback[2])
                else:
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

    def publish(self, head: bytes, prefix: bytes, data: bytes,
                missed: Callable[[Any, Any, bytes], None], context: Any) -> None:
        """PUBLISH ``prefix + data`` (``head``: :func:`publish_head` of the channel),
        as :meth:`send` but for the hot path, where only a miss matters.

        ``missed(reply, context, data)`` runs when nobody got it: a reply of 0
        subscribers, an error reply or a lost connection; a positive count
        runs nothing.  No closure per message: the queue entry is a tuple of
        the shared ``missed`` and its arguments; the command goes in as its
        parts (the stanza is copied once, by the turn's join).
        """
        if self.closed:
            missed(ConnectionError("Redis connection lost"), context, data)
            return
        self.waiting.append((missed, context, data))
        out = self._out
        if not out:
            self.clock.callLater(0, self._flush)
        out.extend((head, b"%d\r\n" % (len(prefix) + len(data)), prefix, data, b"\r\n"))

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
        if not self.buf and data.count(ONE) * 4 == len(data):
            # The hot path: a burst of PUBLISH replies, each one subscriber
            # got it (a node's channel).  Nothing to run for a publish.
            waiting = self.waiting
            if len(waiting) < len(data) // 4:
                self._broken("a reply to no command")
                return
            for _ in range(len(data) // 4):
                callback = waiting.popleft()
                if callback.__class__ is not tuple:
                    try:
                        callback(1)
                    except Exception:
                        log.failure("cluster: handling a Redis reply failed")
                    if self.closed:
                        return
            return
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
                    if callback.__class__ is tuple:  # a publish: only a miss is reported
                        if value.__class__ is not int or value <= 0:
                            callback[0](value, callback[1], callback[2])
                    else:
                        callback(value)
                except RESPError:
                    raise
                except Exception:
                    log.failure("cluster: handling a Redis reply failed")
        except (RESPError, ValueError) as e:
            self._broken(str(e))
            return
        del buf[:pos]

    def _broken(self, why: str) -> None:
        log.error("cluster: Redis command connection: {why}", why=why)
        if not self._ready.called:
            self._ready.errback(RESPError(why))
        self.buf.clear()
        self.transport.loseConnection()

"""Fewer reactor turns, timers and system calls per stanza on client connections.

At light load every stanza a client sends wakes the server on its own, and
what a delivery costs is then mostly Twisted's per-write machinery, not
routing (issue 20).  Twisted's TLS transport (``BufferingTLSTransport``)
collects the plaintext written in one reactor turn and hands it to OpenSSL
in the *next* turn, through a ``callLater(0)`` per connection; the TCP
transport then asks epoll for writability (``epoll_ctl``), sends in a third
turn and stops asking (``epoll_ctl`` again).  A message between two idle
clients thus took three reactor iterations, one timer (a heap push and pop)
and two ``epoll_ctl`` calls besides its ``recv`` and ``send``.

Two changes, both keeping what Twisted guarantees (order of bytes, one TLS
record per turn and connection under load, flow control):

* :class:`TurnAggregator` replaces the per-connection aggregator.  Writes of
  one turn are still joined into one ``SSL_write``; they are flushed when the
  stream whose input caused them has finished its ``dataReceived``
  (:func:`reading`), and only output produced outside any read (a timer, a
  storage callback) waits for one shared ``callLater(0)`` for all
  connections.
* :func:`eager_write` sends at once when the TCP transport has nothing
  buffered, the way asyncio does; whatever the kernel does not take (and any
  error) goes to Twisted's buffered path, which then behaves as before.

Both reach into Twisted internals that have been stable for years
(``BufferingTLSTransport._aggregator``, ``_BypassTLS``, ``FileDescriptor``'s
buffers); :func:`install` checks for each and leaves a connection on
Twisted's own path when anything is not as expected.
"""
from __future__ import annotations

from typing import Any, Callable

from twisted.logger import Logger

from xmppd.logfilter import log_observer

log = Logger(observer=log_observer)

#: As Twisted's aggregator: beyond this many buffered bytes, write at once.
MAX_BUFFER = 65536


class _Turn:
    """Process-wide: how deep inside stream reads we are, and who has output waiting."""

    __slots__ = ("depth", "dirty", "scheduled", "clock")

    def __init__(self) -> None:
        self.depth = 0
        self.dirty: list[TurnAggregator] = []
        self.scheduled: Any = None
        self.clock: Any = None


TURN = _Turn()


def flush_all() -> None:
    """Hand every connection's collected plaintext to its TLS layer (one write each)."""
    TURN.scheduled = None
    dirty = TURN.dirty
    while dirty:
        aggregators, TURN.dirty = dirty, []
        for agg in aggregators:
            try:
                agg.flush()
            except Exception:  # one broken connection must not keep the others' output
                log.failure("flushing output")
        dirty = TURN.dirty


def _schedule() -> None:
    if TURN.scheduled is None:
        clock = TURN.clock
        if clock is None:
            from twisted.internet import reactor as clock

            TURN.clock = clock
        TURN.scheduled = clock.callLater(0, flush_all)


class TurnAggregator:
    """Drop-in for Twisted's ``_AggregateSmallWrites`` (``write``, ``flush``, ``close``)."""

    __slots__ = ("_write", "_buffer", "_size", "_queued")

    def __init__(self, write: Callable[[bytes], object]) -> None:
        self._write = write
        self._buffer: list[bytes] = []
        self._size = 0
        self._queued = False

    def write(self, data: bytes) -> None:
        self._buffer.append(bytes(data))
        self._size += len(data)
        if self._size > MAX_BUFFER:
            self.flush()
            return
        if not self._queued:
            self._queued = True
            TURN.dirty.append(self)
            if not TURN.depth:
                _schedule()

    def flush(self) -> None:
        self._queued = False
        if self._buffer:
            data = b"".join(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
            self._buffer = []
            self._size = 0
            self._write(data)

    def close(self) -> None:
        self.flush()


class reading:
    """``with reading():`` around a stream's ``dataReceived``: output it causes is
    flushed when the outermost read returns, without a timer."""

    __slots__ = ()

    def __enter__(self) -> None:
        TURN.depth += 1

    def __exit__(self, *_exc) -> None:
        TURN.depth -= 1
        if not TURN.depth and TURN.dirty:
            flush_all()


READING = reading()


def eager_write(conn: Any, buffered_write: Callable[[bytes], object]) -> Callable[[bytes], None]:
    """A ``write`` for TCP connection ``conn`` that sends at once when nothing is buffered.

    ``buffered_write`` is the transport's own write (Twisted's buffering,
    writability polling, producer pausing and error handling), used for
    whatever is not sent right away.
    """
    write_some = conn.writeSomeData

    def write(data: bytes) -> None:
        if (conn.connected and not conn.disconnecting and not conn._writeDisconnected
                and not conn._tempDataLen and conn.offset == len(conn.dataBuffer)):
            sent = write_some(data)
            if type(sent) is int:  # noqa: E721 -- an exception object means an error
                if sent == len(data):
                    return
                data = data[sent:]
        buffered_write(data)

    return write


def install(transport: Any) -> bool:
    """Use both on a server connection's ``transport`` once it is TLS (direct TLS,
    or right after ``startTLS``).  False, changing nothing, on plain TCP or when
    its shape is unexpected."""
    try:
        from twisted.internet import tcp
        from twisted.internet._newtls import _BypassTLS
        from twisted.protocols.tls import BufferingTLSTransport
    except ImportError:  # pragma: no cover - another Twisted
        return False
    if isinstance(transport, tcp.Connection):
        # Plain TCP is left alone: its write must keep checking for a later
        # startTLS, or plaintext would follow the handshake.
        if not getattr(transport, "TLS", False):
            return False
        tls = transport.protocol  # after startTLS
        lower = tls.transport if isinstance(tls, BufferingTLSTransport) else None
        if not isinstance(lower, _BypassTLS):
            return False
        conn = lower._connection
    elif isinstance(transport, BufferingTLSTransport) and isinstance(transport.transport, tcp.Connection):
        tls, lower, conn = transport, transport.transport, transport.transport  # direct TLS
    else:
        return False
    if not all(hasattr(conn, a) for a in ("_tempDataLen", "offset", "dataBuffer",
                                          "_writeDisconnected", "writeSomeData")):
        return False
    old = getattr(tls, "_aggregator", None)
    if old is None or getattr(old, "_buffer", None) or not hasattr(old, "_write"):
        return False
    if getattr(old, "_scheduled", None) is not None:
        old._scheduled.cancel()
    agg = TurnAggregator(old._write)
    tls._aggregator = agg
    tls.write = agg.write
    lower.write = eager_write(conn, lower.write)
    return True

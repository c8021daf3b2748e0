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
record per read and connection under load, flow control), made by one small
object per connection (:class:`TLSOutput`):

* it replaces the per-connection aggregator.  Writes are still joined into
  one ``SSL_write``; they are flushed when the TCP read that caused them
  returns (:meth:`TLSOutput.data_received` and
  :meth:`xmppd.stream.XMPPStream.dataReceived` count reads in :data:`TURN`;
  a client's TLS records of one read flush once), and only output produced
  outside any read (a timer, a
  storage callback) waits for one shared ``callLater(0)`` for all
  connections;
* it sends the ciphertext at once when the TCP transport has nothing
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
        self.dirty: list[TLSOutput] = []
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


class TLSOutput:
    """One client TLS connection's output: both changes of the module in one object.

    As Twisted's ``_AggregateSmallWrites`` (``write``, ``flush``, ``close``)
    it collects the plaintext of a turn for one ``SSL_write``; :meth:`send`
    is the ciphertext side, the TCP connection's ``write`` that sends at
    once when nothing is buffered.  ``buffered_write`` is the transport's own
    write (Twisted's buffering, writability polling, producer pausing and
    error handling), used for whatever the kernel does not take at once, and
    for everything once the stream is closing (:func:`closing`): the last
    stanzas and TLS's close_notify then leave in one send.
    """

    __slots__ = ("_tls", "_tls_write", "_buffer", "_size", "_queued", "_conn",
                 "_buffered_write", "closing")

    def __init__(self, tls: Any, tls_write: Callable[[bytes], object], conn: Any,
                 buffered_write: Callable[[bytes], object]) -> None:
        self._tls = tls
        self._tls_write = tls_write
        self._buffer: list[bytes] | None = None  # only while something waits
        self._size = 0
        self._queued = False
        self._conn = conn
        self._buffered_write = buffered_write
        self.closing = False

    # -- input ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """The TLS layer's ``dataReceived``, counted as one read: the TLS records
        of one TCP read (a client may send one per stanza) flush once."""
        turn = TURN
        turn.depth += 1
        try:
            type(self._tls).dataReceived(self._tls, data)
        finally:
            turn.depth -= 1
            if not turn.depth and turn.dirty:
                flush_all()

    # -- plaintext, before TLS -------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._buffer is None:
            self._buffer = [bytes(data)]
            self._size = len(data)
        else:
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
        buffer = self._buffer
        if buffer:
            self._buffer = None
            self._size = 0
            self._tls_write(b"".join(buffer) if len(buffer) > 1 else buffer[0])

    def close(self) -> None:
        self.flush()

    # -- ciphertext, to the socket ------------------------------------------------

    def send(self, data: bytes) -> None:
        conn = self._conn
        if (not self.closing and conn.connected and not conn.disconnecting
                and not conn._writeDisconnected and not conn._tempDataLen
                and conn.offset == len(conn.dataBuffer)):
            sent = conn.writeSomeData(data)
            if type(sent) is int:  # noqa: E721 -- an exception object means an error
                if sent == len(data):
                    return
                data = data[sent:]
        self._buffered_write(data)


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
    out = TLSOutput(tls, old._write, conn, lower.write)
    lower.write = out.send
    tls._aggregator = out
    tls.write = out.write
    tls.dataReceived = out.data_received
    return True


def closing(transport: Any) -> None:
    """The stream is about to close ``transport``: buffer from now on, so that
    the last output and TLS's close_notify leave in one send."""
    tls = transport if hasattr(transport, "_aggregator") else getattr(transport, "protocol", None)
    out = getattr(tls, "_aggregator", None)
    if out.__class__ is TLSOutput:
        out.closing = True

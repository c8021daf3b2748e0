"""What every XML stream of the server shares (RFC 6120 §4), whatever its peer.

Client streams (:mod:`xmppd.c2s`) and server-to-server streams
(:mod:`xmppd.s2s`) differ in what they negotiate and what a stanza may
claim, but not in how a stream lives and dies.  This base owns that part,
once:

* the parser (:class:`~xmppd.xmlparser.StreamParser`) and its limits, fed
  from ``dataReceived``; any violation ends in the RFC 6120 §4.9 stream
  error, logged once with the peer address;
* the stream header and ``<stream:error/>`` output;
* time bounds on every way out: a stream not established within
  ``auth_timeout`` is ended (aborted while a TLS handshake is pending, since
  a TLS close would wait for that handshake forever); a graceful close not
  completed within ``close_timeout`` is aborted;
* outbound flow control: an established stream is a streaming producer on
  its transport; while the transport's buffer is full, output is held in an
  :class:`~xmppd.backlog.OutboundBacklog` bounded by ``max_outbound_bytes``,
  and overflowing it is the subclass's to handle.

Subclasses say what "established" means (``ESTABLISHED``: a bound client
session, an authenticated server link), build their parser limits, their
header, and react through the hooks ``stream_started``, ``element``,
``established_ended``, ``output_overflowed`` and ``connection_closed``.
Their settings object (``stream_settings()``) must have ``auth_timeout``,
``close_timeout`` and ``max_outbound_bytes``.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet import protocol
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.logger import Logger
from twisted.words.xish import domish
from zope.interface import implementer

from xmppd.backlog import OutboundBacklog
from xmppd.fastio import TURN, closing, flush_all
from xmppd.stanzas import NS_STREAM_ERRORS, serialize
from xmppd.xmlparser import Limits, StreamParser, XMLStreamError
from xmppd.logfilter import log_observer

if TYPE_CHECKING:
    from xmppd.core import Server

log = Logger(observer=log_observer)

# Connection phases shared by every stream kind (a kind uses the ones it needs).
HEADER, NEGOTIATING, AUTHENTICATED, BOUND, CLOSED = range(5)

NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"


@implementer(IHandshakeListener, IPushProducer)
class XMPPStream(protocol.Protocol):
    """One XML stream over one transport; see the module docstring."""

    #: Log prefix: "c2s", "s2s in", "s2s out".
    kind = "stream"
    #: The phase from which the stream carries stanzas and is a producer.
    ESTABLISHED = BOUND
    #: Namespace rename applied by the parser (see StreamParser), or None.
    RENAME_NS: tuple[str, str] | None = None
    #: The parser class (inbound s2s streams use xmppd.s2s.wire.WireParser).
    PARSER: type[StreamParser] = StreamParser

    def __init__(self) -> None:
        self.phase = HEADER
        self.secure = False
        self.header_sent = False
        self.parser: StreamParser | None = None
        self.peer = "?"
        self.stream_id = ""
        self._timeout = None
        self._closer = None  # aborts a close that does not complete
        self.tls_pending = False  # a TLS handshake has started and not finished
        # Output flow (see send_bytes): True while output goes straight to
        # the transport; False while the transport is paused or once closed.
        self._direct = True
        self._paused = False
        self._producing = False  # registered as the transport's producer
        self._backlog: OutboundBacklog | None = None  # only for slow peers
        self._drained: list[Callable[[], None]] | None = None

    # -- what subclasses provide -------------------------------------------------

    @property
    def server(self) -> "Server":
        return self.factory.server

    def stream_settings(self) -> Any:
        """``auth_timeout``, ``close_timeout``, ``max_outbound_bytes`` of this kind."""
        raise NotImplementedError

    def parser_limits(self) -> Limits:
        """The parser limits for the current phase."""
        raise NotImplementedError

    def header_bytes(self) -> bytes:
        """Our ``<stream:stream>`` opening tag (``self.stream_id`` is set)."""
        raise NotImplementedError

    def stream_started(self, uri: str, local: str, attrs: dict, decls: dict) -> None:
        """The peer's stream header arrived."""
        raise NotImplementedError

    def element(self, el: domish.Element) -> None:
        """A top-level element arrived."""
        raise NotImplementedError

    def established_ended(self) -> None:
        """The established stream is over (closed, aborted or lost): clean up once."""

    def output_overflowed(self, backlog: OutboundBacklog) -> None:
        """The peer does not read: more than ``max_outbound_bytes`` held."""
        self.stream_error("policy-violation", "too much output waiting: read your stream")

    def connection_closed(self, previous: int, reason: Any) -> None:
        """connectionLost after the common cleanup; ``previous`` is the phase it was in."""

    def new_stream_id(self) -> str:
        # 128 random bits as 32 hex digits, as uuid4().hex gave, without the UUID object.
        return os.urandom(16).hex()

    # -- connection life cycle ----------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer = getattr(peer, "host", str(peer))
        self._new_parser()
        clock = self.server.clock
        self.last_active = clock.seconds()
        self._timeout = clock.callLater(self.stream_settings().auth_timeout, self._auth_timeout)

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS handshake (direct or STARTTLS) finished."""
        self.tls_pending = False

    def connectionLost(self, reason=None) -> None:
        previous, self.phase = self.phase, CLOSED
        self._direct = False
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        if self._closer is not None and self._closer.active():
            self._closer.cancel()
        self._closer = None
        self.connection_closed(previous, reason)
        if previous == self.ESTABLISHED:
            self.established_ended()

    def cancel_auth_timeout(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None

    def _auth_timeout(self) -> None:
        self._timeout = None
        if self.phase >= self.ESTABLISHED:
            return
        if self.tls_pending:
            # Nothing can reach a peer that has not finished its handshake,
            # and a TLS close would wait for that handshake: abort.
            log.info("{kind} {peer}: TLS handshake not completed in time",
                     kind=self.kind, peer=self.peer)
            self.abort()
            return
        self.auth_timed_out()

    def auth_timed_out(self) -> None:
        log.info("{kind} {peer}: no authenticated session in time", kind=self.kind, peer=self.peer)
        self.stream_error("connection-timeout", "authenticate sooner")

    def abort(self) -> None:
        """Drop the connection now, whatever is buffered (connectionLost follows)."""
        if self.phase != CLOSED:
            self.parser.halt()
            was_established, self.phase = self.phase == self.ESTABLISHED, CLOSED
            self._direct = False
            if was_established:
                self.established_ended()
        self.transport.abortConnection()

    _abort = abort

    def _close_timed_out(self) -> None:
        self._closer = None
        log.info("{kind} {peer}: connection not closed after {t:g}s (peer not reading?), aborting",
                 kind=self.kind, peer=self.peer, t=self.stream_settings().close_timeout)
        self.transport.abortConnection()

    def _new_parser(self) -> None:
        if self.parser is not None:
            self.parser.halt()
        self.parser = self.PARSER(self.stream_started, self.element, self.stream_ended,
                                   self.parser_limits(), self.RENAME_NS)
        self.header_sent = False

    def dataReceived(self, data: bytes) -> None:
        if self.phase == CLOSED:
            return
        self.last_active = self.server.clock.seconds()
        # Output this read causes (on any connection) is flushed when the
        # outermost read returns, not a reactor turn later (xmppd.fastio).
        turn = TURN
        turn.depth += 1
        try:
            self.parser.feed(data)
        except XMLStreamError as e:
            log.info("{kind} {peer}: {error}", kind=self.kind, peer=self.peer, error=e)
            self.stream_error(e.condition, e.text)
        except Exception:
            log.failure("{kind} {peer}: internal error", kind=self.kind, peer=self.peer)
            self.stream_error("internal-server-error")
        finally:
            turn.depth -= 1
            if not turn.depth and turn.dirty:
                flush_all()

    # -- output ---------------------------------------------------------------------

    def send(self, element: domish.Element) -> None:
        if self._direct:
            self.transport.write(serialize(element))
        elif self.phase != CLOSED:
            self._hold(serialize(element))

    def send_bytes(self, data: bytes) -> None:
        # The hot path is the first test: one attribute, as before flow
        # control existed.  Only a paused (or closed) stream goes further.
        if self._direct:
            self.transport.write(data)
        elif self.phase != CLOSED:
            self._hold(data)

    @property
    def writable(self) -> bool:
        """True while output goes straight to the transport (not paused, not closed)."""
        return self._direct

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once held output has reached the transport.

        For senders of bulk output (offline delivery) that should wait for a
        slow peer instead of filling the backlog.  Never called if the
        stream closes first.
        """
        if self._direct:
            callback()
        elif self.phase != CLOSED:
            if self._drained is None:
                self._drained = []
            self._drained.append(callback)

    def _hold(self, data: bytes) -> None:
        """Keep output while the transport is paused; too much of it ends the stream."""
        if self._backlog is None:  # paused outside producer registration (closing)
            self._backlog = OutboundBacklog(self.stream_settings().max_outbound_bytes)
        if self._backlog.add(data):
            # Not now: we are inside some delivery loop over the sessions,
            # which closing (unbinding) would change under it.  Until then
            # the stream stays established and keeps what it is sent, so
            # that it all takes the same path together.
            self.server.clock.callLater(0, self._overflowed)

    def _overflowed(self) -> None:
        backlog = self._backlog
        if self.phase == CLOSED or backlog is None:
            return  # gone first (its backlog was released then), or caught up
        self.output_overflowed(backlog)

    def start_producing(self) -> None:
        """From now on the transport tells us when the peer stops reading."""
        self.transport.registerProducer(self, True)
        self._producing = True

    # IPushProducer: the transport tells an established stream when its buffer is full.

    def pauseProducing(self) -> None:
        if self.phase == CLOSED:
            return
        self._paused = True
        self._direct = False
        if self._backlog is None:
            self._backlog = OutboundBacklog(self.stream_settings().max_outbound_bytes)

    def resumeProducing(self) -> None:
        self._paused = False
        if self.phase == CLOSED:
            return
        backlog = self._backlog
        if backlog is not None:
            write = self.transport.write
            # transport.write may pause us again at once: stop there.
            while backlog.chunks and not self._paused:
                write(backlog.popleft())
            if not backlog.chunks:
                self._backlog = None  # a stream that caught up holds nothing
        if not self._paused:
            self._direct = True
            callbacks, self._drained = self._drained, None
            for callback in callbacks or ():
                callback()

    def stopProducing(self) -> None:
        """The transport is going away; connectionLost does the cleanup."""

    def take_backlog(self) -> OutboundBacklog | None:
        """The output never handed to the transport (for the subclass's clean-up)."""
        backlog, self._backlog = self._backlog, None
        self._drained = None
        return backlog

    # -- stream header, errors and close ----------------------------------------------

    def _send_header(self, stream_id: str | None = None) -> None:
        self.stream_id = stream_id or self.new_stream_id()
        self.transport.write(self.header_bytes())
        self.header_sent = True

    def answer_starttls(self, host: str | None, options: Callable[[], Any]) -> None:
        """``<starttls/>`` from the peer (server side): ``<proceed/>`` and TLS, or
        ``<failure/>`` and close when ``options()`` (the vhost's TLS options)
        cannot be built.

        Anything pipelined after ``<starttls/>`` arrived in plaintext: the old
        parser is dropped with it, so nothing from before the handshake
        survives.
        """
        if self.secure or self.phase != NEGOTIATING:
            return self.stream_error("policy-violation", "TLS already negotiated")
        try:
            tls_options = options()
        except Exception:
            log.failure("{kind} {peer}: no TLS context for {host}", kind=self.kind,
                        peer=self.peer, host=host)
            self.transport.write(f"<failure xmlns='{NS_TLS}'/></stream:stream>".encode())
            return self._close()
        self.transport.write(f"<proceed xmlns='{NS_TLS}'/>".encode())
        self.transport.startTLS(tls_options)
        self.secure = self.tls_pending = True
        self._new_parser()

    def stream_error(self, condition: str, text: str = "") -> None:
        """Send ``<stream:error/>``, close the stream and the connection."""
        if self.phase == CLOSED:
            return
        if not self.header_sent:
            self._send_header()
        body = f"<stream:error><{condition} xmlns='{NS_STREAM_ERRORS}'/>"
        if text:
            body += f"<text xmlns='{NS_STREAM_ERRORS}'>{domish.escapeToXml(text)}</text>"
        self.transport.write((body + "</stream:error></stream:stream>").encode())
        self._close()

    def stream_ended(self) -> None:
        """The peer sent ``</stream:stream>``: close ours too."""
        log.debug("{kind} {peer}: peer closed the stream", kind=self.kind, peer=self.peer)
        self.transport.write(b"</stream:stream>")
        self._close()

    def close(self) -> None:
        """Close the stream gracefully (``</stream:stream>``, then the connection)."""
        if self.phase == CLOSED:
            return
        if self.header_sent:
            self.transport.write(b"</stream:stream>")
        self._close()

    def _close(self) -> None:
        self.parser.halt()
        was_established = self.phase == self.ESTABLISHED
        self.phase = CLOSED
        self._direct = False
        if self._producing:
            # A registered producer keeps a TLS transport from sending
            # close_notify and a TCP one from closing after its last write.
            self._producing = False
            self.transport.unregisterProducer()
        # The last output and TLS's close_notify leave in one send.
        closing(self.transport)
        self.transport.loseConnection()
        # A peer that never reads (or never answers close_notify) would keep
        # the connection forever: bound the close in time.
        self._closer = self.server.clock.callLater(
            self.stream_settings().close_timeout, self._close_timed_out
        )
        if was_established:
            self.established_ended()

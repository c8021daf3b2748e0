"""External components: the server side of XEP-0114 (``jabber:component:accept``).

A component connects to ``[components] listen``, names its domain in the
stream header (``to``) and proves it knows the domain's shared secret with
``<handshake>hex(SHA-1(stream id + secret))</handshake>``; from then on the
stream carries stanzas both ways, like a c2s session of the whole domain.

What the XEP leaves open, decided here:

* the handshake is compared with :func:`hmac.compare_digest`, and must come
  within ``[c2s] auth_timeout`` (connection-timeout otherwise);
* one stream per domain: a second one that authenticates while the first is
  up is refused with ``<conflict/>`` and the first stays (XEP-0114 §3: the
  server returns conflict when the name is already in use).  A component
  that restarts after a crash gets in once the server noticed the old TCP
  connection is gone;
* every stanza's ``from`` must be the component's domain or a JID at it
  (``invalid-from`` stream error otherwise), a missing ``from`` is the bare
  domain (wokkel's ``Component`` fills it in the same way), a missing ``to``
  is ``improper-addressing``;
* stanzas are limited as c2s stanzas are (``[c2s] max_stanza_size``,
  ``max_stanza_nodes``, ``max_depth``; the pre-authentication limits until
  the handshake) and output held for a component that does not read is
  bounded by ``[c2s] max_outbound_bytes`` (``policy-violation``);
* while no stream is up, stanzas to the domain bounce with
  ``service-unavailable`` (presence is dropped): nothing is queued.

The stream is kept small and self-contained (header, stream errors, timeouts,
the hardened :class:`~xmppd.xmlparser.StreamParser`) so that it can move onto a
stream base shared with c2s and s2s.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import TYPE_CHECKING

from twisted.internet import protocol
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.words.xish import domish
from zope.interface import implementer

from xmppd import jid as jidlib
from xmppd.components.namespaces import NS_ACCEPT, to_client_namespace
from xmppd.stanzas import NS_STREAM_ERRORS, NS_STREAMS, StanzaError, error_reply, serialize
from xmppd.xmlparser import StreamParser, XMLStreamError
from xmppd.logfilter import log_observer

if TYPE_CHECKING:
    from xmppd.core import Server

log = Logger(observer=log_observer)

_STANZAS = frozenset(("message", "presence", "iq"))
HEADER, HANDSHAKE, READY, CLOSED = range(4)


def handshake_digest(stream_id: str, secret: str) -> str:
    """XEP-0114 §3: lower-case hex SHA-1 of the stream id followed by the secret."""
    return hashlib.sha1((stream_id + secret).encode("utf-8")).hexdigest()


class ExternalRoute:
    """What the router holds for an external component's domain."""

    __slots__ = ("domain", "secret", "public", "stream")

    def __init__(self, settings) -> None:
        self.domain: str = settings.domain
        self.secret: str = settings.secret
        self.public: bool = settings.public
        self.stream: ComponentStream | None = None

    @property
    def online(self) -> bool:
        return self.stream is not None

    def send(self, stanza: domish.Element) -> None:
        stream = self.stream
        if stream is not None:
            stream.send(stanza)


@implementer(IPushProducer)
class ComponentStream(protocol.Protocol):
    """One XEP-0114 connection."""

    factory: "ComponentFactory"

    def __init__(self) -> None:
        self.phase = HEADER
        self.peer = "?"
        self.route: ExternalRoute | None = None
        self.domain: str | None = None
        self.jid: jidlib.JID | None = None
        self.stream_id = ""
        self.header_sent = False
        self.parser: StreamParser | None = None
        self._timeout = None
        self._closer = None
        self._paused = False
        self._held = 0  # bytes written while the transport asked us to pause
        self._counted = False

    @property
    def server(self) -> "Server":
        return self.factory.server

    # -- life cycle ------------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer = getattr(peer, "host", str(peer))
        self._counted = True
        over = not self.factory.admit(self.peer)
        self.parser = StreamParser(self._stream_start, self._element, self._stream_end,
                                   self.factory.preauth_limits)
        c2s = self.server.config.c2s
        self._timeout = self.server.clock.callLater(c2s.auth_timeout, self._handshake_timeout)
        if over:
            log.warn("component stream from {peer}: too many connections from this address",
                     peer=self.peer)
            self.stream_error("policy-violation", "too many connections from your address")

    def connectionLost(self, reason=None) -> None:
        was_ready, self.phase = self.phase == READY, CLOSED
        for call in (self._timeout, self._closer):
            if call is not None and call.active():
                call.cancel()
        self._timeout = self._closer = None
        if self._counted:
            self._counted = False
            self.factory.release(self.peer)
        if was_ready:
            self._detach()

    def _detach(self) -> None:
        if self.route is not None and self.route.stream is self:
            self.route.stream = None
            log.info("component {domain} from {peer}: disconnected", domain=self.domain,
                     peer=self.peer)

    def _handshake_timeout(self) -> None:
        self._timeout = None
        if self.phase in (HEADER, HANDSHAKE):
            log.info("component stream from {peer}: no handshake in time", peer=self.peer)
            self.stream_error("connection-timeout", "handshake sooner")

    def dataReceived(self, data: bytes) -> None:
        if self.phase == CLOSED:
            return
        try:
            self.parser.feed(data)
        except XMLStreamError as e:
            log.info("component {domain} from {peer}: {error}", peer=self.peer, error=e,
                     domain=self.domain or "stream")
            self.stream_error(e.condition, e.text)
        except Exception:
            log.failure("component stream from {peer}: internal error", peer=self.peer)
            self.stream_error("internal-server-error")

    # -- output ------------------------------------------------------------------

    def send(self, element: domish.Element) -> None:
        """Deliver a stanza to the component (router side)."""
        if self.phase != READY:
            return
        data = serialize(element)
        if self._paused:
            self._held += len(data)
            limit = self.server.config.c2s.max_outbound_bytes
            if self._held > limit:
                log.warn("component {domain} from {peer}: not reading; more than {limit} bytes"
                         " held, closing", domain=self.domain, peer=self.peer, limit=limit)
                self.stream_error("policy-violation", "too much output waiting: read your stream")
                return
        self.transport.write(data)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._held = 0

    def stopProducing(self) -> None:
        """connectionLost does the cleanup."""

    def _send_header(self) -> None:
        host = self.domain or self.server.config.default_host
        self.stream_id = self.stream_id or secrets.token_hex(16)
        self.transport.write(
            ("<?xml version='1.0'?>"
             f"<stream:stream xmlns='{NS_ACCEPT}' xmlns:stream='{NS_STREAMS}'"
             f" from='{domish.escapeToXml(host, True)}' id='{self.stream_id}'>").encode())
        self.header_sent = True

    def stream_error(self, condition: str, text: str = "") -> None:
        """``<stream:error/>``, then close (bounded by ``[c2s] close_timeout``)."""
        if self.phase == CLOSED:
            return
        if not self.header_sent:
            self._send_header()
        body = f"<stream:error><{condition} xmlns='{NS_STREAM_ERRORS}'/>"
        if text:
            body += f"<text xmlns='{NS_STREAM_ERRORS}'>{domish.escapeToXml(text)}</text>"
        self.transport.write((body + "</stream:error></stream:stream>").encode())
        self._close()

    def _close(self) -> None:
        self.parser.halt()
        was_ready, self.phase = self.phase == READY, CLOSED
        if was_ready:
            self.transport.unregisterProducer()
            self._detach()
        self.transport.loseConnection()
        self._closer = self.server.clock.callLater(
            self.server.config.c2s.close_timeout, self.transport.abortConnection)

    # -- stream header and handshake ----------------------------------------

    def _stream_start(self, uri: str, local: str, attrs: dict, decls: dict) -> None:
        if local != "stream" or uri != NS_STREAMS:
            return self.stream_error("invalid-namespace", "expected a stream:stream element")
        if decls.get("") != NS_ACCEPT:
            return self.stream_error("invalid-namespace",
                                     f"the default namespace must be {NS_ACCEPT}")
        to = attrs.get("to")
        if not to:
            return self.stream_error("improper-addressing", "name the component's domain in 'to'")
        try:
            host = jidlib.parse(to).host
        except jidlib.InvalidJID:
            host = None
        route = self.factory.routes.get(host) if host else None
        if route is None:
            log.info("component stream from {peer}: {to!r} is not an external component here",
                     peer=self.peer, to=to)
            return self.stream_error("host-unknown", f"{to!r} is not a component of this server")
        self.route, self.domain = route, route.domain
        self.jid = jidlib.parse(route.domain)
        self.phase = HANDSHAKE
        self._send_header()

    def _element(self, el: domish.Element) -> None:
        if self.phase == READY:
            if el.uri != NS_ACCEPT or el.name not in _STANZAS:
                return self.stream_error("unsupported-stanza-type")
            return self._stanza(el)
        if el.uri != NS_ACCEPT or el.name != "handshake":
            return self.stream_error("not-authorized", "handshake first")
        given = str(el).strip().lower().encode("utf-8")
        expected = handshake_digest(self.stream_id, self.route.secret).encode("ascii")
        if not hmac.compare_digest(given, expected):
            log.warn("component {domain} from {peer}: wrong secret (handshake refused)",
                     domain=self.domain, peer=self.peer)
            return self.stream_error("not-authorized", "wrong handshake")
        if self.route.stream is not None:
            log.warn("component {domain} from {peer}: already connected from {other}, refused",
                     domain=self.domain, peer=self.peer, other=self.route.stream.peer)
            return self.stream_error("conflict", f"{self.domain} is already connected")
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
        self.phase = READY
        self.route.stream = self
        self.parser.set_limits(self.factory.limits)
        self.transport.registerProducer(self, True)
        self.transport.write(b"<handshake/>")
        log.info("component {domain} from {peer}: connected", domain=self.domain, peer=self.peer)

    def _stream_end(self) -> None:
        self.transport.write(b"</stream:stream>")
        self._close()

    # -- stanzas -----------------------------------------------------------------

    def _stanza(self, el: domish.Element) -> None:
        claimed = el.getAttribute("from")
        if claimed is None:
            sender = self.jid
            el["from"] = self.domain
        else:
            try:
                sender = jidlib.parse(claimed)
            except jidlib.InvalidJID:
                sender = None
            if sender is None or sender.host != self.domain:
                log.warn("component {domain} from {peer}: stanza from {claimed!r}, closing",
                         domain=self.domain, peer=self.peer, claimed=claimed)
                return self.stream_error("invalid-from", f"'from' must be at {self.domain}")
        to_attr = el.getAttribute("to")
        if not to_attr:
            return self.stream_error("improper-addressing", "every stanza needs a 'to'")
        to_client_namespace(el, NS_ACCEPT)
        try:
            to = jidlib.parse(to_attr)
        except jidlib.InvalidJID:
            reply = error_reply(el, StanzaError("jid-malformed"))
            if reply is not None:
                self.send(reply)
            return
        self.server.router.deliver(el, sender, to, self.route)


class ComponentFactory(protocol.ServerFactory):
    """Accepts XEP-0114 streams for the external components of ``routes``."""

    protocol = ComponentStream

    def __init__(self, server: "Server", routes: dict[str, ExternalRoute]) -> None:
        from xmppd.c2s import parser_limits

        self.server = server
        self.routes = routes
        self.per_ip: dict[str, int] = {}
        self.limits, self.preauth_limits = parser_limits(server.config.c2s)

    def admit(self, ip: str) -> bool:
        count = self.per_ip.get(ip, 0) + 1
        self.per_ip[ip] = count
        limit = self.server.config.c2s.max_connections_per_ip
        return not limit or count <= limit

    def release(self, ip: str) -> None:
        count = self.per_ip.get(ip, 0) - 1
        if count > 0:
            self.per_ip[ip] = count
        else:
            self.per_ip.pop(ip, None)

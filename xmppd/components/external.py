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

The stream's life cycle (parser and its limits, header and stream errors,
the handshake and close timeouts, outbound flow control) is the one every
stream of the server has, :class:`xmppd.stream.XMPPStream`; this module adds
only what XEP-0114 says: the handshake, the domain's route and the checks on
what a component may claim.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import TYPE_CHECKING

from twisted.internet import protocol
from twisted.logger import Logger
from twisted.words.xish import domish

from xmppd import jid as jidlib
from xmppd.backlog import OutboundBacklog
from xmppd.components.namespaces import NS_ACCEPT, to_client_namespace
from xmppd.connlimit import PerAddressLimit
from xmppd.stanzas import NS_STREAMS, StanzaError, error_reply
from xmppd.stream import AUTHENTICATED, CLOSED, HEADER, NEGOTIATING, XMPPStream
from xmppd.xmlparser import Limits
from xmppd.logfilter import log_observer

if TYPE_CHECKING:
    from xmppd.core import Server

log = Logger(observer=log_observer)

_STANZAS = frozenset(("message", "presence", "iq"))
# The phases a component stream goes through (the base's numbers): header
# not yet received, waiting for <handshake/>, carrying stanzas, closed.
HANDSHAKE, READY = NEGOTIATING, AUTHENTICATED
__all__ = ["ComponentFactory", "ComponentStream", "ExternalRoute", "handshake_digest",
           "HEADER", "HANDSHAKE", "READY", "CLOSED"]


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


class ComponentStream(XMPPStream):
    """One XEP-0114 connection; from the handshake on, the route of its domain."""

    factory: "ComponentFactory"
    ESTABLISHED = READY

    def __init__(self) -> None:
        super().__init__()
        self.route: ExternalRoute | None = None
        self.domain: str | None = None
        self.jid: jidlib.JID | None = None

    @property
    def kind(self) -> str:
        """The base's log prefix (before the peer): "component <domain> from"."""
        return f"component {self.domain or 'stream'} from"

    # -- what the base asks of a stream kind ---------------------------------

    def stream_settings(self):
        # The time and output bounds of client streams apply (see the module docstring).
        return self.server.config.c2s

    def parser_limits(self) -> Limits:
        return self.factory.limits if self.phase >= READY else self.factory.preauth_limits

    def new_stream_id(self) -> str:
        return secrets.token_hex(16)

    def header_bytes(self) -> bytes:
        host = self.domain or self.server.config.default_host
        return ("<?xml version='1.0'?>"
                f"<stream:stream xmlns='{NS_ACCEPT}' xmlns:stream='{NS_STREAMS}'"
                f" from='{domish.escapeToXml(host, True)}' id='{self.stream_id}'>").encode()

    # -- life cycle ------------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        if not self.factory.admit(self.peer):
            log.warn("component stream from {peer}: too many connections from this address",
                     peer=self.peer)
            self.stream_error("policy-violation", "too many connections from your address")

    def connection_closed(self, previous: int, reason) -> None:
        self.factory.release(self.peer)

    def established_ended(self) -> None:
        """Closed, aborted or lost after the handshake: the domain is offline again."""
        self.take_backlog()  # output it did not read is lost with it, as before
        if self.route is not None and self.route.stream is self:
            self.route.stream = None
            log.info("component {domain} from {peer}: disconnected", domain=self.domain,
                     peer=self.peer)

    def auth_timed_out(self) -> None:
        log.info("component stream from {peer}: no handshake in time", peer=self.peer)
        self.stream_error("connection-timeout", "handshake sooner")

    def output_overflowed(self, backlog: OutboundBacklog) -> None:
        log.warn("component {domain} from {peer}: not reading; more than {limit} bytes"
                 " held, closing", domain=self.domain, peer=self.peer, limit=backlog.limit)
        self.stream_error("policy-violation", "too much output waiting: read your stream")

    # -- stream header and handshake ----------------------------------------

    def stream_started(self, uri: str, local: str, attrs: dict, decls: dict) -> None:
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

    def element(self, el: domish.Element) -> None:
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
        self.cancel_auth_timeout()
        self.phase = READY
        self.route.stream = self
        self.parser.set_limits(self.factory.limits)
        self.start_producing()
        self.transport.write(b"<handshake/>")
        log.info("component {domain} from {peer}: connected", domain=self.domain, peer=self.peer)

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


class ComponentFactory(PerAddressLimit, protocol.ServerFactory):
    """Accepts XEP-0114 streams for the external components of ``routes``."""

    protocol = ComponentStream

    def __init__(self, server: "Server", routes: dict[str, ExternalRoute]) -> None:
        from xmppd.c2s import parser_limits

        super().__init__()  # PerAddressLimit
        self.server = server
        self.routes = routes
        self.limits, self.preauth_limits = parser_limits(server.config.c2s)

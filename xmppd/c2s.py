"""Server side of client-to-server streams (RFC 6120 §4–7).

One :class:`C2SStream` per TCP connection walks the stream through its
phases — header checks, STARTTLS, SASL, resource binding — and from then on
is the user's *session*: the router delivers to it with :meth:`send` /
:meth:`send_bytes` and it hands every stanza the client sends to
:meth:`Router.route` after stamping ``from``.

Every violation ends in the RFC 6120 §4.9 stream error before the close, and
is logged with the peer address.

Every way out is bounded in time: a connection that does not finish its TLS
handshake by ``[c2s] auth_timeout`` is aborted (a TLS close would wait for
the handshake forever), and a graceful close that has not completed after
``[c2s] close_timeout`` (a peer that never reads its stream error or never
answers close_notify) is aborted too.

A bound session is a streaming producer on its transport: while the
transport's buffer is full, output is held in an
:class:`~xmppd.backlog.OutboundBacklog` bounded by ``[c2s]
max_outbound_bytes`` instead of growing the buffer without limit.

The life-cycle part (parser, header, stream errors, time bounds, flow
control) is shared with the server-to-server streams in
:mod:`xmppd.stream`; this module adds what only clients do.
"""
from __future__ import annotations

import base64
import binascii
import os
from typing import TYPE_CHECKING

from twisted.internet import protocol
from twisted.logger import Logger
from twisted.words.xish import domish

from OpenSSL import SSL

from xmppd import channelbinding, fastio, sasl
from xmppd import jid as jidlib
from xmppd.backlog import OutboundBacklog
from xmppd.certs import ClientCertificate, client_certificate
from xmppd.connlimit import PerAddressLimit
from xmppd.stanzas import (
    NS_CLIENT,
    NS_STREAMS,
    StanzaError,
    error_reply,
    escape_attr,
    escape_text,
    iq_result,
    serialize,
)
from xmppd.stream import AUTHENTICATED, BOUND, CLOSED, HEADER, NEGOTIATING, NS_TLS, XMPPStream
from xmppd.xmlparser import Limits
from xmppd.logfilter import literal, log_observer

if TYPE_CHECKING:
    from xmppd.core import Server

log = Logger(observer=log_observer)

NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_SESSION = "urn:ietf:params:xml:ns:xmpp-session"
NS_SASL_CB = "urn:xmpp:sasl-cb:0"
_XML_LANG = ("http://www.w3.org/XML/1998/namespace", "lang")
_STANZAS = frozenset(("message", "presence", "iq"))
_STARTTLS = f"<starttls xmlns='{NS_TLS}'/>"
_STARTTLS_REQUIRED = f"<starttls xmlns='{NS_TLS}'><required/></starttls>"
_BIND_AND_SESSION = f"<bind xmlns='{NS_BIND}'/><session xmlns='{NS_SESSION}'><optional/></session>"

# Connection phases (shared with every stream kind).
__all__ = ["C2SStream", "C2SFactory", "parser_limits", "HEADER", "NEGOTIATING",
           "AUTHENTICATED", "BOUND", "CLOSED"]

# Counters for the metrics page (xmppd.metrics reads them at scrape time).
# Process-wide: one server per process.  Stanzas are counted only by
# MeteredC2SStream, i.e. only with [metrics] configured; SASL outcomes (one
# per login, not per stanza) always.
#: stanzas received from bound sessions, by element name
STANZAS_RECEIVED: dict[str, int] = dict.fromkeys(_STANZAS, 0)
#: stanzas handed to sessions as bytes, by their second byte ("<m", "<p", "<i")
STANZAS_SENT_BYTES: list[int] = [0] * 256
#: stanzas handed to sessions as elements, by element name
STANZAS_SENT: dict[str, int] = dict.fromkeys(_STANZAS, 0)
#: (mechanism, connector, condition or "") -> SASL exchanges ended so (""
#: for success); the mechanism is "none" when the client named none we offer
AUTH_OUTCOMES: dict[tuple[str, str, str], int] = {}


class C2SStream(XMPPStream):
    """A client connection, and after binding the user's session."""

    factory: "C2SFactory"
    kind = "c2s"
    ESTABLISHED = BOUND
    #: The client ended the stream with ``</stream:stream>`` (set only then):
    #: XEP-0198 does not keep such a session for resumption.
    closed_by_peer = False

    def __init__(self) -> None:
        super().__init__()
        self.host: str | None = None
        self.username: str | None = None
        self.jid: jidlib.JID | None = None
        self.available = False
        self.priority = 0
        self.mechanism: sasl.Mechanism | None = None
        self.auth_mechanism = ""  # the SASL mechanism that succeeded (for the session's log line)
        self.auth_failures = 0
        self._refusal: str | None = None
        self._cert_logged = False
        # Per-session state owned by plugins (e.g. blocking interest).
        self.state: dict = {}

    # -- connection life cycle ----------------------------------------------

    def stream_settings(self):
        return self.server.config.c2s

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer = getattr(peer, "host", str(peer))
        self.secure = self.tls_pending = self.factory.direct_tls
        if not self.factory.admit(self.peer):
            self._refusal = "policy-violation"
            log.warn("c2s {peer}: too many connections from this address", peer=self.peer)
        elif self.secure:
            fastio.install(self.transport)
        super().connectionMade()

    def connection_closed(self, previous: int, reason) -> None:
        self.factory.release(self.peer)
        if self.secure and previous < AUTHENTICATED and reason is not None and reason.check(SSL.Error):
            # e.g. a vhost with client_cert = "required" and no valid certificate
            log.info("c2s {peer}: TLS failed for {host}: {error}", peer=self.peer,
                     host=self.host or self._sni() or "(no SNI)", error=reason.getErrorMessage())

    def established_ended(self) -> None:
        self._end_session()

    def stream_ended(self) -> None:
        self.closed_by_peer = True
        super().stream_ended()

    def parser_limits(self) -> Limits:
        # Until SASL succeeds, the much smaller pre-authentication limits.
        return self.factory.limits if self.phase >= AUTHENTICATED else self.factory.preauth_limits

    def output_overflowed(self, backlog: OutboundBacklog) -> None:
        log.warn("c2s {jid} from {peer}: client is not reading; {size} bytes of output held"
                 " (max_outbound_bytes = {limit}), closing",
                 jid=self.jid.full, peer=self.peer, size=backlog.size, limit=backlog.limit)
        # policy-violation (RFC 6120 §4.9.3.14): the client broke a
        # configured limit of this server.  resource-constraint would tell
        # it the server is short of resources, which it is not.
        self.stream_error("policy-violation", "too much output waiting: read your stream")

    def header_bytes(self) -> bytes:
        host = self.host or self.server.config.default_host
        return (
            "<?xml version='1.0'?>"
            f"<stream:stream xmlns='{NS_CLIENT}' xmlns:stream='{NS_STREAMS}'"
            f" from='{host}' id='{self.stream_id}' version='1.0' xml:lang='en'>"
        ).encode()

    def _end_session(self) -> None:
        sm = self.state.get("sm")
        if sm is not None:
            # XEP-0198: the session may outlive its connection (resumption),
            # and its unacknowledged stanzas are the plugin's to re-route.
            return sm.plugin.session_ended(self)
        jid, peer = self.jid.full, self.peer
        log.info(literal(f"c2s {jid} from {peer}: session ended"), jid=jid, peer=peer)
        self.server.router.unbind(self)
        self._release_backlog()
        self._bookkeeping("record_logout")

    def _release_backlog(self) -> None:
        """Output never handed to the transport: messages go to offline storage.

        They take the router's offline path as if the user had had no
        available resource (normal/chat stored, over quota bounced to the
        sender; filters already ran when they were routed here); other
        stanzas are dropped.

        Sessions with XEP-0198 stream management do not come here: their
        unacknowledged queue holds all of this too (xmppd.handlers.sm).
        """
        backlog = self.take_backlog()
        if backlog is None or not backlog.chunks:
            return
        held, size = len(backlog.chunks), backlog.size
        messages = backlog.messages()
        backlog.clear()
        to = self.jid.bare_jid()
        for stanza in messages:
            self.server.router.undelivered(stanza, to)
        log.info("c2s {jid}: {held} stanzas ({size} bytes) were never sent; {n} messages"
                 " take the offline path", jid=self.jid.full, held=held, size=size,
                 n=len(messages))

    def _bookkeeping(self, what: str) -> None:
        """Login/logout bookkeeping queries of connectors that have them (sql)."""
        record = getattr(self.server.connector_for(self.host), what, None)
        if record is not None:
            record(self.username, self.host, self.peer).addErrback(
                lambda f: log.warn("c2s {jid}: {what} failed: {err}", jid=self.jid.full,
                                   what=what, err=f.getErrorMessage())
            )

    # -- stream header -------------------------------------------------------

    def stream_started(self, uri: str, local: str, attrs: dict, decls: dict) -> None:
        to = attrs.get("to")
        if to is not None:
            try:
                self.host = jidlib.parse(to).host
            except jidlib.InvalidJID:
                self.host = None
        if local != "stream" or uri != NS_STREAMS:
            return self.stream_error("invalid-namespace", "expected a stream:stream element")
        if decls.get("") != NS_CLIENT:
            return self.stream_error("invalid-namespace", "the default namespace must be jabber:client")
        if to is None:
            self.host = self.server.config.default_host
        elif self.host not in self.server.router.hosts:
            self.host = None
            return self.stream_error("host-unknown", f"{to!r} is not served here")
        version = attrs.get("version", "0.9")
        try:
            major = int(version.split(".")[0])
        except ValueError:
            major = 0
        if major != 1:
            return self.stream_error("unsupported-version", "only XMPP 1.0 is supported")
        if self._refusal:
            return self.stream_error(self._refusal, "too many connections from your address")
        if self.phase == HEADER:
            self.phase = NEGOTIATING
        self._send_header()
        if self.secure and not self._cert_logged:
            self._cert_logged = True
            self._log_client_certificate()
        self._send_features()

    def _tls_required(self) -> bool:
        if self.secure:
            return False
        if self.server.config.c2s.tls == "required":
            return True
        # A vhost that requires client certificates must not be reachable without TLS.
        return self.host is not None and self.server.config.client_cert(self.host).mode == "required"

    def _send_features(self) -> None:
        # Written as text: once per stream (re)start, three times per login,
        # and domish's general serializer cost more than the rest of it.
        out = ["<stream:features>"]
        if self.phase == AUTHENTICATED:
            out.append(_BIND_AND_SESSION)
            for feature in self.server.c2s_features:
                child = feature(self)
                if child is not None:
                    out.append(child.toXml())
        else:
            tls_required = self._tls_required()
            if not self.secure:
                out.append(_STARTTLS_REQUIRED if tls_required else _STARTTLS)
            names = self._mechanisms() if not tls_required else []
            if names:  # RFC 6120 §6.4.1: never an empty <mechanisms/>
                out.append(f"<mechanisms xmlns='{NS_SASL}'>")
                out.extend(f"<mechanism>{escape_text(name)}</mechanism>" for name in names)
                out.append("</mechanisms>")
            if not tls_required:
                binding_types = self._binding_types()
                if binding_types:
                    # XEP-0440: which channel bindings -PLUS can use here.
                    out.append(f"<sasl-channel-binding xmlns='{NS_SASL_CB}'>")
                    out.extend(f"<channel-binding type='{escape_attr(t)}'/>" for t in binding_types)
                    out.append("</sasl-channel-binding>")
                register = self.server.plugin("register")
                feature = register.stream_feature(self.host) if register is not None else None
                if feature is not None:
                    out.append(feature.toXml())
        if len(out) == 1:
            self.transport.write(b"<stream:features/>")
            return
        out.append("</stream:features>")
        self.transport.write("".join(out).encode())

    def _tls_connection(self):
        """The pyOpenSSL connection of this stream, or None before TLS."""
        if not self.secure:
            return None
        handle = self.transport.getHandle()
        return handle if isinstance(handle, SSL.Connection) else None

    def _sni(self) -> str | None:
        try:
            name = self.transport.getHandle().get_servername()
        except Exception:
            return None
        return name.decode("ascii", "replace") if name else None

    def _binding_types(self) -> list[str]:
        conn = self._tls_connection()
        return channelbinding.available_types(conn) if conn is not None else []

    def _client_certificate(self) -> ClientCertificate | None:
        """The client certificate verified for this stream's vhost (EXTERNAL), or None.

        A certificate verified for another vhost (direct TLS whose SNI named a
        different host than the stream header) does not count.
        """
        if self.host is None or not self.server.config.client_cert(self.host).enabled:
            return None
        cert = client_certificate(self._tls_connection())
        return cert if cert is not None and cert.verified_for(self.host) else None

    def _log_client_certificate(self) -> None:
        """Once per TLS connection: which client certificate came, and whether it verified."""
        if self.host is None or not self.server.config.client_cert(self.host).enabled:
            return
        cert = client_certificate(self._tls_connection())
        if cert is None:
            log.debug("c2s {peer}: no client certificate for {host}", peer=self.peer, host=self.host)
        elif cert.verified_for(self.host):
            log.info("c2s {peer}: client certificate {cert} verified for {host}",
                     peer=self.peer, cert=cert.describe(), host=self.host)
        else:
            if cert.verified:  # direct TLS: SNI named another vhost than the stream
                problem = f"verified for {cert.host}, not {self.host}"
            else:
                problem = cert.problem or "not verified"
            log.info("c2s {peer}: client certificate {cert} not accepted for {host}: {problem}"
                     " (EXTERNAL not offered)", peer=self.peer, cert=cert.describe(),
                     host=self.host, problem=problem)

    def _mechanisms(self) -> list[str]:
        connector = self.server.connector_for(self.host)
        return sasl.available_mechanisms(
            connector, self.secure, bool(self._binding_types()),
            external=self._client_certificate() is not None,
            passwords=self.server.config.sasl_for(self.host).password_mechanisms,
        )

    # -- elements ----------------------------------------------------------------

    def element(self, el: domish.Element) -> None:
        phase = self.phase
        if phase == BOUND:
            if el.uri != NS_CLIENT or el.name not in _STANZAS:
                return self.extension_element(el)
            return self._stanza(el)
        if el.uri == NS_TLS and el.name == "starttls":
            return self._starttls()
        if self._tls_required():
            return self.stream_error("policy-violation", "STARTTLS is required first")
        if el.uri == NS_SASL and phase == NEGOTIATING:
            return self._sasl(el)
        if phase == NEGOTIATING and el.uri == NS_CLIENT and el.name == "iq":
            register = self.server.plugin("register")
            child = el.firstChildElement()
            if register is not None and child is not None and child.uri == register.features[0]:
                return register.pre_auth(self, el)
        if phase == AUTHENTICATED and el.uri == NS_CLIENT and el.name == "iq":
            return self._pre_bind_iq(el)
        if phase == AUTHENTICATED and el.uri != NS_CLIENT:
            return self.extension_element(el)
        return self.stream_error("not-authorized", "authenticate and bind first")

    def extension_element(self, el: domish.Element) -> None:
        """A top-level element outside jabber:client: a plugin's (SM, CSI) or an error."""
        handler = self.server.c2s_elements.get((el.uri, el.name))
        if handler is None:
            if self.phase == BOUND:
                return self.stream_error("unsupported-stanza-type")
            return self.stream_error("not-authorized", "authenticate and bind first")
        handler(self, el)

    # -- output layers (XEP-0198 counting, XEP-0352 holding) ---------------------

    def set_output_layer(self, name: str, layer) -> None:
        """Add (or with None remove) an output layer and rewire send/send_bytes.

        A layer has ``order`` (lower is nearer the transport) and
        ``wrap(send_bytes) -> send_bytes``.  A session without layers keeps
        the class's methods: it pays nothing for features it does not use.
        """
        layers = self.state.setdefault("output_layers", {})
        if layer is None:
            layers.pop(name, None)
        else:
            layers[name] = layer
        self.__dict__.pop("send", None)
        self.__dict__.pop("send_bytes", None)
        if not layers:
            return
        send_bytes = self.send_bytes  # the class's (metered or not)
        for _, layer in sorted(((lay.order, n), lay) for n, lay in layers.items()):
            send_bytes = layer.wrap(send_bytes)
        self.send_bytes = send_bytes
        self.send = lambda element: send_bytes(serialize(element))

    def _starttls(self) -> None:
        was_secure = self.secure
        self.answer_starttls(self.host, lambda: self.server.certs.starttls_options(self.host))
        if self.secure and not was_secure:
            fastio.install(self.transport)

    # -- SASL --------------------------------------------------------------------

    def _sasl(self, el: domish.Element) -> None:
        if el.name == "auth":
            name = el.getAttribute("mechanism", "")
            if self.mechanism is not None:
                return self._sasl_failure(sasl.SASLFailure("aborted", "exchange in progress"))
            offered = self._mechanisms()
            if name not in offered:
                return self._sasl_failure(sasl.SASLFailure("invalid-mechanism"))
            throttle = self.server.throttle
            wait = throttle.blocked(self.peer, "") if throttle is not None else 0
            if wait:
                return self._sasl_failure(
                    sasl.SASLFailure("temporary-auth-failure", f"too many failures, retry in {int(wait)}s"),
                    name,
                )
            gate = self.server.login_gate  # a cluster node cut off from Redis
            refusal = gate() if gate is not None else None
            if refusal:
                return self._sasl_failure(sasl.SASLFailure("temporary-auth-failure", refusal), name)
            conn = self._tls_connection()
            client_cert = self._client_certificate()
            ctx = sasl.SASLContext(
                host=self.host, connector=self.server.connector_for(self.host),
                secure=self.secure, peer=self.peer,
                channel_bindings=(
                    (lambda t: channelbinding.binding_data(conn, t)) if conn is not None
                    else (lambda _t: None)
                ),
                plus_offered=any(m.endswith("-PLUS") for m in offered),
                client_cert=client_cert,
                account_wait=self._account_wait,
                cert_identity=self.server.config.client_cert(self.host).identity,
                auto_provision=self.server.config.sasl_for(self.host).external_auto_provision,
            )
            self.mechanism = sasl.create(name, ctx)
            try:
                data = self._decode(el, allow_empty_marker=True)
            except sasl.SASLFailure as f:
                return self._sasl_failure(f)
            d = self.mechanism.start(data)
        elif el.name == "response" and self.mechanism is not None:
            try:
                data = self._decode(el) or b""
            except sasl.SASLFailure as f:
                return self._sasl_failure(f)
            d = self.mechanism.respond(data)
        elif el.name == "abort":
            return self._sasl_failure(sasl.SASLFailure("aborted"))
        else:
            return self._sasl_failure(sasl.SASLFailure("malformed-request"))
        d.addCallbacks(self._sasl_step, self._sasl_error)

    @staticmethod
    def _decode(el: domish.Element, allow_empty_marker: bool = False) -> bytes | None:
        text = str(el).strip()
        if not text:
            return None
        if text == "=":
            return b""
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise sasl.SASLFailure("incorrect-encoding") from None

    def _sasl_step(self, step) -> None:
        if self.phase != NEGOTIATING:
            return
        if isinstance(step, sasl.Challenge):
            payload = base64.b64encode(step.data).decode() if step.data else ""
            self.transport.write(f"<challenge xmlns='{NS_SASL}'>{payload}</challenge>".encode())
            return
        mech = self.mechanism.name
        self.mechanism = None
        self.username = step.username
        self._count_auth(mech, "")
        if self.server.throttle is not None:
            self.server.throttle.record_success(self.peer, f"{step.username}@{self.host}")
        payload = base64.b64encode(step.data).decode() if step.data else ""
        self.transport.write(f"<success xmlns='{NS_SASL}'>{payload}</success>".encode())
        # Logged at info with the bound session (one line per login): this
        # line is for following an exchange that never reaches a session.
        log.debug(
            "c2s {peer}: {user}@{host} authenticated with {mech}",
            peer=self.peer, user=step.username, host=self.host, mech=mech,
        )
        self.auth_mechanism = mech
        self.phase = AUTHENTICATED
        self._new_parser()

    def _sasl_error(self, failure) -> None:
        if self.phase != NEGOTIATING:
            return
        if not failure.check(sasl.SASLFailure):
            log.failure("c2s {peer}: SASL mechanism crashed", failure, peer=self.peer)
            failure = sasl.SASLFailure("temporary-auth-failure")
        else:
            failure = failure.value
        self._sasl_failure(failure)

    def _account_wait(self, username: str) -> float:
        """Seconds this address must wait before trying ``username`` (every throttle mode)."""
        throttle = self.server.throttle
        return throttle.blocked(self.peer, f"{username}@{self.host}") if throttle is not None else 0.0

    def _count_auth(self, mechanism: str, condition: str) -> None:
        """One SASL outcome for the metrics page (labels from a bounded set only)."""
        connector = (getattr(self.server.connector_for(self.host), "name", "unknown")
                     if self.host is not None else "none")
        key = (mechanism, connector, condition)
        AUTH_OUTCOMES[key] = AUTH_OUTCOMES.get(key, 0) + 1

    def _sasl_failure(self, failure: sasl.SASLFailure, mechanism: str | None = None) -> None:
        """``mechanism``: the offered one the client asked for, when no exchange exists yet."""
        account = f"{self.mechanism.username}@{self.host}" if self.mechanism and self.mechanism.username else ""
        if self.mechanism is not None:
            mechanism = self.mechanism.name
        self._count_auth(mechanism or "none", failure.condition)
        self.mechanism = None
        body = f"<failure xmlns='{NS_SASL}'><{failure.condition}/>"
        if failure.text:
            body += f"<text>{domish.escapeToXml(failure.text)}</text>"
        self.transport.write((body + "</failure>").encode())
        if failure.condition in ("not-authorized", "invalid-authzid"):
            self.auth_failures += 1
            if self.server.throttle is not None:
                self.server.throttle.record_failure(self.peer, account)
            log.info(
                "c2s {peer}: authentication failed ({condition}{text})",
                peer=self.peer, condition=failure.condition,
                text=f": {failure.text}" if failure.text else "",
            )
            if self.auth_failures >= self.server.config.c2s.max_auth_failures:
                log.warn("c2s {peer}: too many authentication failures, closing", peer=self.peer)
                self.stream_error("policy-violation", "too many authentication failures")

    # -- resource binding ----------------------------------------------------

    def _pre_bind_iq(self, iq: domish.Element) -> None:
        child = iq.firstChildElement()
        if iq.getAttribute("type") == "set" and child is not None and child.uri == NS_BIND:
            return self._bind(iq, child)
        self.send(error_reply(iq, StanzaError("not-authorized")))

    def _bind(self, iq: domish.Element, bind: domish.Element) -> None:
        requested = None
        for child in bind.elements(NS_BIND, "resource"):
            requested = str(child).strip()
        try:
            resource = jidlib.prep_resource(requested) if requested else None
        except jidlib.InvalidJID:
            return self.send(error_reply(iq, StanzaError("bad-request", text="invalid resource")))
        if resource is None:
            resource = os.urandom(8).hex()
        self.jid = jidlib.make(self.username, self.host, resource)
        self.phase = BOUND
        self.bound_at = self.server.clock.seconds()  # for `xmppctl sessions`
        self.cancel_auth_timeout()
        # From now on the transport tells us when the client stops reading.
        self.start_producing()
        old = self.server.router.bind(self)
        if old is not None:
            log.info("c2s {jid}: new session replaces the old one", jid=self.jid.full)
            old.stream_error("conflict", "replaced by a new session")
        result = domish.Element((NS_BIND, "bind"))
        result.addElement("jid", content=self.jid.full)
        self.send(iq_result(iq, result))
        jid, peer, mech = self.jid.full, self.peer, self.auth_mechanism
        log.info(literal(f"c2s {jid} from {peer}: session bound, authenticated with {mech}"),
                 jid=jid, peer=peer, mech=mech)
        self._bookkeeping("record_login")

    # -- stanzas of a bound session -----------------------------------------

    def _stanza(self, el: domish.Element) -> None:
        claimed = el.getAttribute("from")
        if claimed is not None and claimed != self.jid.full and claimed != self.jid.bare:
            return self.stream_error("invalid-from", "from does not match your JID")
        el["from"] = self.jid.full
        if el.name == "iq":
            child = el.firstChildElement()
            if child is not None and el.getAttribute("to") is None:
                if child.uri == NS_SESSION:
                    # RFC 3921 session establishment: a no-op kept for old clients.
                    return self.send(iq_result(el))
                if child.uri == NS_BIND:
                    return self.send(error_reply(el, StanzaError("not-allowed", text="already bound")))
        self.server.router.route(el, self)


_plain_element = C2SStream.element


class MeteredC2SStream(C2SStream):
    """A client stream that also counts the stanzas in and out, by kind.

    Used instead of :class:`C2SStream` only when ``[metrics]`` is configured,
    so that a server without metrics pays nothing at all for them.  Each
    count is one integer added to a module-level table (no lock, no label
    look-up, no prometheus_client call): at saturation a delivered message
    costs ~15 µs of CPU and the budget for metrics is 3 % of that.

    The hot methods repeat the few lines of C2SStream's instead of calling
    them, so a counted stanza costs no extra call (bench/metrics_cost.py);
    keep them in step with C2SStream.  A sent stanza is counted by the second
    byte of its serialisation (``<m``, ``<p``, ``<i``), which costs no
    parsing.
    """

    def element(self, el: domish.Element) -> None:
        if self.phase == BOUND:  # as C2SStream.element, counted
            name = el.name
            if el.uri != NS_CLIENT or name not in _STANZAS:
                return self.extension_element(el)
            STANZAS_RECEIVED[name] += 1
            return self._stanza(el)
        return _plain_element(self, el)

    def send(self, element: domish.Element) -> None:
        name = element.name
        STANZAS_SENT[name] = STANZAS_SENT.get(name, 0) + 1
        if self._direct:
            self.transport.write(serialize(element))
        elif self.phase != CLOSED:
            self._hold(serialize(element))

    def send_bytes(self, data: bytes) -> None:
        STANZAS_SENT_BYTES[data[1]] += 1
        if self._direct:
            self.transport.write(data)
        elif self.phase != CLOSED:
            self._hold(data)


def parser_limits(c2s) -> tuple[Limits, Limits]:
    """Parser limits after and before authentication, from ``[c2s]``.

    Every stream header is held to the pre-authentication size: it never
    needs more, and it arrives before authentication.
    """
    header = min(c2s.max_preauth_stanza_size, c2s.max_stanza_size)
    after = Limits(c2s.max_stanza_size, c2s.max_depth, c2s.max_stanza_nodes, header)
    before = Limits(header, c2s.max_depth,
                    min(c2s.max_preauth_stanza_nodes, c2s.max_stanza_nodes), header)
    return after, before


class C2SFactory(PerAddressLimit, protocol.ServerFactory):
    """Creates client streams; enforces the per-address connection limit."""

    protocol = C2SStream

    def __init__(self, server: "Server", direct_tls: bool = False) -> None:
        self.server = server
        self.direct_tls = direct_tls
        if getattr(server, "metrics", None) is not None:
            self.protocol = MeteredC2SStream
        super().__init__()  # PerAddressLimit
        self.limits, self.preauth_limits = parser_limits(server.config.c2s)

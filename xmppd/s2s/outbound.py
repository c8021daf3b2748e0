"""The initiating side of a server-to-server stream, and the link that owns it.

:class:`OutboundLink` is our way to one remote domain for one local domain
(a domain pair).  It queues stanzas (:class:`~xmppd.s2s.queue.PendingQueue`)
while it resolves the remote domain (``[s2s.routes]`` first, then DNS:
:mod:`xmppd.s2s.resolve`), connects to each address in turn, and
negotiates an :class:`OutboundStream`; once the stream is authenticated
the queue is flushed into it and later stanzas are written straight to it.
If the attempt fails, every waiting stanza is bounced once
(``remote-server-not-found``, or ``remote-server-timeout`` for one that
waited ``queue_timeout``); the next stanza starts a new attempt.

The stream: header (``from`` our domain, ``to`` theirs), STARTTLS (or
direct TLS underneath), then the peer's certificate is checked
(:class:`~xmppd.s2s.tls.PeerTrust`); a domain that needs a valid
certificate (``secure_domains``, ``require_certificates``) is given up here
when it does not verify.  We authenticate with SASL EXTERNAL when the peer
offers it (it does only when our certificate verified there), else with
dialback where our policy and the peer allow it.  ``<db:verify/>``
requests (we are a receiving server checking a key) ride on this stream
as soon as it is encrypted, before it is authenticated.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer, endpoints, protocol
from twisted.logger import Logger
from twisted.words.xish import domish

from xmppd.s2s.common import (
    NS_DIALBACK, NS_DIALBACK_FEATURE, NS_SASL, NS_TLS, ServerStream,
)
from xmppd.s2s.queue import PendingQueue
from xmppd.s2s.resolve import Target
from xmppd.stanzas import NS_STREAMS, serialize
from xmppd.stream import AUTHENTICATED, CLOSED, NEGOTIATING
from xmppd.logfilter import log_observer

if TYPE_CHECKING:
    from xmppd.s2s.service import S2SService

log = Logger(observer=log_observer)

#: db:verify requests waiting on one link (each is one peer's login attempt).
MAX_PENDING_VERIFY = 64


class LinkFailed(Exception):
    """Why a link could not be set up (one line, for the log and the bounce text)."""

    def __init__(self, reason: str, condition: str = "remote-server-not-found") -> None:
        super().__init__(reason)
        self.reason = reason
        self.condition = condition


class OutboundStream(ServerStream):
    """One outgoing s2s connection, negotiated for its link's domain pair."""

    kind = "s2s out"

    def __init__(self, link: "OutboundLink", direct_tls: bool) -> None:
        super().__init__()
        self.link = link
        self.secure = self.tls_pending = direct_tls
        self.how = ""
        self._checked_cert = False
        self._sasl_sent = False
        self._db_sent = False
        self._verify_ready = False
        self.peer_verified = False
        # db:verify requests written on this stream, by stream id, awaiting the answer.
        self.verify_sent: dict[str, defer.Deferred] = {}

    @property
    def service(self) -> "S2SService":
        return self.link.service

    @property
    def server(self):
        return self.link.service.server

    def connectionMade(self) -> None:
        super().connectionMade()
        self.phase = NEGOTIATING
        self._send_header()

    def header_bytes(self) -> bytes:
        return self.header_for(self.link.local, self.link.remote, False)

    def connection_closed(self, previous: int, reason) -> None:
        self.link.stream_lost(self, previous, reason)

    def established_ended(self) -> None:
        pass  # the link's stream_lost does the clean-up

    def auth_timed_out(self) -> None:
        self.fail(LinkFailed("no authenticated stream in time", "remote-server-timeout"))

    def output_overflowed(self, backlog) -> None:
        log.warn("s2s out {remote}: peer is not reading; {size} bytes held, closing",
                 remote=self.link.remote, size=backlog.size)
        self.stream_error("policy-violation", "too much output waiting: read your stream")

    def fail(self, failure: LinkFailed) -> None:
        """Give up on this stream (the link bounces what waits)."""
        if self.phase == CLOSED:
            return
        self.link.note_failure(failure)
        self.stream_error("policy-violation" if failure.condition == "policy" else "undefined-condition",
                          failure.reason)

    # -- the peer's stream ---------------------------------------------------------------

    def stream_started(self, uri: str, local: str, attrs: dict, decls: dict) -> None:
        if local != "stream" or uri != NS_STREAMS or decls.get("") != "jabber:server":
            return self.fail(LinkFailed("peer did not open a jabber:server stream"))
        if attrs.get("version", "0.9").split(".")[0] != "1":
            return self.fail(LinkFailed("peer does not speak XMPP 1.0"))
        self.stream_id = attrs.get("id", "")

    def element(self, el: domish.Element) -> None:
        if el.uri == NS_STREAMS and el.name == "features":
            return self._features(el)
        if el.uri == NS_STREAMS and el.name == "error":
            return self._peer_error(el)
        if el.uri == NS_TLS:
            return self._tls_answer(el)
        if el.uri == NS_SASL:
            return self._sasl_answer(el)
        if el.uri == NS_DIALBACK and el.name == "result":
            return self._db_result_answer(el)
        if el.uri == NS_DIALBACK and el.name == "verify":
            return self.link.service.verify_answered(self, el)
        # XEP-0288 is not negotiated: the peer sends its stanzas on its own stream.
        return self.stream_error("unsupported-stanza-type", "stanzas belong on your own stream")

    def _peer_error(self, el: domish.Element) -> None:
        condition = next((c.name for c in el.elements() if c.name != "text"), "undefined-condition")
        text = next((str(c) for c in el.elements() if c.name == "text"), "")
        self.link.note_failure(LinkFailed(f"peer sent stream error {condition}"
                                          + (f" ({text})" if text else "")))
        self.close()

    def _features(self, features: domish.Element) -> None:
        config = self.service.config
        remote = self.link.remote
        if self.phase == AUTHENTICATED:
            return  # features after the SASL restart: nothing we use
        if self._sasl_sent and self.how == "EXTERNAL":
            return self._ready()
        if not self.secure:
            starttls = next(features.elements(NS_TLS, "starttls"), None)
            if starttls is not None:
                self.transport.write(f"<starttls xmlns='{NS_TLS}'/>".encode())
                return
            if config.needs_tls(remote):
                return self.fail(LinkFailed(f"{remote} does not offer TLS, which is required", "policy"))
        if self.secure and not self._checked_cert:
            self._checked_cert = True
            check = self.service.trust.check(self.tls_connection(), remote)
            self.peer_verified = check.verified
            if not check.verified:
                if config.needs_certificate(remote):
                    return self.fail(LinkFailed(f"certificate of {remote} refused: {check.how}", "policy"))
                if not config.dialback:
                    return self.fail(LinkFailed(f"certificate of {remote} refused ({check.how})"
                                                " and dialback is disabled", "policy"))
                log.info("s2s out {local} -> {remote}: certificate of {remote} not verified ({why});"
                         " going on unauthenticated, as dialback does", local=self.link.local,
                         remote=remote, why=check.how)
        self._verify_ready = True
        self.link.service.flush_verifies(self)
        mechanisms = [str(m).strip() for mech in features.elements(NS_SASL, "mechanisms")
                      for m in mech.elements(NS_SASL, "mechanism")]
        # EXTERNAL authenticates us to the peer; whether we could verify the
        # peer is the check above (RFC 6120 §13.7.2, XEP-0344).
        if "EXTERNAL" in mechanisms and not self._sasl_sent:
            self._sasl_sent = True
            # Nothing may follow <auth/> until the peer answered and (on
            # success) the stream restarted: the peer reads the next bytes
            # with a fresh parser.  db:verify requests wait until then.
            self._verify_ready = False
            self.transport.write(f"<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>=</auth>".encode())
            return
        self._try_dialback(features)

    def _try_dialback(self, features: domish.Element | None) -> None:
        config = self.service.config
        remote = self.link.remote
        offered = features is None or next(features.elements(NS_DIALBACK_FEATURE, "dialback"), None) is not None
        if not config.dialback:
            return self.fail(LinkFailed(f"{remote} did not accept our certificate and dialback is"
                                        " disabled here", "policy"))
        if not offered:
            return self.fail(LinkFailed(f"{remote} offers neither EXTERNAL nor dialback"))
        if self._db_sent:
            return
        self._db_sent = True
        key = self.service.keys.generate(remote, self.link.local, self.stream_id)
        self.transport.write(f"<db:result from='{self.link.local}' to='{remote}'>{key}</db:result>".encode())

    def _tls_answer(self, el: domish.Element) -> None:
        if el.name != "proceed" or self.secure:
            return self.fail(LinkFailed("peer refused STARTTLS"))
        self.transport.startTLS(self.service.tls.client(self.link.local, self.link.remote))
        self.secure = self.tls_pending = True
        self._new_parser()
        self._send_header()

    def _sasl_answer(self, el: domish.Element) -> None:
        if el.name == "success" and self._sasl_sent:
            self.how = "EXTERNAL"
            self._new_parser()
            self._send_header()
            return
        if el.name == "failure":
            log.info("s2s out {remote}: EXTERNAL refused; trying dialback", remote=self.link.remote)
            self._sasl_sent = False
            self._verify_ready = True
            self.link.service.flush_verifies(self)
            return self._try_dialback(None)
        return self.fail(LinkFailed(f"unexpected SASL <{el.name}/>"))

    def _db_result_answer(self, el: domish.Element) -> None:
        kind = el.getAttribute("type")
        if kind == "valid" and self._db_sent:
            self.how = "dialback"
            return self._ready()
        why = "dialback refused" if kind == "invalid" else "dialback failed"
        text = next((str(t) for e in el.elements() for t in e.elements() if t.name == "text"), "")
        self.fail(LinkFailed(f"{self.link.remote}: {why}" + (f" ({text})" if text else "")))

    def _ready(self) -> None:
        # The parser keeps the pre-authentication limits: the peer sends
        # its stanzas on its own stream, so nothing large comes on this one.
        self.phase = AUTHENTICATED
        self.cancel_auth_timeout()
        self.start_producing()
        self._verify_ready = True
        self.link.service.flush_verifies(self)
        log.info("s2s out {local} -> {remote}: authenticated with {how} ({tls}, peer certificate {cert})",
                 local=self.link.local, remote=self.link.remote, how=self.how, tls=self.tls_version(),
                 cert="verified" if self.peer_verified else "not verified")
        self.link.stream_ready(self)

    def send_verify(self, el_xml: bytes) -> None:
        self.transport.write(el_xml)

    @property
    def verify_ready(self) -> bool:
        return self._verify_ready and self.phase != CLOSED

    def describe(self) -> dict:
        return {"direction": "out", "peer": self.peer,
                "pairs": [f"{self.link.local}->{self.link.remote}"],
                "tls": self.tls_version(), "auth": self.how or "none",
                "state": "established" if self.phase == AUTHENTICATED else "negotiating"}


class _StreamFactory(protocol.ClientFactory):
    noisy = False  # one per connection: no "Starting factory" lines

    def __init__(self, link: "OutboundLink", direct_tls: bool) -> None:
        self.link = link
        self.direct_tls = direct_tls

    def buildProtocol(self, addr):
        stream = OutboundStream(self.link, self.direct_tls)
        stream.factory = self
        return stream


class OutboundLink:
    """Our stanzas for one (local, remote) domain pair: a queue and at most one stream."""

    def __init__(self, service: "S2SService", local: str, remote: str) -> None:
        self.service = service
        self.local, self.remote = local, remote
        cfg = service.config
        self.queue = PendingQueue(service.server.clock, cfg.queue_max_stanzas, cfg.queue_timeout,
                                  self._expired)
        self.stream: OutboundStream | None = None  # authenticated stream
        self.connecting: OutboundStream | None = None  # stream being negotiated
        self.attempt: defer.Deferred | None = None
        self.last_failure: LinkFailed | None = None
        self._seconds = service.server.clock.seconds
        self.last_used = self._seconds()
        # Dialback keys other servers gave us, to check with this remote
        # domain's authoritative server: (stream id, key, Deferred).
        self.verify_waiting: list[tuple[str, str, defer.Deferred]] = []
        # XEP-0199: when the peer last showed it reads (stream ready, ping answered).
        self.alive = self.last_used
        self.ping_id: str | None = None
        self.ping_sent = 0.0
        self.waiting_turn = False  # in line for [s2s] max_connecting_domains

    # -- stanzas ------------------------------------------------------------------------

    def send(self, stanza: domish.Element) -> None:
        self.last_used = self._seconds()
        stream = self.stream
        if stream is not None:
            if stream.phase != CLOSED:
                stream.send_bytes(serialize(stanza))
                return
            self.stream = None  # closing (idle, error): this stanza waits for a new one
        if not self.queue.add(stanza):
            self.service.bounce(stanza, "resource-constraint",
                                f"too many stanzas waiting for {self.remote}")
            return
        self.start()

    def _expired(self, stanzas: list[domish.Element]) -> None:
        for stanza in stanzas:
            self.service.bounce(stanza, "remote-server-timeout",
                                f"no connection to {self.remote} in time")

    def bounce_queue(self, failure: LinkFailed) -> None:
        """The link could not be set up: bounce what waits, and remember why for a while."""
        self.service.link_failed(self, failure.reason)
        for stanza in self.queue.take_all():
            self.service.bounce(stanza, failure.condition if failure.condition.startswith("remote-")
                                else "remote-server-not-found", failure.reason)

    # -- connecting -----------------------------------------------------------------------

    def start(self) -> None:
        """Set up a stream unless one exists or is on its way."""
        if self.stream is not None or self.attempt is not None or self.connecting is not None:
            return
        if not self.service.begin_connecting(self):
            return  # started by end_connecting when another link is done
        self.last_failure = None
        route = self.service.config.routes.get(self.remote)
        if route is not None:
            d = defer.succeed([Target(route.host, route.port, route.direct_tls)])
        else:
            d = self.service.resolver.targets(self.remote)
        self.attempt = d
        d.addCallback(self._try_targets)
        d.addErrback(self._attempt_failed)

    @defer.inlineCallbacks
    def _try_targets(self, targets: list[Target]):
        if not targets:
            raise LinkFailed(f"{self.remote} does not offer XMPP federation (SRV '.')")
        problems = []
        for target in targets:
            try:
                addresses = yield self.service.resolver.addresses(target.host)
            except Exception as e:  # noqa: BLE001 -- every DNS failure is one line
                problems.append(f"{target.host}: {type(e).__name__} {e}".strip())
                continue
            for address in addresses:
                try:
                    stream = yield self._connect(target, address)
                except Exception as e:  # noqa: BLE001
                    problems.append(f"{address}:{target.port}: {e.__class__.__name__}")
                    continue
                self.connecting = stream
                self.attempt = None
                return
        raise LinkFailed(f"cannot connect to {self.remote}: " + ("; ".join(problems)[:300] or "no address"))

    def _connect(self, target: Target, address: str) -> defer.Deferred:
        reactor = self.service.reactor
        timeout = self.service.config.connect_timeout
        if ":" in address:
            endpoint: Any = endpoints.TCP6ClientEndpoint(reactor, address, target.port, timeout)
        else:
            endpoint = endpoints.TCP4ClientEndpoint(reactor, address, target.port, timeout)
        factory: Any = _StreamFactory(self, target.direct_tls)
        if target.direct_tls:
            factory = self.service.tls.client_factory(self.local, self.remote, factory)
            factory.noisy = False
        d = endpoint.connect(factory)
        if target.direct_tls:
            d.addCallback(lambda tls_protocol: tls_protocol.wrappedProtocol)
        return d

    def _attempt_failed(self, failure) -> None:
        self.attempt = None
        self.service.end_connecting(self)
        if failure.check(LinkFailed):
            problem = failure.value
        else:
            problem = LinkFailed(f"cannot reach {self.remote}: {failure.getErrorMessage()}")
        log.info("s2s out {local} -> {remote}: {why}", local=self.local, remote=self.remote,
                 why=problem.reason)
        self.bounce_queue(problem)
        self.service.link_idle(self)

    # -- stream events ----------------------------------------------------------------------

    def note_failure(self, failure: LinkFailed) -> None:
        if self.last_failure is None:
            self.last_failure = failure
            log.info("s2s out {local} -> {remote}: {why}", local=self.local, remote=self.remote,
                     why=failure.reason)

    def stream_ready(self, stream: OutboundStream) -> None:
        self.connecting = None
        self.service.end_connecting(self)
        self.stream = stream
        self.alive = self.service.server.clock.seconds()
        self.ping_id = None
        for stanza in self.queue.take_all():
            stream.send_bytes(serialize(stanza))

    def stream_lost(self, stream: OutboundStream, previous: int, reason) -> None:
        if stream is self.connecting:
            self.connecting = None
            self.service.end_connecting(self)
            failure = self.last_failure or LinkFailed(
                f"connection to {self.remote} lost during negotiation"
                + (f" ({reason.getErrorMessage()})" if reason is not None else ""))
            self.note_failure(failure)
            self.bounce_queue(failure)
        else:
            if stream is self.stream:
                self.stream = None
            if previous >= AUTHENTICATED or stream.how:
                log.info("s2s out {local} -> {remote}: stream closed", local=self.local,
                         remote=self.remote)
            held = stream.take_backlog()
            if held is not None and held.chunks:
                # Accepted for the peer, never handed to the transport: each bounced once.
                reason = f"connection to {self.remote} lost"
                for stanza in held.stanzas():
                    self.service.bounce(stanza, "remote-server-not-found", reason)
                held.clear()
        if self.stream is None:
            self.service.forget_ping(self)
        self.service.verifies_lost(stream)
        self.service.link_idle(self)

    def close(self) -> None:
        for stream in (self.stream, self.connecting):
            if stream is not None:
                stream.close()
        if self.attempt is not None:
            self.attempt.cancel()

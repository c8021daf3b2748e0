"""The receiving side of a server-to-server stream (RFC 6120, XEP-0178, XEP-0220).

A peer connects to ``[s2s] listen`` (STARTTLS) or ``listen_tls`` (direct
TLS) and sends us its stanzas on this stream; ours to it go on a stream we
open (:mod:`xmppd.s2s.outbound`).  The stream walks through:

1. header: ``jabber:server``, version 1.0, ``to`` one of our hosts or a
   public component domain (:meth:`S2SService.federates`), ``from``
   (when given) not in ``[s2s] blocked_domains`` and under
   ``max_connections_per_domain``;
2. STARTTLS, required unless ``require_encryption`` is off (or the domain
   is an ``encryption_exceptions`` entry);
3. authentication of a (remote domain, local domain) *pair*: SASL EXTERNAL
   when the peer's certificate verifies for the domain in ``from``
   (offered only then), or dialback (``<db:result/>``, checked by asking
   the domain's authoritative server) where policy allows it.  Further
   pairs may be added with more ``<db:result/>`` (piggybacking, XEP-0220
   §2.4).

Every stanza must then carry ``from`` and ``to`` matching an authenticated
pair: a ``from`` outside them is ``invalid-from``, a ``to`` outside them
``improper-addressing`` (or ``host-unknown`` for a domain not served here,
private components included: they are unknown to other servers).
Accepted stanzas go to :meth:`S2SService.inbound`, which hands them to the
router exactly where local ones enter it.

``<db:verify/>`` requests (we are the authoritative server for a key one
of our outgoing streams presented) are answered on this stream too.
"""
from __future__ import annotations

import base64
import binascii

from twisted.internet import protocol
from twisted.logger import Logger
from twisted.words.xish import domish

from xmppd import jid as jidlib
from xmppd.s2s.common import (
    NS_DIALBACK, NS_DIALBACK_FEATURE, NS_SASL, NS_SERVER, NS_TLS, STANZAS, ServerStream,
)
from xmppd.s2s.wire import WireParser
from xmppd.stanzas import NS_CLIENT, NS_STREAMS
from xmppd.stream import AUTHENTICATED, CLOSED, HEADER, NEGOTIATING
from xmppd.logfilter import log_observer

log = Logger(observer=log_observer)

#: Dialback requests one stream may have outstanding (each costs a look-up).
MAX_PENDING_DIALBACK = 8
#: Address pairs one stream remembers as checked (a conversation repeats its
#: pair on every stanza; the memory is cleared when full, ~0.3 kB an entry).
MAX_CHECKED_ADDRESSES = 512


class InboundStream(ServerStream):
    """One incoming s2s connection."""

    kind = "s2s in"
    factory: "InboundFactory"
    # Messages keep their received bytes and build their children lazily.
    PARSER = WireParser

    def __init__(self) -> None:
        super().__init__()
        self.local: str | None = None  # the 'to' of the header: our host
        self.remote: str | None = None  # the 'from' of the header, when given
        self.pairs: set[tuple[str, str]] = set()  # authenticated (remote, local)
        self.how = ""  # "EXTERNAL" / "dialback"
        self.pending_dialback = 0
        self._counted: str | None = None
        self._unauthenticated = False  # counted in [s2s] max_unauthenticated_inbound
        # (from, to) attribute values that passed _stanza's checks -> parsed JIDs
        self._checked: dict[tuple[str, str], tuple] = {}

    # -- life cycle -----------------------------------------------------------------

    def connectionMade(self) -> None:
        self.secure = self.tls_pending = self.factory.direct_tls
        peer = self.transport.getPeer()
        if not self.service.admit_unauthenticated(getattr(peer, "host", str(peer))):
            # Before anything is read or a TLS handshake is paid for.
            self.phase = CLOSED
            self.transport.abortConnection()
            return
        self._unauthenticated = True
        super().connectionMade()
        self.service.inbound_streams.add(self)

    def _authenticated_once(self) -> None:
        if self._unauthenticated:
            self._unauthenticated = False
            self.service.release_unauthenticated()

    def connection_closed(self, previous: int, reason) -> None:
        self._authenticated_once()
        self.service.inbound_streams.discard(self)
        if self._counted is not None:
            self.service.release_inbound(self._counted)
            self._counted = None
        if previous < AUTHENTICATED and self.secure and reason is not None:
            from OpenSSL import SSL

            if reason.check(SSL.Error):
                log.info("s2s in {peer}: TLS failed ({domain}): {error}", peer=self.peer,
                         domain=self.remote or "?", error=reason.getErrorMessage())

    def parser_limits(self):
        if self.phase >= AUTHENTICATED:
            return self.service.limits_for(self.remote)
        return self.service.preauth_limits

    def header_bytes(self) -> bytes:
        return self.header_for(self.local or self.server.config.default_host, self.remote, True)

    def established_ended(self) -> None:
        log.info("s2s in {peer}: stream from {pairs} closed", peer=self.peer,
                 pairs=", ".join(f"{r}->{l}" for r, l in sorted(self.pairs)) or "?")

    # -- stream header -----------------------------------------------------------------

    def stream_started(self, uri: str, local: str, attrs: dict, decls: dict) -> None:
        if local != "stream" or uri != NS_STREAMS:
            return self.stream_error("invalid-namespace", "expected a stream:stream element")
        if decls.get("") != NS_SERVER:
            return self.stream_error("invalid-namespace", "the default namespace must be jabber:server")
        to, sender = attrs.get("to"), attrs.get("from")
        try:
            host = jidlib.parse(to).host if to else None
        except jidlib.InvalidJID:
            host = None
        if host is None or not self.service.federates(host):
            # A private component is as unknown to other servers as any name.
            return self.stream_error("host-unknown", f"{to!r} is not served here")
        self.local = host
        if sender:
            try:
                remote = jidlib.parse(sender)
            except jidlib.InvalidJID:
                return self.stream_error("invalid-from", "'from' is not a domain")
            if remote.user is not None or remote.resource is not None:
                return self.stream_error("invalid-from", "'from' is not a domain")
            if self.remote is not None and remote.host != self.remote:
                return self.stream_error("invalid-from", "'from' changed on stream restart")
            self.remote = remote.host
        version = attrs.get("version", "0.9")
        if version.split(".")[0] != "1":
            return self.stream_error("unsupported-version", "only XMPP 1.0 is supported")
        if self.remote is not None:
            refusal = self.service.refuse_domain(self.remote)
            if refusal:
                log.info("s2s in {peer}: refusing {domain}: {why}", peer=self.peer,
                         domain=self.remote, why=refusal)
                return self.stream_error("policy-violation", refusal)
            if self._counted is None:
                if not self.service.admit_inbound(self.remote):
                    log.warn("s2s in {peer}: too many connections from {domain}",
                             peer=self.peer, domain=self.remote)
                    return self.stream_error("policy-violation", "too many connections from your domain")
                self._counted = self.remote
        if self.phase == HEADER:
            self.phase = NEGOTIATING
        self._send_header()
        self._send_features()
        if self.phase == NEGOTIATING and self.secure and self.remote is not None:
            self._log_no_method()

    def _log_no_method(self) -> None:
        """Once per stream, after TLS: say why a peer has no way to authenticate."""
        config = self.service.config
        if self._external_ok() or config.dialback_allowed(self.remote):
            return
        check = self.service.trust.check(self.tls_connection(), self.remote)
        why = "a valid certificate is required" if config.needs_certificate(self.remote) \
            else "dialback is disabled here"
        log.info("s2s in {peer}: {domain} cannot authenticate here: {problem}; {why}",
                 peer=self.peer, domain=self.remote, problem=check.how, why=why)

    def _tls_required(self) -> bool:
        if self.secure:
            return False
        return self.service.config.needs_tls(self.remote) if self.remote else self.service.config.require_encryption

    def _external_ok(self) -> bool:
        if self.remote is None or not self.secure:
            return False
        return self.service.trust.check(self.tls_connection(), self.remote).verified

    def _send_features(self) -> None:
        out = ["<stream:features>"]
        if self.phase < AUTHENTICATED:
            if not self.secure:
                out.append(f"<starttls xmlns='{NS_TLS}'>"
                           + ("<required/>" if self._tls_required() else "") + "</starttls>")
            if not self._tls_required():
                if self._external_ok():
                    out.append(f"<mechanisms xmlns='{NS_SASL}'><mechanism>EXTERNAL</mechanism></mechanisms>")
                if self.service.config.dialback and (self.remote is None
                                                     or self.service.config.dialback_allowed(self.remote)):
                    out.append(f"<dialback xmlns='{NS_DIALBACK_FEATURE}'><errors/></dialback>")
        out.append("</stream:features>")
        self.transport.write("".join(out).encode())

    # -- elements ---------------------------------------------------------------------

    def element(self, el: domish.Element) -> None:
        if el.uri == NS_CLIENT and el.name in STANZAS:
            if self.phase != AUTHENTICATED:
                return self.stream_error("not-authorized", "authenticate first")
            return self._stanza(el)
        if el.uri == NS_TLS and el.name == "starttls":
            return self._starttls()
        if self._tls_required():
            return self.stream_error("policy-violation", "STARTTLS is required first")
        if el.uri == NS_SASL and el.name == "auth":
            return self._sasl_external(el)
        if el.uri == NS_DIALBACK and el.name == "result":
            return self._db_result(el)
        if el.uri == NS_DIALBACK and el.name == "verify":
            return self._db_verify(el)
        return self.stream_error("unsupported-stanza-type", f"unexpected <{el.name}/>")

    def _starttls(self) -> None:
        def options():
            tls_options = self.service.tls.starttls_server(self.local)
            tls_options.tls.context(self.local, client=False)  # fails now, not inside the handshake
            return tls_options

        self.answer_starttls(self.local, options)

    def _sasl_external(self, el: domish.Element) -> None:
        if self.phase != NEGOTIATING or el.getAttribute("mechanism") != "EXTERNAL":
            return self._sasl_failure("invalid-mechanism")
        text = str(el).strip()
        authzid = None
        if text and text != "=":
            try:
                authzid = base64.b64decode(text, validate=True).decode("utf-8")
            except (binascii.Error, ValueError):
                return self._sasl_failure("incorrect-encoding")
        if self.remote is None:
            return self._sasl_failure("not-authorized", "send 'from' in the stream header")
        if authzid and authzid != self.remote:
            return self._sasl_failure("invalid-authzid")
        check = self.service.trust.check(self.tls_connection(), self.remote)
        if not check.verified:
            log.info("s2s in {peer}: EXTERNAL refused for {domain}: {why}", peer=self.peer,
                     domain=self.remote, why=check.how)
            return self._sasl_failure("not-authorized")
        self.transport.write(f"<success xmlns='{NS_SASL}'/>".encode())
        log.info("s2s in {peer}: {remote} authenticated for {local} with EXTERNAL ({how}, {tls})",
                 peer=self.peer, remote=self.remote, local=self.local, how=check.how,
                 tls=self.tls_version())
        self.how = "EXTERNAL"
        self.pairs.add((self.remote, self.local))
        self._authenticated()
        self._new_parser()  # stream restart (RFC 6120 §6.4.6)

    def _sasl_failure(self, condition: str, text: str = "") -> None:
        body = f"<failure xmlns='{NS_SASL}'><{condition}/>"
        if text:
            body += f"<text>{domish.escapeToXml(text)}</text>"
        self.transport.write((body + "</failure>").encode())
        if condition == "not-authorized":
            self.stream_error("not-authorized", text or "certificate not accepted")

    def _authenticated(self) -> None:
        if self.phase != AUTHENTICATED:
            self.phase = AUTHENTICATED
            self._authenticated_once()
            self.cancel_auth_timeout()
            # Dialback authenticates without a stream restart: the parser
            # this stream keeps gets the post-authentication limits now.
            self.parser.set_limits(self.parser_limits())

    # -- dialback (we are the receiving server) ------------------------------------------

    def _db_result(self, el: domish.Element) -> None:
        sender, to = el.getAttribute("from"), el.getAttribute("to")
        key = str(el).strip()
        try:
            remote = jidlib.parse(sender or "").host
            local = jidlib.parse(to or "").host
        except jidlib.InvalidJID:
            return self.stream_error("improper-addressing", "db:result needs from and to domains")
        if not self.service.federates(local):
            return self._db_answer(local, remote, "error", "item-not-found")
        if self.remote is not None and self.how == "" and remote != self.remote and not self.pairs:
            return self.stream_error("invalid-from", "db:result from another domain than the stream")
        config = self.service.config
        refusal = self.service.refuse_domain(remote)
        if refusal or not config.dialback_allowed(remote):
            why = refusal or ("a valid certificate is required" if config.needs_certificate(remote)
                              else "dialback is disabled here")
            log.info("s2s in {peer}: dialback from {domain} refused: {why}", peer=self.peer,
                     domain=remote, why=why)
            return self._db_answer(local, remote, "error", "policy-violation", why)
        if (remote, local) in self.pairs:
            return self._db_answer(local, remote, "valid")
        if not key or self.pending_dialback >= MAX_PENDING_DIALBACK:
            return self._db_answer(local, remote, "error", "policy-violation", "too many requests")
        self.pending_dialback += 1
        d = self.service.verify_dialback(local, remote, self.stream_id, key)
        d.addCallback(self._db_checked, local, remote)

    def _db_checked(self, outcome: str, local: str, remote: str) -> None:
        self.pending_dialback -= 1
        if self.phase == CLOSED:
            return
        if outcome == "valid":
            log.info("s2s in {peer}: {remote} authenticated for {local} with dialback ({tls})",
                     peer=self.peer, remote=remote, local=local, tls=self.tls_version())
            self.pairs.add((remote, local))
            self.how = self.how or "dialback"
            self._db_answer(local, remote, "valid")
            self._authenticated()
        elif outcome == "invalid":
            log.info("s2s in {peer}: dialback key of {remote} is invalid", peer=self.peer, remote=remote)
            self._db_answer(local, remote, "invalid")
            if not self.pairs:
                self.stream_error("not-authorized", "dialback key invalid")
        else:
            log.info("s2s in {peer}: dialback for {remote} failed: {why}", peer=self.peer,
                     remote=remote, why=outcome)
            self._db_answer(local, remote, "error", "remote-server-not-found", outcome)

    def _db_answer(self, local: str, remote: str, kind: str, condition: str | None = None,
                   text: str = "") -> None:
        body = f"<db:result from='{local}' to='{remote}' type='{kind}'"
        if condition is None:
            body += "/>"
        else:
            body += (f"><error type='cancel'><{condition} xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
                     + (f"<text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>{domish.escapeToXml(text)}</text>"
                        if text else "") + "</error></db:result>")
        self.transport.write(body.encode())

    def _db_verify(self, el: domish.Element) -> None:
        """We are the authoritative server: is this key one of ours?"""
        sender, to, ident = el.getAttribute("from"), el.getAttribute("to"), el.getAttribute("id")
        try:
            receiving = jidlib.parse(sender or "").host
            originating = jidlib.parse(to or "").host
        except jidlib.InvalidJID:
            return self.stream_error("improper-addressing", "db:verify needs from and to domains")
        if not self.service.federates(originating) or not ident:
            kind = "invalid"
        else:
            valid = self.service.keys.check(str(el), receiving, originating, ident)
            kind = "valid" if valid else "invalid"
        log.info("s2s in {peer}: dialback verify for {orig} -> {recv}: {kind}", peer=self.peer,
                 orig=originating, recv=receiving, kind=kind)
        self.transport.write(
            f"<db:verify from='{domish.escapeToXml(originating, True)}'"
            f" to='{domish.escapeToXml(receiving, True)}' id='{domish.escapeToXml(ident or '', True)}'"
            f" type='{kind}'/>".encode())

    # -- stanzas ---------------------------------------------------------------------------

    def _stanza(self, el: domish.Element) -> None:
        attrs = el.attributes
        key = (attrs.get("from"), attrs.get("to"))
        checked = self._checked.get(key)
        if checked is not None:
            # These addresses passed the checks below on this stream; its
            # pairs only ever grow, so they still do.
            return self.service.inbound(el, *checked)
        sender_attr, to_attr = key
        if not sender_attr or not to_attr:
            return self.stream_error("improper-addressing", "stanzas need 'from' and 'to'")
        try:
            sender = jidlib.parse(sender_attr)
        except jidlib.InvalidJID:
            return self.stream_error("invalid-from", "'from' is not a valid JID")
        try:
            to = jidlib.parse(to_attr)
        except jidlib.InvalidJID:
            return self.stream_error("improper-addressing", "'to' is not a valid JID")
        if (sender.host, to.host) not in self.pairs:
            if not any(r == sender.host for r, _l in self.pairs):
                log.warn("s2s in {peer}: forged 'from' {sender} (authenticated: {pairs})",
                         peer=self.peer, sender=sender.host,
                         pairs=", ".join(r for r, _l in sorted(self.pairs)))
                return self.stream_error("invalid-from", f"{sender.host} is not authenticated on this stream")
            if not self.service.federates(to.host):
                # Not served, or a private component: either way unknown to
                # peers (no stanza error: it would have to come from that
                # domain, which does not federate).
                return self.stream_error("host-unknown", f"{to.host} is not served here")
            return self.stream_error("improper-addressing", f"{to.host} was not authenticated on this stream")
        checked = self._checked
        if len(checked) >= MAX_CHECKED_ADDRESSES:
            checked.clear()
        checked[key] = (sender, to)
        self.service.inbound(el, sender, to)

    def describe(self) -> dict:
        return {"direction": "in", "peer": self.peer,
                "pairs": sorted(f"{r}->{l}" for r, l in self.pairs) or [f"{self.remote or '?'}->{self.local or '?'}"],
                "tls": self.tls_version(), "auth": self.how or "none",
                "state": "established" if self.phase == AUTHENTICATED else "negotiating"}


class InboundFactory(protocol.ServerFactory):
    protocol = InboundStream

    def __init__(self, service, direct_tls: bool = False) -> None:
        self.service = service
        self.direct_tls = direct_tls

"""SASL mechanisms for client streams (RFC 6120 §6).

Each mechanism is a small state machine driven by the c2s stream with the
decoded payloads of ``<auth/>`` and ``<response/>``; it answers with a
:class:`Challenge` or :class:`Success` (through a Deferred, since connectors
are networked) or raises :class:`SASLFailure` with the RFC 6120 §6.5
condition.  SCRAM runs on :mod:`xmppd.scram` from the stored keys; the
client-first message is parsed first to learn the username (and, for -PLUS,
the channel-binding type), then the credentials are fetched.
EXTERNAL (XEP-0178) takes the identity from the TLS client certificate that
``xmppd.certs`` verified during the handshake.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger

from xmppd import jid as jidlib
from xmppd.auth.base import (
    IAuthConnector,
    NotSupported,
    ScramCredentials,
    TemporaryAuthFailure,
    UserExists,
)
from xmppd.logfilter import log_observer
from xmppd.scram import ScramError, ScramServer, dummy_credentials

log = Logger(observer=log_observer)

#: Iterations announced for an account that does not exist (the default of
#: ``[auth] scram_iterations``): such an exchange must look like any other.
UNKNOWN_USER_ITERATIONS = 4096


class SASLFailure(Exception):
    """Ends the exchange with ``<failure><condition/></failure>``."""

    def __init__(self, condition: str, text: str = "") -> None:
        super().__init__(f"{condition}: {text}" if text else condition)
        self.condition = condition
        self.text = text


@dataclass
class Challenge:
    data: bytes


@dataclass
class Success:
    username: str  # prepared localpart
    data: bytes | None = None


@dataclass
class SASLContext:
    """What a mechanism may know about the connection it runs on."""

    host: str
    connector: IAuthConnector
    secure: bool
    peer: str
    # Channel-binding data for a type name ("tls-exporter", ...), None if unavailable.
    channel_bindings: Callable[[str], bytes | None] = lambda _name: None
    plus_offered: bool = False
    # EXTERNAL: the client certificate (xmppd.certs.ClientCertificate) verified
    # for ``host``, or None; where its XMPP addresses come from; whether a
    # missing account is created.
    client_cert: Any = None
    cert_identity: tuple[str, ...] = ("xmppaddr",)
    auto_provision: bool = False
    # Seconds before this client may try the account again (brute-force
    # throttle: per address+account, address and account).
    account_wait: Callable[[str], float] = lambda _username: 0.0


class Mechanism:
    name = ""

    def __init__(self, ctx: SASLContext) -> None:
        self.ctx = ctx
        # The prepared localpart once the client has named it (for logs and
        # the per-account throttle).
        self.username = ""

    def _claim(self, username: str) -> str:
        """Record who the client says it is; refuse while that account is throttled."""
        self.username = username
        wait = self.ctx.account_wait(username)
        if wait:
            raise SASLFailure("temporary-auth-failure", f"too many failures, retry in {int(wait) + 1}s")
        return username

    def start(self, initial: bytes | None) -> defer.Deferred:
        raise NotImplementedError

    def respond(self, data: bytes) -> defer.Deferred:
        raise SASLFailure("malformed-request", "unexpected response")


def _check_authzid(authzid: str, username: str, host: str) -> None:
    """Only the account itself may be named as authorization identity."""
    if not authzid:
        return
    try:
        requested = jidlib.parse(authzid)
    except jidlib.InvalidJID:
        raise SASLFailure("invalid-authzid") from None
    if requested.user != username or requested.host != host or requested.resource:
        raise SASLFailure("invalid-authzid")


def _prep_user(raw: str) -> str:
    try:
        return jidlib.prep_localpart(raw)
    except jidlib.InvalidJID:
        raise SASLFailure("not-authorized", "invalid username") from None


def _backend_errors(failure):
    """Map connector errors: an unavailable backend never means 'wrong password'."""
    if failure.check(SASLFailure):
        return failure
    if failure.check(TemporaryAuthFailure):
        raise SASLFailure("temporary-auth-failure", str(failure.value))
    log.failure("authentication backend error", failure)
    raise SASLFailure("temporary-auth-failure", "backend error")


class Plain(Mechanism):
    """RFC 4616; offered only on encrypted streams."""

    name = "PLAIN"

    def start(self, initial: bytes | None) -> defer.Deferred:
        if initial is None:
            return defer.succeed(Challenge(b""))
        return self.respond(initial)

    def respond(self, data: bytes) -> defer.Deferred:
        try:
            authzid, authcid, password = data.decode("utf-8").split("\x00")
        except (UnicodeDecodeError, ValueError):
            return defer.fail(SASLFailure("malformed-request"))
        if not authcid or not password:
            return defer.fail(SASLFailure("not-authorized"))
        try:
            username = self._claim(_prep_user(authcid))
            _check_authzid(authzid, username, self.ctx.host)
        except SASLFailure as f:
            return defer.fail(f)
        d = defer.maybeDeferred(
            self.ctx.connector.check_password, username, self.ctx.host, password
        )

        def checked(ok: bool):
            if not ok:
                raise SASLFailure("not-authorized")
            return Success(username)

        return d.addCallback(checked).addErrback(_backend_errors)


def parse_client_first(message: str) -> tuple[str, str, str, str]:
    """(gs2 flag, cb name or '', authzid, username) from a SCRAM client-first."""
    parts = message.split(",", 2)
    if len(parts) != 3:
        raise SASLFailure("malformed-request")
    flag, authz, bare = parts
    cbname = ""
    if flag.startswith("p="):
        flag, cbname = "p", flag[2:]
    elif flag not in ("n", "y"):
        raise SASLFailure("malformed-request")
    authzid = ""
    if authz:
        if not authz.startswith("a="):
            raise SASLFailure("malformed-request")
        authzid = authz[2:].replace("=2C", ",").replace("=3D", "=")
    for attr in bare.split(","):
        if attr.startswith("n="):
            user = attr[2:].replace("=2C", ",").replace("=3D", "=")
            return flag, cbname, authzid, user
    raise SASLFailure("malformed-request")


class Scram(Mechanism):
    """SCRAM-SHA-1 / SCRAM-SHA-256 (RFC 5802, RFC 7677) on :mod:`xmppd.scram`."""

    plus = False

    def __init__(self, ctx: SASLContext, hash_name: str) -> None:
        super().__init__(ctx)
        self.hash_name = hash_name
        self.name = hash_name + ("-PLUS" if self.plus else "")
        self._server = None
        self._unknown_user = False

    def start(self, initial: bytes | None) -> defer.Deferred:
        if not initial:
            return defer.fail(SASLFailure("malformed-request", "no client-first"))
        try:
            message = initial.decode("utf-8")
            flag, cbname, authzid, raw_user = parse_client_first(message)
            binding = self._binding_for(flag, cbname)
            self._claim(_prep_user(raw_user))
            _check_authzid(authzid, self.username, self.ctx.host)
        except UnicodeDecodeError:
            return defer.fail(SASLFailure("malformed-request"))
        except SASLFailure as f:
            return defer.fail(f)
        d = defer.maybeDeferred(
            self.ctx.connector.get_scram_credentials,
            self.username, self.ctx.host, self.hash_name,
        )
        d.addCallback(self._first, message, binding)
        return d.addErrback(_backend_errors)

    def _binding_for(self, flag: str, cbname: str):
        """Channel binding for this exchange; plain SCRAM refuses binding."""
        if self.plus:
            if flag != "p":
                raise SASLFailure("malformed-request", "-PLUS needs channel binding")
            data = self.ctx.channel_bindings(cbname)
            if data is None:
                raise SASLFailure("malformed-request", f"channel binding {cbname!r} not available")
            return (cbname, data)
        if flag == "p":
            raise SASLFailure("malformed-request", "channel binding needs a -PLUS mechanism")
        if flag == "y" and self.ctx.plus_offered:
            # RFC 5802 §6: the client thinks we do not support binding, but we
            # offered -PLUS: someone stripped it (downgrade attack).
            raise SASLFailure("not-authorized", "channel binding downgrade detected")
        return None

    def _first(self, creds: ScramCredentials | None, message: str, binding):
        if creds is None:
            # Run the exchange with throw-away keys so that unknown users and
            # wrong passwords look the same on the wire.
            self._unknown_user = True
            creds = ScramCredentials(*dummy_credentials(self.hash_name, UNKNOWN_USER_ITERATIONS))
        self._server = ScramServer(self.hash_name, creds.salt, creds.stored_key,
                                   creds.server_key, creds.iterations, binding)
        try:
            return Challenge(self._server.first(message).encode("utf-8"))
        except ScramError as e:
            raise SASLFailure("malformed-request", str(e)) from None

    def respond(self, data: bytes) -> defer.Deferred:
        if self._server is None:
            return defer.fail(SASLFailure("malformed-request"))
        try:
            final = self._server.final(data.decode("utf-8"))
        except (ScramError, UnicodeDecodeError) as e:
            return defer.fail(SASLFailure("not-authorized", str(e)))
        if self._unknown_user:
            return defer.fail(SASLFailure("not-authorized"))
        return defer.succeed(Success(self.username, final.encode("utf-8")))


class ScramPlus(Scram):
    """SCRAM-*-PLUS: the same exchange bound to the TLS channel."""

    plus = True


class External(Mechanism):
    """
    SASL EXTERNAL with a TLS client certificate (RFC 6120 §6.4, XEP-0178).

    The certificate's chain was verified during the handshake; here its XMPP
    addresses (see ``SASLContext.cert_identity``) are matched against the
    authorization identity the client sends (possibly empty):

    * empty authzid: the one address of this vhost the certificate names;
      none -> ``not-authorized``; several -> ``invalid-authzid`` (the client
      must say which);
    * authzid given: it must be a bare JID the certificate names, of this
      vhost; otherwise ``invalid-authzid``;
    * the account must exist on the connector (``not-authorized`` otherwise)
      unless auto-provisioning creates it with a random password nobody knows.
    """

    name = "EXTERNAL"

    def __init__(self, ctx: SASLContext) -> None:
        super().__init__(ctx)
        self._started = False

    def start(self, initial: bytes | None) -> defer.Deferred:
        if initial is None:  # RFC 6120 §6.4.2: empty challenge, the authzid comes next
            return defer.succeed(Challenge(b""))
        return self.respond(initial)

    def respond(self, data: bytes) -> defer.Deferred:
        if self._started:
            return defer.fail(SASLFailure("malformed-request", "unexpected response"))
        self._started = True
        cert = self.ctx.client_cert
        if cert is None or not cert.verified_for(self.ctx.host):
            return defer.fail(SASLFailure("not-authorized", "no verified client certificate"))
        try:
            authzid = data.decode("utf-8")
            jid = self._choose(cert, authzid)
        except UnicodeDecodeError:
            return defer.fail(self._refused(cert, SASLFailure("malformed-request")))
        except SASLFailure as f:
            return defer.fail(self._refused(cert, f))
        d = defer.maybeDeferred(self.ctx.connector.user_exists, jid.user, jid.host)
        d.addCallback(self._account, jid, cert)
        d.addErrback(_backend_errors)

        def refused(failure):
            failure.trap(SASLFailure)
            self._refused(cert, failure.value)
            return failure

        return d.addErrback(refused)

    def _identities(self, cert) -> list[jidlib.JID]:
        """Bare JIDs (with a localpart) the certificate names; invalid strings are skipped."""
        found: dict[str, jidlib.JID] = {}
        for raw in cert.identities(self.ctx.cert_identity):
            try:
                j = jidlib.parse(raw.strip())
            except (jidlib.InvalidJID, ValueError):
                continue
            if j.user:
                found.setdefault(j.bare, j.bare_jid())
        return list(found.values())

    def _choose(self, cert, authzid: str) -> jidlib.JID:
        identities = self._identities(cert)
        host = self.ctx.host
        if not identities:
            raise SASLFailure("not-authorized", "the certificate names no XMPP address")
        local = [j for j in identities if j.host == host]
        if not authzid:
            if len(local) == 1:
                return local[0]
            if not local:
                raise SASLFailure("not-authorized", f"the certificate is not for {host}")
            raise SASLFailure("invalid-authzid", "the certificate names several addresses; "
                                                 "send the one to use as authzid")
        try:
            requested = jidlib.parse(authzid)
        except jidlib.InvalidJID:
            raise SASLFailure("invalid-authzid", "not a JID") from None
        if requested.resource or not requested.user:
            raise SASLFailure("invalid-authzid", "must be a bare JID")
        if requested.bare not in {j.bare for j in identities}:
            raise SASLFailure("invalid-authzid", "the certificate does not name this address")
        if requested.host != host:
            raise SASLFailure("invalid-authzid", f"not an account of {host}")
        return requested

    def _account(self, exists: bool, jid: jidlib.JID, cert) -> defer.Deferred | Success:
        if exists:
            return self._success(jid, cert, "")
        if not self.ctx.auto_provision:
            raise SASLFailure("not-authorized", "no such account")
        # Nobody knows this password: the account can log in only with the certificate.
        d = defer.maybeDeferred(self.ctx.connector.add_user, jid.user, jid.host,
                                secrets.token_urlsafe(32))

        def added(_):
            log.info("EXTERNAL: created account {jid} for certificate {cert}",
                     jid=jid.bare, cert=cert.describe())
            return self._success(jid, cert, ", account created")

        def not_added(failure):
            if failure.check(UserExists):  # created meanwhile by another connection
                return self._success(jid, cert, "")
            if failure.check(NotSupported):
                raise SASLFailure("not-authorized", "no such account (the account backend "
                                                    "cannot create accounts)")
            return failure

        return d.addCallbacks(added, not_added)

    def _success(self, jid: jidlib.JID, cert, how: str) -> Success:
        log.info("c2s {peer}: certificate {cert} authenticated {jid} (EXTERNAL{how})",
                 peer=self.ctx.peer, cert=cert.describe(), jid=jid.bare, how=how,
                 subject=cert.subject, serial=cert.serial, issuer=cert.issuer)
        return Success(jid.user)

    def _refused(self, cert, failure: SASLFailure) -> SASLFailure:
        log.info("c2s {peer}: EXTERNAL refused for certificate {cert}: {condition}{text}",
                 peer=self.ctx.peer, cert=cert.describe(), condition=failure.condition,
                 text=f" ({failure.text})" if failure.text else "")
        return failure


MECHANISM_ORDER = (
    "SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN",
)


def available_mechanisms(connector: IAuthConnector, secure: bool, binding: bool = False,
                         external: bool = False, passwords: bool = True) -> list[str]:
    """Mechanism names to advertise, strongest first.

    PLAIN is never offered on an unencrypted stream; -PLUS only where the
    connection has channel bindings and the connector has SCRAM credentials.
    EXTERNAL comes first, and only when ``external`` (a client certificate
    verified for this vhost) on an encrypted stream.  ``passwords=False``
    (a certificate-only vhost) drops PLAIN and SCRAM altogether.
    """
    supported = set(connector.mechanisms()) if passwords else set()
    if binding:
        supported |= {m + "-PLUS" for m in supported if m.startswith("SCRAM-")}
    names = [m for m in MECHANISM_ORDER if m in supported]
    if not secure:
        names = [m for m in names if m != "PLAIN"]
    if external and secure:
        names.insert(0, "EXTERNAL")
    return names


def create(name: str, ctx: SASLContext) -> Mechanism:
    if name == "PLAIN":
        return Plain(ctx)
    if name in ("SCRAM-SHA-1", "SCRAM-SHA-256"):
        return Scram(ctx, name)
    if name in ("SCRAM-SHA-1-PLUS", "SCRAM-SHA-256-PLUS"):
        return ScramPlus(ctx, name[: -len("-PLUS")])
    if name == "EXTERNAL":
        return External(ctx)
    raise SASLFailure("invalid-mechanism")

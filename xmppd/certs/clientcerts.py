"""
Client certificates (SASL EXTERNAL, XEP-0178): which vhosts ask for one,
what they trust (client CAs, CRLs), how each handshake's verification is
recorded, and what the stream layer sees of it (:func:`client_certificate`).
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.logger import Logger

from xmppd.certs.contexts import TLSPolicy, _build_context, _session_id
from xmppd.certs.identity import _normalise, _san, _short_name, _xmpp_addrs
from xmppd.certs.model import _Loaded
from xmppd.certs.pem import (
    _CERT_SUFFIXES,
    CertificateError,
    _listdir,
    _parse_certs,
    _pem_blocks,
    _read,
)
from xmppd.logfilter import log_observer

# The namespace of the single module this package was split from, so log
# lines read as before.
log = Logger(namespace="xmppd.certs", observer=log_observer)


#: ``[tls] client_cert`` values: whether a vhost asks TLS clients for a certificate.
CLIENT_CERT_MODES = ("off", "optional", "required")


@dataclass(frozen=True)
class ClientCertPolicy:
    """
    Client certificates of one vhost (docs/external.rst).

    ``optional`` asks for a certificate and records whether its chain verified
    against ``ca`` (files or directories of PEM certificates), the system
    store when ``system`` is set, and ``crl`` (CRL files or directories; with
    any CRL every client certificate's issuer must have one).  The handshake
    never fails for a missing or bad certificate; SASL EXTERNAL is just not
    offered.  ``required`` fails the handshake instead.
    """

    mode: str = "off"
    ca: tuple[str, ...] = ()
    crl: tuple[str, ...] = ()
    system: bool = False

    def __post_init__(self) -> None:
        if self.mode not in CLIENT_CERT_MODES:
            allowed = ", ".join(repr(m) for m in CLIENT_CERT_MODES)
            raise ValueError(f"[tls] client_cert must be one of {allowed}, not {self.mode!r}")
        if self.mode != "off" and not self.ca and not self.system:
            raise ValueError("[tls] client_cert needs client_ca or client_ca_system = true")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


_CRL_SUFFIXES = (".pem", ".crl", ".der")
_EMAIL_OID = NameOID.EMAIL_ADDRESS

#: OpenSSL X509_V_ERR_* codes a client certificate is typically refused for.
_VERIFY_ERRORS = {
    2: "issuer certificate not found",
    3: "no CRL for the issuer (every issuer needs one when client_crl is set)",
    4: "cannot decrypt the certificate signature",
    7: "certificate signature does not verify",
    8: "CRL signature does not verify",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    11: "CRL is not yet valid",
    12: "CRL has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in the chain",
    20: "issuer is not a trusted client CA",
    21: "cannot verify the first certificate",
    22: "certificate chain too long",
    23: "certificate is revoked",
    24: "issuer is not a CA",
    25: "path length constraint exceeded",
    26: "certificate is not for client authentication (extended key usage)",
    27: "root CA is not trusted for this purpose",
    28: "certificate rejected",
}


@dataclass(frozen=True)
class _ClientTrust:
    """What a vhost verifies client certificates against, read from disk."""

    host: str
    policy: ClientCertPolicy
    cas: tuple[x509.Certificate, ...]
    crls: tuple[x509.CertificateRevocationList, ...]

    @property
    def required(self) -> bool:
        return self.policy.mode == "required"


@dataclass
class _Verification:
    """What OpenSSL's chain verification said about one connection's client certificate."""

    host: str | None
    errors: list[str] = field(default_factory=list)


# Connection -> verification record, filled by the verify callback during the
# handshake.  Weak, so a record lives exactly as long as its connection.
_VERIFICATIONS: "weakref.WeakKeyDictionary[SSL.Connection, _Verification]" = (
    weakref.WeakKeyDictionary())
# Context -> (verify mode, callback), so the SNI callback can carry a vhost's
# client-certificate settings over to the connection when it switches context
# (OpenSSL takes the verify mode and callback from the first context only).
_CLIENT_VERIFY: "weakref.WeakKeyDictionary[SSL.Context, tuple[int, Callable]]" = (
    weakref.WeakKeyDictionary())


def _verify_error(errnum: int) -> str:
    return _VERIFY_ERRORS.get(errnum, f"verification error {errnum}")


def _verifier(host: str, required: bool) -> Callable:
    """
    The verify callback of a vhost's contexts.  It records every error with
    the connection; in optional mode it always accepts, so a bad certificate
    never aborts the handshake (SASL EXTERNAL then is not offered); in
    required mode OpenSSL's verdict stands and the handshake fails.
    """

    def verify(conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int,
               ok: int) -> bool:
        try:
            record = _VERIFICATIONS.get(conn)
            if record is None or record.host != host:
                record = _VERIFICATIONS[conn] = _Verification(host)
            if not ok:
                try:
                    subject = _short_name(cert.to_cryptography().subject)
                except Exception:
                    subject = "?"
                problem = f"{_verify_error(errnum)} (depth {depth}: {subject})"
                if problem not in record.errors:
                    record.errors.append(problem)
                if required:
                    log.info("{host}: refusing TLS client certificate: {problem}",
                             host=host, problem=problem)
        except Exception:  # never let bookkeeping decide a handshake
            log.failure("while recording a client certificate verification")
            return bool(ok) if required else True
        return bool(ok) if required else True

    return verify


def _files_in(path: str, suffixes: tuple[str, ...]) -> list[str]:
    """A configured path: the file itself, or the matching files of a directory."""
    if os.path.isdir(path):
        return [os.path.join(path, n) for n in _listdir(path)
                if not n.startswith(".") and n.lower().endswith(suffixes)]
    return [path]


def _read_client_cas(path: str) -> list[x509.Certificate]:
    """Certificates of one configured client_ca entry (PEM file, DER file or directory)."""
    found: list[x509.Certificate] = []
    for name in _files_in(path, _CERT_SUFFIXES + (".der",)):
        data = _read(name, "client CA")
        blocks = _pem_blocks(data)
        if blocks:
            certs = _parse_certs(blocks, name)
        else:
            try:
                certs = [x509.load_der_x509_certificate(data)]
            except ValueError:
                certs = []
        if not certs and name == path:
            raise CertificateError(name, "client CA file holds no certificate "
                                         "(expected PEM CERTIFICATE blocks)")
        found.extend(certs)
    if not found:
        raise CertificateError(path, "client CA directory holds no certificate "
                                     "(*.pem, *.crt, *.cer, *.der)")
    return found


def _read_crls(path: str) -> list[x509.CertificateRevocationList]:
    """CRLs of one configured client_crl entry (PEM or DER file, or directory)."""
    found = []
    for name in _files_in(path, _CRL_SUFFIXES):
        data = _read(name, "CRL")
        blocks = [b for label, b in _pem_blocks(data) if label == "X509 CRL"]
        try:
            if blocks:
                found.extend(x509.load_pem_x509_crl(b) for b in blocks)
            else:
                found.append(x509.load_der_x509_crl(data))
        except ValueError as e:
            raise CertificateError(name, f"is not a valid CRL ({e})") from None
    if not found:
        raise CertificateError(path, "CRL directory holds no CRL (*.pem, *.crl, *.der)")
    return found


def _load_client_trust(host: str, policy: ClientCertPolicy,
                       cache: dict[tuple[str, str], list] | None = None) -> _ClientTrust:
    """Read a vhost's client CAs and CRLs; CertificateError names the bad file."""
    cache = {} if cache is None else cache
    cas: dict[bytes, x509.Certificate] = {}
    crls = []
    for kind, paths in (("ca", policy.ca), ("crl", policy.crl)):
        for path in paths:
            key = (kind, path)
            if key not in cache:
                try:
                    cache[key] = _read_client_cas(path) if kind == "ca" else _read_crls(path)
                except CertificateError as e:
                    cache[key] = e  # type: ignore[assignment]
            value = cache[key]
            if isinstance(value, CertificateError):
                what = "client_ca" if kind == "ca" else "client_crl"
                raise CertificateError(value.path, f"{value.problem} ({what} of host {host})")
            if kind == "ca":
                for cert in value:
                    cas.setdefault(cert.fingerprint(hashes.SHA256()), cert)
            else:
                crls.extend(value)
    return _ClientTrust(host, policy, tuple(cas.values()), tuple(crls))


def _request_client_certs(ctx: SSL.Context, trust: _ClientTrust) -> None:
    """
    Make ``ctx`` ask for a client certificate and verify it against the
    vhost's CAs (dates included; CRLs with X509_V_FLAG_CRL_CHECK).  Session
    resumption is switched off: a resumed session carries no fresh
    verification, and a revocation must take effect on the next connection.
    """
    store = ctx.get_cert_store()
    assert store is not None
    for ca in trust.cas:
        try:
            store.add_cert(crypto.X509.from_cryptography(ca))
        except crypto.Error:
            pass  # already in the store
        ctx.add_client_ca(ca)  # names sent in CertificateRequest
    if trust.policy.system:
        ctx.set_default_verify_paths()
    for crl in trust.crls:
        store.add_crl(crl)
    if trust.crls:
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
    mode = SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if trust.required else 0)
    callback = _verifier(trust.host, trust.required)
    ctx.set_verify(mode, callback)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_options(SSL.OP_NO_TICKET)
    _CLIENT_VERIFY[ctx] = (mode, callback)


def _client_context(policy: TLSPolicy, loaded: _Loaded, trust: _ClientTrust) -> SSL.Context:
    """A vhost's own context: its certificate plus its client-certificate settings."""
    ctx = _build_context(policy, loaded.chain, loaded.key, loaded.source.cert_path)
    ctx.set_session_id(_session_id(f"{loaded.fingerprint.hex()}:client:{trust.host}"))
    _request_client_certs(ctx, trust)
    return ctx


@dataclass(frozen=True)
class ClientCertificate:
    """
    The certificate a TLS client presented, and whether it verified.

    ``host`` is the vhost whose client CAs checked it (the STARTTLS stream's
    host or the SNI name), None when no vhost asked for one; ``problem`` says
    why verification failed, None when it succeeded.
    """

    cert: x509.Certificate
    host: str | None
    problem: str | None

    @property
    def verified(self) -> bool:
        return self.host is not None and self.problem is None

    def verified_for(self, host: str) -> bool:
        """Verified against the trust settings of ``host`` (not another vhost's)."""
        return self.verified and _normalise(host) == _normalise(self.host or "")

    @property
    def subject(self) -> str:
        return self.cert.subject.rfc4514_string() or "(empty)"

    @property
    def issuer(self) -> str:
        return self.cert.issuer.rfc4514_string() or "(empty)"

    @property
    def serial(self) -> str:
        return f"{self.cert.serial_number:#x}"

    def describe(self) -> str:
        """One line for logs: subject, serial, issuer."""
        return f"subject '{self.subject}', serial {self.serial}, issuer '{self.issuer}'"

    def identities(self, sources: Sequence[str] = ("xmppaddr",)) -> list[str]:
        """
        The XMPP addresses the certificate names, in the order of ``sources``:
        ``xmppaddr`` (id-on-xmppAddr otherName SANs, XEP-0178), ``email``
        (rfc822Name SANs, then the subject's emailAddress), ``cn`` (subject
        common names).  Raw strings; the SASL layer parses them as JIDs.
        """
        out: list[str] = []
        san = _san(self.cert)
        for source in sources:
            if source == "xmppaddr":
                out.extend(_xmpp_addrs(self.cert))
            elif source == "email":
                if san is not None:
                    out.extend(san.get_values_for_type(x509.RFC822Name))
                out.extend(str(a.value) for a in
                           self.cert.subject.get_attributes_for_oid(_EMAIL_OID))
            elif source == "cn":
                out.extend(str(a.value) for a in
                           self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
            else:
                raise ValueError(f"unknown certificate identity source {source!r}")
        return list(dict.fromkeys(out))


def client_certificate(conn: SSL.Connection | None) -> ClientCertificate | None:
    """
    The client certificate of an established connection, None when the client
    sent none.  Verified only when this connection's own handshake ran the
    vhost's verification without error (a resumed session never counts).
    """
    if conn is None:
        return None
    try:
        cert = conn.get_peer_certificate(as_cryptography=True)
    except SSL.Error:
        return None
    if cert is None:
        return None
    record = _VERIFICATIONS.get(conn)
    if record is None:
        return ClientCertificate(cert, None, "no vhost asked for a client certificate")
    problem = "; ".join(record.errors) if record.errors else None
    return ClientCertificate(cert, record.host, problem)

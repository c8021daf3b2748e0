"""TLS for server-to-server streams: our certificate out, the peer's checked.

Both sides present the vhost's certificate from the certificate store
(:meth:`~xmppd.certs.CertificateStore.credentials`), so a reload of the
store is picked up by the next connection.  Both sides ask for the peer's
certificate but never fail a handshake over it: the handshake only
encrypts.  Whether the certificate *authenticates* the peer is decided
afterwards by :meth:`PeerTrust.check`, against ``[s2s] ca_file`` /
``ca_dir`` and (``ca_system``) the system store, with the RFC 6125 /
RFC 6120 §13.7.1.2 identity checks (DNS-ID, SRV-ID ``_xmpp-server``,
XmppAddr).  A certificate that does not verify leaves dialback, where the
policy allows it.

The verification runs without an X.509 purpose, so a server certificate
lacking the clientAuth extended key usage is accepted from the initiating
side (public CAs stopped issuing that usage in 2026).
"""
from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from xmppd.certs import identity_for, policy_context
from xmppd.logfilter import log_observer

log = Logger(observer=log_observer)

_CERT_SUFFIXES = (".pem", ".crt", ".cer")


def _accept_any(conn, cert, errnum, depth, ok) -> bool:
    """Ask for the peer's certificate without letting it decide the handshake."""
    return True


@dataclass(frozen=True)
class PeerCertificate:
    """What the peer's certificate says about a domain."""

    present: bool
    verified: bool  # chain valid and identity matches the domain
    how: str  # the identity that matched (DNS-ID, SRV-ID, XmppAddr) or the problem


class PeerTrust:
    """The trust anchors of ``[s2s]``, read once at start-up."""

    def __init__(self, ca_file: str | None, ca_dir: str | None, system: bool) -> None:
        self.store = crypto.X509Store()
        count = 0
        for path in (ca_file,) if ca_file else ():
            count += self._add_file(path, required=True)
        if ca_dir:
            if not os.path.isdir(ca_dir):
                raise ValueError(f"{ca_dir}: not a directory")
            for name in sorted(os.listdir(ca_dir)):
                if name.lower().endswith(_CERT_SUFFIXES) and not name.startswith("."):
                    count += self._add_file(os.path.join(ca_dir, name), required=False)
        # The system store is read at the first check: a server that never
        # federates (and every in-process test) does not pay for it.
        self._system_pending = system
        self.anchors = count

    def _load_system(self) -> None:
        self._system_pending = False
        paths = ssl.get_default_verify_paths()
        try:
            if paths.cafile or paths.capath:
                self.store.load_locations(paths.cafile, paths.capath)
        except crypto.Error:
            log.warn("s2s: the system trust store could not be loaded")

    def _add_file(self, path: str, required: bool) -> int:
        with open(path, "rb") as f:
            data = f.read()
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError:
            certs = []
        if not certs and required:
            raise ValueError(f"{path}: no PEM certificate in it")
        for cert in certs:
            try:
                self.store.add_cert(crypto.X509.from_cryptography(cert))
            except crypto.Error:
                pass  # the same certificate twice
        return len(certs)

    def check(self, conn: SSL.Connection | None, domain: str) -> PeerCertificate:
        """Does the peer's certificate on ``conn`` authenticate ``domain``?"""
        if conn is None:
            return PeerCertificate(False, False, "no TLS")
        if self._system_pending:
            self._load_system()
        try:
            leaf = conn.get_peer_certificate()
            chain = conn.get_peer_cert_chain() or []
        except SSL.Error:
            return PeerCertificate(False, False, "no certificate")
        if leaf is None:
            return PeerCertificate(False, False, "no certificate")
        leaf_der = crypto.dump_certificate(crypto.FILETYPE_ASN1, leaf)
        intermediates = [c for c in chain
                         if crypto.dump_certificate(crypto.FILETYPE_ASN1, c) != leaf_der]
        try:
            crypto.X509StoreContext(self.store, leaf, intermediates).verify_certificate()
        except crypto.X509StoreContextError as e:
            return PeerCertificate(True, False, f"certificate not trusted ({e})")
        how = identity_for(leaf.to_cryptography(), domain, "_xmpp-server")
        if how is None:
            return PeerCertificate(True, False, f"certificate does not name {domain}")
        return PeerCertificate(True, True, how)


@implementer(IOpenSSLServerConnectionCreator)
class _ServerCreator:
    """Server side (incoming STARTTLS to ``host``, or direct TLS switched by SNI)."""

    def __init__(self, tls: "S2STLS", host: str, sni: bool) -> None:
        self.tls, self.host, self.sni = tls, host, sni

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return SSL.Connection(self.tls.context(self.host, client=False, sni=self.sni), None)


@implementer(IOpenSSLClientConnectionCreator)
class _ClientCreator:
    """Initiating side: our vhost's certificate, SNI naming the remote domain."""

    def __init__(self, tls: "S2STLS", local: str, remote: str) -> None:
        self.tls, self.local, self.remote = tls, local, remote

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        conn = SSL.Connection(self.tls.context(self.local, client=True), None)
        try:
            conn.set_tlsext_host_name(self.remote.encode("idna"))
        except (UnicodeError, ValueError):
            pass
        conn.set_connect_state()
        return conn


class S2STLS:
    """Contexts for s2s streams, built from the certificate store, cached per certificate."""

    def __init__(self, certs, policy, default_host: str) -> None:
        self.certs = certs
        self.policy = policy
        self.default_host = default_host
        self._contexts: dict[tuple, SSL.Context] = {}

    def context(self, host: str, client: bool, sni: bool = False) -> SSL.Context:
        chain, key, path = self.certs.credentials(host)
        fingerprint = chain[0].fingerprint(hashes.SHA256())
        cache_key = (fingerprint, client, sni)
        ctx = self._contexts.get(cache_key)
        if ctx is None:
            if len(self._contexts) > 64:
                self._contexts.clear()  # reloads replaced certificates: drop the old ones
            ctx = policy_context(self.policy, chain, key, path, client=client)
            ctx.set_verify(SSL.VERIFY_PEER, _accept_any)
            if client:
                ctx.set_alpn_protos([b"xmpp-server"])  # XEP-0368
            else:
                # A resumed session carries no fresh peer certificate.
                ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
                ctx.set_options(SSL.OP_NO_TICKET)
                if sni:
                    ctx.set_tlsext_servername_callback(self._on_servername)
            self._contexts[cache_key] = ctx
        return ctx

    def _on_servername(self, conn: SSL.Connection) -> None:
        try:
            name = conn.get_servername()
            if name:
                conn.set_context(self.context(name.decode("ascii", "replace"), client=False))
                conn.set_verify(SSL.VERIFY_PEER, _accept_any)
        except Exception:
            log.failure("s2s: while selecting the certificate for SNI")

    def starttls_server(self, host: str) -> _ServerCreator:
        return _ServerCreator(self, host, sni=False)

    def client(self, local: str, remote: str) -> _ClientCreator:
        return _ClientCreator(self, local, remote)

    def direct_tls_factory(self, wrapped):
        """Incoming direct TLS (XEP-0368): default host first, SNI switches."""
        return TLSMemoryBIOFactory(_ServerCreator(self, self.default_host, sni=True), False, wrapped)

    def client_factory(self, local: str, remote: str, wrapped):
        """Outgoing direct TLS."""
        return TLSMemoryBIOFactory(self.client(local, remote), True, wrapped)

"""
pyOpenSSL contexts with xmppd's TLS policy applied.

A server context per certificate (with its own session-id context, so a
session is never resumed under another certificate), ALPN for XEP-0368, and
the client side of a server-to-server connection.  The key-exchange groups
are applied by xmppd.tlsgroups.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL

from xmppd import tlsgroups
from xmppd.certs.pem import CertificateError

#: ALPN protocols accepted (XEP-0368), in our order of preference.  Clients that
#: offer none of them still connect, without ALPN.
ALPN_PROTOCOLS: tuple[bytes, ...] = (b"xmpp-client", b"xmpp-server")
#: Forward-secret AEAD suites only, for TLS 1.2 (TLS 1.3 suites are all fine).
DEFAULT_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"

_TLS_VERSIONS = {"TLSv1.2": SSL.TLS1_2_VERSION, "TLSv1.3": SSL.TLS1_3_VERSION}
_CONTEXT_OPTIONS = (
    SSL.OP_NO_COMPRESSION  # CRIME
    | SSL.OP_CIPHER_SERVER_PREFERENCE
    | getattr(SSL, "OP_NO_RENEGOTIATION", 0)  # client-initiated renegotiation DoS
)


@dataclass(frozen=True)
class TLSPolicy:
    """
    Protocol settings shared by every context of the store.

    Validated here, not only in the config module, because a bad value must
    never reach OpenSSL silently (an unknown version string would otherwise
    fall back to OpenSSL's defaults).
    """

    min_version: str = "TLSv1.2"
    ciphers: str | None = None
    #: Key-exchange groups, most preferred first (xmppd.tlsgroups).
    groups: tuple[str, ...] = tlsgroups.DEFAULT_GROUPS

    def __post_init__(self) -> None:
        if self.min_version not in _TLS_VERSIONS:
            allowed = " or ".join(repr(v) for v in _TLS_VERSIONS)
            raise ValueError(f"[tls] min_version must be {allowed}, not {self.min_version!r}")
        if self.ciphers is not None and not self.ciphers.strip():
            raise ValueError("[tls] ciphers must not be empty (leave it out for the default)")
        object.__setattr__(self, "groups", tlsgroups.validate(self.groups))


def _session_id(name: str) -> bytes:
    """Per-certificate session id context: no resuming a session across vhosts."""
    return b"xmppd:" + hashlib.sha256(name.encode("utf-8")).digest()[:16]


def _select_alpn(conn: SSL.Connection, offered: list[bytes]) -> object:
    """Pick XMPP's ALPN id (XEP-0368); other offers just get no ALPN answer."""
    for proto in ALPN_PROTOCOLS:
        if proto in offered:
            return proto
    return SSL.NO_OVERLAPPING_PROTOCOLS


def _new_context(policy: TLSPolicy, session_name: str) -> SSL.Context:
    """A context with the policy applied and no certificate yet."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(_TLS_VERSIONS[policy.min_version])
    ctx.set_options(_CONTEXT_OPTIONS)
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.set_cipher_list((policy.ciphers or DEFAULT_CIPHERS).encode("ascii"))
    tlsgroups.apply(ctx, policy.groups)
    # Session-id cache and RFC 5077 tickets (OpenSSL's default) both stay on.
    ctx.set_session_id(_session_id(session_name))
    ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    ctx.set_alpn_select_callback(_select_alpn)
    return ctx


def _use_credentials(ctx: SSL.Context, chain: Sequence[x509.Certificate], key: object,
                     path: str) -> None:
    """Put the leaf, then the rest of the chain, and the checked key into ``ctx``."""
    try:
        ctx.use_certificate(chain[0])
        for extra in chain[1:]:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(key)  # type: ignore[arg-type]
        ctx.check_privatekey()
    except (SSL.Error, TypeError, ValueError) as e:
        raise CertificateError(path, f"OpenSSL refused the certificate or key ({e})") from None


def _build_context(policy: TLSPolicy, chain: Sequence[x509.Certificate], key: object,
                   path: str) -> SSL.Context:
    """The per-certificate context: leaf, then the rest of the chain, key checked."""
    ctx = _new_context(policy, chain[0].fingerprint(hashes.SHA256()).hex())
    _use_credentials(ctx, chain, key, path)
    return ctx


def _check_policy(policy: TLSPolicy) -> None:
    try:
        _new_context(policy, "policy-check")
    except SSL.Error:
        raise CertificateError(
            "", f"[tls] ciphers: OpenSSL accepts no cipher from {policy.ciphers!r}") from None


def policy_context(policy: TLSPolicy, chain: Sequence[x509.Certificate], key: object,
                   path: str, client: bool = False) -> SSL.Context:
    """
    A context with ``policy`` applied carrying ``chain`` and ``key``: the
    server side of a vhost's stream, or (``client``) the initiating side of
    a server-to-server connection, which presents the same certificate.
    """
    if not client:
        return _build_context(policy, chain, key, path)
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(_TLS_VERSIONS[policy.min_version])
    ctx.set_options(SSL.OP_NO_COMPRESSION | getattr(SSL, "OP_NO_RENEGOTIATION", 0))
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.set_cipher_list((policy.ciphers or DEFAULT_CIPHERS).encode("ascii"))
    tlsgroups.apply(ctx, policy.groups)
    _use_credentials(ctx, chain, key, path)
    return ctx

"""
The store's internal value types: where a certificate comes from, what was
loaded from it, what a host serves, and the state a reload swaps in whole;
also the clock every date is judged by.

Nothing here does I/O or imports the rest of the package at run time, so
every other module can use these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Mapping

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL

if TYPE_CHECKING:
    from xmppd.certs.clientcerts import _ClientTrust

# Where a certificate came from; also the priority order.
EXPLICIT, CERTS_DIR, WILDCARD, LETSENCRYPT, DEFAULT, GENERATED = (
    "explicit", "certs_dir", "wildcard", "letsencrypt", "default", "generated")


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class _Source:
    """A place a certificate may come from: key_path None means 'in the cert file'."""

    origin: str
    cert_path: str
    key_path: str | None = None

    @property
    def fatal_when_broken(self) -> bool:
        """Configured files must work; discovered ones are only candidates."""
        return self.origin in (EXPLICIT, DEFAULT)


@dataclass(frozen=True)
class _Loaded:
    """A checked certificate chain + key and the context built from it."""

    source: _Source
    files: tuple[str, ...]
    chain: tuple[x509.Certificate, ...]
    key: object
    context: SSL.Context
    notes: tuple[str, ...]  # host-independent remarks (chain, key permissions)

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def fingerprint(self) -> bytes:
        return self.leaf.fingerprint(hashes.SHA256())


@dataclass(frozen=True)
class _Entry:
    """The certificate one host serves, with what was found out about it."""

    host: str
    loaded: _Loaded
    identity: str | None  # which RFC 6125 identifier matched, None = not valid for host
    notes: tuple[str, ...] = ()
    client: _ClientTrust | None = None  # client-certificate trust of this vhost
    client_context: SSL.Context | None = None  # loaded.context + client verification

    @property
    def context(self) -> SSL.Context:
        return self.client_context or self.loaded.context


@dataclass(frozen=True)
class _State:
    """Everything a handshake needs, replaced as a whole on reload."""

    entries: Mapping[str, _Entry]  # normalised host -> entry
    default: _Entry | None
    front: SSL.Context  # first context of a direct-TLS connection (SNI switches)
    by_name: Mapping[str, _Entry]  # DNS SAN -> entry, for names that are not hosts
    by_parent: Mapping[str, _Entry]  # "example.org" -> entry holding *.example.org
    stale: frozenset[str] = frozenset()
    problems: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    front_resumes: bool = True  # whether direct TLS offers session resumption
    names: Mapping[str, _Entry] = field(default_factory=dict)  # other names with their own file

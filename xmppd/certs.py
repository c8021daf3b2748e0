"""
The server certificate store: which certificate each virtual host presents.

One store serves every TLS listener.  It finds a certificate (chain + key) for
each configured host, checks it, builds one ``OpenSSL.SSL.Context`` per
certificate and hands those contexts out for STARTTLS (by stream-header host)
and direct TLS (by SNI).  Reloading re-reads the files and swaps the whole
host -> context table in one assignment, so connections that are already
established keep their context while new ones get the new certificate.

Sources for a host, highest priority first (see docs/certificates.rst):

1. ``explicit`` -- paths configured for that host (``[hosts."h".tls]``);
2. ``certs_dir`` -- ``<host>.pem`` (chain + key) or ``<host>.crt`` + ``<host>.key``;
3. ``wildcard`` -- ``*.<parent>.pem`` / ``.crt`` in certs_dir, then any
   certificate in certs_dir whose subjectAltNames cover the host;
4. ``letsencrypt`` -- ``<letsencrypt_dir>/<host>/fullchain.pem`` + ``privkey.pem``,
   then any certbot lineage whose names cover the host;
5. ``default`` -- the configured default certificate;
6. ``generated`` -- a self-signed certificate in ``<data_dir>/certs/<host>.pem``.

Other *names* (public component domains, for their server-to-server streams)
are looked up in sources 2 to 4 only: a certificate found for one is served
for it; otherwise the name gets what any other name gets (a served
certificate naming it, else the default host's), never a generated one.

Everything here runs in the reactor thread and only touches small local files;
nothing touches the network.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import re
import stat
import tempfile
import weakref
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from service_identity import CertificateError as _SIDCertificateError
from service_identity.cryptography import extract_patterns
from service_identity.hazmat import (
    DNS_ID,
    SRV_ID,
    DNSPattern,
    VerificationError,
    verify_service_identity,
)
from twisted.internet.interfaces import (
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from xmppd import tlsgroups
from xmppd.logfilter import log_observer

try:
    import idna as _idna
except ImportError:  # pragma: no cover - idna comes with service_identity
    _idna = None

__all__ = [
    "ALPN_PROTOCOLS",
    "CLIENT_CERT_MODES",
    "CertInfo",
    "CertificateError",
    "CertificateStore",
    "ClientCertPolicy",
    "ClientCertificate",
    "TLSPolicy",
    "check_certificates",
    "client_certificate",
    "format_cert_table",
    "has_errors",
]

log = Logger(observer=log_observer)

#: Warn when a certificate in service expires within this time.
EXPIRY_WARNING = timedelta(days=14)
#: A generated self-signed certificate is replaced when it has less than this left.
SELF_SIGNED_RENEW = timedelta(days=30)
SELF_SIGNED_LIFETIME = timedelta(days=365)
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
_ID_ON_XMPPADDR = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.5")
_ID_ON_DNSSRV = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.7")
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.S)
_CERT_SUFFIXES = (".pem", ".crt", ".cer")

# Where a certificate came from; also the priority order.
EXPLICIT, CERTS_DIR, WILDCARD, LETSENCRYPT, DEFAULT, GENERATED = (
    "explicit", "certs_dir", "wildcard", "letsencrypt", "default", "generated")


# --------------------------------------------------------------------------
# public value types


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


class CertificateError(Exception):
    """
    A certificate or key file that cannot be used.

    ``str()`` is one line naming the file and the problem, so it can go to the
    operator as it is (no stack trace).  ``path`` and ``problem`` keep the
    parts; ``fatal`` is False for problems that come with time (expired, not
    yet valid) rather than from the configuration, which never stop a start.
    """

    def __init__(self, path: str, problem: str, *, fatal: bool = True) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path = path
        self.problem = problem
        self.fatal = fatal


@dataclass(frozen=True)
class CertInfo:
    """What ``xmppctl certs`` shows about the certificate a host serves."""

    host: str
    status: str  # ok | expiring | expired | self-signed | mismatch | stale
    subject: str
    sans: tuple[str, ...]
    issuer: str
    serial: int
    not_before: datetime
    not_after: datetime
    fingerprint: str  # SHA-256 of the leaf, colon-separated hex
    origin: str  # explicit | certs_dir | wildcard | letsencrypt | default | generated
    sources: tuple[str, ...]
    notes: tuple[str, ...] = ()


# --------------------------------------------------------------------------
# internal value types


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


# --------------------------------------------------------------------------
# small helpers


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _normalise(name: str) -> str:
    """Lower-case A-label form, so 'Example.ORG.' and IDNs compare as on the wire."""
    name = name.strip().rstrip(".").lower()
    if name.isascii():
        return name
    try:
        if _idna is not None:
            return _idna.encode(name, uts46=True).decode("ascii")
        return name.encode("idna").decode("ascii")
    except (UnicodeError, ValueError):
        return name


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _access_problem(path: str, what: str) -> str:
    """
    Explain why ``path`` cannot be read, in one line: the usual cause is a
    key owned by root with mode 0600 while xmppd runs as its own user.
    """
    user = _user_name(os.geteuid())
    try:
        st = os.stat(path)
    except PermissionError:
        return (f"cannot reach the {what}: a parent directory is not searchable "
                f"by user {user}")
    except FileNotFoundError:
        return f"{what} file does not exist"
    mode = stat.S_IMODE(st.st_mode)
    return (f"{what} is not readable by user {user}: owner "
            f"{_user_name(st.st_uid)}:{_group_name(st.st_gid)}, mode {mode:04o} "
            f"({stat.filemode(st.st_mode)})")


def _read(path: str, what: str) -> bytes:
    """Read a whole (small) file, turning OS errors into one-line CertificateErrors."""
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except PermissionError:
        raise CertificateError(path, _access_problem(path, what)) from None
    except FileNotFoundError:
        raise CertificateError(path, f"{what} file does not exist") from None
    except IsADirectoryError:
        raise CertificateError(path, f"{what} path is a directory") from None
    except OSError as e:
        raise CertificateError(path, f"cannot read {what}: {e.strerror}") from None


def _pem_blocks(data: bytes) -> list[tuple[str, bytes]]:
    return [(m.group(1).decode("ascii"), m.group(0)) for m in _PEM_BLOCK.finditer(data)]


def _parse_certs(blocks: list[tuple[str, bytes]], path: str) -> list[x509.Certificate]:
    certs = []
    for label, block in blocks:
        if label != "CERTIFICATE":
            continue
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except ValueError as e:
            raise CertificateError(
                path, f"certificate {len(certs) + 1} in the file is not a valid certificate ({e})"
            ) from None
    return certs


def _parse_key(blocks: list[tuple[str, bytes]], path: str) -> object | None:
    keys = [block for label, block in blocks if label.endswith("PRIVATE KEY")]
    if not keys:
        return None
    if len(keys) > 1:
        raise CertificateError(path, f"holds {len(keys)} private keys; expected one")
    try:
        return serialization.load_pem_private_key(keys[0], password=None)
    except TypeError:
        raise CertificateError(
            path, "private key is encrypted with a passphrase; xmppd needs an unencrypted "
                  "key protected by file permissions (mode 0600)") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CertificateError(path, f"private key cannot be parsed ({e})") from None


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _short_name(name: x509.Name) -> str:
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns:
        return f"CN={cns[0].value}"
    return name.rfc4514_string() or "(empty)"


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, InvalidSignature):
        return False
    except TypeError:  # key type cryptography cannot verify: judge by names only
        return child.issuer == parent.subject
    return True


def _is_self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject and _issued_by(cert, cert)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _der_string(value: bytes) -> str | None:
    """Decode a DER UTF8String/IA5String (the otherName values XMPP uses)."""
    if len(value) < 2 or value[0] not in (0x0C, 0x16):
        return None
    length, offset = value[1], 2
    if length & 0x80:
        count = length & 0x7F
        length, offset = int.from_bytes(value[2:2 + count], "big"), 2 + count
    try:
        return value[offset:offset + length].decode("utf-8")
    except UnicodeDecodeError:
        return None


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return None


def _xmpp_addrs(cert: x509.Certificate) -> list[str]:
    san = _san(cert)
    if san is None:
        return []
    found = []
    for other in san.get_values_for_type(x509.OtherName):
        if other.type_id == _ID_ON_XMPPADDR:
            text = _der_string(other.value)
            if text:
                found.append(text)
    return found


def _display_names(cert: x509.Certificate) -> tuple[str, ...]:
    """Every identifier a client could match, for ``xmppctl certs``."""
    san = _san(cert)
    if san is None:
        return ()
    names = [f"DNS:{n}" for n in san.get_values_for_type(x509.DNSName)]
    for other in san.get_values_for_type(x509.OtherName):
        text = _der_string(other.value)
        if other.type_id == _ID_ON_DNSSRV and text:
            names.append(f"SRV:{text}")
        elif other.type_id == _ID_ON_XMPPADDR and text:
            names.append(f"xmppAddr:{text}")
    return tuple(names)


def _identity_for(cert: x509.Certificate, host: str, service: str = "_xmpp-client") -> str | None:
    """
    Which RFC 6125 / RFC 6120 §13.7.1.2 identifier makes ``cert`` valid for
    ``host``: a DNS-ID, an SRV-ID ``<service>.<host>`` (``_xmpp-client`` for
    clients, ``_xmpp-server`` for peers), or an XmppAddr.
    service_identity does the DNS and SRV matching (wildcards included).
    """
    try:
        patterns = extract_patterns(cert)
    except _SIDCertificateError:
        patterns = []
    host = _normalise(host)
    if patterns:
        for label, service_id in (("DNS-ID", DNS_ID), ("SRV-ID", SRV_ID)):
            name = host if service_id is DNS_ID else f"{service}.{host}"
            try:
                verify_service_identity(patterns, obligatory_ids=[service_id(name)],
                                        optional_ids=[])
                return label
            except (VerificationError, _SIDCertificateError, ValueError):
                continue
    if any(_normalise(a) == host for a in _xmpp_addrs(cert)):
        return "XmppAddr"
    return None


def identity_for(cert: x509.Certificate, host: str, service: str = "_xmpp-client") -> str | None:
    """Public form of the identity check, for the s2s peer verification."""
    return _identity_for(cert, host, service)


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
    try:
        ctx.use_certificate(chain[0])
        for extra in chain[1:]:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(key)  # type: ignore[arg-type]
        ctx.check_privatekey()
    except (SSL.Error, TypeError, ValueError) as e:
        raise CertificateError(path, f"OpenSSL refused the certificate or key ({e})") from None
    return ctx


def _coverage(cert: x509.Certificate, host: str) -> str | None:
    """'exact' or 'wildcard' when a DNS name of ``cert`` covers ``host``."""
    try:
        dns = [p for p in extract_patterns(cert) if isinstance(p, DNSPattern)]
        service_id = DNS_ID(host)
    except (_SIDCertificateError, ValueError):
        return None
    matches = [p for p in dns if service_id.verify(p)]
    if any(b"*" not in p.pattern for p in matches):
        return "exact"
    return "wildcard" if matches else None


def _first_leaf(path: str) -> x509.Certificate | None:
    """The first certificate of a file, for indexing a directory; None if unusable."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
        for label, block in _pem_blocks(data):
            if label == "CERTIFICATE":
                return x509.load_pem_x509_certificate(block)
    except (OSError, ValueError):
        pass
    return None


def _stat_key(path: str) -> tuple:
    try:
        st = os.stat(path)
    except OSError as e:
        return ("error", e.errno)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _listdir(path: str | None) -> list[str]:
    if not path:
        return []
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _session_id(name: str) -> bytes:
    """Per-certificate session id context: no resuming a session across vhosts."""
    return b"xmppd:" + hashlib.sha256(name.encode("utf-8")).digest()[:16]


# --------------------------------------------------------------------------
# checks and contexts


def _load_material(source: _Source) -> tuple[tuple[str, ...], list[x509.Certificate], object]:
    """Read a source's files; the key is taken from the cert file or its sibling .key."""
    data = _read(source.cert_path, "certificate")
    blocks = _pem_blocks(data)
    if not blocks:
        raise CertificateError(source.cert_path, "is not a PEM file (no -----BEGIN block)")
    chain = _parse_certs(blocks, source.cert_path)
    if not chain:
        raise CertificateError(source.cert_path, "holds no CERTIFICATE block")
    files = [source.cert_path]
    key_path = source.key_path
    key = None
    if key_path is None:
        key = _parse_key(blocks, source.cert_path)
        if key is None:
            sibling = os.path.splitext(source.cert_path)[0] + ".key"
            if os.path.lexists(sibling):
                key_path = sibling
    if key_path is not None:
        key = _parse_key(_pem_blocks(_read(key_path, "private key")), key_path)
        files.append(key_path)
        if key is None:
            raise CertificateError(key_path, "holds no PRIVATE KEY block")
    if key is None:
        raise CertificateError(
            source.cert_path, "holds no private key (append it to the file or put it "
                              "next to it as <name>.key)")
    return tuple(files), chain, key


def _check_key(chain: list[x509.Certificate], key: object, files: Sequence[str]) -> None:
    key_spki = _spki(key.public_key())  # type: ignore[attr-defined]
    if _spki(chain[0].public_key()) == key_spki:
        return
    where = files[-1]
    against = f" in {files[0]}" if len(files) > 1 else ""
    for i, cert in enumerate(chain[1:], start=2):
        if _spki(cert.public_key()) == key_spki:
            raise CertificateError(
                where, f"private key belongs to certificate {i} of the chain "
                       f"({_short_name(cert.subject)}); the server certificate must come first")
    raise CertificateError(
        where, f"private key does not match the certificate{against} "
               f"({_short_name(chain[0].subject)}, serial {chain[0].serial_number:#x})")


def _check_chain(chain: list[x509.Certificate], path: str) -> None:
    """Each certificate must be issued by the next one, as TLS sends them in order."""
    for i in range(len(chain) - 1):
        if not _issued_by(chain[i], chain[i + 1]):
            raise CertificateError(
                path, f"chain out of order: certificate {i + 1} "
                      f"({_short_name(chain[i].subject)}) is not issued by certificate {i + 2} "
                      f"({_short_name(chain[i + 1].subject)}); put the server certificate "
                      f"first, then each issuer")


def _check_dates(leaf: x509.Certificate, path: str, now: datetime) -> None:
    if leaf.not_valid_after_utc <= now:
        raise CertificateError(
            path, f"certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC "
                  f"(serial {leaf.serial_number:#x})", fatal=False)
    if leaf.not_valid_before_utc > now:
        raise CertificateError(
            path, f"certificate is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} "
                  f"UTC (check the clock)", fatal=False)


def _file_notes(chain: list[x509.Certificate], files: Sequence[str]) -> tuple[str, ...]:
    notes = []
    if len(chain) == 1 and not _is_self_signed(chain[0]):
        notes.append(f"{files[0]}: holds only the server certificate, no intermediate; "
                     f"clients may fail to build the chain (use the full chain, e.g. "
                     f"fullchain.pem)")
    try:
        mode = stat.S_IMODE(os.stat(files[-1]).st_mode)
    except OSError:
        mode = 0
    if mode & stat.S_IROTH:
        notes.append(f"{files[-1]}: private key is readable by every user (mode {mode:04o}); "
                     f"use 0600 or 0640")
    return tuple(notes)


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


def _build_context(policy: TLSPolicy, chain: Sequence[x509.Certificate], key: object,
                   path: str) -> SSL.Context:
    """The per-certificate context: leaf, then the rest of the chain, key checked."""
    ctx = _new_context(policy, chain[0].fingerprint(hashes.SHA256()).hex())
    try:
        ctx.use_certificate(chain[0])
        for extra in chain[1:]:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(key)  # type: ignore[arg-type]
        ctx.check_privatekey()
    except (SSL.Error, TypeError, ValueError) as e:
        raise CertificateError(path, f"OpenSSL refused the certificate or key ({e})") from None
    return ctx


def _check_policy(policy: TLSPolicy) -> None:
    try:
        _new_context(policy, "policy-check")
    except SSL.Error:
        raise CertificateError(
            "", f"[tls] ciphers: OpenSSL accepts no cipher from {policy.ciphers!r}") from None


def _generate_self_signed(host: str, path: str) -> None:
    """
    Write a fresh self-signed EC P-256 certificate + key for ``host`` to
    ``path`` (mode 0600, replaced atomically so a crash never leaves half a key).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + SELF_SIGNED_LIFETIME)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    directory = os.path.dirname(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        target = e.filename if e.filename and e.filename != tmp else path
        raise CertificateError(
            target, f"cannot write the self-signed certificate for {host} "
                    f"({e.strerror}; user {_user_name(os.geteuid())})") from None


# --------------------------------------------------------------------------
# client certificates (SASL EXTERNAL, XEP-0178)

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


# --------------------------------------------------------------------------
# one pass over the disk


class _Pass:
    """
    One load/reload/check run: lists each directory once, loads each source
    once (a wildcard or default certificate serves several hosts with one
    context) and reuses the previous context when a file did not change, so
    SIGHUP does not throw away TLS session caches for untouched hosts.
    """

    def __init__(self, store: CertificateStore, previous: _State | None, now: datetime) -> None:
        self.store = store
        self.now = now
        self._cache: dict[_Source, _Loaded | CertificateError] = {}
        self._previous: dict[_Source, _Loaded] = {}
        if previous is not None:
            for entry in [*previous.entries.values(), *previous.names.values(), previous.default]:
                if entry is not None:
                    self._previous[entry.loaded.source] = entry.loaded
        self._certs_dir_index: list[tuple[str, x509.Certificate]] | None = None
        self._le_index: list[tuple[str, x509.Certificate]] | None = None
        self.written: list[str] = []  # files this pass wrote (generated certificates)
        self.client_files: dict[tuple[str, str], list] = {}  # client CA / CRL files read

    def load(self, source: _Source) -> _Loaded:
        """Read and check a source, or raise CertificateError (cached both ways)."""
        cached = self._cache.get(source)
        if cached is None:
            try:
                cached = self._load(source)
            except CertificateError as e:
                cached = e
            self._cache[source] = cached
        if isinstance(cached, CertificateError):
            raise cached
        return cached

    def _load(self, source: _Source) -> _Loaded:
        files, chain, key = _load_material(source)
        _check_key(chain, key, files)
        _check_chain(chain, source.cert_path)
        _check_dates(chain[0], source.cert_path, self.now)
        notes = _file_notes(chain, files)
        old = self._previous.get(source)
        if (old is not None and old.chain == tuple(chain)
                and _spki(old.key.public_key()) == _spki(key.public_key())):  # type: ignore[attr-defined]
            return replace(old, files=files, notes=notes)
        context = _build_context(self.store.policy, chain, key, source.cert_path)
        return _Loaded(source, files, tuple(chain), key, context, notes)

    def certs_dir_index(self) -> list[tuple[str, x509.Certificate]]:
        """(path, leaf) of every non-CA certificate file in certs_dir."""
        if self._certs_dir_index is None:
            directory = self.store.certs_dir
            index = []
            for name in _listdir(directory):
                path = os.path.join(directory, name)  # type: ignore[arg-type]
                if name.startswith(".") or not name.endswith(_CERT_SUFFIXES):
                    continue
                leaf = _first_leaf(path)
                if leaf is not None and not _is_ca(leaf):
                    index.append((path, leaf))
            self._certs_dir_index = index
        return self._certs_dir_index

    def le_index(self) -> list[tuple[str, x509.Certificate]]:
        """(lineage dir, leaf) of every certbot lineage."""
        if self._le_index is None:
            live = self.store.letsencrypt_live
            index = []
            for name in _listdir(live):
                lineage = os.path.join(live, name)  # type: ignore[arg-type]
                leaf = _first_leaf(os.path.join(lineage, "fullchain.pem"))
                if leaf is not None:
                    index.append((lineage, leaf))
            self._le_index = index
        return self._le_index


# --------------------------------------------------------------------------
# connection creators


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class _StartTLSCreator:
    """What ``transport.startTLS()`` gets: the context of one vhost, looked up
    when the handshake starts so a reload in between is honoured."""

    def __init__(self, store: CertificateStore, host: str) -> None:
        self._store = store
        self._host = host

    def getContext(self) -> SSL.Context:
        return self._store.context_for(self._host)

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self.getContext(), None)


@implementer(IOpenSSLServerConnectionCreator)
class _DirectTLSCreator:
    """Direct TLS: start on the default host's context; SNI switches it."""

    def __init__(self, store: CertificateStore) -> None:
        self._store = store

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self._store._current().front, None)


# --------------------------------------------------------------------------
# the store


class CertificateStore:
    """
    Certificates of all virtual hosts; see the module docstring for the
    sources and docs/certificates.rst for the operator's view.
    """

    def __init__(
        self,
        hosts: list[str],
        data_dir: str,
        certs_dir: str | None = None,
        letsencrypt_dir: str | None = None,
        explicit: dict[str, tuple[str, str | None]] | None = None,
        default_cert: tuple[str, str | None] | None = None,
        policy: TLSPolicy = TLSPolicy(),
        default_host: str | None = None,
        client_certs: Mapping[str, ClientCertPolicy] | None = None,
        generate: bool = True,
        names: Iterable[str] = (),
    ) -> None:
        if not hosts:
            raise ValueError("CertificateStore needs at least one host")
        self.hosts: list[str] = list(dict.fromkeys(hosts))
        self._keys = {_normalise(h): h for h in self.hosts}
        #: Names that are not hosts but may have their own certificate file
        #: (public component domains: their s2s streams present it).
        self.names: list[str] = [n for n in dict.fromkeys(_normalise(x) for x in names)
                                 if n and n not in self._keys]
        self.data_dir = data_dir
        # False for operator tools (``xmppctl certs``/``check``): a missing
        # self-signed certificate is previewed in memory, never written to the
        # server's data dir (it would be owned by the tool's user).
        self.generate = generate
        self.certs_dir = certs_dir
        self.letsencrypt_dir = letsencrypt_dir
        self.explicit = {_normalise(h): paths for h, paths in (explicit or {}).items()}
        self.default_cert = default_cert
        self.policy = policy
        self.default_host = _normalise(default_host or self.hosts[0])
        #: host -> client-certificate policy; hosts not named do not ask for one.
        self.client_certs = {_normalise(h): p for h, p in (client_certs or {}).items()
                             if p.enabled}
        if self.default_host not in self._keys:
            raise ValueError(f"default host {default_host!r} is not one of the hosts")
        self._state: _State | None = None
        self._signature: dict[str, tuple] = {}
        self._poller: LoopingCall | None = None
        self._warned_expiry: dict[str, tuple[int, str]] = {}

    # -- configuration-derived paths

    @property
    def letsencrypt_live(self) -> str | None:
        """certbot's ``live`` dir: accept both /etc/letsencrypt and .../live."""
        d = self.letsencrypt_dir
        if d and os.path.isdir(os.path.join(d, "live")) and not os.path.exists(
                os.path.join(d, "fullchain.pem")):
            return os.path.join(d, "live")
        return d

    def generated_path(self, host: str) -> str:
        """Where the self-signed certificate of ``host`` lives."""
        name = _normalise(host)
        if not name or "/" in name or name.startswith(".") or "\0" in name:
            raise CertificateError("", f"host name {host!r} cannot be used as a file name")
        return os.path.join(self.data_dir, "certs", f"{name}.pem")

    # -- candidates in priority order

    def _candidates(self, host: str, run: _Pass) -> Iterator[_Source]:
        """Every existing source for ``host``, best first (never the generated one)."""
        key = _normalise(host)
        names = list(dict.fromkeys([self._keys.get(key, host).lower(), key]))
        seen: set[str] = set()
        if key in self.explicit:
            cert, keyfile = self.explicit[key]
            yield _Source(EXPLICIT, cert, keyfile)
        yield from self._named_files(CERTS_DIR, names, seen)
        if key.count(".") >= 2:
            parent = key.split(".", 1)[1]
            yield from self._named_files(
                WILDCARD, [f"{star}.{parent}" for star in ("*", "_")], seen)
        yield from self._covering(run.certs_dir_index(), key, seen, self._dir_source)
        live = self.letsencrypt_live
        if live:
            for name in names:
                lineage = os.path.join(live, name)
                if os.path.exists(os.path.join(lineage, "fullchain.pem")):
                    seen.add(lineage)
                    yield self._le_source(lineage)
            yield from self._covering(run.le_index(), key, seen, self._le_source)
        if self.default_cert is not None:
            yield _Source(DEFAULT, *self.default_cert)

    def _named_files(self, origin: str, names: Iterable[str], seen: set[str]
                     ) -> Iterator[_Source]:
        if not self.certs_dir:
            return
        for name in names:
            for suffix in (".pem", ".crt"):
                path = os.path.join(self.certs_dir, name + suffix)
                if path not in seen and os.path.lexists(path):
                    seen.add(path)
                    yield _Source(origin, path, None)

    @staticmethod
    def _dir_source(path: str, how: str = "exact") -> _Source:
        return _Source(CERTS_DIR if how == "exact" else WILDCARD, path, None)

    @staticmethod
    def _le_source(lineage: str, how: str = "exact") -> _Source:
        return _Source(LETSENCRYPT, os.path.join(lineage, "fullchain.pem"),
                       os.path.join(lineage, "privkey.pem"))

    @staticmethod
    def _covering(index: list[tuple[str, x509.Certificate]], host: str, seen: set[str],
                  make: Callable[[str, str], _Source]) -> Iterator[_Source]:
        """Indexed certificates whose DNS names cover ``host``: exact names first."""
        found = {"exact": [], "wildcard": []}  # type: dict[str, list[str]]
        for path, leaf in index:
            how = _coverage(leaf, host)
            if how and path not in seen:
                found[how].append(path)
        for how in ("exact", "wildcard"):
            for path in found[how]:
                seen.add(path)
                yield make(path, how)

    # -- resolution

    def _resolve(self, host: str, run: _Pass) -> tuple[_Loaded | None, list[tuple[_Source, CertificateError]]]:
        """The first candidate that loads, and the ones refused on the way."""
        refused = []
        for source in self._candidates(host, run):
            try:
                return run.load(source), refused
            except CertificateError as e:
                refused.append((source, e))
        return None, refused

    def _self_signed(self, host: str, run: _Pass, create: bool) -> tuple[_Loaded | None, bool]:
        """
        The generated certificate of ``host``: reused while it is valid for the
        host and has a month left, otherwise (if ``create``) written anew.
        Returns (loaded or None, whether a new one was written).
        """
        source = _Source(GENERATED, self.generated_path(host), None)
        try:
            loaded = run.load(source)
            if (loaded.leaf.not_valid_after_utc - run.now > SELF_SIGNED_RENEW
                    and _identity_for(loaded.leaf, host)):
                return loaded, False
        except CertificateError:
            pass
        if not create:
            return None, False
        if not self.generate:
            # The file holds a private key: it lives only while it is read
            # (the directory goes whatever happens), and the preview is shown
            # under the path the server itself would use.
            with tempfile.TemporaryDirectory(prefix="xmppd-cert-preview-") as tmp:
                preview = _Source(GENERATED, os.path.join(tmp, os.path.basename(source.cert_path)))
                _generate_self_signed(_normalise(host), preview.cert_path)
                loaded = run.load(preview)
            return replace(loaded, source=source, files=(source.cert_path,)), True
        _generate_self_signed(_normalise(host), source.cert_path)
        run.written.append(source.cert_path)
        run._cache.pop(source, None)
        return run.load(source), True

    @staticmethod
    def _entry(host: str, loaded: _Loaded) -> _Entry:
        """Attach the host-specific findings (RFC 6125 identity) to a loaded source."""
        identity = _identity_for(loaded.leaf, host)
        notes = list(loaded.notes)
        if identity is None:
            notes.insert(0, _mismatch_note(loaded, host))
        return _Entry(host, loaded, identity, tuple(notes))

    def _pass_host(self, host: str, run: _Pass, old: _Entry | None,
                   messages: list[str]) -> tuple[_Entry, bool, list[str]]:
        """
        Decide what ``host`` serves after this pass.  Returns the entry, whether
        it is the old one kept because its replacement was refused, and the
        per-host problems to show in ``describe()``.
        """
        loaded, refused = self._resolve(host, run)
        if old is None:
            _raise_if_fatal(host, refused)
        else:
            replaced = [err for source, err in refused if source == old.loaded.source]
            if replaced:  # the file in service turned bad: the old certificate stays
                return old, True, _keep_old(host, old, f"refused {replaced[0]}", messages)
        problems = [f"skipped {err}" for _, err in refused]
        for _, err in refused:
            log.warn("{message}", message=f"{host}: skipped {err}", host=host, path=err.path)
            messages.append(f"{host}: skipped {err}")
        if loaded is None:
            if old is not None and old.loaded.source.origin != GENERATED:
                # files vanished: a real certificate beats a new self-signed one
                reason = "no usable certificate file found any more"
                return old, True, problems + _keep_old(host, old, reason, messages)
            loaded, created = self._self_signed(host, run, create=True)
            assert loaded is not None
            self._announce_self_signed(host, loaded, created, messages)
        return self._entry(host, loaded), False, problems

    @staticmethod
    def _announce_self_signed(host: str, loaded: _Loaded, created: bool,
                              messages: list[str]) -> None:
        verb = "generated" if created else "reusing"
        msg = (f"WARNING: {host} has no certificate; {verb} a SELF-SIGNED certificate "
               f"{loaded.source.cert_path} -- clients will not trust it; install a real "
               f"certificate (see docs/certificates.rst)")
        log.warn("{message}", message=msg, host=host, path=loaded.source.cert_path)
        messages.append(msg)

    def _run(self, initial: bool) -> list[str]:
        """One full pass: resolve every host, then swap the state in one assignment."""
        _check_policy(self.policy)
        signature = self._watch_signature()
        previous = None if initial else self._state
        run = _Pass(self, previous, _now())
        messages: list[str] = []
        self._warn_config(messages)
        entries: dict[str, _Entry] = {}
        stale: set[str] = set()
        problems: dict[str, tuple[str, ...]] = {}
        for key, host in self._keys.items():
            old = previous.entries.get(key) if previous else None
            entry, kept, host_problems = self._pass_host(host, run, old, messages)
            entries[key] = entry
            problems[key] = tuple(host_problems)
            if kept:
                stale.add(key)
            else:
                self._report_entry(entry, old, messages, run.now)
        entries = self._with_client_certs(entries, run)
        names = self._pass_names(run, previous, messages)
        default = self._load_default(run, previous, messages)
        # Direct TLS decides on resumption before SNI names the vhost, so a
        # session made without a client certificate could otherwise be resumed
        # for a vhost that requires one.
        resumes = _single_certificate(entries, default) and not self.client_certs
        front = self._front(entries[self.default_host], previous, resumes)
        self._state = _State(entries, default, front, *self._name_indexes(entries),
                             frozenset(stale), problems, resumes, names)
        # Taken before reading, so a change during the pass triggers another;
        # files the pass wrote itself are not a change.
        signature.update((path, _stat_key(path)) for path in run.written)
        self._signature = signature
        return messages

    def _pass_names(self, run: _Pass, previous: _State | None,
                    messages: list[str]) -> dict[str, _Entry]:
        """Certificates of the other names: certs_dir, wildcard and certbot sources only.

        Never fatal and never generated: a name without a usable file of its
        own is served like any name that is not a host (see :meth:`_lookup`).
        A file that turned bad keeps the certificate it replaced.
        """
        out: dict[str, _Entry] = {}
        for name in self.names:
            found = None
            for source in self._candidates(name, run):
                if source.origin == DEFAULT:
                    break
                try:
                    loaded = run.load(source)
                except CertificateError as e:
                    message = f"{name}: skipped {e}"
                    log.warn("{message}", message=message, host=name, path=e.path)
                    messages.append(message)
                    continue
                if _identity_for(loaded.leaf, name):
                    found = self._entry(name, loaded)
                    break
            if found is None and previous is not None and name in previous.names:
                old = previous.names[name]
                if os.path.exists(old.loaded.source.cert_path):
                    found = old
            if found is not None:
                out[name] = found
        return out

    def _with_client_certs(self, entries: dict[str, _Entry], run: _Pass) -> dict[str, _Entry]:
        """
        Give every vhost that asks for client certificates its own context.
        Rebuilt on every pass (CRLs change), also for a host that keeps its old
        server certificate.  A client CA or CRL that cannot be read raises
        CertificateError: it stops the start, and a reload keeps everything.
        """
        out = dict(entries)
        for key, policy in self.client_certs.items():
            entry = out.get(key)
            if entry is None:
                continue
            trust = _load_client_trust(entry.host, policy, run.client_files)
            out[key] = replace(entry, client=trust,
                               client_context=_client_context(self.policy, entry.loaded, trust))
        return out

    def _config_problems(self) -> list[str]:
        """Configuration that cannot do what it says, but need not stop the server."""
        found = [f"[tls] {key} {path} is not a readable directory"
                 for key, path in (("certs_dir", self.certs_dir),
                                   ("letsencrypt_dir", self.letsencrypt_dir))
                 if path and not os.path.isdir(path)]
        found += [f'[hosts."{host}".tls] names a host that is not in [server] hosts; ignored'
                  for host in self.explicit if host not in self._keys]
        found += [f'[hosts."{host}".tls] client_cert names a host that is not in [server] '
                  f'hosts; ignored' for host in self.client_certs if host not in self._keys]
        return found

    def _warn_config(self, messages: list[str]) -> None:
        for msg in self._config_problems():
            log.warn("{message}", message=msg)
            messages.append(msg)

    def _report_entry(self, entry: _Entry, old: _Entry | None, messages: list[str],
                      now: datetime) -> None:
        """Log what changed and what the operator should look at."""
        leaf = entry.loaded.leaf
        if old is not None and old.loaded.fingerprint != entry.loaded.fingerprint:
            msg = (f"{entry.host}: now serving serial {leaf.serial_number:#x} from "
                   f"{entry.loaded.source.cert_path} (was serial "
                   f"{old.loaded.leaf.serial_number:#x})")
            log.info("{message}", message=msg, host=entry.host)
            messages.append(msg)
        left = leaf.not_valid_after_utc - now
        if left < EXPIRY_WARNING:
            msg = (f"{entry.host}: certificate {entry.loaded.source.cert_path} expires "
                   f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC (in {left.days} days)")
            log.warn("{message}", message=msg, host=entry.host)
            messages.append(msg)
        for note in entry.notes:
            msg = f"{entry.host}: {note}"
            log.warn("{message}", message=msg, host=entry.host)
            messages.append(msg)

    def _load_default(self, run: _Pass, previous: _State | None,
                      messages: list[str]) -> _Entry | None:
        """The default certificate also answers SNI names that are no vhost."""
        if self.default_cert is None:
            return None
        source = _Source(DEFAULT, *self.default_cert)
        try:
            return _Entry("*", run.load(source), "default")
        except CertificateError as e:
            if previous is not None and previous.default is not None:
                return previous.default  # the refusal was already reported per host
            if e.fatal:
                raise CertificateError(e.path, f"{e.problem} (default certificate)") from None
            msg = f"default certificate refused: {e}"
            log.warn("{message}", message=msg)
            messages.append(msg)
            return None

    def _front(self, entry: _Entry, previous: _State | None, resumes: bool) -> SSL.Context:
        """
        The context a direct-TLS handshake starts on.  It must carry the policy
        (OpenSSL takes versions, options and ciphers from the first context,
        not the one SNI switches to) and the default host's certificate for
        clients without SNI.  Kept across reloads when nothing it depends on
        changed, so TLS sessions survive a SIGHUP.

        Session resumption: OpenSSL decides to resume *before* the SNI
        callback runs, against this context's session cache, tickets and
        session-id context, so a session made for one vhost would be resumed
        under another vhost's SNI (RFC 6066 section 3 forbids that; the fix,
        switching in a ClientHello callback, is not exposed by pyOpenSSL).
        So when more than one certificate is served, direct TLS does full
        handshakes only.  STARTTLS contexts are per vhost and keep resumption.
        """
        if previous is not None:
            old = previous.entries[self.default_host]
            if old.context is entry.context and previous.front_resumes == resumes:
                return previous.front
        loaded = entry.loaded
        ctx = _build_context(self.policy, loaded.chain, loaded.key, loaded.source.cert_path)
        if entry.client is not None:  # clients without SNI get the default host's settings
            _request_client_certs(ctx, entry.client)
        if not resumes:
            ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
            ctx.set_options(SSL.OP_NO_TICKET)
        ctx.set_tlsext_servername_callback(self._on_servername)
        return ctx

    @staticmethod
    def _name_indexes(entries: Mapping[str, _Entry]
                      ) -> tuple[dict[str, _Entry], dict[str, _Entry]]:
        """DNS names of served certificates, for SNI names that are not hosts."""
        by_name: dict[str, _Entry] = {}
        by_parent: dict[str, _Entry] = {}
        for entry in entries.values():
            san = _san(entry.loaded.leaf)
            for name in san.get_values_for_type(x509.DNSName) if san else []:
                name = name.lower()
                if name.startswith("*.") and name.count(".") >= 2:
                    by_parent.setdefault(name[2:], entry)
                elif "*" not in name:
                    by_name.setdefault(name, entry)
        return by_name, by_parent

    # -- public interface

    def load(self) -> list[str]:
        """
        Initial load.  Returns warnings (also logged).  Raises CertificateError
        only when the configuration itself is wrong: an explicitly configured
        certificate or default certificate that is missing, unreadable,
        unparsable or does not match its key, a cipher string OpenSSL rejects,
        or a self-signed certificate that cannot be written.  An expired file
        never stops the start: it is refused and the next source is used.
        """
        if self._state is not None:
            return self.reload()
        return self._run(initial=True)

    def reload(self) -> list[str]:
        """
        Re-read every source.  A host whose file is now broken keeps serving
        the certificate it had (and is reported), so a bad deploy never takes
        TLS down.  Established connections keep their context; only new
        handshakes see the new table.  Returns the messages it logged.
        """
        if self._state is None:
            return self.load()
        try:
            return self._run(initial=False)
        except CertificateError as e:
            log.error("reload failed, keeping all certificates: {error}", error=str(e))
            return [f"reload failed, keeping all certificates: {e}"]

    def _current(self) -> _State:
        state = self._state
        if state is None:
            raise RuntimeError("CertificateStore.load() has not been called")
        return state

    def _lookup(self, name: str) -> _Entry:
        state = self._current()
        key = _normalise(name)
        entry = (state.entries.get(key) or state.names.get(key) or state.by_name.get(key)
                 or (state.by_parent.get(key.split(".", 1)[1]) if "." in key else None)
                 or state.default)
        return entry or state.entries[self.default_host]

    def context_for(self, host: str) -> SSL.Context:
        """
        The context for a name (stream-header host for STARTTLS, or SNI):
        exact host, then a served certificate naming it (wildcards included),
        then the default certificate, then the default host.
        """
        return self._lookup(host).context

    def credentials(self, host: str) -> tuple[tuple[x509.Certificate, ...], object, str]:
        """Chain, key and file of the certificate served for ``host`` (the s2s contexts reuse them)."""
        loaded = self._lookup(host).loaded
        return loaded.chain, loaded.key, loaded.source.cert_path

    def starttls_options(self, host: str) -> _StartTLSCreator:
        """Argument for ``transport.startTLS()`` on the server side of a stream to ``host``."""
        return _StartTLSCreator(self, host)

    def direct_tls_factory(self, wrapped_factory: IProtocolFactory,
                           clock: IReactorTime | None = None) -> IProtocolFactory:
        """
        Wrap a factory for direct TLS (XEP-0368).  The handshake starts on the
        default host's certificate; the client's SNI switches to the vhost's.
        ``clock`` is TLSMemoryBIOFactory's write-coalescing clock (tests).
        """
        creator = _DirectTLSCreator(self)
        if clock is None:
            return TLSMemoryBIOFactory(creator, False, wrapped_factory)
        return TLSMemoryBIOFactory(creator, False, wrapped_factory, clock=clock)

    def _on_servername(self, conn: SSL.Connection) -> None:
        """SNI callback of the front context; never raises (that would abort the handshake)."""
        try:
            name = conn.get_servername()
            if name:
                ctx = self._lookup(name.decode("ascii", "replace")).context
                if ctx is not conn.get_context():
                    conn.set_context(ctx)
                    # OpenSSL keeps the first context's verify mode and
                    # callback: carry the vhost's client-certificate settings
                    # over (its CA store and CA names come with the context).
                    mode, callback = _CLIENT_VERIFY.get(ctx, (SSL.VERIFY_NONE, None))
                    conn.set_verify(mode, callback)
        except Exception:
            log.failure("while selecting the certificate for SNI")

    def describe(self, now: datetime | None = None) -> list[CertInfo]:
        """One CertInfo per host, in configuration order."""
        state = self._current()
        now = now or _now()
        return [self._info(state, key, state.entries[key], now) for key in self._keys]

    def _info(self, state: _State, key: str, entry: _Entry, now: datetime) -> CertInfo:
        leaf = entry.loaded.leaf
        return CertInfo(
            host=entry.host,
            status=_status(entry, key in state.stale, now),
            subject=_short_name(leaf.subject),
            sans=_display_names(leaf),
            issuer=_short_name(leaf.issuer),
            serial=leaf.serial_number,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            fingerprint=entry.loaded.fingerprint.hex(":").upper(),
            origin=entry.loaded.source.origin,
            sources=entry.loaded.files,
            notes=tuple(state.problems.get(key, ())) + entry.notes,
        )

    # -- polling

    def _watch_paths(self) -> set[str]:
        """
        Every file that could change what is served.  It depends only on the
        configuration and directory listings, never on what is loaded, so two
        signatures are always comparable.
        """
        paths: set[str] = set()
        for cert, key in list(self.explicit.values()) + (
                [self.default_cert] if self.default_cert else []):
            paths.update([cert, key or os.path.splitext(cert)[0] + ".key"])
        if self.certs_dir:
            paths.add(self.certs_dir)
            paths.update(os.path.join(self.certs_dir, n) for n in _listdir(self.certs_dir))
        live = self.letsencrypt_live
        if live:
            paths.add(live)
            for name in _listdir(live):
                for f in ("fullchain.pem", "privkey.pem"):
                    paths.add(os.path.join(live, name, f))
        for host in self.hosts:
            try:
                paths.add(self.generated_path(host))
            except CertificateError:
                pass
        for policy in self.client_certs.values():  # a new CRL must take effect
            for path in policy.ca + policy.crl:
                paths.add(path)
                if os.path.isdir(path):
                    paths.update(os.path.join(path, n) for n in _listdir(path))
        return paths

    def _watch_signature(self) -> dict[str, tuple]:
        """stat() results (inode, size, mtime, ctime) of the watched files."""
        return {path: _stat_key(path) for path in self._watch_paths()}

    def start_polling(self, interval: float = 30.0, clock: IReactorTime | None = None) -> None:
        """
        Check the source files every ``interval`` seconds and reload when one
        changed (inode, size, mtime or ctime); certbot renewals and copied
        files are picked up without SIGHUP.  Also re-warns about expiry.
        """
        self.stop_polling()
        poller = LoopingCall(self._poll)
        if clock is not None:
            poller.clock = clock
        self._poller = poller
        poller.start(interval, now=False).addErrback(
            lambda f: log.failure("certificate polling stopped", f))

    def stop_polling(self) -> None:
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        self._poller = None

    def _poll(self) -> None:
        try:
            if self._state is not None and self._watch_signature() != self._signature:
                log.info("certificate files changed; reloading")
                self.reload()
            self._warn_expiry()
        except Exception:
            log.failure("certificate poll failed")

    def _warn_expiry(self) -> None:
        """Log once per certificate when it enters 'expiring' or 'expired'."""
        for info in self.describe():
            if info.status in ("expiring", "expired"):
                mark = (info.serial, info.status)
                if self._warned_expiry.get(info.host) != mark:
                    self._warned_expiry[info.host] = mark
                    log.warn("{host}: certificate {status}: serial {serial:#x} not after "
                             "{not_after}", host=info.host, status=info.status,
                             serial=info.serial, not_after=info.not_after.isoformat())


def _raise_if_fatal(host: str, refused: list[tuple[_Source, CertificateError]]) -> None:
    """At start, a configured file that is wrong (not merely expired) stops the server."""
    for source, err in refused:
        if source.fatal_when_broken and err.fatal:
            what = "default certificate" if source.origin == DEFAULT else "certificate"
            raise CertificateError(
                err.path, f"{err.problem} ({what} of host {host}, set by {_config_key(source, host, err)})")


def _config_key(source: _Source, host: str, err: CertificateError) -> str:
    """The config key that named a configured (explicit or default) file."""
    if source.origin == DEFAULT:
        table, names = "tls", ("default_cert", "default_key")
    else:
        table, names = f'hosts."{host}".tls', ("cert", "key")
    name = names[1] if source.key_path is not None and err.path == source.key_path else names[0]
    return f"{table}.{name}"


def _keep_old(host: str, old: _Entry, reason: str, messages: list[str]) -> list[str]:
    """Log that ``old`` stays in service; returns the note for describe()."""
    note = (f"{reason}; still serving serial {old.loaded.leaf.serial_number:#x} loaded "
            f"earlier from {old.loaded.source.cert_path}")
    log.error("{message}", message=f"{host}: {note}", host=host)
    messages.append(f"{host}: {note}")
    return [note]


def _single_certificate(entries: Mapping[str, _Entry], default: _Entry | None) -> bool:
    """True when every name is served the same certificate (resumption is then safe)."""
    served = [*entries.values()] + ([default] if default is not None else [])
    return len({entry.loaded.fingerprint for entry in served}) == 1


def _mismatch_note(loaded: _Loaded, host: str) -> str:
    names = ", ".join(_display_names(loaded.leaf)) or "none"
    return f"{loaded.source.cert_path}: certificate is not valid for {host} (names: {names})"


def _status(entry: _Entry, stale: bool, now: datetime) -> str:
    leaf = entry.loaded.leaf
    if leaf.not_valid_after_utc <= now:
        return "expired"
    if entry.identity is None:
        return "mismatch"
    if stale:
        return "stale"
    if leaf.not_valid_after_utc - now < EXPIRY_WARNING:
        return "expiring"
    if _is_self_signed(leaf):
        return "self-signed"
    return "ok"


# --------------------------------------------------------------------------
# xmppctl support


def check_certificates(store: CertificateStore, now: datetime | None = None) -> list[str]:
    """
    Problems for ``xmppctl check``, one line each, starting with ``error:`` or
    ``warning:``; ``has_errors()`` tells whether the command should fail.

    Reads the files afresh (the store need not be loaded and is not changed;
    nothing is generated).  Errors: a candidate file for a host that cannot be
    used (broken, unreadable, key mismatch, chain order, expired), a served
    certificate not valid for its host, an unusable TLS policy.  Warnings:
    expiring within 14 days, self-signed, missing intermediates, a key readable
    by everyone, a host that would get a generated certificate.
    """
    try:
        _check_policy(store.policy)
    except CertificateError as e:
        return [f"error: {e}"]
    problems = [f"warning: {p}" for p in store._config_problems()]
    run = _Pass(store, None, now or _now())
    for host in store.hosts:
        problems.extend(_check_host(store, host, run))
        policy = store.client_certs.get(_normalise(host))
        if policy is not None:
            problems.extend(_check_client_trust(host, policy, run))
    return problems


def _check_client_trust(host: str, policy: ClientCertPolicy, run: _Pass) -> list[str]:
    """Client CA / CRL files of a vhost: unreadable is an error, expired a warning."""
    try:
        trust = _load_client_trust(host, policy, run.client_files)
    except CertificateError as e:
        return [f"error: {host}: {e}"]
    out = []
    for ca in trust.cas:
        if ca.not_valid_after_utc <= run.now:
            out.append(f"warning: {host}: client CA {_short_name(ca.subject)} expired on "
                       f"{ca.not_valid_after_utc:%Y-%m-%d}")
    for crl in trust.crls:
        if crl.next_update_utc is not None and crl.next_update_utc <= run.now:
            out.append(f"warning: {host}: CRL of {_short_name(crl.issuer)} is past its next "
                       f"update ({crl.next_update_utc:%Y-%m-%d %H:%M} UTC); OpenSSL refuses "
                       f"client certificates with an expired CRL")
    return out


def _check_host(store: CertificateStore, host: str, run: _Pass) -> list[str]:
    out = []
    loaded, refused = store._resolve(host, run)
    fatal = False
    for source, err in refused:
        if source.fatal_when_broken and err.fatal:
            # what start-up refuses: name the key, and promise no fallback
            fatal = True
            out.append(f"error: {host}: {_config_key(source, host, err)}: {err}; "
                       f"the server does not start")
        else:
            out.append(f"error: {host}: {err}")
    if loaded is None and fatal:
        return out
    if loaded is None:
        loaded, _ = store._self_signed(host, run, create=False)
        if loaded is None:
            out.append(f"warning: {host}: no certificate; a self-signed one will be generated "
                       f"at {store.generated_path(host)}")
            return out
    if _identity_for(loaded.leaf, host) is None:
        # A default certificate is a deliberate catch-all; anything else is a mistake.
        severity = "warning" if loaded.source.origin == DEFAULT else "error"
        out.append(f"{severity}: {host}: {_mismatch_note(loaded, host)}")
    out.extend(f"warning: {host}: {note}" for note in loaded.notes)
    left = loaded.leaf.not_valid_after_utc - run.now
    if left < EXPIRY_WARNING:
        out.append(f"warning: {host}: {loaded.source.cert_path}: expires "
                   f"{loaded.leaf.not_valid_after_utc:%Y-%m-%d} (in {left.days} days)")
    if _is_self_signed(loaded.leaf):
        out.append(f"warning: {host}: {loaded.source.cert_path}: self-signed certificate; "
                   f"clients will not trust it")
    return out


def has_errors(problems: Iterable[str]) -> bool:
    """True when ``check_certificates()`` found something that must fail ``xmppctl check``."""
    return any(p.startswith("error:") for p in problems)


def format_cert_table(infos: list[CertInfo], now: datetime | None = None) -> str:
    """
    The ``xmppctl certs`` table: one row per host, then indented lines with
    the certificate's names and any notes (``!``).
    """
    now = now or _now()
    header = ("HOST", "STATUS", "EXPIRES (UTC)", "SERIAL", "ISSUER", "SOURCE")
    rows = [header] + [_row(info, now) for info in infos]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    indent = " " * (widths[0] + 2)
    lines = []
    for n, row in enumerate(rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            continue
        info = infos[n - 1]
        lines.append(f"{indent}names: {', '.join(info.sans) or '(none)'}")
        lines.extend(f"{indent}! {note}" for note in info.notes)
    return "\n".join(lines) + "\n"


def _row(info: CertInfo, now: datetime) -> tuple[str, ...]:
    left = info.not_after - now
    when = f"in {left.days} days" if left > timedelta(0) else f"{(-left).days} days ago"
    return (info.host, info.status, f"{info.not_after:%Y-%m-%d %H:%M} ({when})",
            f"{info.serial:x}",
            info.issuer, f"{info.origin}: {', '.join(info.sources)}")

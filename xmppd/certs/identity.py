"""
Which names a certificate is valid for (RFC 6125; RFC 6120 section 13.7.1.2),
and the names shown to operators.

DNS-ID and SRV-ID matching (wildcards included) is service_identity's; the
XmppAddr and SRVName otherNames are decoded here.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import NameOID
from service_identity import CertificateError as _SIDCertificateError
from service_identity.cryptography import extract_patterns
from service_identity.hazmat import (
    DNS_ID,
    SRV_ID,
    DNSPattern,
    VerificationError,
    verify_service_identity,
)

try:
    import idna as _idna
except ImportError:  # pragma: no cover - idna comes with service_identity
    _idna = None

_ID_ON_XMPPADDR = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.5")
_ID_ON_DNSSRV = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.7")


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


def _short_name(name: x509.Name) -> str:
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns:
        return f"CN={cns[0].value}"
    return name.rfc4514_string() or "(empty)"


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

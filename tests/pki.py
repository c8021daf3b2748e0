"""A test PKI made with ``cryptography``: a CA issuing client and server certificates.

Shared by the SASL EXTERNAL tests (client certificates with id-on-xmppAddr,
e-mail and CN identities) and the federation tests (server certificates
with DNS names, for each test domain).
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

XMPP_ADDR = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.5")
NOW = datetime.now(timezone.utc)


# --------------------------------------------------------------------------
# PKI


def _utf8(text: str) -> bytes:
    """DER UTF8String, the value of an id-on-xmppAddr otherName."""
    raw = text.encode("utf-8")
    assert len(raw) < 128
    return bytes([0x0C, len(raw)]) + raw


def _name(cn: str, email: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "xmppd tests"),
             x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if email:
        attrs.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, email))
    return x509.Name(attrs)


class CA:
    def __init__(self, cn: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(cn)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name).issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(days=30))
            .not_valid_after(NOW + timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, cn: str, serial: int, xmpp: tuple[str, ...] = (), emails: tuple[str, ...] = (),
              subject_email: str | None = None, expired: bool = False) -> tuple[x509.Certificate, object]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn, subject_email)).issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(serial)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
        )
        if expired:
            builder = builder.not_valid_before(NOW - timedelta(days=20)).not_valid_after(
                NOW - timedelta(days=1))
        else:
            builder = builder.not_valid_before(NOW - timedelta(days=1)).not_valid_after(
                NOW + timedelta(days=30))
        sans = [x509.OtherName(XMPP_ADDR, _utf8(a)) for a in xmpp]
        sans += [x509.RFC822Name(e) for e in emails]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self.key, hashes.SHA256()), key

    def issue_server(self, domain: str, directory: Path, name: str | None = None,
                     dns: tuple[str, ...] | None = None, client_auth: bool = False) -> tuple[str, str]:
        """A server certificate for ``domain`` (DNS-ID), written as cert and key files.

        Only the serverAuth usage unless ``client_auth``: servers must accept
        such a certificate from the initiating side too.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client_auth else [])
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(domain)).issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in (dns or (domain,))]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        stem = directory / (name or domain)
        cert_path, key_path = Path(f"{stem}.crt"), Path(f"{stem}.key")
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        return str(cert_path), str(key_path)

    def crl(self, revoked: tuple[int, ...]) -> bytes:
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.name)
                   .last_update(NOW - timedelta(hours=1)).next_update(NOW + timedelta(days=7)))
        for serial in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(NOW - timedelta(hours=1)).build())
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _write_pair(directory: Path, name: str, cert: x509.Certificate, key) -> str:
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return str(path)



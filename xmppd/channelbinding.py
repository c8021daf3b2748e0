"""TLS channel bindings for SCRAM-*-PLUS (RFC 5929, RFC 9266), from pyOpenSSL.

Python's ``ssl`` cannot give ``tls-exporter``; the server runs on pyOpenSSL,
which can, so every binding type is computed here from the connection:

* ``tls-exporter`` (RFC 9266): TLS 1.3 only (where the exporter is safe);
* ``tls-unique`` (RFC 5929): TLS 1.2 only (undefined for 1.3);
* ``tls-server-end-point`` (RFC 5929): any version; the hash of our
  certificate with its signature hash (SHA-256 for MD5/SHA-1).
"""
from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL

EXPORTER_LABEL = b"EXPORTER-Channel-Binding"


def available_types(conn: SSL.Connection) -> list[str]:
    """Binding types this connection supports, preferred first."""
    version = conn.get_protocol_version_name()
    types = []
    if version == "TLSv1.3":
        types.append("tls-exporter")
    elif version == "TLSv1.2":
        types.append("tls-unique")
    if conn.get_certificate() is not None:
        types.append("tls-server-end-point")
    return types


def binding_data(conn: SSL.Connection, name: str) -> bytes | None:
    """The channel-binding data of type ``name`` for this (server) connection."""
    if name not in available_types(conn):
        return None
    if name == "tls-exporter":
        return conn.export_keying_material(EXPORTER_LABEL, 32, b"")
    if name == "tls-unique":
        # The first Finished message of the handshake: the client's, on a
        # full handshake seen from the server side.
        return conn.get_peer_finished()
    cert = conn.get_certificate().to_cryptography()
    return server_end_point_hash(cert)


def server_end_point_hash(cert: x509.Certificate) -> bytes:
    """RFC 5929 §4.1: hash the DER certificate with its signature hash."""
    algorithm = cert.signature_hash_algorithm
    if algorithm is None or isinstance(algorithm, (hashes.MD5, hashes.SHA1)):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(cert.public_bytes(Encoding.DER))
    return digest.finalize()

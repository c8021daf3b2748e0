"""The server side of one SCRAM exchange (RFC 5802, RFC 7677), from stored keys.

The server never sees a password here: it checks the client's proof against
the stored ``StoredKey`` and signs with ``ServerKey``.  That is two HMACs and
a hash per login, so the exchange is written out here rather than run
through ``scramp`` (whose general client/server state machine, validation
and imports cost more than the cryptography: issue 20).  ``scramp`` is still
what derives new credentials from passwords (:mod:`xmppd.auth.passwords`).

Parsing is strict and bounded: the messages are split at commas once, every
attribute the RFC requires is checked for presence and order, unknown
mandatory extensions (``m=``) are refused, and the client's nonce must be
printable ASCII without commas.  Every refusal is :class:`ScramError`; the
caller maps it to the SASL condition.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

#: Mechanism name -> hashlib name.
HASHES = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}


class ScramError(Exception):
    """The client's message is not acceptable (malformed, or the proof is wrong)."""


def _valid_nonce(nonce: str) -> bool:
    # RFC 5802 §7: printable = %x21-2B / %x2D-7E (ASCII, no comma)
    return bool(nonce) and nonce.isascii() and nonce.isprintable() and "," not in nonce \
        and " " not in nonce


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ScramError("invalid base64") from None


class ScramServer:
    """One exchange: :meth:`first` answers the client-first message, :meth:`final`
    checks the client-final message and returns the server-final one."""

    __slots__ = ("_hash", "_salt", "_stored_key", "_server_key", "_iterations", "_binding",
                 "_gs2_header", "_bare", "_nonce", "_server_first")

    def __init__(self, mechanism: str, salt: bytes, stored_key: bytes, server_key: bytes,
                 iterations: int, binding: tuple[str, bytes] | None = None) -> None:
        """``binding``: (type name, data) of the channel for -PLUS, else None."""
        self._hash = HASHES[mechanism]
        self._salt = salt
        self._stored_key = stored_key
        self._server_key = server_key
        self._iterations = iterations
        self._binding = binding
        self._gs2_header = ""
        self._bare = ""
        self._nonce = ""
        self._server_first = ""

    def first(self, message: str) -> str:
        """The server-first message for ``message`` (the whole client-first message).

        The GS2 header (flag, channel-binding name, authzid) has been
        checked by the caller (:func:`xmppd.sasl.parse_client_first`); here
        only its extent matters: it is everything up to the second comma.
        """
        parts = message.split(",", 2)
        if len(parts) != 3:
            raise ScramError("malformed client-first message")
        self._gs2_header = parts[0] + "," + parts[1] + ","
        bare = parts[2]
        attrs = bare.split(",")
        if attrs[0].startswith("m="):
            raise ScramError("mandatory extensions are not supported")
        if len(attrs) < 2 or not attrs[0].startswith("n=") or not attrs[1].startswith("r="):
            raise ScramError("client-first message needs n= and r=")
        client_nonce = attrs[1][2:]
        if not _valid_nonce(client_nonce):
            raise ScramError("invalid client nonce")
        self._bare = bare
        self._nonce = client_nonce + secrets.token_urlsafe(18)
        salt = base64.b64encode(self._salt).decode("ascii")
        self._server_first = f"r={self._nonce},s={salt},i={self._iterations}"
        return self._server_first

    def final(self, message: str) -> str:
        """Check the client-final message; the server-final message when the proof is right."""
        if not self._server_first:
            raise ScramError("client-final message before client-first")
        without_proof, sep, proof_attr = message.rpartition(",")
        if not sep or not proof_attr.startswith("p="):
            raise ScramError("client-final message needs p= last")
        attrs = without_proof.split(",")
        if len(attrs) < 2 or not attrs[0].startswith("c=") or not attrs[1].startswith("r="):
            raise ScramError("client-final message needs c= and r=")
        expected = self._gs2_header.encode("utf-8")
        if self._binding is not None:
            expected += self._binding[1]
        if not hmac.compare_digest(_b64decode(attrs[0][2:]), expected):
            raise ScramError("channel binding does not match")
        if not hmac.compare_digest(attrs[1][2:].encode("utf-8"), self._nonce.encode("utf-8")):
            raise ScramError("nonce does not match")
        proof = _b64decode(proof_attr[2:])
        auth_message = f"{self._bare},{self._server_first},{without_proof}".encode("utf-8")
        signature = hmac.digest(self._stored_key, auth_message, self._hash)
        if len(proof) != len(signature):
            raise ScramError("proof of the wrong length")
        client_key = (int.from_bytes(proof, "big") ^ int.from_bytes(signature, "big")).to_bytes(
            len(signature), "big")
        if not hmac.compare_digest(hashlib.new(self._hash, client_key).digest(), self._stored_key):
            raise ScramError("wrong proof")
        server_signature = hmac.digest(self._server_key, auth_message, self._hash)
        return "v=" + base64.b64encode(server_signature).decode("ascii")


def dummy_credentials(mechanism: str, iterations: int) -> tuple[bytes, bytes, bytes, int]:
    """Salt and keys nobody can log in with, for an unknown user: the exchange
    then runs exactly as for a wrong password, so the wire does not tell them apart
    (and costs no PBKDF2)."""
    size = hashlib.new(HASHES[mechanism]).digest_size
    return secrets.token_bytes(16), secrets.token_bytes(size), secrets.token_bytes(size), iterations

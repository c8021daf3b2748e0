"""A raw XMPP client on pyOpenSSL, for what Python's ssl cannot do.

Python's ``ssl`` has no ``tls-exporter`` and limited client-certificate
control; this client negotiates STARTTLS with pyOpenSSL and carries its own
small SCRAM client (RFC 5802, written independently of the server's code
path, xmppd.scram) so channel bindings can be tested end to end.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import socket
import struct

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL


class TLSClient:
    def __init__(self, port: int, host: str = "localhost", tls_version: int | None = None,
                 cert: str | None = None, key: str | None = None) -> None:
        self.host = host
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""
        self.conn: SSL.Connection | None = None
        self.tls_version = tls_version
        self.cert, self.key = cert, key

    # -- raw I/O -----------------------------------------------------------------

    def send(self, data: str | bytes) -> None:
        data = data.encode() if isinstance(data, str) else data
        (self.conn or self.sock).sendall(data)

    def read_until(self, pattern: str) -> str:
        regex = re.compile(pattern.encode(), re.S)
        while True:
            m = regex.search(self.buffer)
            if m:
                out, self.buffer = self.buffer[: m.end()], self.buffer[m.end():]
                return out.decode()
            try:
                chunk = (self.conn or self.sock).recv(65536)
            except (SSL.ZeroReturnError, SSL.SysCallError):
                chunk = b""  # closed (cleanly or not): what was read is in the error
            if not chunk:
                raise ConnectionError(self.buffer.decode(errors="replace"))
            self.buffer += chunk

    def open_stream(self) -> str:
        self.send("<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
                  f"to='{self.host}' version='1.0'>")
        return self.read_until("</stream:features>")

    def starttls(self, sni: str | None = None) -> None:
        self.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        self.read_until("<proceed[^>]*/>")
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        if self.tls_version is not None:
            ctx.set_min_proto_version(self.tls_version)
            ctx.set_max_proto_version(self.tls_version)
        if self.cert:
            ctx.use_certificate_chain_file(self.cert)
            ctx.use_privatekey_file(self.key or self.cert)
        # pyOpenSSL wants a blocking socket; SO_RCVTIMEO still bounds each read.
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 10, 0))
        conn = SSL.Connection(ctx, self.sock)
        conn.set_tlsext_host_name((sni or self.host).encode())
        conn.set_connect_state()
        conn.do_handshake()
        self.conn = conn
        self.buffer = b""

    # -- channel bindings, computed on the client side ----------------------------

    def binding(self, name: str) -> bytes:
        if name == "tls-exporter":
            return self.conn.export_keying_material(b"EXPORTER-Channel-Binding", 32, b"")
        if name == "tls-unique":
            return self.conn.get_finished()
        if name == "tls-server-end-point":
            cert = self.conn.get_peer_certificate(as_cryptography=True)
            algo = cert.signature_hash_algorithm
            if isinstance(algo, (hashes.MD5, hashes.SHA1)):
                algo = hashes.SHA256()
            h = hashes.Hash(algo)
            h.update(cert.public_bytes(Encoding.DER))
            return h.finalize()
        raise ValueError(name)

    # -- SASL ------------------------------------------------------------------

    def sasl(self, mechanism: str, initial: bytes | None) -> str:
        payload = base64.b64encode(initial).decode() if initial else "="
        self.send(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='{mechanism}'>{payload}</auth>")
        return self.read_until("</challenge>|</success>|<success[^>]*/>|</failure>")

    def scram(self, user: str, password: str, mechanism: str, cb_name: str | None = None,
              cb_data: bytes | None = None, gs2_flag: str | None = None) -> str:
        """Run a SCRAM exchange; returns the final server element."""
        hash_name = "sha256" if "SHA-256" in mechanism else "sha1"
        if gs2_flag is None:
            gs2_flag = f"p={cb_name}" if cb_name else "n"
        gs2 = f"{gs2_flag},,"
        cnonce = base64.b64encode(os.urandom(18)).decode()
        first_bare = f"n={user},r={cnonce}"
        reply = self.sasl(mechanism, (gs2 + first_bare).encode())
        if "<challenge" not in reply:
            return reply
        server_first = base64.b64decode(re.search(r">([^<]*)</challenge>", reply).group(1)).decode()
        attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
        salt, iters, nonce = base64.b64decode(attrs["s"]), int(attrs["i"]), attrs["r"]
        if cb_data is None and cb_name:
            cb_data = self.binding(cb_name)
        cbind = base64.b64encode(gs2.encode() + (cb_data or b"")).decode()
        final_no_proof = f"c={cbind},r={nonce}"
        salted = hashlib.pbkdf2_hmac(hash_name, password.encode(), salt, iters)
        client_key = hmac.new(salted, b"Client Key", hash_name).digest()
        stored_key = hashlib.new(hash_name, client_key).digest()
        auth_message = f"{first_bare},{server_first},{final_no_proof}".encode()
        signature = hmac.new(stored_key, auth_message, hash_name).digest()
        proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature))).decode()
        payload = base64.b64encode(f"{final_no_proof},p={proof}".encode()).decode()
        self.send(f"<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{payload}</response>")
        result = self.read_until("</success>|<success[^>]*/>|</failure>")
        if "<success" in result:
            server_key = hmac.new(salted, b"Server Key", hash_name).digest()
            expected = base64.b64encode(hmac.new(server_key, auth_message, hash_name).digest()).decode()
            final = base64.b64decode(re.search(r">([^<]*)</success>", result).group(1)).decode()
            assert final == f"v={expected}", "server signature mismatch"
        return result

    def close(self) -> None:
        try:
            (self.conn or self.sock).close()
        except Exception:
            pass

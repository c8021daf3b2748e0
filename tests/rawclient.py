"""A byte-level XMPP client for tests that must see exact wire data.

slixmpp hides stream errors and refuses to send malformed XML; this client
sends whatever a test gives it and returns what the server wrote.
"""
from __future__ import annotations

import base64
import re
import socket
import ssl
import time


def unverified_context() -> ssl.SSLContext:
    """A client context that accepts the test daemon's self-signed certificates."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class RawClient:
    def __init__(self, port: int, host: str = "localhost", timeout: float = 10.0,
                 rcvbuf: int | None = None, source: str | None = None) -> None:
        """``rcvbuf``: a small receive buffer (a client that reads slowly);
        ``source``: a loopback address to connect from (127.0.0.2, ...), as another client host."""
        self.host = host
        self.timeout = timeout
        # Options before connect(): the advertised window is small from the start.
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source:
            self.sock.bind((source, 0))
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.buffer = b""

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def read_until(self, pattern: bytes | str, timeout: float | None = None) -> bytes:
        """Read until ``pattern`` (regex) matches the buffer; return and consume it."""
        if isinstance(pattern, str):
            pattern = pattern.encode()
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            m = re.search(pattern, self.buffer, re.S)
            if m:
                out, self.buffer = self.buffer[: m.end()], self.buffer[m.end():]
                return out
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {pattern!r} in {self.buffer[-500:]!r}")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; buffer {self.buffer[-500:]!r}")
            self.buffer += chunk

    def read_all(self, timeout: float = 5.0) -> bytes:
        """Everything until the server closes the connection."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except (socket.timeout, ssl.SSLError, ConnectionResetError):
                break
            if not chunk:
                break
            self.buffer += chunk
        out, self.buffer = self.buffer, b""
        return out

    def open_stream(self, to: str | None = None) -> bytes:
        self.send(
            "<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
            "xmlns:stream='http://etherx.jabber.org/streams' "
            f"to='{to or self.host}' version='1.0'>"
        )
        return self.read_until(b"</stream:features>")

    def starttls(self, server_hostname: str | None = None,
                 context: ssl.SSLContext | None = None) -> ssl.SSLSocket:
        """STARTTLS; ``context`` replaces the default (no certificate checks) one."""
        self.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        self.read_until(b"<proceed[^>]*/>")
        ctx = context or unverified_context()
        self.sock = ctx.wrap_socket(self.sock, server_hostname=server_hostname or self.host)
        self.buffer = b""
        return self.sock

    def auth_plain(self, user: str, password: str) -> bytes:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        self.send(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>")
        return self.read_until(b"</success>|<success[^>]*/>|</failure>")

    def bind(self, resource: str = "raw") -> str:
        self.send(
            "<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
            f"<resource>{resource}</resource></bind></iq>"
        )
        reply = self.read_until(b"</iq>").decode()
        return re.search(r"<jid>([^<]+)</jid>", reply).group(1)

    def login(self, user: str, password: str, resource: str = "raw") -> str:
        """STARTTLS + PLAIN + bind; returns the bound full JID."""
        self.open_stream()
        self.starttls()
        self.open_stream()
        reply = self.auth_plain(user, password)
        assert b"<success" in reply, reply
        self.open_stream()
        return self.bind(resource)

    def iq(self, xml: str, ident: str, timeout: float | None = None) -> str:
        """Send an IQ and return the reply with id ``ident`` (result or error)."""
        self.send(xml)
        return self.read_until(f"<iq[^>]*id='{ident}'[^>]*(/>|>.*?</iq>)", timeout).decode()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class RawComponent(RawClient):
    """An external component (XEP-0114) at byte level: header, handshake, raw stanzas."""

    def open_component_stream(self, domain: str) -> str:
        """Send the header; return the stream id of the server's answer."""
        self.send(
            "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' "
            f"xmlns:stream='http://etherx.jabber.org/streams' to='{domain}'>"
        )
        header = self.read_until(b"<stream:stream[^>]*>").decode()
        m = re.search(r"id='([^']+)'", header)
        return m.group(1) if m else ""

    def handshake(self, domain: str, secret: str) -> bytes:
        """Header plus handshake; returns the server's answer (``<handshake/>`` or a stream error)."""
        import hashlib

        sid = self.open_component_stream(domain)
        digest = hashlib.sha1((sid + secret).encode()).hexdigest()
        self.send(f"<handshake>{digest}</handshake>")
        return self.read_until(b"<handshake/>|</stream:stream>")

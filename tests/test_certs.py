"""
Tests for xmppd.certs: real TLS handshakes against the store's contexts.

Certificates are made here with `cryptography` (a test root CA, an
intermediate, leaves).  Handshakes run two ways:

* in memory: a pyOpenSSL client Connection and the server Connection the
  store hands out, joined by memory BIOs (no network, no reactor);
* over loopback: a real Twisted listening endpoint on 127.0.0.1:0 wrapped with
  ``direct_tls_factory`` (or a STARTTLS line protocol), driven by a *private*
  reactor instance running in a thread -- never the global reactor, so other
  test modules may still start and stop that one.  Clients are blocking
  pyOpenSSL sockets and ``openssl s_client``.
"""

from __future__ import annotations

import os
import queue
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from service_identity.pyopenssl import verify_hostname
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.basic import LineReceiver

from xmppd.certs import (
    CertificateError,
    CertificateStore,
    TLSPolicy,
    check_certificates,
    format_cert_table,
    has_errors,
)

try:
    from twisted.internet.epollreactor import EPollReactor as _Reactor
except ImportError:  # not Linux
    from twisted.internet.selectreactor import SelectReactor as _Reactor

NOW = datetime.now(timezone.utc)
XMPPADDR = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.5")
DNSSRV = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.7")


# ---------------------------------------------------------------------------
# a small PKI


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "xmppd tests")])


def _der_string(tag: int, text: str) -> bytes:
    raw = text.encode("utf-8")
    assert len(raw) < 128
    return bytes([tag, len(raw)]) + raw


class PKI:
    """Root CA -> intermediate -> leaves, all EC P-256 (fast to make)."""

    def __init__(self) -> None:
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = self._ca(_name("xmppd test root"), self.root_key, self.root_key, None)
        self.inter_key = ec.generate_private_key(ec.SECP256R1())
        self.inter = self._ca(_name("xmppd test intermediate"), self.inter_key,
                              self.root_key, self.root)

    @staticmethod
    def _ca(name, key, signer_key, signer):
        return (x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(signer.subject if signer else name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(NOW - timedelta(days=30))
                .not_valid_after(NOW + timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(signer_key, hashes.SHA256()))

    def issue(self, *dns: str, serial: int | None = None, cn: str | None = None,
              not_before: datetime | None = None, not_after: datetime | None = None,
              srv: tuple[str, ...] = (), xmpp: tuple[str, ...] = (), key=None):
        """A leaf signed by the intermediate; returns (cert, key)."""
        key = key or ec.generate_private_key(ec.SECP256R1())
        sans = [x509.DNSName(n) for n in dns]
        sans += [x509.OtherName(DNSSRV, _der_string(0x16, s)) for s in srv]
        sans += [x509.OtherName(XMPPADDR, _der_string(0x0C, s)) for s in xmpp]
        builder = (x509.CertificateBuilder()
                   .subject_name(_name(cn or (dns[0] if dns else "leaf")))
                   .issuer_name(self.inter.subject)
                   .public_key(key.public_key())
                   .serial_number(serial or x509.random_serial_number())
                   .not_valid_before(not_before or NOW - timedelta(days=1))
                   .not_valid_after(not_after or NOW + timedelta(days=90))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), True))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self.inter_key, hashes.SHA256()), key

    def chain(self, leaf):
        return [leaf, self.inter]

    def write_root(self, path: Path) -> str:
        path.write_bytes(self.root.public_bytes(serialization.Encoding.PEM))
        return str(path)


def pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_pem(path: Path, certs, key=None, mode: int = 0o600) -> Path:
    """Certificates (in the given order) then the key, replaced atomically (new inode)."""
    data = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    if key is not None:
        data += pem_key(key)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return path


def write_key(path: Path, key, mode: int = 0o600) -> Path:
    path.write_bytes(pem_key(key))
    os.chmod(path, mode)
    return path


def install(pki: PKI, directory: Path, filename: str, *dns: str, **kw):
    """Issue a leaf for ``dns`` and write chain + key to ``directory/filename``."""
    cert, key = pki.issue(*dns, **kw)
    write_pem(directory / filename, pki.chain(cert), key)
    return cert, key


@pytest.fixture(scope="module")
def pki() -> PKI:
    return PKI()


@pytest.fixture
def dirs(tmp_path: Path):
    data, certs, le = tmp_path / "data", tmp_path / "certs", tmp_path / "letsencrypt"
    for d in (data, certs, le):
        d.mkdir()
    return data, certs, le


@pytest.fixture
def logged():
    """Events logged by xmppd.certs, as (level name, text)."""
    events: list[tuple[str, str]] = []

    def observer(event):
        if event.get("log_namespace", "").startswith("xmppd.certs"):
            events.append((event["log_level"].name, formatEvent(event)))

    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


# ---------------------------------------------------------------------------
# in-memory handshakes


def client_context(alpn=(b"xmpp-client",), ca: str | None = None,
                   max_version: int | None = None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if alpn:
        ctx.set_alpn_protos(list(alpn))
    if ca:
        ctx.load_verify_locations(ca)
        ctx.set_verify(SSL.VERIFY_PEER)
    if max_version:
        ctx.set_max_proto_version(max_version)
    return ctx


def memory_handshake(server: SSL.Connection, sni: str | None = None,
                     ctx: SSL.Context | None = None, session: SSL.Session | None = None,
                     **client_kw):
    """Handshake a pyOpenSSL client with ``server`` over memory BIOs."""
    client = SSL.Connection(ctx or client_context(**client_kw), None)
    if sni:
        client.set_tlsext_host_name(sni.encode())
    if session is not None:
        client.set_session(session)
    client.set_connect_state()
    server.set_accept_state()
    for _ in range(10):
        for conn in (client, server):
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                pass
        shuttle(client, server)
    try:  # let the client take in TLS 1.3 session tickets
        client.recv(1)
    except SSL.WantReadError:
        pass
    return client


def shuttle(client: SSL.Connection, server: SSL.Connection) -> None:
    for src, dst in ((client, server), (server, client)):
        try:
            dst.bio_write(src.bio_read(1 << 16))
        except SSL.WantReadError:
            continue


def starttls_serial(store: CertificateStore, host: str, **kw) -> int:
    """Serial the server presents for a STARTTLS stream to ``host``."""
    creator = store.starttls_options(host)
    client = memory_handshake(creator.serverConnectionForTLS(None), **kw)
    return client.get_peer_certificate(as_cryptography=True).serial_number


def served_serial(store: CertificateStore, host: str) -> int:
    return {i.host: i.serial for i in store.describe()}[host]


# ---------------------------------------------------------------------------
# a private reactor in a thread, and blocking clients


@pytest.fixture(scope="module")
def reactor():
    r = _Reactor()
    thread = threading.Thread(target=r.run, kwargs={"installSignalHandlers": False},
                              daemon=True, name="test-certs-reactor")
    thread.start()
    blockingCallFromThread(r, lambda: None)  # running
    yield r
    r.callFromThread(r.stop)
    thread.join(10)


class Echo(Protocol):
    """Echoes; answers b'ALPN?' with the ALPN protocol the server negotiated."""

    def dataReceived(self, data: bytes) -> None:
        if data == b"ALPN?":
            self.transport.write(self.transport.negotiatedProtocol or b"none")
        else:
            self.transport.write(data)


@contextmanager
def serve_direct_tls(reactor, store: CertificateStore):
    factory = store.direct_tls_factory(Factory.forProtocol(Echo), clock=reactor)
    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    port = blockingCallFromThread(reactor, endpoint.listen, factory)
    try:
        yield port.getHost().port
    finally:
        blockingCallFromThread(reactor, port.stopListening)


def blocking_socket(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.settimeout(None)  # pyOpenSSL wants a blocking fd; kernel timeouts stop hangs
    tv = struct.pack("ll", 10, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    return sock


def tls_client(port: int, sni: str | None = None, sock: socket.socket | None = None,
               session: SSL.Session | None = None, ctx: SSL.Context | None = None,
               **kw) -> SSL.Connection:
    conn = SSL.Connection(ctx or client_context(**kw), sock or blocking_socket(port))
    if sni:
        conn.set_tlsext_host_name(sni.encode())
    if session is not None:
        conn.set_session(session)
    conn.set_connect_state()
    conn.do_handshake()
    return conn


def peer_serial(conn: SSL.Connection) -> int:
    return conn.get_peer_certificate(as_cryptography=True).serial_number


def echo(conn: SSL.Connection, data: bytes) -> bytes:
    conn.sendall(data)
    return conn.recv(1024)


def close(conn: SSL.Connection) -> None:
    try:
        conn.shutdown()
    except SSL.Error:
        pass
    conn.close()  # delegated to the socket


@pytest.fixture
def two_vhosts(pki, dirs, tmp_path):
    """a.test and b.test from certs_dir, chat.w.test from a *.w.test wildcard file."""
    data, certs, _ = dirs
    a, _ = install(pki, certs, "a.test.pem", "a.test", serial=0xA1)
    b_cert, b_key = pki.issue("b.test", serial=0xB1)
    write_pem(certs / "b.test.crt", pki.chain(b_cert), mode=0o644)
    write_key(certs / "b.test.key", b_key)
    w, _ = install(pki, certs, "*.w.test.pem", "*.w.test", serial=0xC1)
    store = CertificateStore(["a.test", "b.test", "chat.w.test"], str(data), str(certs))
    store.load()
    return store, pki.write_root(tmp_path / "root.pem")


# ---------------------------------------------------------------------------
# vhost selection


def test_starttls_serves_each_vhost_its_certificate(two_vhosts):
    store, ca = two_vhosts
    assert IOpenSSLServerConnectionCreator.providedBy(store.starttls_options("a.test"))
    assert starttls_serial(store, "a.test", ca=ca) == 0xA1
    assert starttls_serial(store, "b.test", ca=ca) == 0xB1
    # the stream header decides for STARTTLS, whatever SNI the client sent
    assert starttls_serial(store, "b.test", sni="a.test") == 0xB1
    # names are compared as on the wire
    assert store.context_for("A.Test.") is store.context_for("a.test")
    assert store.starttls_options("a.test").getContext() is store.context_for("a.test")


def test_context_for_fallback_order(pki, dirs):
    data, certs, _ = dirs
    install(pki, certs, "a.test.pem", "a.test", "conference.a.test", serial=1)
    install(pki, certs, "w.pem", "*.w.test", serial=2)
    default_cert, default_key = pki.issue("fallback.test", serial=3)
    write_pem(certs.parent / "default.pem", pki.chain(default_cert), default_key)
    store = CertificateStore(["a.test", "x.w.test"], str(data), str(certs),
                             default_cert=(str(certs.parent / "default.pem"), None))
    store.load()
    by_serial = {i.serial: i.host for i in store.describe()}
    assert by_serial == {1: "a.test", 2: "x.w.test"}
    assert store.context_for("conference.a.test") is store.context_for("a.test")  # SAN
    assert store.context_for("other.w.test") is store.context_for("x.w.test")  # wildcard
    unknown = store.context_for("nowhere.example")  # default cert
    assert unknown is not store.context_for("a.test")
    assert memory_handshake(SSL.Connection(unknown, None)).get_peer_certificate(
        as_cryptography=True).serial_number == 3
    # without a default certificate the default host answers
    plain = CertificateStore(["a.test", "x.w.test"], str(data), str(certs),
                             default_host="x.w.test")
    plain.load()
    assert plain.context_for("nowhere.example") is plain.context_for("x.w.test")


def test_other_names_get_their_own_file_never_a_generated_one(pki, dirs):
    """Public component domains (``names``): certs_dir and wildcard files only, else the fallback."""
    data, certs, _ = dirs
    install(pki, certs, "a.test.pem", "a.test", serial=31)
    install(pki, certs, "comp.a.test.pem", "comp.a.test", serial=32)
    install(pki, certs, "w.pem", "*.w.test", serial=33)
    store = CertificateStore(["a.test"], str(data), str(certs),
                             names=["comp.a.test", "gw.w.test", "bare.a.test", "a.test"])
    store.load()
    assert [i.host for i in store.describe()] == ["a.test"]  # names are not hosts
    serial = {n: store.credentials(n)[0][0].serial_number
              for n in ("comp.a.test", "gw.w.test", "bare.a.test")}
    assert serial == {"comp.a.test": 32, "gw.w.test": 33, "bare.a.test": 31}
    assert store.credentials("comp.a.test")[2] == str(certs / "comp.a.test.pem")
    assert not (data / "certs" / "bare.a.test.pem").exists()
    # without the name, the file is not looked for (the default host answers)
    plain = CertificateStore(["a.test"], str(data), str(certs))
    plain.load()
    assert plain.credentials("comp.a.test")[0][0].serial_number == 31
    # a reload that finds the file broken keeps the certificate it had
    (certs / "comp.a.test.pem").write_text("garbage")
    store.reload()
    assert store.credentials("comp.a.test")[0][0].serial_number == 32


def test_direct_tls_sni_picks_vhost_and_alpn(reactor, two_vhosts):
    store, ca = two_vhosts
    with serve_direct_tls(reactor, store) as port:
        for sni, serial in [("a.test", 0xA1), ("b.test", 0xB1), ("chat.w.test", 0xC1),
                            ("other.w.test", 0xC1),  # not a host: wildcard certificate
                            ("nowhere.example", 0xA1),  # unknown: default host
                            (None, 0xA1)]:  # no SNI: default host
            conn = tls_client(port, sni, ca=ca)  # verifies the full chain to the root
            assert peer_serial(conn) == serial, sni
            assert len(conn.get_peer_cert_chain()) == 2
            if sni in ("a.test", "b.test", "chat.w.test"):
                verify_hostname(conn, sni)
            assert conn.get_alpn_proto_negotiated() == b"xmpp-client"
            assert echo(conn, b"ALPN?") == b"xmpp-client"  # the server saw it too
            assert echo(conn, b"<stream/>") == b"<stream/>"
            close(conn)
        # a client offering other protocols still connects, without ALPN
        conn = tls_client(port, "b.test", alpn=(b"h2",))
        assert conn.get_alpn_proto_negotiated() == b""
        assert peer_serial(conn) == 0xB1
        close(conn)


def test_fifty_concurrent_handshakes_no_crossover(reactor, two_vhosts):
    store, ca = two_vhosts
    wanted = {"a.test": 0xA1, "b.test": 0xB1, "chat.w.test": 0xC1}
    names = [list(wanted)[i % 3] for i in range(50)]
    barrier = threading.Barrier(len(names), timeout=20)

    def one(sni: str) -> tuple[str, int, bytes]:
        sock = blocking_socket(port)
        barrier.wait()  # all 50 TCP connections open before any handshake starts
        conn = tls_client(port, sni, sock=sock, ca=ca)
        try:
            return sni, peer_serial(conn), echo(conn, sni.encode())
        finally:
            close(conn)

    with serve_direct_tls(reactor, store) as port:
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            results = list(pool.map(one, names))
    assert len(results) == 50
    for sni, serial, reply in results:
        assert serial == wanted[sni] and reply == sni.encode()


def test_openssl_s_client_sni_alpn(reactor, two_vhosts):
    store, ca = two_vhosts
    with serve_direct_tls(reactor, store) as port:
        out = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "b.test",
             "-alpn", "xmpp-client", "-CAfile", ca, "-verify_hostname", "b.test"],
            input=b"", capture_output=True, timeout=20).stdout.decode()
        assert "ALPN protocol: xmpp-client" in out
        assert "CN = b.test" in out
        assert "Verify return code: 0 (ok)" in out
        # several certificates: direct TLS does no resumption (see
        # test_session_resumption; s_client -reconnect only tries TLS 1.2)
        out = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername",
             "a.test", "-reconnect", "-tls1_2"],
            input=b"", capture_output=True, timeout=20).stdout.decode()
        assert out.count("New, TLSv1.2") == 6 and "Reused" not in out, out[-2000:]


def session_reused(conn: SSL.Connection) -> bool:
    from OpenSSL._util import lib  # pyOpenSSL has no public accessor for this

    return bool(lib.SSL_session_reused(conn._ssl))


def direct_resumption(port: int, first_sni: str, then_sni: str, version: int):
    """Connect, take the session, reconnect offering it: (reused?, serial)."""
    ctx = client_context(max_version=version)  # pyOpenSSL wants one Context for resuming
    first = tls_client(port, first_sni, ctx=ctx)
    assert echo(first, b"x") == b"x"  # reads the TLS 1.3 session tickets too
    session = first.get_session()
    close(first)
    again = tls_client(port, then_sni, session=session, ctx=ctx)
    try:
        return session_reused(again), peer_serial(again)
    finally:
        close(again)


@pytest.mark.parametrize("version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION])
def test_session_resumption(reactor, two_vhosts, pki, dirs, version):
    store, _ = two_vhosts
    # STARTTLS contexts are per vhost: resumed within a vhost, never across
    for host, other, serial in (("a.test", "b.test", 0xB1), ("b.test", "a.test", 0xA1)):
        ctx = client_context(max_version=version)
        first = memory_handshake(store.starttls_options(host).serverConnectionForTLS(None),
                                 ctx=ctx)
        session = first.get_session()
        again = memory_handshake(store.starttls_options(host).serverConnectionForTLS(None),
                                 ctx=ctx, session=session)
        assert session_reused(again)
        across = memory_handshake(store.starttls_options(other).serverConnectionForTLS(None),
                                  ctx=ctx, session=session)
        assert not session_reused(across)
        assert across.get_peer_certificate(as_cryptography=True).serial_number == serial
    # direct TLS with several certificates: OpenSSL would resume before SNI
    # selection, across vhosts, so the store offers full handshakes only
    with serve_direct_tls(reactor, store) as port:
        assert direct_resumption(port, "a.test", "b.test", version) == (False, 0xB1)
        assert direct_resumption(port, "a.test", "a.test", version) == (False, 0xA1)
    # one certificate for every name: resumption is safe and on
    data, certs, _ = dirs
    install(pki, certs, "multi.pem", "m1.test", "m2.test", serial=0xD1)
    single = CertificateStore(["m1.test", "m2.test"], str(data), str(certs))
    single.load()
    with serve_direct_tls(reactor, single) as port:
        assert direct_resumption(port, "m1.test", "m1.test", version) == (True, 0xD1)
        assert direct_resumption(port, "m1.test", "m2.test", version) == (True, 0xD1)


class StartTLSLine(LineReceiver):
    """A toy stream: 'STARTTLS <host>' upgrades with the store's options for host."""

    def lineReceived(self, line: bytes) -> None:
        if line.startswith(b"STARTTLS "):
            host = line.split()[1].decode()
            self.sendLine(b"PROCEED")
            self.transport.startTLS(self.factory.store.starttls_options(host))
        else:
            self.factory.received.put(line)


def test_real_twisted_starttls(reactor, two_vhosts):
    store, ca = two_vhosts
    factory = Factory.forProtocol(StartTLSLine)
    factory.store, factory.received = store, queue.Queue()
    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    port = blockingCallFromThread(reactor, endpoint.listen, factory)
    try:
        for host, serial in (("a.test", 0xA1), ("b.test", 0xB1)):
            sock = blocking_socket(port.getHost().port)
            sock.sendall(f"STARTTLS {host}\r\n".encode())
            assert sock.recv(100) == b"PROCEED\r\n"
            conn = tls_client(0, None, sock=sock, ca=ca)  # no SNI: the stream decides
            assert peer_serial(conn) == serial
            verify_hostname(conn, host)
            conn.sendall(f"hello {host}\r\n".encode())
            assert factory.received.get(timeout=10) == f"hello {host}".encode()
            close(conn)
    finally:
        blockingCallFromThread(reactor, port.stopListening)


# ---------------------------------------------------------------------------
# sources


def test_source_priority_order(pki, dirs, tmp_path):
    """explicit > certs_dir > wildcard > Let's Encrypt > default > generated."""
    data, certs, le = dirs
    host = "p.example.test"
    explicit_cert, explicit_key = pki.issue(host, serial=1)
    write_pem(tmp_path / "explicit.crt", pki.chain(explicit_cert), mode=0o644)
    write_key(tmp_path / "explicit.key", explicit_key)
    install(pki, certs, f"{host}.pem", host, serial=2)
    install(pki, certs, "*.example.test.pem", "*.example.test", serial=3)
    (le / host).mkdir()
    cert, key = pki.issue(host, serial=4)
    write_pem(le / host / "fullchain.pem", pki.chain(cert))
    write_key(le / host / "privkey.pem", key)
    install(pki, tmp_path, "default.pem", "default.test", serial=5)

    def serving(**kw) -> tuple[int, str]:
        store = CertificateStore([host], str(data), str(certs), str(le), **kw)
        store.load()
        info = store.describe()[0]
        return info.serial, info.origin

    explicit = {host: (str(tmp_path / "explicit.crt"), str(tmp_path / "explicit.key"))}
    default = (str(tmp_path / "default.pem"), None)
    assert serving(explicit=explicit, default_cert=default) == (1, "explicit")
    assert serving(default_cert=default) == (2, "certs_dir")
    (certs / f"{host}.pem").unlink()
    assert serving(default_cert=default) == (3, "wildcard")
    (certs / "*.example.test.pem").unlink()
    assert serving(default_cert=default) == (4, "letsencrypt")
    shutil.rmtree(le / host)
    assert serving(default_cert=default) == (5, "default")
    assert serving()[1] == "generated"


def test_crt_key_pair_and_key_inside_pem(pki, dirs, tmp_path):
    data, certs, _ = dirs
    c1, k1 = pki.issue("one.test", serial=11)
    write_pem(certs / "one.test.crt", pki.chain(c1), mode=0o644)
    write_key(certs / "one.test.key", k1)
    install(pki, tmp_path, "two.pem", "two.test", serial=12)  # explicit, key inside
    store = CertificateStore(["one.test", "two.test"], str(data), str(certs),
                             explicit={"two.test": (str(tmp_path / "two.pem"), None)})
    assert store.load() == []
    infos = {i.host: i for i in store.describe()}
    assert infos["one.test"].sources == (str(certs / "one.test.crt"), str(certs / "one.test.key"))
    assert infos["two.test"].sources == (str(tmp_path / "two.pem"),)
    assert starttls_serial(store, "one.test") == 11 and starttls_serial(store, "two.test") == 12


def test_wildcard_in_any_file_serves_subdomain(pki, dirs):
    data, certs, _ = dirs
    install(pki, certs, "company.pem", "conf.test", "*.conf.test", serial=21)
    install(pki, certs, "ca-bundle.pem", "ignored.test")
    store = CertificateStore(["room.conf.test", "conf.test"], str(data), str(certs))
    store.load()
    infos = {i.host: i for i in store.describe()}
    assert infos["room.conf.test"].serial == 21 and infos["room.conf.test"].origin == "wildcard"
    assert infos["room.conf.test"].status == "ok"
    assert infos["conf.test"].serial == 21 and infos["conf.test"].origin == "certs_dir"
    # a wildcard covers one label only
    deep = CertificateStore(["a.b.conf.test"], str(data), str(certs))
    deep.load()
    assert deep.describe()[0].origin == "generated"


def certbot_deploy(pki, le: Path, lineage: str, version: int, *dns: str, serial: int):
    """Lay out files the way certbot does: archive/<name>/*N.pem, live/<name>/* -> symlinks."""
    archive, live = le / "archive" / lineage, le / "live" / lineage
    archive.mkdir(parents=True, exist_ok=True)
    live.mkdir(parents=True, exist_ok=True)
    cert, key = pki.issue(*dns, serial=serial)
    pem = serialization.Encoding.PEM
    (archive / f"cert{version}.pem").write_bytes(cert.public_bytes(pem))
    (archive / f"chain{version}.pem").write_bytes(pki.inter.public_bytes(pem))
    (archive / f"fullchain{version}.pem").write_bytes(
        cert.public_bytes(pem) + pki.inter.public_bytes(pem))
    write_key(archive / f"privkey{version}.pem", key)
    for name in ("cert", "chain", "fullchain", "privkey"):
        link = live / f"{name}.pem"
        tmp = live / f".{name}.tmp"
        os.symlink(f"../../archive/{lineage}/{name}{version}.pem", tmp)
        os.replace(tmp, link)


def test_letsencrypt_layout(pki, dirs):
    data, certs, le = dirs
    certbot_deploy(pki, le, "le.test", 1, "le.test", "muc.le.test", serial=31)
    certbot_deploy(pki, le, "other.test-0001", 1, "other.test", serial=32)
    # letsencrypt_dir may name /etc/letsencrypt or /etc/letsencrypt/live
    for le_dir in (le, le / "live"):
        store = CertificateStore(["le.test", "muc.le.test", "other.test"], str(data),
                                 str(certs), letsencrypt_dir=str(le_dir))
        assert store.load() == []
        infos = {i.host: i for i in store.describe()}
        assert {h: (i.serial, i.origin, i.status) for h, i in infos.items()} == {
            "le.test": (31, "letsencrypt", "ok"),
            "muc.le.test": (31, "letsencrypt", "ok"),  # lineage named after le.test
            "other.test": (32, "letsencrypt", "ok"),  # certbot's -0001 lineage
        }
        assert infos["le.test"].sources[0].endswith("live/le.test/fullchain.pem")
    # renewal: certbot writes version 2 and repoints the symlinks
    certbot_deploy(pki, le, "le.test", 2, "le.test", "muc.le.test", serial=33)
    messages = store.reload()
    assert any("now serving serial 0x21" in m for m in messages)
    assert starttls_serial(store, "muc.le.test") == 33


def test_default_certificate_for_everything_else(pki, dirs, tmp_path):
    data, certs, _ = dirs
    install(pki, certs, "a.test.pem", "a.test", serial=41)
    install(pki, tmp_path, "default.pem", "a.test", "b.test", serial=42)
    store = CertificateStore(["a.test", "b.test"], str(data), str(certs),
                             default_cert=(str(tmp_path / "default.pem"), None))
    store.load()
    assert [(i.host, i.serial, i.origin) for i in store.describe()] == [
        ("a.test", 41, "certs_dir"), ("b.test", 42, "default")]
    assert not (data / "certs").exists()  # nothing generated


# ---------------------------------------------------------------------------
# self-signed generation


def test_self_signed_generated_once_and_reused(dirs, logged):
    data, _, _ = dirs
    store = CertificateStore(["fresh.test"], str(data))
    messages = store.load()
    path = data / "certs" / "fresh.test.pem"
    assert any("SELF-SIGNED" in m and str(path) in m for m in messages)
    assert any(level == "warn" and "SELF-SIGNED" in text for level, text in logged)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    blob = path.read_bytes()
    cert = x509.load_pem_x509_certificate(blob)
    key = serialization.load_pem_private_key(blob, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fresh.test"]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=364) < lifetime < timedelta(days=367)
    info = store.describe()[0]
    assert (info.status, info.origin, info.serial) == ("self-signed", "generated",
                                                       cert.serial_number)
    assert starttls_serial(store, "fresh.test") == cert.serial_number
    # the next start reuses the file
    mtime = path.stat().st_mtime_ns
    again = CertificateStore(["fresh.test"], str(data))
    assert any("reusing" in m for m in again.load())
    assert again.describe()[0].serial == cert.serial_number
    assert path.stat().st_mtime_ns == mtime


def test_self_signed_regenerated_when_nearly_expired(pki, dirs):
    data, _, _ = dirs
    (data / "certs").mkdir(mode=0o700)
    cert, key = pki.issue("old.test", serial=51, not_after=NOW + timedelta(days=10))
    write_pem(data / "certs" / "old.test.pem", [cert], key)
    store = CertificateStore(["old.test"], str(data))
    assert any("generated a SELF-SIGNED" in m for m in store.load())
    assert store.describe()[0].serial != 51


def test_self_signed_unwritable_data_dir_is_fatal(dirs):
    data, _, _ = dirs
    (data / "certs").write_text("not a directory")
    with pytest.raises(CertificateError) as e:
        CertificateStore(["x.test"], str(data)).load()
    assert "cannot write the self-signed certificate" in str(e.value)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------
# reload


def test_reload_new_certificate_existing_connection_survives(reactor, pki, dirs, tmp_path):
    data, certs, _ = dirs
    install(pki, certs, "r.test.pem", "r.test", serial=0x61)
    store = CertificateStore(["r.test"], str(data), str(certs))
    store.load()
    with serve_direct_tls(reactor, store) as port:
        old = tls_client(port, "r.test")
        assert peer_serial(old) == 0x61 and echo(old, b"before") == b"before"
        install(pki, certs, "r.test.pem", "r.test", serial=0x62)
        messages = blockingCallFromThread(reactor, store.reload)
        assert messages == ["r.test: now serving serial 0x62 from "
                            f"{certs / 'r.test.pem'} (was serial 0x61)"]
        new = tls_client(port, "r.test")
        assert peer_serial(new) == 0x62
        # the connection opened before the reload is untouched
        assert echo(old, b"after") == b"after"
        assert peer_serial(old) == 0x61
        close(old)
        close(new)


BREAKAGES = [
    ("mismatched key", "private key does not match the certificate"),
    ("expired", "certificate expired on"),
    ("not yet valid", "is not valid before"),
    ("garbage", "is not a PEM file"),
    ("no key", "holds no private key"),
    ("chain out of order", "chain out of order: certificate 1 (CN=s.test) is not issued by "
                           "certificate 2 (CN=xmppd test root)"),
    ("key belongs to intermediate", "private key belongs to certificate 2 of the chain"),
    ("deleted", "no usable certificate file found any more"),
]


@pytest.mark.parametrize("breakage, expected", BREAKAGES,
                         ids=[name.replace(" ", "-") for name, _ in BREAKAGES])
def test_reload_refuses_broken_file_and_keeps_old(pki, dirs, logged, breakage, expected):
    data, certs, _ = dirs
    path = certs / "s.test.pem"
    install(pki, certs, "s.test.pem", "s.test", serial=0x71)
    store = CertificateStore(["s.test"], str(data), str(certs))
    store.load()
    old_context = store.context_for("s.test")
    cert, key = pki.issue("s.test", serial=0x72)
    if breakage == "mismatched key":
        write_pem(path, pki.chain(cert), ec.generate_private_key(ec.SECP256R1()))
    elif breakage == "expired":
        cert, key = pki.issue("s.test", serial=0x72, not_before=NOW - timedelta(days=90),
                              not_after=NOW - timedelta(days=1))
        write_pem(path, pki.chain(cert), key)
    elif breakage == "not yet valid":
        cert, key = pki.issue("s.test", serial=0x72, not_before=NOW + timedelta(days=2))
        write_pem(path, pki.chain(cert), key)
    elif breakage == "garbage":
        path.write_bytes(b"this is not a certificate\n")
    elif breakage == "no key":
        write_pem(path, pki.chain(cert))
    elif breakage == "chain out of order":
        write_pem(path, [cert, pki.root, pki.inter], key)
    elif breakage == "key belongs to intermediate":
        write_pem(path, [cert, pki.inter], pki.inter_key)
    elif breakage == "deleted":
        path.unlink()
    messages = store.reload()
    assert len(messages) == 1 and expected in messages[0], messages
    assert "still serving serial 0x71" in messages[0] and "\n" not in messages[0]
    if breakage != "deleted":
        assert str(path) in messages[0]
    assert any(level == "error" and expected in text for level, text in logged)
    # the old certificate stays in service, same context
    assert store.context_for("s.test") is old_context
    assert starttls_serial(store, "s.test") == 0x71
    info = store.describe()[0]
    assert info.status == "stale" and info.serial == 0x71
    assert any(expected in note for note in info.notes)
    # fixing the file puts the new one in service
    if breakage in ("expired", "not yet valid"):
        cert, key = pki.issue("s.test", serial=0x72)
    write_pem(path, pki.chain(cert), key)
    store.reload()
    assert starttls_serial(store, "s.test") == 0x72
    assert store.describe()[0].status == "ok"


def test_reload_picks_up_new_source_after_self_signed(pki, dirs):
    data, certs, _ = dirs
    store = CertificateStore(["n.test"], str(data), str(certs))
    store.load()
    assert store.describe()[0].origin == "generated"
    install(pki, certs, "n.test.pem", "n.test", serial=0x81)
    store.reload()
    assert (store.describe()[0].serial, store.describe()[0].status) == (0x81, "ok")


def test_reload_keeps_contexts_of_unchanged_hosts(pki, dirs):
    data, certs, _ = dirs
    install(pki, certs, "u.test.pem", "u.test")
    install(pki, certs, "v.test.pem", "v.test")
    store = CertificateStore(["u.test", "v.test"], str(data), str(certs))
    store.load()
    before = store.context_for("u.test"), store.context_for("v.test")
    install(pki, certs, "v.test.pem", "v.test")
    store.reload()
    assert store.context_for("u.test") is before[0]  # sessions survive for u.test
    assert store.context_for("v.test") is not before[1]


# ---------------------------------------------------------------------------
# checks at load


def test_explicit_broken_file_stops_the_start(pki, dirs, tmp_path):
    data, _, _ = dirs
    cert, _ = pki.issue("e.test")
    write_pem(tmp_path / "e.pem", pki.chain(cert), ec.generate_private_key(ec.SECP256R1()))
    store = CertificateStore(["e.test"], str(data), explicit={"e.test": (str(tmp_path / "e.pem"), None)})
    with pytest.raises(CertificateError) as e:
        store.load()
    text = str(e.value)
    assert text.startswith(f"{tmp_path / 'e.pem'}: private key does not match")
    assert "certificate of host e.test" in text and "\n" not in text
    missing = CertificateStore(["e.test"], str(data),
                               explicit={"e.test": (str(tmp_path / "nope.pem"), None)})
    with pytest.raises(CertificateError, match="nope.pem: certificate file does not exist"):
        missing.load()
    default = CertificateStore(["e.test"], str(data),
                               default_cert=(str(tmp_path / "nope.pem"), None))
    with pytest.raises(CertificateError, match="default certificate"):
        default.load()


def test_expired_file_at_start_is_skipped_not_fatal(pki, dirs, tmp_path):
    data, certs, _ = dirs
    cert, key = pki.issue("x.test", not_after=NOW - timedelta(hours=1),
                          not_before=NOW - timedelta(days=90))
    write_pem(tmp_path / "x.pem", pki.chain(cert), key)
    install(pki, certs, "x.test.pem", "x.test", serial=0x91)
    store = CertificateStore(["x.test"], str(data), str(certs),
                             explicit={"x.test": (str(tmp_path / "x.pem"), None)})
    messages = store.load()
    assert any("skipped" in m and "expired on" in m and "x.pem" in m for m in messages)
    assert store.describe()[0].serial == 0x91


def test_broken_discovered_file_falls_through(pki, dirs):
    data, certs, _ = dirs
    (certs / "d.test.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    install(pki, certs, "*.d.test.pem", "*.d.test")
    store = CertificateStore(["d.test", "sub.d.test"], str(data), str(certs))
    messages = store.load()
    assert any(m.startswith("d.test: skipped") and "not a valid certificate" in m
               for m in messages)
    assert [i.origin for i in store.describe()] == ["generated", "wildcard"]


def test_expiring_certificate_warns(pki, dirs, logged):
    data, certs, _ = dirs
    install(pki, certs, "soon.test.pem", "soon.test", not_after=NOW + timedelta(days=5, hours=1))
    store = CertificateStore(["soon.test"], str(data), str(certs))
    messages = store.load()
    assert any("expires" in m and "(in 5 days)" in m for m in messages)
    assert any(level == "warn" and "expires" in text for level, text in logged)
    assert store.describe()[0].status == "expiring"


def test_identity_dns_srv_and_xmppaddr(pki, dirs):
    data, certs, _ = dirs
    install(pki, certs, "dns.test.pem", "dns.test")
    install(pki, certs, "srv.test.pem", cn="srv.test", srv=("_xmpp-client.srv.test",))
    install(pki, certs, "xa.test.pem", cn="xa.test", xmpp=("xa.test",))
    install(pki, certs, "wrong.test.pem", "somewhere.else")
    store = CertificateStore(["dns.test", "srv.test", "xa.test", "wrong.test"], str(data),
                             str(certs))
    messages = store.load()
    status = {i.host: i.status for i in store.describe()}
    assert status == {"dns.test": "ok", "srv.test": "ok", "xa.test": "ok",
                      "wrong.test": "mismatch"}
    assert any("wrong.test" in m and "not valid for wrong.test" in m
               and "DNS:somewhere.else" in m for m in messages)
    sans = {i.host: i.sans for i in store.describe()}
    assert sans["srv.test"] == ("SRV:_xmpp-client.srv.test",)
    assert sans["xa.test"] == ("xmppAddr:xa.test",)


def test_incomplete_chain_and_world_readable_key_are_noted(pki, dirs):
    data, certs, _ = dirs
    cert, key = pki.issue("lone.test")
    write_pem(certs / "lone.test.pem", [cert], key, mode=0o644)
    store = CertificateStore(["lone.test"], str(data), str(certs))
    messages = store.load()
    assert any("no intermediate" in m for m in messages)
    assert any("readable by every user (mode 0644)" in m for m in messages)


def test_encrypted_key_is_refused_clearly(pki, dirs):
    data, certs, _ = dirs
    cert, key = pki.issue("enc.test")
    write_pem(certs / "enc.test.crt", pki.chain(cert))
    (certs / "enc.test.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    store = CertificateStore(["enc.test"], str(data), str(certs))
    messages = store.load()
    assert any(str(certs / "enc.test.key") in m and "encrypted with a passphrase" in m
               for m in messages)


@contextmanager
def unprivileged():
    """Run as 'nobody' if we are root (root reads any file); else do nothing."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_unreadable_private_key_reported_in_one_line(pki):
    base = Path(tempfile.mkdtemp(prefix="xmppd-certs-"))
    try:
        os.chmod(base, 0o755)
        data, certs = base / "data", base / "certs"
        data.mkdir(mode=0o777)
        certs.mkdir()
        os.chmod(data, 0o777)
        cert, key = pki.issue("k.test")
        for where in (base, certs):
            write_pem(where / "k.test.crt", pki.chain(cert), mode=0o644)
            write_key(where / "k.test.key", key, mode=0o600 if os.geteuid() == 0 else 0)
        user = "nobody" if os.geteuid() == 0 else None
        explicit = CertificateStore(["k.test"], str(data), explicit={
            "k.test": (str(base / "k.test.crt"), str(base / "k.test.key"))})
        with unprivileged(), pytest.raises(CertificateError) as e:
            explicit.load()
        text = str(e.value)
        assert text.startswith(f"{base / 'k.test.key'}: private key is not readable by user")
        if user:
            assert f"not readable by user {user}: owner root:root, mode 0600 (-rw-------)" in text
        assert "\n" not in text and "Traceback" not in text
        # the same file found in certs_dir: a warning, and the host still gets TLS
        discovered = CertificateStore(["k.test"], str(data), str(certs))
        with unprivileged():
            messages = discovered.load()
        assert any(str(certs / "k.test.key") in m and "not readable by user" in m
                   for m in messages)
        assert discovered.describe()[0].origin == "generated"
    finally:
        shutil.rmtree(base)


# ---------------------------------------------------------------------------
# TLS policy


def test_context_options_and_policy(pki, dirs):
    data, certs, _ = dirs
    install(pki, certs, "t.test.pem", "t.test")
    store = CertificateStore(["t.test"], str(data), str(certs))
    store.load()
    options = store.context_for("t.test").set_options(0)  # returns the current options
    assert options & SSL.OP_NO_COMPRESSION and options & SSL.OP_NO_RENEGOTIATION
    conn = store.starttls_options("t.test").serverConnectionForTLS(None)
    assert memory_handshake(conn).get_protocol_version_name() == "TLSv1.3"
    conn = store.starttls_options("t.test").serverConnectionForTLS(None)
    tls12 = memory_handshake(conn, max_version=SSL.TLS1_2_VERSION)
    assert tls12.get_protocol_version_name() == "TLSv1.2"
    assert tls12.get_cipher_name().startswith("ECDHE-ECDSA-")
    # TLS 1.1 and older are refused by default
    with pytest.raises(SSL.Error):
        conn = store.starttls_options("t.test").serverConnectionForTLS(None)
        memory_handshake(conn, max_version=SSL.TLS1_1_VERSION)

    strict = CertificateStore(["t.test"], str(data), str(certs),
                              policy=TLSPolicy(min_version="TLSv1.3"))
    strict.load()
    with pytest.raises(SSL.Error):
        memory_handshake(strict.starttls_options("t.test").serverConnectionForTLS(None),
                         max_version=SSL.TLS1_2_VERSION)
    ciphers = CertificateStore(["t.test"], str(data), str(certs),
                               policy=TLSPolicy(ciphers="ECDHE-ECDSA-CHACHA20-POLY1305"))
    ciphers.load()
    client = memory_handshake(ciphers.starttls_options("t.test").serverConnectionForTLS(None),
                              max_version=SSL.TLS1_2_VERSION)
    assert client.get_cipher_name() == "ECDHE-ECDSA-CHACHA20-POLY1305"


def test_bad_policy_values():
    with pytest.raises(ValueError, match="min_version"):
        TLSPolicy(min_version="TLSv1.0")
    store = CertificateStore(["p.test"], "/nonexistent", policy=TLSPolicy(ciphers="NOTACIPHER"))
    with pytest.raises(CertificateError, match=r"\[tls\] ciphers: OpenSSL accepts no cipher"):
        store.load()
    with pytest.raises(ValueError):
        CertificateStore([], "/tmp")
    with pytest.raises(ValueError):
        CertificateStore(["a.test"], "/tmp", default_host="b.test")


# ---------------------------------------------------------------------------
# polling


def test_polling_reloads_on_change(pki, dirs):
    data, certs, le = dirs
    install(pki, certs, "poll.test.pem", "poll.test", serial=0x101)
    certbot_deploy(pki, le, "le.test", 1, "le.test", serial=0x201)
    store = CertificateStore(["poll.test", "le.test", "late.test"], str(data), str(certs),
                             str(le))
    store.load()
    reloads = []
    real_reload = store.reload
    store.reload = lambda: reloads.append(1) or real_reload()  # type: ignore[method-assign]
    clock = Clock()
    store.start_polling(interval=30, clock=clock)
    clock.advance(30)
    assert reloads == []  # nothing changed, nothing re-read
    install(pki, certs, "poll.test.pem", "poll.test", serial=0x102)
    clock.advance(29)
    assert served_serial(store, "poll.test") == 0x101
    clock.advance(1)
    assert served_serial(store, "poll.test") == 0x102 and len(reloads) == 1
    # a half-written file is refused, the next tick after it is complete takes it
    cert, key = pki.issue("poll.test", serial=0x103)
    (certs / "poll.test.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    clock.advance(30)
    assert served_serial(store, "poll.test") == 0x102
    assert store.describe()[0].status == "stale"
    write_pem(certs / "poll.test.pem", pki.chain(cert), key)
    clock.advance(30)
    assert served_serial(store, "poll.test") == 0x103
    # certbot renewal (symlinks repointed) and a new file for a self-signed host
    certbot_deploy(pki, le, "le.test", 2, "le.test", serial=0x202)
    install(pki, certs, "late.test.pem", "late.test", serial=0x301)
    clock.advance(30)
    assert served_serial(store, "le.test") == 0x202
    assert served_serial(store, "late.test") == 0x301
    store.stop_polling()
    install(pki, certs, "poll.test.pem", "poll.test", serial=0x104)
    clock.advance(300)
    assert served_serial(store, "poll.test") == 0x103


# ---------------------------------------------------------------------------
# xmppctl output


def test_format_cert_table_each_status(pki, dirs):
    data, certs, _ = dirs
    install(pki, certs, "ok.test.pem", "ok.test", serial=0x1)
    install(pki, certs, "soon.test.pem", "soon.test", serial=0x2,
            not_after=NOW + timedelta(days=3, hours=1))
    install(pki, certs, "wrong.test.pem", "elsewhere.test", serial=0x3)
    install(pki, certs, "stale.test.pem", "stale.test", serial=0x4)
    hosts = ["ok.test", "soon.test", "self.test", "wrong.test", "stale.test"]
    store = CertificateStore(hosts, str(data), str(certs))
    store.load()
    (certs / "stale.test.pem").write_text("garbage")
    store.reload()
    table = format_cert_table(store.describe(), now=NOW)
    lines = table.splitlines()
    assert lines[0].split() == ["HOST", "STATUS", "EXPIRES", "(UTC)", "SERIAL", "ISSUER", "SOURCE"]
    rows = {line.split()[0]: line for line in lines[1:] if not line.startswith(" ")}
    expected = {"ok.test": "ok", "soon.test": "expiring", "self.test": "self-signed",
                "wrong.test": "mismatch", "stale.test": "stale"}
    for host, status in expected.items():
        assert rows[host].split()[1] == status, table
    assert "(in 3 days)" in rows["soon.test"]
    assert rows["soon.test"].split()[7] == "2"  # serial, hex
    assert f"certs_dir: {certs / 'ok.test.pem'}" in rows["ok.test"]
    assert "CN=xmppd test intermediate" in rows["ok.test"]
    assert f"generated: {data / 'certs' / 'self.test.pem'}" in rows["self.test"]
    assert "names: DNS:elsewhere.test" in table
    assert "! " + f"{certs / 'wrong.test.pem'}: certificate is not valid for wrong.test" in table
    assert f"! refused {certs / 'stale.test.pem'}: is not a PEM file" in table
    # once past the end date every row says expired
    later = NOW + timedelta(days=400)
    expired = format_cert_table(store.describe(now=later), now=later)
    for line in expired.splitlines()[1:]:
        if not line.startswith(" "):
            assert line.split()[1] == "expired" and "days ago" in line


def test_check_certificates(pki, dirs, tmp_path):
    data, certs, _ = dirs
    install(pki, certs, "good.test.pem", "good.test")
    install(pki, certs, "soon.test.pem", "soon.test", not_after=NOW + timedelta(days=2))
    install(pki, certs, "wrong.test.pem", "other.test")
    cert, _ = pki.issue("bad.test")
    write_pem(certs / "bad.test.pem", pki.chain(cert), ec.generate_private_key(ec.SECP256R1()))
    hosts = ["good.test", "soon.test", "wrong.test", "bad.test", "new.test"]
    store = CertificateStore(hosts, str(data), str(certs))
    problems = check_certificates(store)
    assert all(p.startswith(("error: ", "warning: ")) and "\n" not in p for p in problems)
    assert not [p for p in problems if "good.test" in p]
    assert any(p.startswith("warning: soon.test:") and "expires" in p for p in problems)
    assert any(p.startswith("error: wrong.test:") and "not valid for" in p for p in problems)
    assert any(p.startswith("error: bad.test:") and "does not match" in p for p in problems)
    assert any(p.startswith("warning: new.test: no certificate") for p in problems)
    assert has_errors(problems)
    assert not (data / "certs").exists()  # check never writes
    only_good = CertificateStore(["good.test"], str(data), str(certs))
    assert check_certificates(only_good) == [] and not has_errors([])
    bad_policy = CertificateStore(["good.test"], str(data), str(certs),
                                  policy=TLSPolicy(ciphers="NOPE"))
    assert has_errors(check_certificates(bad_policy))
    ghost = CertificateStore(["good.test"], str(data), str(certs), str(tmp_path / "nope"),
                             explicit={"ghost.test": (str(tmp_path / "g.pem"), None)})
    assert check_certificates(ghost) == [
        f"warning: [tls] letsencrypt_dir {tmp_path / 'nope'} is not a readable directory",
        'warning: [hosts."ghost.test".tls] names a host that is not in [server] hosts; ignored']


def test_international_host_names(dirs):
    data, _, _ = dirs
    store = CertificateStore(["bücher.test"], str(data))
    store.load()
    assert (data / "certs" / "xn--bcher-kva.test.pem").exists()
    assert store.context_for("XN--BCHER-KVA.test.") is store.context_for("bücher.test")
    assert store.describe()[0].sans == ("DNS:xn--bcher-kva.test",)
    assert store.describe()[0].status == "self-signed"

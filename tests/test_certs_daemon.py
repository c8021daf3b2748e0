"""Certificates through the running daemon: per-vhost STARTTLS, SNI on direct
TLS, Let's Encrypt layout, reload by SIGHUP and `xmppctl reload` while a
logged-in session keeps chatting, and `xmppctl certs`."""
from __future__ import annotations

import re
import signal
import socket
import struct
import time

import pytest
from OpenSSL import SSL

from tests.daemon import Daemon
from tests.rawclient import RawClient
from tests.test_certs import PKI, certbot_deploy, install
from tests.tlsclient import TLSClient


@pytest.fixture(scope="module")
def pki():
    return PKI()


@pytest.fixture(scope="module")
def cd(tmp_path_factory, pki):
    tmp = tmp_path_factory.mktemp("certs-daemon")
    certs, le = tmp / "certs", tmp / "le"
    certs.mkdir()
    (le / "live").mkdir(parents=True)
    install(pki, certs, "a.test.pem", "a.test", serial=1001)
    install(pki, certs, "b.test.pem", "b.test", serial=2001)
    install(pki, certs, "*.wild.test.pem", "*.wild.test", serial=3001)
    certbot_deploy(pki, le, "le.test", 1, "le.test", serial=4001)
    d = Daemon(tmp, hosts=("a.test", "b.test", "chat.wild.test", "le.test"), direct_tls=True, extra=f"""
        [tls]
        certs_dir = "{certs}"
        letsencrypt_dir = "{le / 'live'}"
        poll_interval = 0
    """).start()
    d.certs_dir, d.le = certs, le
    for h in ("a.test", "b.test"):
        d.adduser(f"u@{h}", "u-secret")
    yield d
    d.stop()


def starttls_serial(d, host):
    c = TLSClient(d.port, host=host)
    c.open_stream()
    c.starttls(sni="ignored.example")  # the stream header decides, not SNI
    serial = c.conn.get_peer_certificate().get_serial_number()
    c.close()
    return serial


def direct_serial(d, sni):
    sock = socket.create_connection(("127.0.0.1", d.tls_port), timeout=10)
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 10, 0))
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_alpn_protos([b"xmpp-client"])
    conn = SSL.Connection(ctx, sock)
    if sni:
        conn.set_tlsext_host_name(sni.encode())
    conn.set_connect_state()
    conn.do_handshake()
    serial = conn.get_peer_certificate().get_serial_number()
    alpn = conn.get_alpn_proto_negotiated()
    conn.close()
    return serial, alpn


def test_starttls_serves_the_stream_hosts_certificate(cd):
    assert starttls_serial(cd, "a.test") == 1001
    assert starttls_serial(cd, "b.test") == 2001
    assert starttls_serial(cd, "chat.wild.test") == 3001
    assert starttls_serial(cd, "le.test") == 4001


def test_direct_tls_uses_sni_and_alpn(cd):
    assert direct_serial(cd, "a.test") == (1001, b"xmpp-client")
    assert direct_serial(cd, "b.test")[0] == 2001
    assert direct_serial(cd, "chat.wild.test")[0] == 3001
    # no SNI: the default (first) host
    assert direct_serial(cd, None)[0] == 1001


def test_ctl_certs_lists_every_host(cd):
    out = cd.ctl("certs").stdout
    for host in ("a.test", "b.test", "chat.wild.test", "le.test"):
        assert host in out
    assert "letsencrypt" in out or "fullchain.pem" in out


def test_reload_by_sighup_and_ctl_while_session_chats(cd, pki):
    a = RawClient(cd.port, host="a.test")
    a.login("u", "u-secret", "stay")
    b = RawClient(cd.port, host="b.test")
    b.login("u", "u-secret", "stay")
    for c in (a, b):
        c.send("<presence/>")
    install(pki, cd.certs_dir, "a.test.pem", "a.test", serial=1002)
    cd.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while starttls_serial(cd, "a.test") != 1002:
        assert time.monotonic() < deadline, "SIGHUP did not reload"
        time.sleep(0.2)
    # the session that existed before the reload keeps chatting
    a.send("<message to='u@b.test/stay' type='chat'><body>after reload</body></message>")
    assert b"after reload" in b.read_until(b"after reload.*?</message>")
    # xmppctl reload does the same
    install(pki, cd.certs_dir, "b.test.pem", "b.test", serial=2002)
    assert f"(pid {cd.proc.pid}) reloaded" in cd.ctl("reload").stdout
    deadline = time.monotonic() + 10
    while direct_serial(cd, "b.test")[0] != 2002:
        assert time.monotonic() < deadline, "xmppctl reload did not reload"
        time.sleep(0.2)
    for c in (a, b):
        c.close()


def test_broken_file_is_refused_and_old_certificate_stays(cd, pki):
    before = starttls_serial(cd, "b.test")
    other_cert, _ = pki.issue("b.test", serial=2999)
    _, wrong_key = pki.issue("b.test")
    from tests.test_certs import write_pem

    write_pem(cd.certs_dir / "b.test.pem", pki.chain(other_cert), wrong_key)  # key mismatch
    cd.proc.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    assert starttls_serial(cd, "b.test") == before
    assert "b.test.pem" in cd.logtext() and "refus" in cd.logtext().lower()
    # xmppctl certs asks the running server: the old certificate, stale, and why
    out = cd.ctl("certs").stdout
    assert "private key does not match the certificate" in out
    assert re.search(r"^b\.test\s+stale\s", out, re.M), out
    assert "b.test.pem" in cd.ctl("check", check=False).stdout
    # and the operator tool wrote nothing into the server's data dir
    assert not (cd.data_dir / "certs" / "b.test.pem").exists()

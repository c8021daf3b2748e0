"""Federation failure paths, and direct TLS.

* a peer authenticated for one domain that sends a stanza from another is
  cut off with ``invalid-from`` (and the stanza goes nowhere);
* a peer that accepts the connection and goes away while stanzas wait for
  it: each waiting message and IQ bounces exactly once
  (``remote-server-not-found``), presence never;
* a domain that does not resolve (the resolver points at a closed port)
  bounces with ``remote-server-not-found`` within the DNS timeout;
* ``tls:`` routes and ``[s2s] listen_tls``: federation over direct TLS
  (XEP-0368);
* limits on incoming streams: connections per remote domain, the
  pre-authentication stanza size, the authentication timeout.
"""
from __future__ import annotations

import re
import socket
import time

import pytest

from tests.federation import Federation, S2SPeer, SilentPeer, wait_for_log


def _udp_port_nobody_answers() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def silent():
    return SilentPeer(hold=2.0)


@pytest.fixture(scope="module")
def fed(tmp_path_factory, silent):
    tmp = tmp_path_factory.mktemp("s2s-failures")
    f = Federation(tmp, a_routes={"c.test": f"tcp:127.0.0.1:{silent.port}"},
                   a_s2s=f'nameservers = ["127.0.0.1:{_udp_port_nobody_answers()}"]\n'
                         "dns_timeout = 1\nauth_timeout = 3\nmax_connections_per_domain = 2\n")
    f.tmp = tmp
    yield f
    f.stop()


def test_forged_from_is_refused_with_invalid_from(fed):
    cert, key = fed.ca.issue_server("b.test", fed.tmp / "peer", name="peer-b")
    peer = S2SPeer(fed.a.s2s_port, "b.test", "a.test", cert, key)
    alice = fed.login(fed.a, "alice")
    try:
        peer.authenticate()
        peer.send("<message from='bob@b.test/x' to='alice@a.test/raw' id='honest'><body>ok</body></message>")
        got = alice.read_until(r"<message[^>]*id='honest'.*?</message>").decode()
        assert "from='bob@b.test/x'" in got
        peer.send("<message from='mallory@c.test/x' to='alice@a.test/raw' id='forged'><body>pay</body></message>")
        error = peer.read_until("</stream:stream>")
        assert "<invalid-from" in error
        alice.send("<iq type='get' id='ping1'><ping xmlns='urn:xmpp:ping'/></iq>")
        rest = alice.read_until(r"<iq[^>]*id='ping1'[^>]*/?>").decode()
        assert "forged" not in rest
        wait_for_log(fed.a, r"forged 'from' c\.test")
    finally:
        peer.close()
        alice.close()


def test_peer_going_away_mid_queue_bounces_each_stanza_once(fed, silent):
    alice = fed.login(fed.a, "alice", "q")
    try:
        for i in range(3):
            alice.send(f"<message to='x@c.test' type='chat' id='q{i}'><body>{i}</body></message>")
        alice.send("<iq to='c.test' type='get' id='qiq'><ping xmlns='urn:xmpp:ping'/></iq>")
        alice.send("<presence to='x@c.test' id='qp'/>")
        seen = []
        for _ in range(4):
            got = alice.read_until(r"<(message|iq)[^>]*type='error'.*?</(message|iq)>", 15).decode()
            assert "remote-server-not-found" in got
            seen.append(re.search(r"id='(\w+)'", got).group(1))
        assert sorted(seen) == ["q0", "q1", "q2", "qiq"]
        assert b"to='c.test'" in silent.received  # it did connect, and then was left
        # Exactly once: nothing more comes (a ping round trip proves the stream is read).
        reply = alice.iq("<iq type='get' id='after'><ping xmlns='urn:xmpp:ping'/></iq>", "after")
        assert "type='result'" in reply
        assert "id='q" not in alice.read_all(timeout=1.0).decode()
    finally:
        alice.close()


def test_unresolvable_domain_bounces_within_the_dns_timeout(fed):
    alice = fed.login(fed.a, "alice", "dns")
    try:
        start = time.monotonic()
        alice.send("<message to='someone@nowhere.invalid' type='chat' id='nx'><body>?</body></message>")
        got = alice.read_until(r"<message[^>]*id='nx'.*?</message>", 15).decode()
        elapsed = time.monotonic() - start
        assert "type='error'" in got and "<remote-server-not-found" in got
        # SRV (both services at once), then A/AAAA, each bounded by dns_timeout = 1.
        assert elapsed < 8, elapsed
    finally:
        alice.close()


def test_direct_tls_federation(tmp_path):
    fed = Federation(tmp_path, direct_tls=True)
    try:
        alice = fed.login(fed.a, "alice")
        bob = fed.login(fed.b, "bob")
        try:
            alice.send("<message to='bob@b.test/raw' type='chat' id='dt1'><body>direct</body></message>")
            got = bob.read_until(r"<message[^>]*id='dt1'.*?</message>", 15).decode()
            assert "type='error'" not in got and "direct" in got
            bob.send("<message to='alice@a.test/raw' type='chat' id='dt2'><body>back</body></message>")
            got = alice.read_until(r"<message[^>]*id='dt2'.*?</message>", 15).decode()
            assert "type='error'" not in got and "back" in got
        finally:
            alice.close()
            bob.close()
        wait_for_log(fed.a, r"s2s out a\.test -> b\.test: authenticated with EXTERNAL \(TLSv1\.3")
        assert f"tls:127.0.0.1:{fed.b.s2s_tls_port}" in fed.a.config_path.read_text()
    finally:
        fed.stop()


def _raw_s2s(port: int, domain: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(("<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
               "xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
               f"from='{domain}' to='a.test' version='1.0'>").encode())
    return s


def _read_until_closed(s: socket.socket, timeout: float = 10.0) -> bytes:
    s.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk
    except (socket.timeout, ConnectionResetError):
        return data


def test_incoming_stream_limits(fed):
    # max_connections_per_domain = 2: the third stream from one domain is refused.
    first = _raw_s2s(fed.a.s2s_port, "d.test")
    start = time.monotonic()
    second = _raw_s2s(fed.a.s2s_port, "d.test")
    third = _raw_s2s(fed.a.s2s_port, "d.test")
    try:
        refused = _read_until_closed(third).decode()
        assert "<policy-violation" in refused and "too many connections" in refused
        # Before authentication a stanza may have 16 KiB, whatever max_stanza_size says.
        first.sendall(b"<message to='alice@a.test' from='x@d.test'><body>" + b"x" * 20000)
        assert "<policy-violation" in _read_until_closed(first).decode()
        # Not authenticated within auth_timeout (3 s): connection-timeout.
        out = _read_until_closed(second, 15).decode()
        assert "<connection-timeout" in out, out
        assert 2.5 < time.monotonic() - start < 10
    finally:
        for s in (first, second, third):
            s.close()
    # The closed streams no longer count.
    fourth = _raw_s2s(fed.a.s2s_port, "d.test")
    try:
        fourth.settimeout(5)
        data = b""
        while b"</stream:features>" not in data:
            chunk = fourth.recv(65536)
            assert chunk, data
            data += chunk
        assert b"starttls" in data
    finally:
        fourth.close()

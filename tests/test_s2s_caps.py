"""Caps on s2s connections being set up (issue 12): outgoing domains connecting, incoming unauthenticated.

* ``[s2s] max_connecting_domains``: with 1, a second remote domain is not
  even connected to while the first is still negotiating; it waits its turn
  and is connected to as soon as the first gives up (its stanzas bounce once
  each, as for any failed link);
* ``[s2s] max_unauthenticated_inbound``: with 2, a third incoming connection
  that has not authenticated is dropped at once, before TLS; one that has
  authenticated no longer counts, and a closed one frees its place.

Against the daemon over real TCP (the idle peers are plain sockets: nothing
gets as far as TLS).
"""
from __future__ import annotations

import socket
import time

from tests.federation import PASSWORD, Federation, S2SPeer, SilentPeer, wait_for_log


def _start(tmp, s2s: str, routes: dict | None = None) -> Federation:
    fed = Federation(tmp, a_s2s=s2s, a_routes=routes, start=False)
    fed.a.start()
    fed.a.adduser("alice@a.test", PASSWORD)
    return fed


def test_a_second_domain_waits_until_the_first_is_done_connecting(tmp_path):
    first, second = SilentPeer(hold=2.0), SilentPeer(hold=0.5)
    fed = _start(tmp_path, "max_connecting_domains = 1\nretry_delay = 0\n",
                 {"c.test": f"tcp:127.0.0.1:{first.port}", "d.test": f"tcp:127.0.0.1:{second.port}"})
    alice = fed.login(fed.a, "alice")
    try:
        alice.send("<message to='x@c.test' type='chat' id='c1'><body>1</body></message>")
        time.sleep(0.3)  # c.test is being connected to
        alice.send("<message to='x@d.test' type='chat' id='d1'><body>2</body></message>")
        wait_for_log(fed.a, r"max_connecting_domains")
        got = alice.read_until(r"<message[^>]*id='c1'[^>]*type='error'.*?</message>", 10).decode()
        assert "remote-server-not-found" in got
        assert first.accepted_at is not None and first.closed_at is not None
        got = alice.read_until(r"<message[^>]*id='d1'[^>]*type='error'.*?</message>", 10).decode()
        assert "remote-server-not-found" in got
        # d.test was connected to only once c.test's peer had gone away
        assert second.accepted_at is not None and second.accepted_at >= first.closed_at - 0.05
        assert b"to='d.test'" in second.received
        # Each bounced once.
        assert "type='result'" in alice.iq("<iq type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>", "p")
        assert b"id='c1'" not in alice.buffer and b"id='d1'" not in alice.buffer
    finally:
        alice.close()
        fed.stop()


def _idle(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(0.5)
    return s


def _dropped(s: socket.socket) -> bool:
    """True if the server closed ``s`` (it sends nothing before our header)."""
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_unauthenticated_incoming_connections_are_capped(tmp_path):
    fed = _start(tmp_path, "max_unauthenticated_inbound = 2\n")
    port = fed.a.s2s_port
    cert, key = fed.ca.issue_server("b.test", tmp_path / "peer", name="peer-b")
    held = [_idle(port)]
    peer = S2SPeer(port, "b.test", "a.test", cert, key)
    try:
        peer.authenticate()  # counted until authenticated, then not
        held.append(_idle(port))
        extra = _idle(port)
        assert _dropped(extra)
        wait_for_log(fed.a, r"max_unauthenticated_inbound")
        assert not any(_dropped(s) for s in held)
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:  # the server notices the close, then admits a new one
            again = _idle(port)
            if not _dropped(again):
                break
            assert time.monotonic() < deadline
        held.append(again)
        # the authenticated peer's stream works throughout
        alice = fed.login(fed.a, "alice")
        try:
            alice.read_until("<presence[^>]*/>|</presence>")
            peer.send("<message from='bob@b.test/x' to='alice@a.test' type='chat' id='m1'>"
                      "<body>hi</body></message>")
            assert b"<body>hi</body>" in alice.read_until(r"id='m1'.*?</message>")
        finally:
            alice.close()
    finally:
        for s in held:
            s.close()
        peer.close()
        fed.stop()

"""Issue 17 (items 1, 2, 8a): limits on the XML input path, against the real daemon.

Deep nesting, element counts and a stray second stream header end the
offending stream with a stream error as soon as the parser sees them, before
any tree is built past the limit; the daemon and every other session go on.
Before authentication a connection may cost the server only a small amount
of memory however many elements it sends.  Stored XML from an older version
that is beyond the limits is skipped, never delivered.
"""
from __future__ import annotations

import re
import select
import time

import pytest

from tests.rawclient import RawClient
from xmppd.storage import SQLiteStore

PING = "<iq type='get' id='{id}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"
STREAM_ERROR = rb"</stream:error>"


@pytest.fixture(scope="module")
def users(daemon):
    for name in ("carol", "dave", "erin"):
        daemon.adduser(f"{name}@localhost", f"{name}-secret")
    return daemon


def login(daemon, user: str, resource: str = "raw", presence: bool = True) -> RawClient:
    """STARTTLS + PLAIN + bind (+ initial presence) over real TCP/TLS."""
    c = RawClient(daemon.port)
    c.login(user, f"{user}-secret", resource)
    if presence:
        c.send("<presence/>")
        c.read_until(rb"<presence[^>]*from='%s@localhost/%s'" % (user.encode(), resource.encode()))
    return c


def stream_error(client: RawClient, timeout: float = 10.0) -> str:
    """The condition of the stream error the server sends next."""
    data = client.read_until(STREAM_ERROR, timeout=timeout)
    return re.search(rb"<stream:error><([a-z-]+)", data).group(1).decode()


def ping(client: RawClient, n: int = 1) -> tuple[float, bytes]:
    """A bound client's ping round trip (the daemon is alive and not frozen),
    and everything the client received up to the answer."""
    start = time.monotonic()
    client.send(PING.format(id=f"ping{n}"))
    data = client.read_until(rf"<iq[^>]*id='ping{n}'[^>]*type='result'")
    return time.monotonic() - start, data + client.buffer


def deep_message(to: str, levels: int = 1000) -> str:
    """~3 KB: a message whose body sits under ``levels`` nested elements."""
    return (f"<message to='{to}' type='chat'><body>nested payload</body>" + "<a>" * levels
            + "</a>" * levels + "</message>")


def vm_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1))


def test_deep_nesting_is_a_policy_violation_and_others_go_on(users):
    bob = login(users, "bob", "deep")
    alice = login(users, "alice", "deep")
    alice.send(deep_message("bob@localhost"))
    assert stream_error(alice) == "policy-violation"
    # The recipient got nothing of it, and its session (and the daemon) work.
    rtt, received = ping(bob)
    assert rtt < 5 and b"nested payload" not in received
    bob.send("<message to='bob@localhost/deep' type='chat'><body>still here</body></message>")
    bob.read_until(b"still here")
    assert "nested deeper than 48 levels" in users.logtext()
    assert "RecursionError" not in users.logtext()
    alice.close()
    bob.close()


def test_deep_message_to_offline_user_is_refused_not_lost(users):
    """Before: stored? no -- the offline store crashed on it and nobody heard."""
    alice = login(users, "alice", "offline")
    alice.send(deep_message("carol@localhost"))
    assert stream_error(alice) == "policy-violation"
    alice.close()
    assert "offline delivery failed" not in users.logtext()


def test_second_stream_header_is_a_stream_error_at_once(users):
    # Before authentication (plaintext) ...
    c = RawClient(users.port)
    c.open_stream()
    c.send("<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'"
           " to='localhost' version='1.0'>")
    assert stream_error(c, timeout=5) == "unsupported-stanza-type"
    c.close()
    # ... and in a bound session over TLS, where it would swallow all that follows.
    d = login(users, "dave", "restart")
    d.send("<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'"
           " to='localhost' version='1.0'>" + PING.format(id="swallowed"))
    assert stream_error(d, timeout=5) == "unsupported-stanza-type"
    d.close()


def test_element_count_limit_after_authentication(users):
    bob = login(users, "bob", "count")
    alice = login(users, "alice", "count")
    # 2 + 1400 elements + 2 attributes: under max_stanza_nodes (1500), delivered.
    alice.send("<message to='bob@localhost/count'><body>many</body>" + "<x/>" * 1400 + "</message>")
    got = bob.read_until(rb"</message>")
    assert got.count(b"<x/>") == 1400
    # 1600 empty elements (7 KB, far under max_stanza_size): refused while parsing.
    alice.send("<message to='bob@localhost/count'><body>too many</body>" + "<x/>" * 1600)
    assert stream_error(alice) == "policy-violation"
    rtt, received = ping(bob)
    assert rtt < 5 and b"too many" not in received
    alice.close()
    bob.close()


# Issue 17: 100 such connections grew the daemon from 58 MB to 2.67 GB and
# froze it for ~75 s.
CONNECTIONS = 100
FLOOD = ("<iq type='set' id='reg'><query xmlns='jabber:iq:register'>" + "<a/>" * 65_000).encode()


def _send_until_refused(c: RawClient, data: bytes, step: int = 16384) -> None:
    """Send ``data`` unless the server ends the stream first (then stop sending)."""
    for i in range(0, len(data), step):
        readable, _, _ = select.select([c.sock], [], [], 0)
        if readable:
            return
        try:
            c.sock.sendall(data[i:i + step])
        except OSError:
            return


def test_unauthenticated_connections_cannot_make_the_daemon_hold_memory(users):
    pid = users.proc.pid
    watcher = login(users, "erin", "watch")
    ping(watcher, 0)
    before = vm_rss_kb(pid)
    clients = []
    try:
        for _ in range(CONNECTIONS):
            c = RawClient(users.port, timeout=30)
            c.open_stream()  # plaintext: nothing negotiated yet
            clients.append(c)
        for c in clients:
            _send_until_refused(c, FLOOD)
        rtt, _ = ping(watcher, 1)
        # While the floods are (or would be) held, before any socket closes.
        grown_mb = (vm_rss_kb(pid) - before) / 1024
        conditions = [stream_error(c, timeout=30) for c in clients]
    finally:
        for c in clients:
            c.close()
    assert conditions == ["policy-violation"] * CONNECTIONS
    print(f"daemon grew by {grown_mb:.1f} MB, ping {rtt:.3f} s")
    assert grown_mb < 30, f"daemon grew by {grown_mb:.1f} MB"
    assert rtt < 5, f"ping took {rtt:.1f} s"
    assert "more than 100 elements and attributes" in users.logtext()
    watcher.close()


def test_stored_data_beyond_the_limits_is_skipped(users):
    """Offline messages and vCards written by an older version without limits."""
    store = SQLiteStore(str(users.data_dir))
    try:
        deep = ("<message from='alice@localhost/x' to='carol@localhost' type='chat'>"
                "<body>too deep</body>" + "<a>" * 100 + "</a>" * 100 + "</message>")
        store.put("offline", "carol@localhost", "000000000001", deep)
        store.put("offline", "carol@localhost", "000000000002",
                  "<message from='alice@localhost/x' to='carol@localhost' type='chat'>"
                  "<body>fine</body></message>")
        store.put("vcard", "dave@localhost", "vcard",
                  "<vCard xmlns='vcard-temp'><FN>Too Deep Card</FN>"
                  + "<X>" * 100 + "</X>" * 100 + "</vCard>")
    finally:
        store.close()
    carol = login(users, "carol", "stored", presence=False)
    carol.send("<presence/>")
    carol.send("<iq type='get' id='vc' to='dave@localhost'><vCard xmlns='vcard-temp'/></iq>")
    received = carol.read_until(rb"<iq[^>]*id='vc'.*?</iq>")
    assert b"<body>fine</body>" in received and b"too deep" not in received
    reply = received[received.rindex(b"<iq"):]
    assert b"type='result'" in reply and b"Too Deep Card" not in reply
    log = users.logtext()
    assert "offline message 000000000001 of carol@localhost kept in store, not delivered" in log
    assert "stored vCard of dave@localhost skipped" in log
    carol.close()

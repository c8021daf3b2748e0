"""Issue 18 (live half): several xmppd nodes on one Redis and one store.

Every node is a real daemon (tests/daemon.py) with its own data dir (pid
file, admin socket) and ``[storage] dir`` pointing at one shared SQLite
store, all on one private ``redis-server`` (tests/backends.py).  Clients
are raw TLS streams (tests/rawclient.py).  The nodes are shared by the
module's tests; the tests that kill a node or stop Redis come last.
"""
from __future__ import annotations

import re
import time

import pytest

from tests.backends import redis  # noqa: F401  (fixture)
from tests.daemon import Daemon
from tests.rawclient import RawClient

PW = "pw-secret"
USERS = ["alice", "bob", "carol", "dave", "erin", "frank", "gina", "hank"]
PLUGINS = ["roster", "presence", "disco", "ping", "offline", "urn:xmpp:blocking",
           "urn:xmpp:sid:0", "urn:xmpp:carbons:2"]
CARBONS = "urn:xmpp:carbons:2"
HEARTBEAT, EXPIRY = 0.3, 1.5


def make_node(tmp, name, store, redis_url) -> Daemon:
    return Daemon(tmp / name, plugins=PLUGINS, extra=f"""
        [storage]
        dir = "{store}"

        [cluster]
        redis = "{redis_url}"
        node = "{name}"
        heartbeat = {HEARTBEAT}
        expiry = {EXPIRY}
        """)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory, redis):  # noqa: F811
    tmp = tmp_path_factory.mktemp("cluster")
    store = tmp / "store"
    daemons = [make_node(tmp, n, store, redis.url) for n in ("n1", "n2", "n3")]
    daemons[0].start()
    for u in USERS:
        daemons[0].adduser(f"{u}@localhost", PW)
    for d in daemons[1:]:
        d.start()
    yield daemons
    for d in daemons:
        if d.proc is not None:
            d.stop()


def login(node, user, resource="r", presence=True, carbons=False) -> RawClient:
    c = RawClient(node.port)
    c.login(user, PW, resource)
    if carbons:
        assert "type='result'" in c.iq(
            f"<iq type='set' id='cb'><enable xmlns='{CARBONS}'/></iq>", "cb")
    if presence:
        c.send("<presence/>")
        c.read_until(f"<presence[^>]*from='{user}@localhost/{resource}'")
    return c


def expect(c, pattern, timeout=5.0) -> str:
    return c.read_until(pattern, timeout=timeout).decode()


def nothing(c, pattern, wait=0.5) -> None:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            c.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = c.sock.recv(65536)
        except (TimeoutError, OSError):
            break
        if not chunk:
            break
        c.buffer += chunk
    assert not re.search(pattern.encode(), c.buffer, re.S), c.buffer


def subscribe(a, a_user, b, b_user) -> None:
    """Mutual subscription between two logged-in users (each on its own node)."""
    for x, xu, y, yu in ((a, a_user, b, b_user), (b, b_user, a, a_user)):
        x.send(f"<presence to='{yu}@localhost' type='subscribe'/>")
        expect(y, f"<presence[^>]*type='subscribe'")
        y.send(f"<presence to='{xu}@localhost' type='subscribed'/>")
        expect(x, f"<presence[^>]*from='{yu}@localhost/")


def settle():
    time.sleep(0.2)  # bus events: one pub/sub hop


def test_chat_across_nodes_full_and_bare(nodes):
    a = login(nodes[0], "alice")
    b = login(nodes[1], "bob")
    settle()
    a.send("<message to='bob@localhost' type='chat' id='m1'><body>hi bob</body></message>")
    assert "hi bob" in expect(b, "<message.*?</message>")
    b.send("<message to='alice@localhost/r' type='chat' id='m2'><body>hi alice</body></message>")
    got = expect(a, "<message.*?</message>")
    assert "hi alice" in got and "from='bob@localhost/r'" in got
    # An IQ to a full JID on another node, and its answer back.
    reply = a.iq("<iq type='get' id='p1' to='bob@localhost/r'><ping xmlns='urn:xmpp:ping'/></iq>",
                 "p1", timeout=0.1) if False else None
    a.send("<iq type='get' id='q1' to='bob@localhost/r'><query xmlns='jabber:iq:version'/></iq>")
    assert "id='q1'" in expect(b, "<iq[^>]*id='q1'")
    b.send("<iq type='result' id='q1' to='alice@localhost/r'/>")
    assert "type='result'" in expect(a, "<iq[^>]*id='q1'[^>]*>")
    a.close(), b.close()

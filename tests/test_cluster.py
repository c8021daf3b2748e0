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
USERS = ["alice", "bob", "carol", "dave", "erin", "frank", "gina", "hank", "ivan", "judy",
         "kim", "leo"]
PLUGINS = ["roster", "presence", "disco", "ping", "offline", "urn:xmpp:blocking",
           "urn:xmpp:sid:0", "urn:xmpp:carbons:2", "urn:xmpp:sm:3", "domain-filter"]
CARBONS = "urn:xmpp:carbons:2"
SM = "urn:xmpp:sm:3"
HEARTBEAT, EXPIRY = 0.3, 1.5


def make_node(tmp, name, store, redis_url) -> Daemon:
    return Daemon(tmp / name, hosts=("localhost", "b.test"), plugins=PLUGINS, extra=f"""
        [domain-filter]
        poll_interval = 0.2
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
    daemons[0].adduser("bee@b.test", PW)
    for d in daemons[1:]:
        d.start()
    yield daemons
    for d in daemons:
        if d.proc is not None:
            d.stop()


def login(node, user, resource="r", presence=True, carbons=False, host="localhost") -> RawClient:
    c = RawClient(node.port, host=host)
    c.login(user, PW, resource)
    if carbons:
        assert "type='result'" in c.iq(
            f"<iq type='set' id='cb'><enable xmlns='{CARBONS}'/></iq>", "cb")
    if presence:
        c.send("<presence/>")
        c.read_until(f"<presence[^>]*from='{user}@{host}/{resource}'")
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


def subscribe(a, a_user, b, b_user, host="localhost") -> None:
    """Mutual subscription between two logged-in users (each on its own node)."""
    settle()  # each node has heard of the other's session
    for x, xu, y, yu in ((a, a_user, b, b_user), (b, b_user, a, a_user)):
        x.send(f"<presence to='{yu}@{host}' type='subscribe'/>")
        expect(y, f"<presence[^>]*type='subscribe'")
        y.send(f"<presence to='{xu}@{host}' type='subscribed'/>")
        expect(x, f"<presence[^>]*from='{yu}@{host}/")


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
    a.send("<iq type='get' id='q1' to='bob@localhost/r'><query xmlns='jabber:iq:version'/></iq>")
    assert "id='q1'" in expect(b, "<iq[^>]*id='q1'")
    b.send("<iq type='result' id='q1' to='alice@localhost/r'/>")
    assert "type='result'" in expect(a, "<iq[^>]*id='q1'[^>]*>")
    a.close(), b.close()


def test_domain_filter_holds_across_nodes(nodes):
    """The filter chain runs on the node where a stanza enters, with the
    recipient's policy from the shared store: kim (on n1) takes nothing from
    other domains, so bee@b.test on n2 gets an error both ways; a same-domain
    sender on n2 still reaches kim."""
    nodes[0].ctl("filter", "kim@localhost", "OWN")
    time.sleep(0.6)  # every node's filter poll (0.2 s) has seen the change
    k = login(nodes[0], "kim")
    bee = login(nodes[1], "bee", host="b.test")
    leo = login(nodes[1], "leo")
    settle()
    bee.send("<message to='kim@localhost/r' type='chat' id='f1'><body>from b</body></message>")
    assert "type='error'" in expect(bee, "<message[^>]*id='f1'[^>]*>")
    k.send("<message to='bee@b.test/r' type='chat' id='f2'><body>to b</body></message>")
    assert "type='error'" in expect(k, "<message[^>]*id='f2'[^>]*>")
    leo.send("<message to='kim@localhost/r' type='chat' id='f3'><body>same domain</body></message>")
    assert "same domain" in expect(k, "<message[^>]*id='f3'.*?</message>")
    nothing(k, "from b")
    nothing(bee, "to b")
    k.close(), bee.close(), leo.close()


def test_bare_jid_goes_to_highest_priority_across_nodes(nodes):
    b = login(nodes[0], "bob")
    b1 = RawClient(nodes[1].port)
    b1.login("hank", PW, "low")
    b1.send("<presence><priority>1</priority></presence>")
    b2 = RawClient(nodes[2].port)
    b2.login("hank", PW, "high")
    b2.send("<presence><priority>5</priority></presence>")
    expect(b2, "<presence[^>]*from='hank@localhost/high'")
    settle()
    b.send("<message to='hank@localhost' type='chat' id='h1'><body>to the best</body></message>")
    assert "to the best" in expect(b2, "<message.*?</message>")
    nothing(b1, "to the best")
    for c in (b, b1, b2):
        c.close()


def test_presence_probes_blocking_and_invalidations(nodes):
    carol = login(nodes[0], "carol")
    d1 = login(nodes[1], "dave", "d1")
    subscribe(carol, "carol", d1, "dave")
    # A second resource of dave's on a third node: carol sees it come online,
    # and its probe brings carol's presence from node 1.
    d2 = RawClient(nodes[2].port)
    d2.login("dave", PW, "d2")
    d2.send("<presence/>")
    expect(carol, "<presence[^>]*from='dave@localhost/d2'")
    expect(d2, "<presence[^>]*from='carol@localhost/r'")
    expect(d1, "<presence[^>]*from='dave@localhost/d2'")  # own resources see it too
    for c in (d1, d2):
        assert "<blocklist" in c.iq("<iq type='get' id='bl'><blocklist xmlns='urn:xmpp:blocking'/>"
                                    "</iq>", "bl")
    # Node 1 has dave's (empty) blocklist cached after this one.
    carol.send("<message to='dave@localhost' type='chat' id='c1'><body>before</body></message>")
    expect(d1, "before")
    d2.iq("<iq type='set' id='b1'><block xmlns='urn:xmpp:blocking'><item jid='carol@localhost'/>"
          "</block></iq>", "b1")
    assert "carol@localhost" in expect(d1, "<iq[^>]*type='set'.*?</iq>")  # the push, on node 2
    expect(carol, "<presence(?=[^>]*from='dave@localhost/d[12]')(?=[^>]*type='unavailable')")
    settle()
    carol.send("<message to='dave@localhost' type='chat' id='c2'><body>after</body></message>")
    assert "service-unavailable" in expect(carol, "<message[^>]*type='error'.*?</message>")
    nothing(d1, "after"), nothing(d2, "after", 0.1)
    for c in (carol, d1, d2):
        c.close()


def test_carbons_across_nodes(nodes):
    e1 = login(nodes[0], "erin", "e1", carbons=True)
    e2 = login(nodes[1], "erin", "e2", carbons=True)
    frank = login(nodes[2], "frank")
    settle()
    frank.send("<message to='erin@localhost/e1' type='chat' id='f1'><body>direct</body></message>")
    expect(e1, "direct")
    assert "<received xmlns='urn:xmpp:carbons:2'>" in expect(e2, "<message.*?direct.*?</message>")
    e1.send("<message to='frank@localhost' type='chat' id='e1m'><body>reply</body></message>")
    expect(frank, "reply")
    assert "<sent xmlns='urn:xmpp:carbons:2'>" in expect(e2, "<message.*?reply.*?</message>")
    for c in (e1, e2, frank):
        c.close()


def test_offline_when_no_node_has_a_session(nodes):
    hank = login(nodes[1], "hank", "h")
    hank.send("<message to='gina@localhost' type='chat' id='o1'><body>while away</body></message>")
    settle()
    gina = login(nodes[2], "gina", presence=False)
    gina.send("<presence/>")
    assert "while away" in expect(gina, "<message.*?while away.*?</message>")
    nothing(gina, "while away.*while away")
    hank.close(), gina.close()


def test_same_full_jid_on_second_node_closes_first(nodes):
    first = login(nodes[0], "alice", "dup")
    settle()
    second = login(nodes[1], "alice", "dup")
    assert "<conflict" in first.read_all(timeout=5).decode()
    bob = login(nodes[2], "bob", "b")
    settle()
    bob.send("<message to='alice@localhost/dup' type='chat' id='d1'><body>to the new one</body></message>")
    expect(second, "to the new one")
    second.close(), bob.close()


def test_admin_sessions_and_kick_cluster_wide(nodes):
    c = login(nodes[1], "kim", "admin-test")
    settle()
    listing = nodes[0].ctl("sessions").stdout
    assert "kim@localhost/admin-test" in listing
    nodes[0].ctl("sessions", "kick", "kim@localhost/admin-test")
    assert "policy-violation" in c.read_all(timeout=5).decode()


def test_cluster_changes_on_reload_need_a_restart_and_keep_the_running_link(nodes):
    node = nodes[0]
    original = node.config_path.read_text()
    changed = (original.replace(f"heartbeat = {HEARTBEAT}", "heartbeat = 0.5")
               .replace('node = "n1"', 'node = "renamed"')
               .replace("redis = \"redis://127.0.0.1:", "redis = \"redis://127.0.0.2:"))
    assert changed.count("renamed") == 1 and "127.0.0.2" in changed
    try:
        node.config_path.write_text(changed)
        out = node.ctl("reload").stdout
        assert re.search(r"need a restart \(running values kept\): .*cluster\.heartbeat, "
                         r"cluster\.node, cluster\.redis", out), out
        # The running node, link and name stay: chat across nodes goes on.
        a = login(node, "alice", "reload")
        b = login(nodes[1], "bob", "reload")
        settle()
        a.send("<message to='bob@localhost/reload' type='chat' id='rl'><body>still n1</body></message>")
        expect(b, "still n1")
        assert "alice@localhost/reload" in nodes[1].ctl("sessions").stdout
        assert "renamed" not in nodes[1].ctl("sessions").stdout
        a.close(), b.close()
    finally:
        node.config_path.write_text(original)
        node.ctl("reload")


# -- failures (last: they kill a node and stop Redis) ------------------------------------


def test_xep0198_resumption_on_another_node_is_refused_cleanly(nodes):
    c = RawClient(nodes[0].port)
    c.login("frank", PW, "sm")
    c.send(f"<enable xmlns='{SM}' resume='true'/>")
    previd = re.search(r"id='([^']+)'", c.read_until("<enabled[^>]*/>").decode()).group(1)
    c.send("<presence/>")
    c.read_until("<presence[^>]*from='frank@localhost/sm'")
    c.sock.close()  # gone without </stream:stream>: the session waits for a resumption
    other = RawClient(nodes[1].port)
    other.open_stream(), other.starttls(), other.open_stream()
    assert b"<success" in other.auth_plain("frank", PW)
    other.open_stream()
    other.send(f"<resume xmlns='{SM}' previd='{previd}' h='0'/>")
    failed = other.read_until("</failed>").decode()
    assert "<item-not-found" in failed, failed
    # The stream goes on: a new session on this node, and nothing logged as an error.
    assert other.bind("again") == "frank@localhost/again"
    other.send("<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>")
    other.read_until("<iq[^>]*id='p1'")
    other.close()
    for node in nodes[:2]:
        assert "Traceback" not in node.logtext()


def test_kill9_node_contacts_see_unavailable_once_messages_go_offline(nodes):
    ivan = login(nodes[0], "ivan")
    judy = login(nodes[2], "judy")
    watcher = login(nodes[1], "ivan", "w")  # a second resource, on a survivor too
    subscribe(ivan, "ivan", judy, "judy")
    # A directed presence (no subscription) from judy, and one from a session
    # of hers that never sent broadcast presence: after the kill their
    # targets hear unavailable too, from the survivor that announces her.
    leo = login(nodes[1], "leo", "dir")
    settle()  # judy's node has heard of leo's session
    judy.send("<presence to='leo@localhost/dir'/>")
    expect(leo, "<presence[^>]*from='judy@localhost/r'")
    quiet = RawClient(nodes[2].port)
    quiet.login("judy", PW, "quiet")
    quiet.send("<presence to='leo@localhost'/>")
    expect(leo, "<presence[^>]*from='judy@localhost/quiet'")
    settle()
    killed = time.monotonic()
    nodes[2].kill9()
    # Before the expiry the dead node is still listed: PUBLISH reaches nobody,
    # and the message takes the offline path instead of vanishing.
    ivan.send("<message to='judy@localhost/r' type='chat' id='k0'><body>in the window</body></message>")
    got = expect(ivan, "<presence(?=[^>]*from='judy@localhost/r')(?=[^>]*type='unavailable')",
                 timeout=EXPIRY + HEARTBEAT + 5)
    assert time.monotonic() - killed < EXPIRY + HEARTBEAT + 5, got
    # Both, in either order (the whole buffer is consumed: no third may follow).
    expect(leo, "".join(f"(?=.*?<presence(?=[^>]*from='judy@localhost/{r}')"
                        "(?=[^>]*type='unavailable'))" for r in ("r", "quiet")) + ".*")
    nothing(ivan, "from='judy@localhost/r'[^>]*type='unavailable'", wait=2 * HEARTBEAT + 0.5)
    nothing(leo, "from='judy@localhost/[a-z]+'[^>]*type='unavailable'", wait=0.1)
    ivan.send("<message to='judy@localhost' type='chat' id='k1'><body>after the crash</body></message>")
    ivan.send("<message to='judy@localhost/r' type='chat' id='k2'><body>to the full JID</body></message>")
    nothing(ivan, "type='error'", wait=0.5)
    settle()
    again = login(nodes[1], "judy", "back", presence=False)
    again.send("<presence/>")
    got = expect(again, "to the full JID.*?</message>")
    assert got.count("after the crash") == 1 and got.count("in the window") == 1
    nothing(again, "after the crash|to the full JID|in the window")
    ivan.close(), watcher.close(), again.close(), leo.close()


def test_redis_outage_refuses_logins_keeps_local_routing_and_recovers(nodes, redis):  # noqa: F811
    kim = login(nodes[0], "kim")
    leo = login(nodes[0], "leo")
    redis.stop()
    time.sleep(0.5)
    c = RawClient(nodes[1].port)
    c.open_stream(), c.starttls(), c.open_stream()
    reply = c.auth_plain("gina", PW).decode()
    assert "<temporary-auth-failure/>" in reply and "Redis" in reply
    c.close()
    kim.send("<message to='leo@localhost' type='chat' id='l1'><body>local still</body></message>")
    expect(leo, "local still")
    redis.start()
    deadline = time.monotonic() + 10
    while True:
        c = RawClient(nodes[1].port)
        c.open_stream(), c.starttls(), c.open_stream()
        if b"<success" in c.auth_plain("gina", PW):
            break
        c.close()
        assert time.monotonic() < deadline, "node 2 never came back"
        time.sleep(0.3)
    c.open_stream()
    c.bind("g")
    c.send("<presence/>")
    settle()
    kim.send("<message to='gina@localhost/g' type='chat' id='l2'><body>across again</body></message>")
    expect(c, "across again")
    for node in nodes[:2]:
        assert node.logtext().count("unreachable (") == 1, node.logtext()[-2000:]
    kim.close(), leo.close(), c.close()

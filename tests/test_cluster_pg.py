"""Issue 18: a cluster on PostgreSQL + Redis, with MAM and federation.

Two nodes (``n1``, ``n2``) serve ``a.test`` from one PostgreSQL database
(one ``PostgresServer``, tests/backends.py) and one ``redis-server``;
``b.test`` is a third, stand-alone xmppd reached over s2s
(tests/federation.py).  b.test's route to a.test points at n1 only, so
every inbound s2s stream arrives at n1, which forwards over the bus what is
for a session on n2; each node opens its own outbound link to b.test,
authenticated by dialback (b.test does not trust a.test's certificate), so
n1 verifies the keys n2 hands out: the nodes share the dialback secret
through ``[storage] dir``.  One module fixture; clients are raw TLS streams
(tests/rawclient.py).
"""
from __future__ import annotations

import re

import pytest

from tests.backends import postgres_server, redis  # noqa: F401  (fixture)
from tests.daemon import Daemon
from tests.federation import configure, wait_for_log
from tests.pki import CA
from tests.rawclient import RawClient
from tests.test_cluster import PW, expect, login, settle, subscribe
from tests.test_mam import form, rsm, stanza_ids, wait_archived

PLUGINS = ["roster", "presence", "disco", "ping", "offline", "urn:xmpp:sid:0",
           "urn:xmpp:carbons:2", "urn:xmpp:mam:2"]
SLOT = 1 << 5  # xmppd.msglog_pg.SLOT_BITS


@pytest.fixture(scope="module")
def grid(tmp_path_factory, redis):  # noqa: F811
    tmp = tmp_path_factory.mktemp("clusterpg")
    ca = CA("xmppd cluster test CA")
    ca_file = tmp / "ca.pem"
    ca_file.write_bytes(ca.pem())
    pg = postgres_server()
    dsn = pg.create_database("xmppd_cluster_pg")
    remote = Daemon(tmp / "b", hosts=("b.test",), s2s="", plugins=PLUGINS)
    nodes = [Daemon(tmp / n, hosts=("a.test",), s2s="", plugins=PLUGINS, store="postgresql",
                    pg=pg, pg_dsn=dsn, storage_dir=str(tmp / "shared")) for n in ("n1", "n2")]
    # b.test does not trust a.test's certificate: every outbound stream of
    # n1 and n2 is authenticated by dialback, verified by n1 (b.test's route).
    cert, key = CA("another CA").issue_server("a.test", tmp / "certs")
    for name, node in zip(("n1", "n2"), nodes):
        configure(node, "a.test", cert, key, ca_file,
                  {"b.test": f"tcp:127.0.0.1:{remote.s2s_port}"}, plugins=PLUGINS, extra=f"""
[cluster]
redis = "{redis.url}"
node = "{name}"
heartbeat = 0.3
expiry = 1.5

[mam]
flush_interval = 0.05
""")
    cert, key = ca.issue_server("b.test", tmp / "certs")
    configure(remote, "b.test", cert, key, ca_file,
              {"a.test": f"tcp:127.0.0.1:{nodes[0].s2s_port}"}, plugins=PLUGINS)
    nodes[0].start()
    for u in ("alice", "bob", "carol", "dave"):
        nodes[0].adduser(f"{u}@a.test", PW)
    nodes[1].start()
    remote.start()
    remote.adduser("rob@b.test", PW)
    yield nodes, remote
    for d in (*nodes, remote):
        if d.proc is not None:
            d.stop()


def test_chat_roster_and_archive_across_nodes(grid):
    (n1, n2), _ = grid
    a = login(n1, "alice", host="a.test")
    b = login(n2, "bob", host="a.test")
    subscribe(a, "alice", b, "bob", host="a.test")
    a.send("<message to='bob@a.test' type='chat' id='m1'><body>pg-hello</body></message>")
    got = expect(b, "<message[^>]*id='m1'.*?</message>")
    assert "pg-hello" in got
    b.send("<message to='alice@a.test/r' type='chat' id='m2'><body>pg-reply</body></message>")
    assert "pg-reply" in expect(a, "<message[^>]*id='m2'.*?</message>")
    # The roster, written on both nodes, read on n2 from the shared database.
    roster = b.iq("<iq type='get' id='r1'><query xmlns='jabber:iq:roster'/></iq>", "r1")
    assert re.search(r"<item[^>]*jid='alice@a.test'[^>]*subscription='both'", roster) or \
        re.search(r"<item[^>]*subscription='both'[^>]*jid='alice@a.test'", roster), roster
    # bob's archive: the message n1 archived for him and the reply n2 archived,
    # queried on n2; ids are those delivered, each node's with its own slot.
    page = wait_archived(b, 2, form(with_="alice@a.test"))
    assert page.bodies == ["pg-hello", "pg-reply"]
    assert page.ids[0] == stanza_ids(got, "bob@a.test")[0]
    slots = {int(i.rsplit("-", 1)[1], 16) % SLOT for i in page.ids}
    assert len(slots) == 2
    # ... and alice's, queried on n1, paged backwards.
    page = wait_archived(a, 2, form(with_="bob@a.test"))
    assert page.bodies == ["pg-hello", "pg-reply"]
    a.close(), b.close()


def test_s2s_with_users_on_two_nodes(grid):
    """Inbound s2s arrives at n1 and reaches carol (n1) and dave (n2, over
    the bus); each node answers over its own outbound link."""
    (n1, n2), remote = grid
    c = login(n1, "carol", host="a.test")
    d = login(n2, "dave", host="a.test")
    r = RawClient(remote.port, host="b.test")
    r.login("rob", PW, "r")
    r.send("<presence/>")
    settle()
    for to, ident in (("carol@a.test", "in1"), ("dave@a.test", "in2")):
        r.send(f"<message to='{to}' type='chat' id='{ident}'><body>from rob {ident}</body></message>")
    assert "from rob in1" in expect(c, "<message[^>]*id='in1'.*?</message>", 10)
    got = expect(d, "<message[^>]*id='in2'.*?</message>", 10)
    assert "from rob in2" in got and "from='rob@b.test/r'" in got
    for client, ident in ((c, "out1"), (d, "out2")):
        client.send(f"<message to='rob@b.test/r' type='chat' id='{ident}'>"
                    f"<body>to rob {ident}</body></message>")
    text = expect(r, "<message[^>]*id='out(1|2)'.*?</message>.*?<message[^>]*id='out(1|2)'.*?</message>", 10)
    assert "to rob out1" in text and "to rob out2" in text
    assert "from='dave@a.test/r'" in text
    # Each node's own outbound stream; the inbound one only at n1.
    wait_for_log(n1, r"s2s out a\.test -> b\.test: authenticated")
    wait_for_log(n2, r"s2s out a\.test -> b\.test: authenticated")
    assert "s2s in" not in n2.logtext()
    # dave's archive (on n2) has both directions of his federated chat.
    assert wait_archived(d, 2, form(with_="rob@b.test")).bodies == ["from rob in2", "to rob out2"]
    for x in (c, d, r):
        x.close()


def test_mam_rsm_paging_across_nodes(grid):
    (n1, n2), _ = grid
    a = login(n1, "alice", "p", host="a.test")
    b = login(n2, "bob", "p", host="a.test")
    settle()
    for i in range(6):
        (a if i % 2 == 0 else b).send(
            f"<message to='{'bob' if i % 2 == 0 else 'alice'}@a.test' type='chat' id='k{i}'>"
            f"<body>k{i}</body></message>")
        expect(b if i % 2 == 0 else a, f"<message[^>]*id='k{i}'")
    page = wait_archived(a, 8, form(with_="bob@a.test"))
    assert page.bodies[-6:] == [f"k{i}" for i in range(6)]
    from tests.test_mam import query

    last = query(a, form(with_="bob@a.test"), rsm(max=3, before=""))
    assert last.bodies == ["k3", "k4", "k5"]
    prev = query(a, form(with_="bob@a.test"), rsm(max=3, before=last.first))
    assert prev.bodies == ["k0", "k1", "k2"]
    a.close(), b.close()

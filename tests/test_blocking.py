"""Issue: XEP-0191 blocking command, enforced on every path."""
from __future__ import annotations

import asyncio
import re

import pytest

from tests.daemon import Daemon
from tests.rawclient import RawClient
from tests.xmpp import connect, run

PW = "pw-secret"
USERS = ["alice@localhost", "bob@localhost", "carol@localhost", "dave@localhost",
         "eve@other.test", "frank@other.test", "gina@localhost", "hank@localhost"]

BLOCKED_ERROR = re.compile(
    r"<error type='cancel'><not-acceptable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
    r"<blocked xmlns='urn:xmpp:blocking:errors'/></error>"
)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def bd(request, tmp_path_factory):
    # Also on PostgreSQL (issue 18): the filter loads cold lists asynchronously there.
    d = Daemon(tmp_path_factory.mktemp("blocking"), hosts=("localhost", "other.test"),
               store=request.param).start()
    for u in USERS:
        d.adduser(u, PW)
    yield d
    d.stop()


def raw(d, user, resource="raw", host="localhost"):
    c = RawClient(d.port, host=host)
    c.login(user, PW, resource)
    return c


def iq(c, xml, ident):
    return c.iq(xml, ident)


def block(c, *jids, ident="b"):
    items = "".join(f"<item jid='{j}'/>" for j in jids)
    return iq(c, f"<iq type='set' id='{ident}'><block xmlns='urn:xmpp:blocking'>{items}</block></iq>", ident)


def unblock(c, *jids, ident="u"):
    items = "".join(f"<item jid='{j}'/>" for j in jids)
    return iq(c, f"<iq type='set' id='{ident}'><unblock xmlns='urn:xmpp:blocking'>{items}</unblock></iq>", ident)


def get_list(c, ident="g"):
    return iq(c, f"<iq type='get' id='{ident}'><blocklist xmlns='urn:xmpp:blocking'/></iq>", ident)


def send_message(c, to, body, ident):
    c.send(f"<message to='{to}' id='{ident}' type='chat'><body>{body}</body></message>")


def expect_message(c, body, timeout=3):
    return c.read_until(f"<message[^>]*>(?:(?!</message>).)*{body}.*?</message>", timeout=timeout).decode()


def expect_nothing(c, pattern, wait=0.6):
    data = c.read_all(timeout=wait)
    assert not re.search(pattern.encode(), data), data
    return data


def test_disco_feature_follows_plugin(bd, tmp_path):
    c = raw(bd, "alice")
    reply = iq(c, "<iq type='get' id='d' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", "d")
    assert "<feature var='urn:xmpp:blocking'/>" in reply
    c.close()
    off = Daemon(tmp_path, plugins=["roster", "presence", "disco"]).start()
    try:
        off.adduser("alice@localhost", PW)
        c = raw(off, "alice")
        reply = iq(c, "<iq type='get' id='d' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", "d")
        assert "urn:xmpp:blocking" not in reply
        reply = get_list(c)
        assert "service-unavailable" in reply
        c.close()
    finally:
        off.stop()


def test_empty_list_and_bad_requests(bd):
    c = raw(bd, "gina")
    reply = get_list(c)
    assert re.search(r"<blocklist xmlns='urn:xmpp:blocking'/>|<blocklist xmlns='urn:xmpp:blocking'></blocklist>", reply)
    reply = iq(c, "<iq type='set' id='e'><block xmlns='urn:xmpp:blocking'/></iq>", "e")
    assert "type='error'" in reply and "<bad-request" in reply
    reply = block(c, "bad@@jid", ident="m")
    assert "type='error'" in reply and "<jid-malformed" in reply
    c.close()


@pytest.mark.parametrize("item,blocked_user,blocked_host,other_user", [
    # full JID: only that resource is blocked
    ("bob@localhost/phone", "bob", "localhost", None),
    # bare JID
    ("bob@localhost", "bob", "localhost", None),
    # domain: every user of the other vhost
    ("other.test", "eve", "other.test", "frank"),
    # domain/resource: that resource of anyone at the domain
    ("other.test/phone", "frank", "other.test", None),
])
def test_block_enforced_both_directions(bd, item, blocked_user, blocked_host, other_user):
    a = raw(bd, "alice", "desk")
    x = raw(bd, blocked_user, "phone", host=blocked_host)
    for c in (a, x):
        c.send("<presence/>")
    reply = block(a, item)
    assert "type='result'" in reply
    target = f"{blocked_user}@{blocked_host}/phone"
    # user -> blocked: not routed, exact XEP error payload
    send_message(a, target, "out-blocked", "o1")
    err = expect_message(a, "out-blocked")
    assert "type='error'" in err and BLOCKED_ERROR.search(err), err
    reply = iq(a, f"<iq type='get' id='v1' to='{target}'><query xmlns='jabber:iq:version'/></iq>", "v1")
    assert BLOCKED_ERROR.search(reply), reply
    # blocked -> user: message and IQ answered with service-unavailable, never delivered
    send_message(x, "alice@localhost/desk", "in-blocked", "i1")
    err = expect_message(x, "in-blocked")
    assert "type='error'" in err and "<service-unavailable" in err
    reply = iq(x, "<iq type='get' id='v2' to='alice@localhost/desk'><query xmlns='jabber:iq:version'/></iq>", "v2")
    assert "<service-unavailable" in reply
    x.send("<presence to='alice@localhost/desk'><status>leak</status></presence>")
    expect_nothing(a, "in-blocked|leak|jabber:iq:version")
    if other_user:
        # the domain item covers other users of that domain too
        y = raw(bd, other_user, "tab", host=blocked_host)
        send_message(y, "alice@localhost", "also-blocked", "y1")
        assert "service-unavailable" in expect_message(y, "also-blocked")
        y.close()
    if item == "bob@localhost/phone":
        # other resources of bob are not covered by a full-JID item
        z = raw(bd, "bob", "laptop")
        send_message(z, "alice@localhost/desk", "from-laptop", "z1")
        assert "from-laptop" in expect_message(a, "from-laptop")
        z.close()
    assert "type='result'" in unblock(a, item)
    send_message(x, "alice@localhost/desk", "after-unblock", "i2")
    assert "type='error'" not in expect_message(a, "after-unblock")
    for c in (a, x):
        c.close()


def test_push_only_to_interested_resources(bd):
    async def go():
        a1 = await connect("carol@localhost/one", PW, bd.port, plugins=["xep_0191"])
        a2 = await connect("carol@localhost/two", PW, bd.port, plugins=["xep_0191"])
        a3 = await connect("carol@localhost/three", PW, bd.port, plugins=["xep_0191"])
        pushes = {1: asyncio.Queue(), 2: asyncio.Queue(), 3: asyncio.Queue()}
        for n, c in ((1, a1), (2, a2), (3, a3)):
            c.add_event_handler("blocked", lambda iq, n=n: pushes[n].put_nowait(("block", iq)))
            c.add_event_handler("unblocked", lambda iq, n=n: pushes[n].put_nowait(("unblock", iq)))
        assert await a1.plugin["xep_0191"].get_blocked_jids() == set()
        await a2.plugin["xep_0191"].get_blocked_jids()
        # a3 never asked: it must get no push
        await a1.plugin["xep_0191"].block(["spammer@localhost", "junk.example"])
        kind, push = await asyncio.wait_for(pushes[2].get(), 5)
        assert kind == "block"
        assert set(re.findall(r'jid="([^"]+)"', str(push))) == {"spammer@localhost", "junk.example"}
        kind, _ = await asyncio.wait_for(pushes[1].get(), 5)
        assert kind == "block"
        assert pushes[3].empty()
        assert {str(j) for j in await a2.plugin["xep_0191"].get_blocked_jids()} == {
            "spammer@localhost", "junk.example"}
        # unblock all: empty <unblock/>
        unblock_all = a1.make_iq_set()
        unblock_all.enable("unblock")  # slixmpp's unblock([]) sends no payload
        assert "<unblock xmlns=\"urn:xmpp:blocking\" />" in str(unblock_all)
        await unblock_all.send()
        kind, push = await asyncio.wait_for(pushes[2].get(), 5)
        assert kind == "unblock"
        await asyncio.sleep(0.3)
        assert pushes[3].empty()
        assert await a1.plugin["xep_0191"].get_blocked_jids() == set()
        for c in (a1, a2, a3):
            c.disconnect()

    run(go())


def _subscribe_both(d, a, b):
    """Mutual subscription between two raw clients (already logged in)."""
    ja, jb = a.jid.split("/")[0], b.jid.split("/")[0]
    a.send(f"<presence to='{jb}' type='subscribe'/>")
    b.read_until("type='subscribe'")
    b.send(f"<presence to='{ja}' type='subscribed'/>")
    b.send(f"<presence to='{ja}' type='subscribe'/>")
    a.read_until("type='subscribe'")
    a.send(f"<presence to='{jb}' type='subscribed'/>")
    a.read_all(0.5)
    b.read_all(0.5)


def test_unavailable_on_block_and_presence_on_unblock(bd):
    a = raw(bd, "dave", "main")
    b = raw(bd, "hank", "main")
    a.jid, b.jid = "dave@localhost/main", "hank@localhost/main"
    for c in (a, b):
        c.send("<presence/>")
    _subscribe_both(bd, a, b)
    a.send("<presence><status>here</status></presence>")
    b.read_until("here")
    assert "type='result'" in block(a, "hank@localhost")
    got = b.read_until("<presence[^>]*type='unavailable'[^>]*/?>", timeout=3).decode()
    assert "from='dave@localhost/main'" in got
    # presence changes no longer reach the blocked contact
    a.send("<presence><status>hidden-status</status></presence>")
    expect_nothing(b, "hidden-status")
    assert "type='result'" in unblock(a, "hank@localhost")
    got = b.read_until("<presence[^>]*from='dave@localhost/main'.*?(</presence>|/>)", timeout=3).decode()
    assert "unavailable" not in got
    a.close()
    b.close()


def test_no_bypass_via_offline_storage_probe_or_subscription(bd):
    a = raw(bd, "alice", "bypass")
    a.send("<presence/>")
    assert "type='result'" in block(a, "eve@other.test")
    a.close()
    # alice is offline now: eve's message must not be stored for later
    e = raw(bd, "eve", "e1", host="other.test")
    send_message(e, "alice@localhost", "offline-bypass", "ob")
    assert "service-unavailable" in expect_message(e, "offline-bypass")
    # eve's subscription request must not be stored either
    e.send("<presence to='alice@localhost' type='subscribe'/>")
    e.read_all(0.5)
    e.close()
    a = raw(bd, "alice", "back")
    a.send("<iq type='get' id='r'><query xmlns='jabber:iq:roster'/></iq><presence/>")
    data = a.read_all(1.5)
    assert b"offline-bypass" not in data
    assert b"eve@other.test" not in data
    # and alice cannot reach eve while blocked, even when eve is offline
    send_message(a, "eve@other.test", "to-offline-blocked", "tob")
    assert BLOCKED_ERROR.search(expect_message(a, "to-offline-blocked"))
    assert "type='result'" in unblock(a)
    a.close()


def test_probe_does_not_leak_presence(bd):
    # frank and gina are subscribed both ways; gina blocks frank; frank logs in
    # again and probes: gina's presence must not reach him.
    f = raw(bd, "frank", "p", host="other.test")
    g = raw(bd, "gina", "p")
    f.jid, g.jid = "frank@other.test/p", "gina@localhost/p"
    for c in (f, g):
        c.send("<presence/>")
    _subscribe_both(bd, f, g)
    g.send("<presence><status>gina-online</status></presence>")
    f.read_until("gina-online")
    assert "type='result'" in block(g, "frank@other.test")
    f.close()
    f = raw(bd, "frank", "p2", host="other.test")
    f.send("<presence/>")
    expect_nothing(f, "gina-online|from='gina@localhost", wait=1.0)
    assert "type='result'" in unblock(g, "frank@other.test")
    f.close()
    g.close()


def test_spam_report_stored_and_listed(bd):
    c = raw(bd, "bob", "rep")
    reply = iq(c, "<iq type='set' id='rep'><block xmlns='urn:xmpp:blocking'>"
                  "<item jid='spam@other.test'><report xmlns='urn:xmpp:reporting:1' reason='urn:xmpp:reporting:spam'>"
                  "<text xmlns='urn:xmpp:reporting:1'>buy now</text></report></item></block></iq>", "rep")
    assert "type='result'" in reply
    c.close()
    out = bd.ctl("reports").stdout
    assert "spam@other.test" in out and "bob@localhost" in out and "urn:xmpp:reporting:spam" in out
    assert "buy now" in out
    assert "spam report" in bd.logtext()


def test_list_survives_restart_and_ctl_shows_it(tmp_path):
    d = Daemon(tmp_path).start()
    try:
        d.adduser("ivy@localhost", PW)
        c = raw(d, "ivy")
        block(c, "troll@localhost", "bad.example")
        c.close()
        d.stop()
        d.start()
        c = raw(d, "ivy")
        reply = get_list(c)
        assert "troll@localhost" in reply and "bad.example" in reply
        c.close()
        out = d.ctl("blocklist", "ivy@localhost").stdout.split()
        assert out == ["bad.example", "troll@localhost"]
    finally:
        d.stop()


def test_silent_drop_option(tmp_path):
    d = Daemon(tmp_path, extra="[blocking]\nbounce = false\n").start()
    try:
        for u in ("jo", "kim"):
            d.adduser(f"{u}@localhost", PW)
        j = raw(d, "jo")
        k = raw(d, "kim")
        for c in (j, k):
            c.send("<presence/>")
        block(j, "kim@localhost")
        send_message(k, "jo@localhost", "silently-dropped", "s1")
        expect_nothing(k, "silently-dropped")
        expect_nothing(j, "silently-dropped")
    finally:
        d.stop()

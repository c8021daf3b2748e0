"""Issue 14: XEP-0359 stanza ids and XEP-0280 message carbons, over TLS against the daemon."""
from __future__ import annotations

import asyncio
import re

import pytest

from tests.daemon import Daemon
from tests.rawclient import RawClient
from tests.xmpp import connect, run

PW = "pw-secret"
USERS = ["alice", "bob", "carol", "dave", "erin"]
PLUGINS = ["roster", "presence", "disco", "ping", "offline", "urn:xmpp:blocking",
           "urn:xmpp:sid:0", "urn:xmpp:carbons:2"]
CARBONS = "urn:xmpp:carbons:2"


@pytest.fixture(scope="module")
def cd(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("carbons"), plugins=PLUGINS).start()
    for u in USERS:
        d.adduser(f"{u}@localhost", PW)
    yield d
    d.stop()


def raw(d, user, resource, carbons=True, presence=True):
    c = RawClient(d.port)
    c.login(user, PW, resource)
    if carbons:
        reply = c.iq(f"<iq type='set' id='cb'><enable xmlns='{CARBONS}'/></iq>", "cb")
        assert "type='result'" in reply, reply
    if presence:
        c.send("<presence/>")
        c.read_until("<presence[^>]*/>|</presence>")
    return c


def message(c, to, body, ident, extra="", kind="chat"):
    c.send(f"<message to='{to}' id='{ident}' type='{kind}'><body>{body}</body>{extra}</message>")


def expect(c, pattern, timeout=3):
    return c.read_until(pattern, timeout=timeout).decode()


def expect_nothing(c, pattern, wait=0.6):
    data = c.read_all(timeout=wait)
    assert not re.search(pattern.encode(), data), data
    return data


def test_disco_and_stanza_id(cd):
    a = raw(cd, "alice", "one", carbons=False)
    b = raw(cd, "bob", "one", carbons=False)
    reply = a.iq("<iq type='get' id='d' to='localhost'><query "
                 "xmlns='http://jabber.org/protocol/disco#info'/></iq>", "d")
    assert f"<feature var='{CARBONS}'/>" in reply and "<feature var='urn:xmpp:sid:0'/>" in reply
    # a forged stanza-id claiming the recipient is replaced; one by someone else stays
    message(a, "bob@localhost", "sid1", "m1",
            "<stanza-id xmlns='urn:xmpp:sid:0' by='bob@localhost' id='forged'/>"
            "<stanza-id xmlns='urn:xmpp:sid:0' by='other.example' id='theirs'/>")
    got = expect(b, "</message>")
    assert "forged" not in got and "id='theirs'" in got
    ids = re.findall(r"<stanza-id xmlns='urn:xmpp:sid:0' by='bob@localhost' id='([^']+)'/>", got)
    assert len(ids) == 1
    message(a, "bob@localhost/one", "sid2", "m2")
    got2 = expect(b, "</message>")
    ids2 = re.findall(r"by='bob@localhost' id='([^']+)'", got2)
    assert len(ids2) == 1 and ids2 != ids
    a.close()
    b.close()


def test_sent_and_received_copies_three_resources(cd):
    a1 = raw(cd, "alice", "phone")
    a2 = raw(cd, "alice", "desk")
    a3 = raw(cd, "alice", "tab", carbons=False)  # not enabled: no copies
    b = raw(cd, "bob", "pc")
    for c in (a1, a2, a3):
        c.read_all(timeout=0.3)
    # received: bob -> alice/phone; desk gets a received carbon, tab nothing
    message(b, "alice@localhost/phone", "hello-phone", "r1")
    assert "hello-phone" in expect(a1, "</message>")
    copy = expect(a2, "</message></forwarded></received></message>")
    assert re.search(r"<message from='alice@localhost' to='alice@localhost/desk' type='chat'>"
                     rf"<received xmlns='{CARBONS}'><forwarded xmlns='urn:xmpp:forward:0'>"
                     r"<message xmlns='jabber:client'[^>]*id='r1'", copy), copy
    assert "hello-phone" in copy and "by='alice@localhost'" in copy
    # sent: alice/desk -> bob; phone gets a sent carbon, desk itself none
    message(a2, "bob@localhost", "from-desk", "s1")
    assert "from-desk" in expect(b, "</message>")
    sent = expect(a1, "</message></forwarded></sent></message>")
    assert f"<sent xmlns='{CARBONS}'>" in sent and "from='alice@localhost/desk'" in sent
    assert "from-desk" in sent
    expect_nothing(a3, "hello-phone|from-desk")
    expect_nothing(a2, "from-desk", wait=0.3)
    # two resources after disabling one: a bare-JID message reaches all
    # available resources directly (equal priority), so no carbons at all
    message(b, "alice@localhost", "to-bare", "r2")
    for c in (a1, a2, a3):
        got = expect(c, "</message>")
        assert "to-bare" in got and "<received" not in got
    reply = a2.iq(f"<iq type='set' id='off'><disable xmlns='{CARBONS}'/></iq>", "off")
    assert "type='result'" in reply
    message(b, "alice@localhost/phone", "after-disable", "r3")
    assert "after-disable" in expect(a1, "</message>")
    expect_nothing(a2, "after-disable")
    for c in (a1, a2, a3, b):
        c.close()


def test_private_nocopy_and_ineligible(cd):
    c1 = raw(cd, "carol", "one")
    c2 = raw(cd, "carol", "two")
    d = raw(cd, "dave", "x")
    message(c1, "dave@localhost", "secret", "p1", f"<private xmlns='{CARBONS}'/>")
    message(c1, "dave@localhost", "nocopy", "p2", "<no-copy xmlns='urn:xmpp:hints'/>")
    message(d, "carol@localhost/one", "muc-pm", "p3",
            "<x xmlns='http://jabber.org/protocol/muc#user'/>")
    message(d, "carol@localhost/one", "headline", "p4", kind="headline")
    # chat state only (type chat): eligible
    d.send("<message to='carol@localhost/one' type='chat' id='p5'>"
           "<composing xmlns='http://jabber.org/protocol/chatstates'/></message>")
    got_d = expect(d, "secret.*?</message>")
    assert "<private" not in got_d  # removed before delivery to the recipient
    got = expect(c2, "id='p5'.*?</message>")
    assert "secret" not in got and "nocopy" not in got and "muc-pm" not in got
    assert "headline" not in got
    expect_nothing(c2, "secret|nocopy|muc-pm|headline", wait=0.4)
    # a normal message with a body: eligible, the wrapper keeps its (absent) type
    d.send("<message to='carol@localhost/one' id='p6'><body>plain-normal</body></message>")
    normal = expect(c2, "plain-normal.*?</message></forwarded></received></message>")
    assert re.search(r"<message from='carol@localhost' to='carol@localhost/two'><received", normal)
    for c in (c1, c2, d):
        c.close()


def test_blocked_sender_produces_no_carbon(cd):
    e1 = raw(cd, "erin", "one")
    e2 = raw(cd, "erin", "two")
    b = raw(cd, "bob", "spam", carbons=False)
    reply = e1.iq("<iq type='set' id='bl'><block xmlns='urn:xmpp:blocking'>"
                  "<item jid='bob@localhost'/></block></iq>", "bl")
    assert "type='result'" in reply
    e2.read_all(timeout=0.3)  # the block push
    message(b, "erin@localhost/one", "blocked-in", "b1")
    assert "service-unavailable" in expect(b, "</message>")
    # and erin writing to bob is refused before any sent carbon
    message(e1, "bob@localhost", "blocked-out", "b2")
    assert "<blocked xmlns='urn:xmpp:blocking:errors'/>" in expect(e1, "blocked-out.*?</message>")
    expect_nothing(e2, "blocked-in|blocked-out")
    expect_nothing(e1, "blocked-in", wait=0.2)
    for c in (e1, e2, b):
        c.close()


def test_slixmpp_xep_0280(cd):
    async def go():
        a1 = await connect("dave@localhost/s1", PW, cd.port, plugins=["xep_0280"])
        a2 = await connect("dave@localhost/s2", PW, cd.port, plugins=["xep_0280"])
        b = await connect("carol@localhost/s", PW, cd.port)
        got = []
        a2.add_event_handler("carbon_received", lambda m: got.append(("r", m)))
        a2.add_event_handler("carbon_sent", lambda m: got.append(("s", m)))
        await a1.plugin["xep_0280"].enable()
        await a2.plugin["xep_0280"].enable()
        b.send_message(mto="dave@localhost/s1", mbody="slix-in", mtype="chat")
        a1.send_message(mto="carol@localhost", mbody="slix-out", mtype="chat")
        for _ in range(50):
            if len(got) == 2:
                break
            await asyncio.sleep(0.1)
        kinds = sorted(k for k, _ in got)
        assert kinds == ["r", "s"], got
        bodies = {k: m["carbon_received" if k == "r" else "carbon_sent"]["body"] for k, m in got}
        assert bodies == {"r": "slix-in", "s": "slix-out"}
        for c in (a1, a2, b):
            c.disconnect()

    run(go())

"""Issue 14: XEP-0352 client state indication, over TLS against the daemon."""
from __future__ import annotations

import asyncio
import re

import pytest

from tests.daemon import Daemon
from tests.rawclient import RawClient
from tests.xmpp import connect, run

PW = "pw-secret"
PLUGINS = ["roster", "presence", "disco", "ping", "offline", "urn:xmpp:csi:0"]
CSI = "urn:xmpp:csi:0"
STATE = "http://jabber.org/protocol/chatstates"


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("csi"), plugins=PLUGINS, extra="[csi]\nmax_held = 3\n").start()
    for u in ("alice", "bob", "carol", "dave", "erin"):
        d.adduser(f"{u}@localhost", PW)
    yield d
    d.stop()


def raw(d, user, resource="r"):
    c = RawClient(d.port)
    c.open_stream()
    c.starttls()
    c.open_stream()
    assert b"<success" in c.auth_plain(user, PW)
    features = c.open_stream().decode()
    assert f"<csi xmlns='{CSI}'/>" in features, features
    c.bind(resource)
    c.send("<presence/>")
    c.read_until("<presence[^>]*/>|</presence>")
    return c


def inactive(c):
    """<inactive/>, then a ping round trip: the server has seen it before the test goes on."""
    c.send(f"<inactive xmlns='{CSI}'/>")
    assert "type='result'" in c.iq("<iq type='get' id='in'><ping xmlns='urn:xmpp:ping'/></iq>", "in")


def status(c, to, text):
    c.send(f"<presence to='{to}'><status>{text}</status></presence>")


def order(data: bytes, marks):
    text = data.decode()
    found = [m for m in re.findall(r"\b(mark-\w+)\b", text) if m in marks]
    return found


def test_holds_presence_and_states_flushes_in_order(d):
    b = raw(d, "bob")
    a = raw(d, "alice")
    c = raw(d, "carol")
    inactive(b)
    status(a, "bob@localhost", "mark-a1")
    status(c, "bob@localhost", "mark-c1")
    status(a, "bob@localhost", "mark-a2")  # replaces a1, now after c1
    a.send(f"<message to='bob@localhost/r' type='chat'><composing xmlns='{STATE}'/>"
           "<thread>mark-state1</thread></message>")
    a.send(f"<message to='bob@localhost/r' type='chat'><paused xmlns='{STATE}'/>"
           "<thread>mark-state2</thread></message>")
    # nothing reaches the inactive client, IQs still answered at once
    reply = b.iq("<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>", "p1")
    assert "type='result'" in reply
    assert "mark-" not in reply and b"mark-" not in b.read_all(timeout=0.6)
    # a message with a body: the held ones first, in order, then it
    a.send("<message to='bob@localhost/r' type='chat'><body>mark-body</body></message>")
    got = b.read_until("mark-body.*?</message>")
    assert order(got, {"mark-a1", "mark-a2", "mark-c1", "mark-state1", "mark-state2",
                       "mark-body"}) == ["mark-c1", "mark-a2", "mark-state2", "mark-body"], got
    # held again, then <active/> flushes
    status(c, "bob@localhost", "mark-c2")
    assert b"mark-c2" not in b.read_all(timeout=0.5)
    b.send(f"<active xmlns='{CSI}'/>")
    assert b"mark-c2" in b.read_until("mark-c2.*?</presence>")
    # active again: everything passes at once
    status(a, "bob@localhost", "mark-a3")
    assert b"mark-a3" in b.read_until("mark-a3.*?</presence>")
    for x in (a, b, c):
        x.close()


def test_hold_queue_bounded_and_subscriptions_pass(d):
    e = raw(d, "erin")
    senders = [raw(d, u, "s") for u in ("alice", "bob", "carol", "dave")]
    inactive(e)
    for i, s in enumerate(senders[:3]):
        status(s, "erin@localhost", f"mark-h{i}")
    assert b"mark-h" not in e.read_all(timeout=0.5)
    status(senders[3], "erin@localhost", "mark-h3")  # a fourth contact: max_held = 3 flushes
    got = e.read_until("mark-h2.*?</presence>")
    assert order(got, {"mark-h0", "mark-h1", "mark-h2"}) == ["mark-h0", "mark-h1", "mark-h2"]
    assert b"mark-h3" not in e.read_all(timeout=0.5)
    # a subscription request is not mere state: it is not held
    senders[0].send("<presence to='erin@localhost' type='subscribe'/>")
    e.read_until("type='subscribe'")
    for x in (e, *senders):
        x.close()


def test_slixmpp_xep_0352(d):
    async def go():
        b = await connect("dave@localhost/slix", PW, d.port, plugins=["xep_0352", "xep_0199"])
        a = await connect("alice@localhost/slix", PW, d.port)
        assert b.plugin["xep_0352"].enabled  # it saw the stream feature
        await asyncio.sleep(0.3)
        while not b.presences.empty():  # its own initial presence
            b.presences.get_nowait()
        b.plugin["xep_0352"].send_inactive()
        await b.plugin["xep_0199"].ping(timeout=5)
        a.send_presence(pto="dave@localhost", pstatus="held")
        await asyncio.sleep(0.5)
        assert b.presences.empty()  # held while inactive
        a.send_message(mto="dave@localhost/slix", mbody="now", mtype="chat")
        msg = await b.next_message()
        assert msg["body"] == "now"
        seen = []
        while not b.presences.empty():
            seen.append(b.presences.get_nowait()["status"])
        assert "held" in seen  # flushed before the message
        for c in (a, b):
            c.disconnect()

    run(go())

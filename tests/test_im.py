"""Issue: IM basics (RFC 6121 roster/presence, offline, disco, version, vCard, registration)."""
from __future__ import annotations

import asyncio

import pytest
from slixmpp.exceptions import IqError

from tests.daemon import Daemon
from tests.rawclient import RawClient
from tests.xmpp import connect, run

PW = {"alice": "alice-secret", "bob": "bob-secret", "carol": "carol-secret", "dan": "dan-secret"}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def im(request, tmp_path_factory):
    # The core IM tests run twice: on the embedded store and on PostgreSQL
    # (xmppd.storage_pg, issue 18), the daemon otherwise the same.
    d = Daemon(tmp_path_factory.mktemp("im"), store=request.param, plugins=[
        "roster", "presence", "disco", "ping", "version", "offline", "vcard", "register",
    ], extra="""
        [register]
        max_per_ip = 2
        [version]
        name = "xmppd-test"
        version = "9.9"
    """).start()
    for user, pw in PW.items():
        d.adduser(f"{user}@localhost", pw)
    yield d
    d.stop()


async def login(daemon, user, resource="r", presence=True, **kw):
    c = await connect(f"{user}@localhost/{resource}", PW[user], daemon.port, presence=presence, **kw)
    c.roster.auto_authorize = None  # let the test answer requests
    c.roster.auto_subscribe = False
    return c


async def expect(queue_get, predicate, timeout=5.0):
    """Next item from a client queue satisfying ``predicate``."""
    deadline = asyncio.get_event_loop().time() + timeout
    while True:
        item = await asyncio.wait_for(queue_get(), deadline - asyncio.get_event_loop().time())
        if predicate(item):
            return item


def pushes(client):
    q = asyncio.Queue()
    client.add_event_handler("roster_update", lambda iq: q.put_nowait(iq))
    return q


def test_roster_crud_with_pushes_to_two_resources(im):
    async def go():
        a1 = await login(im, "alice", "one")
        a2 = await login(im, "alice", "two")
        await a1.get_roster()
        await a2.get_roster()
        q1, q2 = pushes(a1), pushes(a2)
        await a1.update_roster("friend@elsewhere.example", name="Friend", groups=["Mates", "Work"])
        for q in (q1, q2):
            push = await asyncio.wait_for(q.get(), 5)
            item = push["roster"]["items"]["friend@elsewhere.example"]
            assert item["name"] == "Friend" and set(item["groups"]) == {"Mates", "Work"}
            assert item["subscription"] == "none"
        # Read back (versioned): the item is there.
        result = await a2.get_roster()
        items = result["roster"]["items"]
        assert items["friend@elsewhere.example"]["name"] == "Friend"
        ver = result["roster"]["ver"]
        assert ver
        for q in (q1, q2):  # slixmpp reports the get result as an update too
            while not q.empty():
                q.get_nowait()
        # Update, then remove; both pushed to both resources.
        await a1.update_roster("friend@elsewhere.example", name="Renamed", groups=[])
        for q in (q1, q2):
            push = await asyncio.wait_for(q.get(), 5)
            assert push["roster"]["items"]["friend@elsewhere.example"]["name"] == "Renamed"
        await a2.del_roster_item("friend@elsewhere.example")
        for q in (q1, q2):
            push = await asyncio.wait_for(q.get(), 5)
            assert push["roster"]["items"]["friend@elsewhere.example"]["subscription"] == "remove"
        result = await a1.get_roster()
        assert "friend@elsewhere.example" not in result["roster"]["items"]
        a1.disconnect()
        a2.disconnect()

    run(go())


def test_roster_validation_and_versioning(im):
    c = RawClient(im.port)
    c.login("carol", PW["carol"])
    c.send("<iq type='set' id='v1'><query xmlns='jabber:iq:roster'><item jid='x@y' name='"
           + "n" * 2000 + "'/></query></iq>")
    assert b"not-acceptable" in c.read_until(b"</iq>")
    c.send("<iq type='set' id='v2'><query xmlns='jabber:iq:roster'><item jid='x@y'/><item jid='z@y'/></query></iq>")
    assert b"bad-request" in c.read_until(b"</iq>")
    c.send("<iq type='set' id='v3'><query xmlns='jabber:iq:roster'><item jid='x@y'><group>g</group><group>g</group></item></query></iq>")
    assert b"bad-request" in c.read_until(b"</iq>")
    c.send("<iq type='set' id='v4'><query xmlns='jabber:iq:roster'><item jid='bad@@y'/></query></iq>")
    assert b"jid-malformed" in c.read_until(b"</iq>")
    c.send("<iq type='get' id='g1'><query xmlns='jabber:iq:roster'/></iq>")
    reply = c.read_until(b"</iq>|id='g1' type='result'/>").decode()
    import re
    ver = re.search(r"ver='(\d+)'", reply).group(1)
    c.send(f"<iq type='get' id='g2'><query xmlns='jabber:iq:roster' ver='{ver}'/></iq>")
    reply = c.read_until(b"id='g2'[^>]*>").decode()
    assert "type='result'" in reply and reply.endswith("/>")  # empty result: up to date
    c.close()


def test_subscription_handshake_both_directions(im):
    async def go():
        a = await login(im, "alice", "hs")
        b = await login(im, "bob", "hs")
        await a.get_roster()
        await b.get_roster()
        # alice asks for bob's presence; bob approves.
        a.send_presence(pto="bob@localhost", ptype="subscribe")
        req = await expect(b.next_presence, lambda p: p["type"] == "subscribe")
        assert str(req["from"]) == "alice@localhost"
        b.send_presence(pto="alice@localhost", ptype="subscribed")
        await expect(a.next_presence, lambda p: p["type"] == "subscribed")
        # alice now receives bob's presence
        pres = await expect(a.next_presence, lambda p: str(p["from"]) == "bob@localhost/hs" and p["type"] == "available")
        assert pres is not None
        # And the other direction.
        b.send_presence(pto="alice@localhost", ptype="subscribe")
        await expect(a.next_presence, lambda p: p["type"] == "subscribe")
        a.send_presence(pto="bob@localhost", ptype="subscribed")
        await expect(b.next_presence, lambda p: p["type"] == "subscribed")
        await expect(b.next_presence, lambda p: str(p["from"]) == "alice@localhost/hs" and p["type"] == "available")
        ra = (await a.get_roster())["roster"]["items"]["bob@localhost"]
        rb = (await b.get_roster())["roster"]["items"]["alice@localhost"]
        assert ra["subscription"] == "both" and rb["subscription"] == "both"
        # Presence broadcast on change reaches the contact.
        a.send_presence(pstatus="busy", pshow="dnd")
        p = await expect(b.next_presence, lambda p: p["status"] == "busy")
        assert p["show"] == "dnd"
        a.disconnect()
        b.disconnect()

    run(go())


def test_probe_answers_after_relogin(im):
    async def go():
        # alice and bob are mutually subscribed (previous test ran first in this module)
        b = await login(im, "bob", "stay")
        a = await login(im, "alice", "late", presence=False)
        a.send_presence()
        p = await expect(a.next_presence, lambda p: str(p["from"]) == "bob@localhost/stay")
        assert p["type"] == "available"
        a.disconnect()
        b.disconnect()

    run(go())


def test_unavailable_broadcast_after_tcp_drop(im):
    async def go():
        b = await login(im, "bob", "watch")
        a = await login(im, "alice", "drop")
        await expect(b.next_presence, lambda p: str(p["from"]) == "alice@localhost/drop" and p["type"] == "available")
        a.transport.abort()  # no </stream:stream>, no unavailable presence
        p = await expect(b.next_presence, lambda p: str(p["from"]) == "alice@localhost/drop" and p["type"] == "unavailable")
        assert p is not None
        b.disconnect()

    run(go())


def test_pending_subscription_redelivered_at_login(im):
    async def go():
        c = await login(im, "carol", "ask")
        c.send_presence(pto="dan@localhost", ptype="subscribe")
        await asyncio.sleep(0.3)
        c.disconnect()
        d = await login(im, "dan", "later")
        req = await expect(d.next_presence, lambda p: p["type"] == "subscribe")
        assert str(req["from"]) == "carol@localhost"
        d.disconnect()

    run(go())


def test_directed_presence_gets_unavailable_at_session_end(im):
    async def go():
        d = await login(im, "dan", "dir")
        c = await login(im, "carol", "dir")
        c.send_presence(pto="dan@localhost/dir", pstatus="hello there")
        await expect(d.next_presence, lambda p: p["status"] == "hello there")
        c.disconnect()
        p = await expect(d.next_presence, lambda p: str(p["from"]) == "carol@localhost/dir")
        assert p["type"] == "unavailable"
        d.disconnect()

    run(go())


def test_offline_message_stored_and_delivered_with_delay(im):
    async def go():
        a = await login(im, "alice", "sender")
        a.send_message(mto="carol@localhost", mbody="while you were out", mtype="chat")
        await asyncio.sleep(0.5)
        a.disconnect()
        c = await login(im, "carol", "back", plugins=["xep_0203"])
        m = await expect(c.next_message, lambda m: m["body"] == "while you were out")
        assert m["delay"]["stamp"] is not None
        assert str(m["from"]).startswith("alice@localhost")
        c.disconnect()
        # Delivered once: not again at the next login.
        c = await login(im, "carol", "again")
        with pytest.raises(asyncio.TimeoutError):
            await expect(c.next_message, lambda m: m["body"] == "while you were out", timeout=1)
        c.disconnect()

    run(go())


def test_version_and_vcard_round_trip(im):
    async def go():
        a = await login(im, "alice", "v", plugins=["xep_0092", "xep_0054"])
        v = await a.plugin["xep_0092"].get_version("localhost")
        assert v["software_version"]["name"] == "xmppd-test"
        assert v["software_version"]["version"] == "9.9"
        card = a.plugin["xep_0054"].make_vcard()
        card["FN"] = "Alice Liddell"
        card["NICKNAME"] = "alice"
        await a.plugin["xep_0054"].publish_vcard(card)
        b = await login(im, "bob", "v", plugins=["xep_0054"])
        got = await b.plugin["xep_0054"].get_vcard("alice@localhost")
        assert got["vcard_temp"]["FN"] == "Alice Liddell"
        a.disconnect()
        b.disconnect()

    run(go())


def _disco_features(daemon, user, pw):
    async def go():
        c = await connect(f"{user}@localhost/d", pw, daemon.port, plugins=["xep_0030"])
        info = await c.plugin["xep_0030"].get_info("localhost")
        c.disconnect()
        return set(info["disco_info"]["features"])

    return run(go())


def test_disco_features_follow_plugins(im, tmp_path):
    features = _disco_features(im, "alice", PW["alice"])
    assert {"jabber:iq:version", "msgoffline", "vcard-temp", "urn:xmpp:ping", "jabber:iq:register"} <= features
    other = Daemon(tmp_path, plugins=["disco", "ping"]).start()
    try:
        other.adduser("alice@localhost", "alice-pw")
        features = _disco_features(other, "alice", "alice-pw")
        assert "urn:xmpp:ping" in features
        assert not {"jabber:iq:version", "msgoffline", "vcard-temp", "jabber:iq:register"} & features
    finally:
        other.stop()


def _register(port, user, password):
    c = RawClient(port)
    features = c.open_stream()
    c.starttls()
    features = c.open_stream()
    c.send("<iq type='set' id='reg1'><query xmlns='jabber:iq:register'>"
           f"<username>{user}</username><password>{password}</password></query></iq>")
    try:
        reply = c.read_until(b"</iq>|id='reg1'[^>]*/>")
    except ConnectionError as e:  # closed with a stream error
        reply = str(e).encode()
    c.close()
    return features, reply


def test_registration_on(im):
    features, reply = _register(im.port, "newbie", "newbie-pw")
    assert b"http://jabber.org/features/iq-register" in features
    assert b"type='result'" in reply

    async def go():
        c = await connect("newbie@localhost/x", "newbie-pw", im.port)
        c.disconnect()

    run(go())
    _, reply = _register(im.port, "newbie", "other-pw-123")
    assert b"conflict" in reply
    # rate limit: 2 per IP in the window (one success above, so one more, then refused)
    _register(im.port, "second", "second-pw")
    _, reply = _register(im.port, "third", "third-pw")
    assert b"resource-constraint" in reply


def test_overlong_passwords_are_not_acceptable(im):
    _, reply = _register(im.port, "longpw", "p" * 1025)
    assert b"<not-acceptable" in reply and b"longer than 1024 bytes" in reply
    assert "no such account" in im.ctl("deluser", "longpw@localhost", check=False).stderr
    im.adduser("hank@localhost", "hank-old-pw")
    c = RawClient(im.port)
    c.login("hank", "hank-old-pw")
    c.send("<iq type='set' id='pw1'><query xmlns='jabber:iq:register'>"
           f"<username>hank</username><password>{'p' * 1025}</password></query></iq>")
    reply = c.read_until(b"</iq>")
    assert b"type='error'" in reply and b"<not-acceptable" in reply
    assert b"longer than 1024 bytes" in reply
    c.close()
    RawClient(im.port).login("hank", "hank-old-pw")  # the password did not change


def test_registration_off_by_default(daemon):
    features, reply = _register(daemon.port, "nope", "nope-pw-12")
    assert b"iq-register" not in features
    assert b"<not-authorized" in reply and b"stream:error" in reply


def test_password_change_and_account_removal(im):
    im.adduser("gina@localhost", "gina-old-pw")

    async def go():
        c = await connect("gina@localhost/x", "gina-old-pw", im.port)
        iq = c.make_iq_set(ito=None)
        q = iq.xml
        from xml.etree import ElementTree as ET
        query = ET.SubElement(q, "{jabber:iq:register}query")
        ET.SubElement(query, "{jabber:iq:register}username").text = "gina"
        ET.SubElement(query, "{jabber:iq:register}password").text = "gina-new-pw"
        await iq.send()
        c.disconnect()
        c = await connect("gina@localhost/x", "gina-new-pw", im.port)
        iq = c.make_iq_set()
        query = ET.SubElement(iq.xml, "{jabber:iq:register}query")
        ET.SubElement(query, "{jabber:iq:register}remove")
        await iq.send()
        await asyncio.sleep(0.3)
        c.disconnect()

    run(go())
    r = im.ctl("deluser", "gina@localhost", check=False)
    assert "no such account" in r.stderr


def test_server_pings_idle_clients_and_drops_dead_ones(tmp_path):
    d = Daemon(tmp_path, plugins=["disco", "ping"], extra="""
        [ping]
        interval = 1
        timeout = 1
    """).start()
    try:
        d.adduser("alice@localhost", "alice-pw")
        raw = RawClient(d.port)
        raw.login("alice", "alice-pw", "silent")
        ping = raw.read_until(b"<ping xmlns='urn:xmpp:ping'/></iq>", timeout=5).decode()
        assert "type='get'" in ping
        # We never answer: the server gives up on us.
        data = raw.read_all(timeout=5)
        assert b"connection-timeout" in data

        async def go():
            c = await connect("alice@localhost/live", "alice-pw", d.port, plugins=["xep_0199"])
            await asyncio.sleep(4)  # slixmpp answers the server's pings
            assert c.is_connected()
            c.disconnect()

        run(go())
    finally:
        d.stop()


def test_registration_closed_on_certificate_only_host(tmp_path):
    d = Daemon(tmp_path, hosts=("localhost", "certonly.test"), plugins=["disco", "register"], extra="""
        [hosts."certonly.test".sasl]
        password_mechanisms = false
    """).start()
    try:
        c = RawClient(d.port, host="certonly.test")
        c.open_stream()
        c.starttls()
        features = c.open_stream()
        assert b"iq-register" not in features
        c.send("<iq type='set' id='reg1'><query xmlns='jabber:iq:register'>"
               "<username>x</username><password>long-enough</password></query></iq>")
        assert b"not-allowed" in c.read_until(b"</iq>")
        features, reply = _register(d.port, "y", "long-enough")
        assert b"iq-register" in features and b"type='result'" in reply
    finally:
        d.stop()


def test_offline_quota_version_hidden_and_register_hosts(tmp_path):
    d = Daemon(tmp_path, hosts=("localhost", "closed.test"), plugins=[
        "roster", "presence", "disco", "version", "offline", "register"], extra="""
        [offline]
        max_messages = 2
        [version]
        hide = true
        [register]
        hosts = ["localhost"]
    """).start()
    try:
        d.adduser("ann@localhost", "ann-secret")
        d.adduser("ben@localhost", "ben-secret")
        c = RawClient(d.port)
        c.login("ann", "ann-secret")
        for i in range(3):
            c.send(f"<message to='ben@localhost' type='chat' id='q{i}'><body>note {i}</body></message>")
        bounce = c.read_until(b"<message[^>]*id='q2'.*?</message>").decode()
        assert "type='error'" in bounce and "service-unavailable" in bounce
        c.send("<iq type='get' id='v' to='localhost'><query xmlns='jabber:iq:version'/></iq>")
        assert b"service-unavailable" in c.read_until(b"</iq>")
        c.send("<iq type='get' id='d' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
        assert b"jabber:iq:version" not in c.read_until(b"</iq>")
        c.close()
        b = RawClient(d.port)
        b.login("ben", "ben-secret")
        b.send("<presence/>")
        got = b.read_all(1.0)
        assert b"note 0" in got and b"note 1" in got and b"note 2" not in got
        b.close()
        # registration only where allowed
        closed = RawClient(d.port, host="closed.test")
        closed.open_stream()
        closed.starttls()
        assert b"iq-register" not in closed.open_stream()
        closed.close()
        features, reply = _register(d.port, "newcomer", "newcomer-pw")
        assert b"iq-register" in features and b"type='result'" in reply
    finally:
        d.stop()


def test_subscription_pre_approval(im):
    im.adduser("pia@localhost", "pia-secret")
    im.adduser("quin@localhost", "quin-secret")
    p = RawClient(im.port)
    p.login("pia", "pia-secret", "pre")
    q = RawClient(im.port)
    q.login("quin", "quin-secret", "pre")
    for c in (p, q):
        c.send("<iq type='get' id='r'><query xmlns='jabber:iq:roster'/></iq><presence/>")
        c.read_until(b"id='r'.*?</iq>")
    # pia approves quin before quin asks (RFC 6121 §3.4)
    p.send("<presence to='quin@localhost' type='subscribed'/>")
    push = p.read_until(b"</iq>").decode()
    assert "approved='true'" in push and "jid='quin@localhost'" in push
    # quin asks: the server answers for pia at once, pia is not asked
    q.send("<presence to='pia@localhost' type='subscribe'/>")
    got = q.read_until(b"<presence[^>]*type='subscribed'[^>]*/>").decode()
    assert "from='pia@localhost'" in got
    assert b"type='subscribe'" not in p.read_all(0.8)
    q.send("<iq type='get' id='r2'><query xmlns='jabber:iq:roster'/></iq>")
    roster = q.read_until(b"id='r2'.*?</iq>").decode()
    assert "jid='pia@localhost'" in roster and "subscription='to'" in roster
    p.close()
    q.close()


def test_own_presence_is_reflected_to_all_resources(im):
    """RFC 6121 §4.2.2: initial presence also goes back to the sending resource."""
    im.adduser("rae@localhost", "rae-secret")
    one = RawClient(im.port)
    one.login("rae", "rae-secret", "one")
    one.send("<presence><status>first</status></presence>")
    got = one.read_until(b"<presence[^>]*>.*?</presence>").decode()
    assert "from='rae@localhost/one'" in got and "first" in got
    two = RawClient(im.port)
    two.login("rae", "rae-secret", "two")
    two.send("<presence><status>second</status></presence>")
    assert b"second" in two.read_until(b"second.*?</presence>")
    assert b"from='rae@localhost/two'" in one.read_until(b"second.*?</presence>")
    one.close()
    two.close()

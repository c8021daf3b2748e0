"""Issue 15: PEP (XEP-0163) with caps-based notifications, access models, publish-options,
private XML and bookmarks compat, against the real daemon over TLS (raw XML and slixmpp)."""
from __future__ import annotations

import re

import pytest

from tests.daemon import Daemon
from tests.peptools import (
    PUBSUB, PW, answer_caps, expect_event, expect_no_event, get_items, online, own_event, publish, subscribe_both,
    sync,
)

USERS = ["alice", "bob", "carol", "dave", "erin", "frank", "gina", "hal"]
PLUGINS = ["roster", "presence", "disco", "ping", "offline", "urn:xmpp:blocking", "caps", "pep",
           "jabber:iq:private", "urn:xmpp:bookmarks:1"]
NODE = "urn:xmpp:test:mood"


@pytest.fixture(scope="module")
def pd(tmp_path_factory):
    yield from pep_daemon(tmp_path_factory.mktemp("pep"))


def pep_daemon(tmp, store: str = "sqlite"):
    """The module's daemon and accounts (also on PostgreSQL: tests/test_store_async.py)."""
    d = Daemon(tmp, plugins=PLUGINS, store=store,
               extra="[pep]\nmax_nodes_per_user = 12\nmax_item_bytes = 2048\n").start()
    for u in USERS:
        d.adduser(f"{u}@localhost", PW)
    for contact in ("bob", "carol", "dave"):
        subscribe_both(d, "alice", contact)
    subscribe_both(d, "alice", "frank", groups=["friends"])
    yield d
    d.stop()


def test_disco_account_identity_features_and_items(pd):
    a = online(pd, "alice", "disco", caps=False)
    reply = a.iq("<iq type='get' id='d' to='alice@localhost'><query "
                 "xmlns='http://jabber.org/protocol/disco#info'/></iq>", "d")
    assert "category='pubsub'" in reply and "type='pep'" in reply
    for f in ("publish", "publish-options", "access-whitelist", "auto-create", "last-published"):
        assert f"var='{PUBSUB}#{f}'" in reply
    assert "urn:xmpp:bookmarks:1#compat" in reply
    publish(a, "urn:xmpp:test:disco", "1", "<x xmlns='urn:xmpp:test:disco'/>")
    publish(a, "urn:xmpp:test:secret", "1", "<x xmlns='urn:xmpp:test:secret'/>",
            {"pubsub#access_model": "whitelist"}, ident="p2")
    e = online(pd, "erin", "disco", caps=False)  # no subscription: sees no presence node
    b = online(pd, "bob", "disco", caps=False)
    q = ("<iq type='get' id='i' to='alice@localhost'><query "
         "xmlns='http://jabber.org/protocol/disco#items'/></iq>")
    own, bobs, erins = a.iq(q, "i"), b.iq(q, "i"), e.iq(q, "i")
    assert "node='urn:xmpp:test:disco'" in own and "node='urn:xmpp:test:secret'" in own
    assert "node='urn:xmpp:test:disco'" in bobs and "urn:xmpp:test:secret" not in bobs
    assert "urn:xmpp:test" not in erins
    for c in (a, b, e):
        c.close()


def test_notifications_to_contacts_with_notify_and_last_item_on_login(pd):
    a = online(pd, "alice", "one", notify=[NODE])
    b = online(pd, "bob", "one", notify=[NODE])
    c = online(pd, "carol", "one", notify=[])  # subscribed, but no +notify
    sync(a), sync(b), sync(c)
    reply = publish(a, NODE, "m1", f"<mood xmlns='{NODE}'><happy/></mood>")
    assert "type='result'" in reply and "<item id='m1'/>" in reply
    got = expect_event(b, NODE)
    assert "from='alice@localhost'" in got and "<happy/>" in got and "id='m1'" in got
    assert "pubsub#event" in got
    assert "<happy/>" in own_event(a, reply, NODE)  # the owner's own resource too
    expect_no_event(c, NODE)
    # bob publishes too: alice gets it
    publish(b, NODE, "b1", f"<mood xmlns='{NODE}'><sad/></mood>")
    assert "<sad/>" in expect_event(a, NODE)
    # bob's new resource gets alice's last item (and his own) at login
    b2 = online(pd, "bob", "two", notify=[NODE])
    seen = expect_event(b2, NODE) + expect_event(b2, NODE)
    assert "<happy/>" in seen and "<sad/>" in seen
    # items: all, by id, max_items
    assert "<happy/>" in get_items(b, "alice@localhost", NODE)
    publish(a, NODE, "m2", f"<mood xmlns='{NODE}'><calm/></mood>")
    expect_event(b, NODE)
    listing = get_items(b, "alice@localhost", NODE)
    assert "<calm/>" in listing and "<happy/>" not in listing  # default max_items 1
    for x in (a, b, b2, c):
        x.close()


def test_blocked_contact_gets_nothing_at_once(pd):
    node = "urn:xmpp:test:block"
    a = online(pd, "alice", "blk", notify=[node])
    d = online(pd, "dave", "blk", notify=[node])
    publish(a, node, "1", f"<x xmlns='{node}'>one</x>")
    assert ">one<" in expect_event(d, node)
    a.iq("<iq type='set' id='b'><block xmlns='urn:xmpp:blocking'><item jid='dave@localhost'/>"
         "</block></iq>", "b")
    out = publish(a, node, "2", f"<x xmlns='{node}'>two</x>")
    assert "type='result'" in out and "blocked" not in out
    expect_no_event(d, node)
    assert "type='error'" not in sync(a)  # the publisher hears nothing of it
    a.iq("<iq type='set' id='u'><unblock xmlns='urn:xmpp:blocking'><item jid='dave@localhost'/>"
         "</unblock></iq>", "u")
    publish(a, node, "3", f"<x xmlns='{node}'>three</x>")
    assert ">three<" in expect_event(d, node)
    a.close()
    d.close()


def test_access_models_and_changes_at_once(pd):
    node = "urn:xmpp:test:access"
    a = online(pd, "alice", "acc", notify=[node])
    b = online(pd, "bob", "acc", notify=[node])
    e = online(pd, "erin", "acc", notify=[node])  # not subscribed
    f = online(pd, "frank", "acc", notify=[node])  # subscribed, in group "friends"
    publish(a, node, "1", f"<x xmlns='{node}'>p</x>")  # presence (default)
    expect_event(b, node)
    assert "<item id='1'>" in get_items(b, "alice@localhost", node)
    err = get_items(e, "alice@localhost", node)
    assert "not-authorized" in err and "presence-subscription-required" in err
    # open: a stranger reads
    cfg = lambda model, extra="": a.iq(
        f"<iq type='set' id='cf'><pubsub xmlns='{PUBSUB}#owner'><configure node='{node}'>"
        "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'>"
        f"<value>{PUBSUB}#node_config</value></field><field var='pubsub#access_model'>"
        f"<value>{model}</value></field>{extra}</x></configure></pubsub></iq>", "cf")
    assert "type='result'" in cfg("open")
    assert "<item id='1'>" in get_items(e, "alice@localhost", node)
    form = a.iq(f"<iq type='get' id='cg'><pubsub xmlns='{PUBSUB}#owner'><configure node='{node}'/>"
                "</pubsub></iq>", "cg")
    assert re.search(r"var='pubsub#access_model'.*?<value>open</value>", form)
    # whitelist: contacts are refused, and get no notification, at once
    assert "type='result'" in cfg("whitelist")
    err = get_items(b, "alice@localhost", node)
    assert "not-allowed" in err and "closed-node" in err
    assert ">w<" in own_event(a, publish(a, node, "2", f"<x xmlns='{node}'>w</x>"), node)
    expect_no_event(b, node)
    # roster groups: frank (friends) yes, bob no
    assert "type='result'" in cfg("roster", "<field var='pubsub#roster_groups_allowed'>"
                                            "<value>friends</value></field>")
    assert "<item id='2'>" in get_items(f, "alice@localhost", node)
    assert "not-in-roster-group" in get_items(b, "alice@localhost", node)
    publish(a, node, "3", f"<x xmlns='{node}'>r</x>")
    assert ">r<" in expect_event(f, node)
    expect_no_event(b, node)
    # a roster change counts at once: bob put in "friends" reads and is notified
    a.iq("<iq type='set' id='rs'><query xmlns='jabber:iq:roster'><item jid='bob@localhost'>"
         "<group>friends</group></item></query></iq>", "rs")
    assert "<item id='3'>" in get_items(b, "alice@localhost", node)
    publish(a, node, "3b", f"<x xmlns='{node}'>g</x>", ident="p3b")
    assert ">g<" in expect_event(b, node)
    a.iq("<iq type='set' id='rs2'><query xmlns='jabber:iq:roster'><item jid='bob@localhost'/>"
         "</query></iq>", "rs2")
    assert "not-in-roster-group" in get_items(b, "alice@localhost", node)
    # back to presence: bob again, erin not
    assert "type='result'" in cfg("presence")
    publish(a, node, "4", f"<x xmlns='{node}'>q</x>")
    assert ">q<" in expect_event(b, node)
    expect_no_event(e, node)
    assert "bad value" in cfg("bogus")
    for x in (a, b, e, f):
        x.close()


def test_publish_options_preconditions(pd):
    node = "urn:xmpp:test:precond"
    g = online(pd, "gina", "pre", caps=False)
    ok = publish(g, node, "1", f"<x xmlns='{node}'/>", {"pubsub#access_model": "open",
                                                        "pubsub#max_items": "max"})
    assert "type='result'" in ok
    assert "type='result'" in publish(g, node, "2", f"<x xmlns='{node}'/>",
                                      {"pubsub#access_model": "open"}, ident="p2")
    bad = publish(g, node, "3", f"<x xmlns='{node}'/>", {"pubsub#access_model": "whitelist"},
                  ident="p3")
    assert "type='error'" in bad and "<conflict" in bad and "precondition-not-met" in bad
    bad = publish(g, node, "3", f"<x xmlns='{node}'/>", {"pubsub#max_items": "1"}, ident="p4")
    assert "precondition-not-met" in bad
    listing = get_items(g, "gina@localhost", node)
    assert "id='1'" in listing and "id='2'" in listing and "id='3'" not in listing
    # someone else's service: forbidden
    h = online(pd, "hal", "pre", caps=False)
    out = h.iq(f"<iq type='set' id='x' to='gina@localhost'><pubsub xmlns='{PUBSUB}'>"
               f"<publish node='{node}'><item><x xmlns='{node}'/></item></publish></pubsub></iq>", "x")
    assert "<forbidden" in out
    g.close()
    h.close()


def test_items_retract_purge_delete_and_quotas(pd):
    node = "urn:xmpp:test:many"
    g = online(pd, "gina", "many", notify=[node])
    for i in range(1, 5):
        own_event(g, publish(g, node, str(i), f"<x xmlns='{node}'>{i}</x>",
                             {"pubsub#max_items": "3"}, ident=f"m{i}"), node)
    listing = get_items(g, "gina@localhost", node)
    assert re.findall(r"<item id='(\d)'", listing) == ["2", "3", "4"]
    assert re.findall(r"<item id='(\d)'", get_items(g, "gina@localhost", node, extra=" max_items='1'")) == ["4"]
    by_id = get_items(g, "gina@localhost", node, inner="<item id='3'/>")
    assert re.findall(r"<item id='(\d)'", by_id) == ["3"]
    r = g.iq(f"<iq type='set' id='rt'><pubsub xmlns='{PUBSUB}'><retract node='{node}' notify='true'>"
             "<item id='3'/></retract></pubsub></iq>", "rt")
    assert "type='result'" in r
    assert "<retract id='3'/>" in own_event(g, r, node)
    assert "item-not-found" in g.iq(
        f"<iq type='set' id='rt2'><pubsub xmlns='{PUBSUB}'><retract node='{node}'>"
        "<item id='3'/></retract></pubsub></iq>", "rt2")
    g.iq(f"<iq type='set' id='pg'><pubsub xmlns='{PUBSUB}#owner'><purge node='{node}'/></pubsub></iq>", "pg")
    assert "<item " not in get_items(g, "gina@localhost", node)
    g.iq(f"<iq type='set' id='dl'><pubsub xmlns='{PUBSUB}#owner'><delete node='{node}'/></pubsub></iq>", "dl")
    assert "item-not-found" in get_items(g, "gina@localhost", node)
    # persist_items false: nothing stored but the last item, in memory
    t = "urn:xmpp:test:transient"
    publish(g, t, "1", f"<x xmlns='{t}'>1</x>", {"pubsub#persist_items": "false"}, ident="t1")
    publish(g, t, "2", f"<x xmlns='{t}'>2</x>", ident="t2")
    assert re.findall(r"<item id='(\d)'", get_items(g, "gina@localhost", t)) == ["2"]
    g.iq(f"<iq type='set' id='dt'><pubsub xmlns='{PUBSUB}#owner'><delete node='{t}'/></pubsub></iq>", "dt")
    # quotas: item bytes, nodes per user
    big = publish(g, "urn:xmpp:test:big", "1", f"<x xmlns='urn:xmpp:test:big'>{'a' * 3000}</x>")
    assert "<not-acceptable" in big and "payload-too-big" in big
    outs = [publish(g, f"urn:xmpp:test:n{i}", "1", f"<x xmlns='urn:xmpp:test:n'/>", ident=f"n{i}")
            for i in range(13)]
    assert "policy-violation" in outs[-1] and "max-nodes-exceeded" in outs[-1]
    ok = ["type='result'" in o for o in outs]
    assert ok == sorted(ok, reverse=True) and sum(ok) == 11  # 12 with the precondition test's
    assert "item-required" in g.iq(f"<iq type='set' id='e1'><pubsub xmlns='{PUBSUB}'><publish "
                                   f"node='{node}'/></pubsub></iq>", "e1")
    g.close()


def test_private_xml_and_bookmarks_compat_raw(pd):
    h = online(pd, "hal", "bm", notify=["urn:xmpp:bookmarks:1"])
    # XEP-0049: store, read back, empty when absent, own account only
    r = h.iq("<iq type='set' id='ps'><query xmlns='jabber:iq:private'><prefs xmlns='urn:test:p'>"
             "<a>1</a></prefs></query></iq>", "ps")
    assert "type='result'" in r
    got = h.iq("<iq type='get' id='pg'><query xmlns='jabber:iq:private'><prefs xmlns='urn:test:p'/>"
               "</query></iq>", "pg")
    assert "<prefs xmlns='urn:test:p'><a>1</a></prefs>" in got
    empty = h.iq("<iq type='get' id='pe'><query xmlns='jabber:iq:private'><none xmlns='urn:test:n'/>"
                 "</query></iq>", "pe")
    assert "<none xmlns='urn:test:n'/>" in empty
    other = h.iq("<iq type='get' id='po' to='alice@localhost'><query xmlns='jabber:iq:private'>"
                 "<prefs xmlns='urn:test:p'/></query></iq>", "po")
    assert "type='error'" in other
    # XEP-0048 write -> XEP-0402 items (with notification)
    r = h.iq("<iq type='set' id='b1'><query xmlns='jabber:iq:private'><storage xmlns='storage:bookmarks'>"
             "<conference jid='room@muc.example' name='Room' autojoin='true'><nick>hal</nick></conference>"
             "</storage></query></iq>", "b1")
    event = own_event(h, r, "urn:xmpp:bookmarks:1")
    assert "<item id='room@muc.example'>" in event and "autojoin='true'" in event
    items = get_items(h, "hal@localhost", "urn:xmpp:bookmarks:1")
    assert re.search(r"<conference xmlns='urn:xmpp:bookmarks:1' name='Room' autojoin='true'>"
                     r"<nick>hal</nick></conference>", items)
    form = h.iq(f"<iq type='get' id='c'><pubsub xmlns='{PUBSUB}#owner'><configure "
                "node='urn:xmpp:bookmarks:1'/></pubsub></iq>", "c")
    assert re.search(r"var='pubsub#access_model'.*?<value>whitelist</value>", form)
    # XEP-0402 publish -> XEP-0048 read
    publish(h, "urn:xmpp:bookmarks:1", "other@muc.example",
            "<conference xmlns='urn:xmpp:bookmarks:1' name='Other'><nick>h</nick></conference>",
            {"pubsub#access_model": "whitelist", "pubsub#max_items": "max",
             "pubsub#persist_items": "true"}, ident="b2")
    legacy = h.iq("<iq type='get' id='b3'><query xmlns='jabber:iq:private'><storage "
                  "xmlns='storage:bookmarks'/></query></iq>", "b3")
    assert "jid='room@muc.example'" in legacy and "jid='other@muc.example'" in legacy
    assert "name='Other'" in legacy and "<nick>h</nick>" in legacy
    # XEP-0048 write without a room retracts it
    r = h.iq("<iq type='set' id='b4'><query xmlns='jabber:iq:private'><storage xmlns='storage:bookmarks'>"
             "<conference jid='other@muc.example' name='Other' autojoin='false'><nick>h</nick></conference>"
             "</storage></query></iq>", "b4")
    assert "type='result'" in r
    items = get_items(h, "hal@localhost", "urn:xmpp:bookmarks:1")
    assert "room@muc.example" not in items and "other@muc.example" in items
    h.close()


OMEMO = "eu.siacs.conversations.axolotl"


def test_omemo_devicelist_and_bundle_exchange(pd):
    """XEP-0384 (legacy namespace as deployed): device lists and bundles with access open."""
    dl = f"{OMEMO}.devicelist"
    a = online(pd, "alice", "omemo", notify=[dl])
    b = online(pd, "bob", "omemo", notify=[dl])
    open_ = {"pubsub#access_model": "open"}
    r = publish(a, dl, "current", f"<list xmlns='{OMEMO}'><device id='1001'/></list>", open_)
    assert "type='result'" in r
    assert "<device id='1001'/>" in expect_event(b, dl)
    bundle = (f"<bundle xmlns='{OMEMO}'><signedPreKeyPublic signedPreKeyId='1'>BQ==</signedPreKeyPublic>"
              "<signedPreKeySignature>c2ln</signedPreKeySignature><identityKey>aWs=</identityKey>"
              "<prekeys><preKeyPublic preKeyId='1'>cGsx</preKeyPublic></prekeys></bundle>")
    assert "type='result'" in publish(a, f"{OMEMO}.bundles:1001", "current", bundle, open_, "pb")
    r = publish(b, dl, "current", f"<list xmlns='{OMEMO}'><device id='2002'/></list>", open_, "pd")
    assert "<device id='2002'/>" in expect_event(a, dl)
    publish(b, f"{OMEMO}.bundles:2002", "current", bundle.replace("aWs=", "Yg=="), open_, "pb2")
    # each fetches the other's bundle; a stranger may too (open)
    got = get_items(b, "alice@localhost", f"{OMEMO}.bundles:1001")
    assert "<identityKey>aWs=</identityKey>" in got and "preKeyId='1'" in got
    got = get_items(a, "bob@localhost", f"{OMEMO}.bundles:2002")
    assert "<identityKey>Yg==</identityKey>" in got
    e = online(pd, "erin", "omemo", caps=False)
    assert "<device id='1001'/>" in get_items(e, "alice@localhost", dl)
    # a new device of bob's gets alice's device list at login
    b2 = online(pd, "bob", "omemo2", notify=[dl])
    seen = expect_event(b2, dl) + expect_event(b2, dl)
    assert "1001" in seen and "2002" in seen
    for c in (a, b, b2, e):
        c.close()


def test_caps_hash_checked(pd):
    """A client whose disco#info does not match its ver gets no notifications (not cached)."""
    node = "urn:xmpp:test:liar"
    a = online(pd, "alice", "liar", notify=[node])
    b = online(pd, "bob", "liar", notify=[node], lie=True)
    own_event(a, publish(a, node, "1", f"<x xmlns='{node}'/>"), node)
    expect_no_event(b, node)
    assert "does not match its disco#info" in pd.logtext()
    a.close()
    b.close()


def test_account_deletion_removes_pep_data(tmp_path):
    d = Daemon(tmp_path, plugins=PLUGINS).start()
    try:
        d.adduser("zed@localhost", PW)
        z = online(d, "zed", caps=False)
        publish(z, "urn:xmpp:test:gone", "1", "<x xmlns='urn:xmpp:test:gone'/>")
        z.iq("<iq type='set' id='p'><query xmlns='jabber:iq:private'><p xmlns='urn:t'/></query></iq>", "p")
        z.close()
        d.ctl("deluser", "zed@localhost")
        d.adduser("zed@localhost", PW)
        z = online(d, "zed", caps=False)
        assert "item-not-found" in get_items(z, "zed@localhost", "urn:xmpp:test:gone")
        z.close()
    finally:
        d.stop()
    import sqlite3
    db = sqlite3.connect(d.data_dir / "xmppd.sqlite3")
    rows = db.execute("SELECT store FROM kv WHERE user='zed@localhost' AND store LIKE 'pep%'").fetchall()
    assert rows == []


def test_slixmpp_avatar_and_bookmarks(pd):
    """slixmpp's own PEP stack (xep_0060/0163/0115/0084/0402, XEP-0048 over xep_0049)."""
    import asyncio

    from slixmpp.plugins.xep_0060.stanza import Item

    from tests.xmpp import connect, run

    plugins = ["xep_0030", "xep_0060", "xep_0163", "xep_0115", "xep_0084", "xep_0402",
               "xep_0048", "xep_0049"]

    async def go():
        bob = await connect("bob@localhost/sx", PW, pd.port, plugins=plugins, presence=False)
        avatars: asyncio.Queue = asyncio.Queue()
        bob.add_event_handler("avatar_metadata_publish", avatars.put_nowait)
        bob.plugin["xep_0163"].add_interest("urn:xmpp:bookmarks:1")
        bob.send_presence()
        alice = await connect("alice@localhost/sx", PW, pd.port, plugins=plugins)
        await asyncio.sleep(0.5)  # caps resolution round trips
        data = b"\x89PNG fake avatar"
        await alice.plugin["xep_0084"].publish_avatar(data)
        await alice.plugin["xep_0084"].publish_avatar_metadata(
            [{"id": alice.plugin["xep_0084"].generate_id(data), "type": "image/png", "bytes": len(data)}])
        msg = await asyncio.wait_for(avatars.get(), 5)
        assert msg["from"].bare == "alice@localhost"
        assert msg["pubsub_event"]["items"]["item"]["avatar_metadata"]["info"]["bytes"] == len(data)
        got = await bob.plugin["xep_0084"].retrieve_avatar("alice@localhost", alice.plugin["xep_0084"].generate_id(data))
        assert got["pubsub"]["items"]["item"]["avatar_data"]["value"] == data
        # XEP-0402 publish by bob -> XEP-0048 view of the same account, and back
        bm_events: asyncio.Queue = asyncio.Queue()
        bob.add_event_handler("pubsub_publish", bm_events.put_nowait)
        item = Item()
        item["conference"]["name"] = "Lounge"
        item["conference"]["autojoin"] = True
        item["conference"]["nick"] = "bob"
        await bob.plugin["xep_0060"].publish(bob.boundjid.bare, "urn:xmpp:bookmarks:1", id="lounge@muc.example",
                                      payload=item["conference"])
        ev = await asyncio.wait_for(bm_events.get(), 5)
        assert ev["pubsub_event"]["items"]["node"] == "urn:xmpp:bookmarks:1"
        legacy = await bob.plugin["xep_0048"].get_bookmarks(method="xep_0049")
        rooms = {str(c["jid"]): c for c in legacy["private"]["bookmarks"]["conferences"]}
        assert rooms["lounge@muc.example"]["name"] == "Lounge" and rooms["lounge@muc.example"]["autojoin"]
        bookmarks = bob.plugin["xep_0048"].stanza.Bookmarks()
        bookmarks.add_conference("den@muc.example", "bobby", name="Den", autojoin=False)
        await bob.plugin["xep_0048"].set_bookmarks(bookmarks, method="xep_0049")
        items = await bob.plugin["xep_0060"].get_items(bob.boundjid.bare, "urn:xmpp:bookmarks:1")
        ids = [i["id"] for i in items["pubsub"]["items"]]
        assert ids == ["den@muc.example"]
        assert items["pubsub"]["items"]["item"]["conference"]["nick"] == "bobby"
        alice.disconnect()
        bob.disconnect()

    run(go(), timeout=40)


def test_notifications_to_a_remote_contact_over_s2s(tmp_path):
    """bob@b.test (another xmppd, over s2s) gets alice@a.test's items and last item;
    a.test resolves bob's caps across the federation."""
    from tests.federation import PASSWORD, Federation

    f = Federation(tmp_path, plugins=PLUGINS)
    try:
        node = "urn:xmpp:test:remote"
        subscribe_both(f.a, "alice", "bob", db=f.b, hosts=("a.test", "b.test"), password=PASSWORD)
        a = online(f.a, "alice", "one", notify=[node], host="a.test", password=PASSWORD)
        own_event(a, publish(a, node, "1", f"<x xmlns='{node}'>first</x>"), node)
        b = online(f.b, "bob", "one", notify=[node], host="b.test", password=PASSWORD)
        # b.test asked for bob's caps at login; a.test asks too, when bob's presence arrives
        got = b.read_until(r"<iq [^>]*type='get'[^>]*>.*?</iq>|<message[^>]*>.*?</message>").decode()
        assert "<iq " in got and "from='a.test'" in got, got
        answer_caps(b, got)  # the same answer as to b.test (same features, same ver)
        seen = expect_event(b, node, timeout=8)
        assert ">first<" in seen
        publish(a, node, "2", f"<x xmlns='{node}'>second</x>", ident="p2")
        assert ">second<" in expect_event(b, node, timeout=8)
        a.close()
        b.close()
    finally:
        f.stop()



def test_domain_filter_applies_to_notifications(tmp_path):
    """A contact whose domain filter takes nothing from other domains gets no
    notification of a contact on another served domain; an unfiltered one does."""
    node = "urn:xmpp:test:domains"
    d = Daemon(tmp_path, hosts=("localhost", "b.test"), plugins=PLUGINS + ["domain-filter"]).start()
    try:
        d.adduser("alice@localhost", PW)
        for u in ("bee", "bea"):
            d.adduser(f"{u}@b.test", PW)
            subscribe_both(d, "alice", u, hosts=("localhost", "b.test"))
        d.ctl("filter", "bee@b.test", "OWN")  # bee takes nothing from other domains
        a = online(d, "alice", "dom", notify=[node])
        bee = online(d, "bee", "dom", notify=[node], host="b.test")
        bea = online(d, "bea", "dom", notify=[node], host="b.test")
        sync(a), sync(bee), sync(bea)
        out = publish(a, node, "1", f"<x xmlns='{node}'>one</x>")
        assert "type='result'" in out
        assert ">one<" in expect_event(bea, node)
        expect_no_event(bee, node)
        assert "type='error'" not in sync(a)  # the publisher hears nothing of it
        for c in (a, bee, bea):
            c.close()
    finally:
        d.stop()

"""Issue 15, conversions between protocols that hold the same data: XEP-0048 bookmarks
over PEP (``urn:xmpp:bookmarks:1#compat-pep``) and XEP-0398 (vCard PHOTO and XEP-0084
avatars), against the real daemon over TLS (raw XML and slixmpp)."""
from __future__ import annotations

import base64
import hashlib
import re

import pytest

from tests.daemon import Daemon
from tests.peptools import (
    PUBSUB, PW, expect_event, expect_no_event, get_items, online, publish, subscribe_both, sync,
)

USERS = ["ivy", "jon", "kim", "lee", "mia", "ned", "oz", "pat"]
PLUGINS = ["roster", "presence", "disco", "ping", "vcard", "caps", "pep", "jabber:iq:private",
           "urn:xmpp:bookmarks:1", "urn:xmpp:pep-vcard-conversion:0"]
BM2 = "urn:xmpp:bookmarks:1"
LEGACY = "storage:bookmarks"
WHITELIST = {"pubsub#persist_items": "true", "pubsub#access_model": "whitelist"}


@pytest.fixture(scope="module")
def cd(tmp_path_factory):
    yield from compat_daemon(tmp_path_factory.mktemp("pepcompat"))


def compat_daemon(tmp, store: str = "sqlite"):
    """The module's daemon and accounts (also on PostgreSQL: tests/test_store_async.py)."""
    d = Daemon(tmp, plugins=PLUGINS, store=store,
               extra="[pep]\nmax_items_per_node = 8\n[vcard]\nmax_size = 4096\n").start()
    for u in USERS:
        d.adduser(f"{u}@localhost", PW)
    subscribe_both(d, "mia", "ned")
    subscribe_both(d, "oz", "pat")
    yield d
    d.stop()


def legacy_storage(*rooms: tuple[str, str, bool, str]) -> str:
    confs = "".join(f"<conference jid='{j}' name='{n}' autojoin='{str(a).lower()}'><nick>{k}</nick>"
                    f"</conference>" for j, n, a, k in rooms)
    return f"<storage xmlns='{LEGACY}'>{confs}</storage>"


def events(c, node: str, count: int) -> str:
    return "".join(expect_event(c, node) for _ in range(count))


def test_bookmarks_compat_pep_raw(cd):
    old = online(cd, "ivy", "legacy", notify=[LEGACY])  # XEP-0048 over PEP
    new = online(cd, "ivy", "bm2", notify=[BM2])  # XEP-0402
    info = old.iq("<iq type='get' id='d' to='ivy@localhost'><query "
                  "xmlns='http://jabber.org/protocol/disco#info'/></iq>", "d")
    assert f"var='{BM2}#compat-pep'" in info and f"var='{BM2}#compat'" in info
    assert "item-not-found" in get_items(old, "ivy@localhost", LEGACY, "i0")
    # XEP-0048 publish -> XEP-0402 items and notifications, one legacy notification
    r = publish(old, LEGACY, "current", legacy_storage(("a@muc.example", "A", True, "ivy"),
                                                       ("b@muc.example", "B", False, "iv")), WHITELIST)
    assert "type='result'" in r, r
    got = events(new, BM2, 2)
    assert "<item id='a@muc.example'><conference xmlns='urn:xmpp:bookmarks:1' name='A' " \
           "autojoin='true'><nick>ivy</nick></conference></item>" in got
    assert "<item id='b@muc.example'>" in got
    mine = r if f"node='{LEGACY}'" in r else expect_event(old, LEGACY)
    assert "<item id='current'><storage xmlns='storage:bookmarks'>" in mine
    items = get_items(new, "ivy@localhost", BM2, "i1")
    assert "a@muc.example" in items and "b@muc.example" in items
    # XEP-0402 publish -> the XEP-0048 PEP client hears the whole list
    publish(new, BM2, "c@muc.example", f"<conference xmlns='{BM2}' name='C'/>",
            {"pubsub#access_model": "whitelist", "pubsub#max_items": "max"}, "p2")
    got = expect_event(old, LEGACY)
    for room in ("a", "b", "c"):
        assert f"jid='{room}@muc.example'" in got
    assert re.search(r"<conference jid='c@muc.example' name='C' autojoin='false'/>", got)
    listing = get_items(old, "ivy@localhost", LEGACY, "i2")
    assert "<item id='current'>" in listing and "jid='c@muc.example'" in listing
    disco = old.iq("<iq type='get' id='di' to='ivy@localhost'><query "
                   "xmlns='http://jabber.org/protocol/disco#items'/></iq>", "di")
    assert f"node='{LEGACY}'" in disco and f"node='{BM2}'" in disco
    # a shorter XEP-0048 list retracts the rooms it no longer has
    publish(old, LEGACY, "current", legacy_storage(("b@muc.example", "Bee", True, "iv")), WHITELIST, "p3")
    got = events(new, BM2, 3)
    assert "<retract id='a@muc.example'/>" in got and "<retract id='c@muc.example'/>" in got
    assert "name='Bee'" in got
    items = get_items(new, "ivy@localhost", BM2, "i3")
    assert "a@muc.example" not in items and "name='Bee' autojoin='true'" in items
    # a private node: another account may not read it
    j = online(cd, "jon", "x", caps=False)
    assert "closed-node" in get_items(j, "ivy@localhost", LEGACY, "i4")
    # precondition mismatch, retract/delete/purge of the view: refused, nothing lost
    bad = publish(old, LEGACY, "current", legacy_storage(), {"pubsub#access_model": "open"}, "p4")
    assert "precondition-not-met" in bad
    for action, ns in (("<retract node='storage:bookmarks'><item id='current'/></retract>", PUBSUB),
                       ("<delete node='storage:bookmarks'/>", PUBSUB + "#owner"),
                       ("<purge node='storage:bookmarks'/>", PUBSUB + "#owner")):
        out = old.iq(f"<iq type='set' id='x'><pubsub xmlns='{ns}'>{action}</pubsub></iq>", "x")
        assert "<not-allowed" in out, out
    wrong = publish(old, LEGACY, "current", "<other xmlns='urn:test'/>", None, "p5")
    assert "bad-request" in wrong
    # over the node's max_items (8 here): refused whole, nothing evicted or retracted
    many = legacy_storage(*[(f"r{i}@muc.example", f"R{i}", False, "n") for i in range(9)])
    over = publish(old, LEGACY, "current", many, WHITELIST, "p6")
    assert "policy-violation" in over and "max-items-exceeded" in over
    assert "name='Bee'" in get_items(new, "ivy@localhost", BM2, "i5")
    # a new XEP-0048 PEP resource gets the list at login
    late = online(cd, "ivy", "late", notify=[LEGACY])
    assert "jid='b@muc.example' name='Bee'" in expect_event(late, LEGACY)
    # the private XML view is the same list, and a set there notifies the PEP view
    r = old.iq("<iq type='set' id='px'><query xmlns='jabber:iq:private'>"
               + legacy_storage(("d@muc.example", "D", False, "x")) + "</query></iq>", "px")
    assert "jid='d@muc.example'" in (r if f"node='{LEGACY}'" in r else expect_event(old, LEGACY))
    for c in (old, new, j, late):
        c.close()


def test_stored_legacy_node_merged_at_login(tmp_path):
    """A storage:bookmarks node kept by an xmppd without #compat-pep is not lost: its
    rooms join the XEP-0402 list at the owner's next login."""
    d = Daemon(tmp_path, plugins=[p for p in PLUGINS if p != BM2]).start()
    try:
        d.adduser("ivy@localhost", PW)
        c = online(d, "ivy", caps=False)
        publish(c, BM2, "keep@muc.example", f"<conference xmlns='{BM2}' name='Keep'/>",
                {"pubsub#max_items": "max", "pubsub#access_model": "whitelist"}, "p1")
        r = publish(c, LEGACY, "current", legacy_storage(("old@muc.example", "Old", True, "i"),
                                                         ("keep@muc.example", "X", False, "i")), WHITELIST)
        assert "type='result'" in r
        c.close()
        d.stop()
        d.write_config(plugins=PLUGINS)
        d.start()
        c = online(d, "ivy", caps=False)
        items = get_items(c, "ivy@localhost", BM2)
        assert "name='Old' autojoin='true'" in items and "name='Keep'" in items  # BM2 wins
        view = get_items(c, "ivy@localhost", LEGACY, "i2")
        assert view.count("<conference ") == 2
        c.close()
        assert "merged into urn:xmpp:bookmarks:1" in d.logtext()
    finally:
        d.stop()


def test_slixmpp_xep0048_over_pep(cd):
    """slixmpp xep_0048 with its xep_0223 (PEP) storage sees XEP-0402 bookmarks and back."""
    import asyncio

    from slixmpp.plugins.xep_0060.stanza import Item

    from tests.xmpp import connect, run

    plugins = ["xep_0030", "xep_0060", "xep_0163", "xep_0115", "xep_0402", "xep_0048", "xep_0223"]

    async def go():
        kim = await connect("kim@localhost/sx", PW, cd.port, plugins=plugins)
        item = Item()
        item["conference"]["name"] = "Lounge"
        item["conference"]["autojoin"] = True
        item["conference"]["nick"] = "kim"
        await kim.plugin["xep_0060"].publish(kim.boundjid.bare, BM2, id="lounge@muc.example",
                                             payload=item["conference"])
        got = await kim.plugin["xep_0048"].get_bookmarks(method="xep_0223")
        confs = got["pubsub"]["items"]["item"]["bookmarks"]["conferences"]
        assert [(str(c["jid"]), c["name"], c["nick"], c["autojoin"]) for c in confs] == \
            [("lounge@muc.example", "Lounge", "kim", True)]
        bookmarks = kim.plugin["xep_0048"].stanza.Bookmarks()
        bookmarks.add_conference("den@muc.example", "kimmy", name="Den", autojoin=False)
        await kim.plugin["xep_0048"].set_bookmarks(bookmarks, method="xep_0223")
        items = await kim.plugin["xep_0060"].get_items(kim.boundjid.bare, BM2)
        assert [i["id"] for i in items["pubsub"]["items"]] == ["den@muc.example"]
        assert items["pubsub"]["items"]["item"]["conference"]["nick"] == "kimmy"
        kim.disconnect()

    run(go(), timeout=30)


def test_no_legacy_notification_without_notify(cd):
    """A XEP-0402 change reaches no resource that did not ask for storage:bookmarks."""
    a = online(cd, "lee", "plain", notify=[])
    publish(a, BM2, "x@muc.example", f"<conference xmlns='{BM2}'/>",
            {"pubsub#access_model": "whitelist"}, "p")
    expect_no_event(a, LEGACY)
    sync(a)
    a.close()


# -- XEP-0398 -------------------------------------------------------------------

DATA = "urn:xmpp:avatar:data"
META = "urn:xmpp:avatar:metadata"
UPDATE = "vcard-temp:x:update"


def publish_avatar(c, image: bytes, ident: str, mime: str = "image/png", item_id: str | None = None) -> str:
    """XEP-0084: data, then metadata naming it; returns the metadata publish reply."""
    item_id = item_id or hashlib.sha1(image).hexdigest()
    r = publish(c, DATA, item_id, f"<data xmlns='{DATA}'>{base64.b64encode(image).decode()}</data>",
                None, ident + "d")
    assert "type='result'" in r, r
    return publish(c, META, item_id, f"<metadata xmlns='{META}'><info id='{item_id}' bytes='{len(image)}' "
                   f"type='{mime}'/><info id='x' url='https://example.org/a.png' type='image/png'/>"
                   f"</metadata>", None, ident + "m")


def vcard_of(c, owner: str, ident: str = "v") -> str:
    return c.iq(f"<iq type='get' id='{ident}' to='{owner}'><vCard xmlns='vcard-temp'/></iq>", ident)


def presence_from(c, full: str) -> str:
    return c.read_until(rf"<presence[^>]*from='{re.escape(full)}'[^>]*>.*?</presence>").decode()


def test_avatar_vcard_conversion_raw(cd):
    m = online(cd, "mia", "av", notify=[META])
    n = online(cd, "ned", "av", notify=[META])
    sync(m), sync(n)
    info = m.iq("<iq type='get' id='d' to='mia@localhost'><query "
                "xmlns='http://jabber.org/protocol/disco#info'/></iq>", "d")
    assert "var='urn:xmpp:pep-vcard-conversion:0'" in info
    # PEP -> vCard (the external-URL info is skipped)
    img = b"\x89PNG mia's first avatar"
    sha = hashlib.sha1(img).hexdigest()
    r = publish_avatar(m, img, "a1")
    assert "type='result'" in r, r
    assert f"<info id='{sha}'" in expect_event(n, META)
    card = vcard_of(n, "mia@localhost")
    assert f"<PHOTO><TYPE>image/png</TYPE><BINVAL>{base64.b64encode(img).decode()}</BINVAL></PHOTO>" in card
    # the hash in each available presence, broadcast and directed; the client's own <photo/> kept
    m.send("<presence><show>away</show></presence>")
    got = presence_from(n, "mia@localhost/av")
    assert f"<x xmlns='{UPDATE}'><photo>{sha}</photo></x>" in got, got
    m.send(f"<presence to='ned@localhost/av'><x xmlns='{UPDATE}'/></presence>")
    assert f"<photo>{sha}</photo>" in presence_from(n, "mia@localhost/av")
    m.send(f"<presence><x xmlns='{UPDATE}'><photo/></x></presence>")
    got = presence_from(n, "mia@localhost/av")
    assert "<photo/>" in got and sha not in got
    # vCard -> PEP: data (id = SHA-1) and metadata, with the notification
    img2 = b"GIF89a mia's second avatar"
    sha2 = hashlib.sha1(img2).hexdigest()
    r = m.iq(f"<iq type='set' id='vs'><vCard xmlns='vcard-temp'><FN>Mia</FN><PHOTO><TYPE>image/gif</TYPE>"
             f"<BINVAL>{base64.b64encode(img2).decode()}</BINVAL></PHOTO></vCard></iq>", "vs")
    assert "type='result'" in r
    ev = expect_event(n, META)
    assert f"<info id='{sha2}' bytes='{len(img2)}' type='image/gif'/>" in ev
    data = get_items(n, "mia@localhost", DATA, "gd")
    assert f"<item id='{sha2}'><data xmlns='{DATA}'>{base64.b64encode(img2).decode()}</data>" in data
    m.send("<presence/>")
    assert f"<photo>{sha2}</photo>" in presence_from(n, "mia@localhost/av")
    card = vcard_of(n, "mia@localhost", "v2")
    assert "<FN>Mia</FN>" in card and card.count("<PHOTO>") == 1
    # an id that is not the image's SHA-1, and an image over [vcard] max_size: PEP only
    r = publish_avatar(m, b"not what the id says", "a2", item_id="0" * 40)
    assert "type='result'" in r
    big = bytes(range(256)) * 13  # base64 over 4096 bytes
    r = publish_avatar(m, big, "a3")
    assert "type='result'" in r
    sync(m)
    assert base64.b64encode(img2).decode() in vcard_of(n, "mia@localhost", "v3")
    log = cd.logtext()
    assert "not an image with that SHA-1" in log and "larger than [vcard] max_size" in log
    # XEP-0084 "avatar disabled": the PHOTO goes, the rest stays
    r = publish(m, META, "current", f"<metadata xmlns='{META}'/>", None, "off")
    assert "type='result'" in r, r
    assert f"<metadata xmlns='{META}'/>" in expect_event(n, META)
    card = vcard_of(n, "mia@localhost", "v4")
    assert "<PHOTO>" not in card and "<FN>Mia</FN>" in card
    m.send("<presence/>")
    assert f"<x xmlns='{UPDATE}'><photo/></x>" in presence_from(n, "mia@localhost/av")
    # a vCard without a photo while PEP names one: empty metadata
    publish_avatar(m, img, "a4")
    assert f"<info id='{sha}'" in expect_event(n, META)
    m.iq("<iq type='set' id='vs2'><vCard xmlns='vcard-temp'><FN>Mia</FN></vCard></iq>", "vs2")
    ev = expect_event(n, META)
    assert f"<metadata xmlns='{META}'/>" in ev
    m.close()
    n.close()


def test_avatar_vcard_conversion_slixmpp(cd):
    """slixmpp: xep_0084 publish -> xep_0054 vCard; xep_0153 set_avatar -> xep_0084 avatar."""
    import asyncio

    from tests.xmpp import connect, run

    plugins = ["xep_0030", "xep_0060", "xep_0163", "xep_0115", "xep_0084", "xep_0054", "xep_0153"]

    async def go():
        pat = await connect("pat@localhost/sx", PW, cd.port, plugins=plugins, presence=False)
        avatars: asyncio.Queue = asyncio.Queue()
        pat.add_event_handler("avatar_metadata_publish", avatars.put_nowait)
        pat.send_presence()
        oz = await connect("oz@localhost/sx", PW, cd.port, plugins=plugins)
        await asyncio.sleep(0.5)  # caps resolution round trips
        data = b"\x89PNG oz by xep_0084"
        x84 = oz.plugin["xep_0084"]
        await x84.publish_avatar(data)
        await x84.publish_avatar_metadata([{"id": x84.generate_id(data), "type": "image/png",
                                            "bytes": len(data)}])
        await asyncio.wait_for(avatars.get(), 5)
        card = await pat.plugin["xep_0054"].get_vcard("oz@localhost")
        assert card["vcard_temp"]["PHOTO"]["BINVAL"] == data
        assert card["vcard_temp"]["PHOTO"]["TYPE"] == "image/png"
        data2 = b"GIF89a oz by xep_0153"
        await oz.plugin["xep_0153"].set_avatar(avatar=data2, mtype="image/gif")
        while True:  # oz's own notifications may come first
            msg = await asyncio.wait_for(avatars.get(), 5)
            info = msg["pubsub_event"]["items"]["item"]["avatar_metadata"]["info"]
            if info["id"] == x84.generate_id(data2):
                break
        assert info["type"] == "image/gif" and info["bytes"] == len(data2)
        got = await pat.plugin["xep_0084"].retrieve_avatar("oz@localhost", x84.generate_id(data2))
        assert got["pubsub"]["items"]["item"]["avatar_data"]["value"] == data2
        oz.disconnect()
        pat.disconnect()

    run(go(), timeout=40)

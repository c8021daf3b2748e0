"""Issue 15: PEP (XEP-0163) with caps-based notifications, access models, publish-options,
private XML and bookmarks compat, against the real daemon over TLS (raw XML and slixmpp)."""
from __future__ import annotations

import re

import pytest

from tests.daemon import Daemon
from tests.peptools import (
    PUBSUB, PW, expect_event, expect_no_event, get_items, online, own_event, publish, subscribe_both,
    sync,
)

USERS = ["alice", "bob", "carol", "dave", "erin", "frank", "gina", "hal"]
PLUGINS = ["roster", "presence", "disco", "ping", "offline", "urn:xmpp:blocking", "caps", "pep",
           "jabber:iq:private", "urn:xmpp:bookmarks:1"]
NODE = "urn:xmpp:test:mood"


@pytest.fixture(scope="module")
def pd(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("pep"), plugins=PLUGINS,
               extra="[pep]\nmax_nodes_per_user = 6\nmax_item_bytes = 2048\n").start()
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
    # quotas: item bytes, nodes per user
    big = publish(g, "urn:xmpp:test:big", "1", f"<x xmlns='urn:xmpp:test:big'>{'a' * 3000}</x>")
    assert "<not-acceptable" in big and "payload-too-big" in big
    outs = [publish(g, f"urn:xmpp:test:n{i}", "1", f"<x xmlns='urn:xmpp:test:n'/>", ident=f"n{i}")
            for i in range(8)]
    assert "policy-violation" in outs[-1] and "max-nodes-exceeded" in outs[-1]
    assert sum("type='result'" in o for o in outs) <= 6
    assert "item-required" in g.iq(f"<iq type='set' id='e1'><pubsub xmlns='{PUBSUB}'><publish "
                                   f"node='{node}'/></pubsub></iq>", "e1")
    g.close()

"""XEP-0115 caps resolution (xmppd.handlers.caps) and the IQ tracker, in process."""
from __future__ import annotations

import textwrap
import tomllib

from twisted.internet import task
from twisted.words.xish import domish

from xmppd import config as configlib
from xmppd import jid as jidlib
from xmppd.handlers.caps import CapsPlugin, caps_of, ver_of
from xmppd.handlers.presence import PresencePlugin
from xmppd.handlers.roster import RosterPlugin
from xmppd.iqtracker import IQTracker, TooManyRequests
from xmppd.router import Router
from xmppd.storage import MemoryStore
from xmppd.xmlparser import Limits, parse_fragment

J = jidlib.parse
LIMITS = Limits(65536)

SIMPLE = """<query xmlns='http://jabber.org/protocol/disco#info'>
<identity category='client' name='Exodus 0.9.1' type='pc'/>
<feature var='http://jabber.org/protocol/caps'/>
<feature var='http://jabber.org/protocol/disco#info'/>
<feature var='http://jabber.org/protocol/disco#items'/>
<feature var='http://jabber.org/protocol/muc'/></query>"""

COMPLEX = """<query xmlns='http://jabber.org/protocol/disco#info'>
<identity xml:lang='en' category='client' name='Psi 0.11' type='pc'/>
<identity xml:lang='el' category='client' name='\u03a8 0.11' type='pc'/>
<feature var='http://jabber.org/protocol/caps'/>
<feature var='http://jabber.org/protocol/disco#info'/>
<feature var='http://jabber.org/protocol/disco#items'/>
<feature var='http://jabber.org/protocol/muc'/>
<x xmlns='jabber:x:data' type='result'>
<field var='FORM_TYPE' type='hidden'><value>urn:xmpp:dataforms:softwareinfo</value></field>
<field var='ip_version'><value>ipv4</value><value>ipv6</value></field>
<field var='os'><value>Mac</value></field>
<field var='os_version'><value>10.5.1</value></field>
<field var='software'><value>Psi</value></field>
<field var='software_version'><value>0.11</value></field></x></query>"""


def test_verification_strings_of_the_xep_examples():
    assert ver_of(parse_fragment(SIMPLE, LIMITS), "sha-1") == "QgayPKawpkPSDYmwT/WM94uAlu0="
    assert ver_of(parse_fragment(COMPLEX, LIMITS), "sha-1") == "q07IKJEyjvHSyhy//CH0CxmKi8w="
    dup = SIMPLE.replace("</query>", "<feature var='http://jabber.org/protocol/muc'/></query>")
    assert ver_of(parse_fragment(dup, LIMITS), "sha-1") is None  # §5.4: duplicate feature


class FakeServer:
    def __init__(self, toml: str = "") -> None:
        data = tomllib.loads("[server]\nhosts = ['a.test']\n" + textwrap.dedent(toml))
        self.config = configlib.from_dict(data, "test.toml")
        self.router = Router(self.config.hosts)
        self.store = MemoryStore()
        self.clock = task.Clock()
        self.iq_tracker = IQTracker(self.router, self.clock, max_outstanding=8)
        self.router.iq_responses = self.iq_tracker.response
        self.plugins = []
        for cls in (RosterPlugin, PresencePlugin, CapsPlugin):
            p = cls()
            p.attach(self)
            self.plugins.append(p)

    def plugin(self, name):
        return next((p for p in self.plugins if p.name == name), None)


class FakeSession:
    def __init__(self, jid: str) -> None:
        self.jid = J(jid)
        self.available, self.priority, self.state = True, 0, {}
        self.sent = []

    def send(self, el):
        self.sent.append(el)

    def send_bytes(self, data):
        self.sent.append(data)


def setup(toml: str = ""):
    server = FakeServer(toml)
    session = FakeSession("u@a.test/r")
    server.router.bind(session)
    return server, server.plugin("caps"), session


def answer(server, query_iq, xml: str, sender: str = "u@a.test/r") -> bool:
    reply = domish.Element((None, "iq"))
    reply["type"] = "result"
    reply["id"] = query_iq["id"]
    reply.addChild(parse_fragment(xml, LIMITS))
    return server.router.iq_responses(reply, J(sender))


def test_one_query_per_ver_cached_after_a_matching_answer():
    server, caps, session = setup()
    got = []
    key = ("sha-1", "QgayPKawpkPSDYmwT/WM94uAlu0=")
    caps.when_known(key, "http://exodus", session.jid, got.append)
    caps.when_known(key, "http://exodus", session.jid, got.append)
    assert len(session.sent) == 1 and len(server.iq_tracker) == 1
    query = session.sent[0]
    assert query.firstChildElement()["node"] == "http://exodus#QgayPKawpkPSDYmwT/WM94uAlu0="
    assert not answer(server, query, SIMPLE, sender="other@a.test/x")  # only the asked JID answers
    assert answer(server, query, SIMPLE)
    assert len(got) == 2 and "http://jabber.org/protocol/muc" in got[0]
    caps.when_known(key, "http://exodus", session.jid, got.append)
    assert len(got) == 3 and len(session.sent) == 1  # from the cache, no query


def test_wrong_answer_not_cached_and_not_asked_again():
    server, caps, session = setup()
    got = []
    key = ("sha-1", "AAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    caps.when_known(key, "n", session.jid, got.append)
    answer(server, session.sent[0], SIMPLE)
    assert got == [] and caps.lookup(key) is None
    caps.when_known(key, "n", session.jid, got.append)
    assert len(session.sent) == 1


def test_bounds_queries_timeout_and_cache_size():
    server, caps, session = setup("[caps]\nmax_queries = 2\ncache_size = 16\nquery_timeout = 5\n")
    for i in range(3):
        caps.when_known(("sha-1", f"v{i}"), "n", session.jid, lambda f: None)
    assert len(session.sent) == 2  # the third is not asked
    server.clock.advance(6)
    assert len(server.iq_tracker) == 0 and caps.waiting == {}
    for i in range(20):
        caps.cache[("sha-1", f"c{i}")] = frozenset()  # the bound applies at the next insert
    caps.when_known(("sha-1", "QgayPKawpkPSDYmwT/WM94uAlu0="), "n", session.jid, lambda f: None)
    query = session.sent[-1]
    answer(server, query, SIMPLE)
    assert len(caps.cache) == 16 and ("sha-1", "c0") not in caps.cache


def test_broadcast_presence_records_caps_without_io():
    server, caps, session = setup()
    reads = []
    server.store.get = lambda *a, **k: reads.append(a)
    p = domish.Element((None, "presence"))
    c = p.addElement(("http://jabber.org/protocol/caps", "c"))
    c["hash"], c["node"], c["ver"] = "sha-1", "n", "QgayPKawpkPSDYmwT/WM94uAlu0="
    assert caps_of(p) == (("sha-1", "QgayPKawpkPSDYmwT/WM94uAlu0="), "n")
    caps._broadcast(session, p, None)
    assert session.state["caps"] == ("sha-1", "QgayPKawpkPSDYmwT/WM94uAlu0=") and reads == []
    caps._broadcast(session, p, "unavailable")
    assert "caps" not in session.state


def test_tracker_bound():
    router = Router(("a.test",))
    tracker = IQTracker(router, task.Clock(), max_outstanding=1)
    iq = domish.Element((None, "iq"))
    first = []
    tracker.request(iq, J("x@a.test/r")).addErrback(first.append)
    failed = []
    tracker.request(domish.Element((None, "iq")), J("x@a.test/r")).addErrback(failed.append)
    assert failed and failed[0].check(TooManyRequests)
    tracker.cancel_all()
    assert len(tracker) == 0 and len(first) == 1

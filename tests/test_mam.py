"""Issue 16: XEP-0313 message archive (with XEP-0441 preferences), over TLS against the daemon."""
from __future__ import annotations

import asyncio
import re
import sqlite3
import time

import pytest

from tests.daemon import Daemon
from tests.rawclient import RawClient
from tests.xmpp import connect, run

PW = "pw-secret"
MAM = "urn:xmpp:mam:2"
USERS = ["alice", "bob", "carol", "dave", "erin", "fil", "gus", "hal", "ivy", "jo", "kim",
         "lea", "max", "ned", "olga", "pia", "quin", "rita"]
PLUGINS = ["roster", "presence", "disco", "ping", "offline", "register", "urn:xmpp:blocking",
           "domain-filter", "urn:xmpp:sid:0", "urn:xmpp:carbons:2", "urn:xmpp:mam:2"]
EXTRA = """
[offline]
max_messages = 200

[mam]
flush_interval = 0.05
max_page = 50
max_ids = 5
retention = "forever"
"""


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def md(request, tmp_path_factory):
    # Twice: the archive in SQLite, and in PostgreSQL ([storage] backend =
    # "postgresql": batches and queries on the store's thread pool, issue 18).
    yield from mam_daemon(tmp_path_factory.mktemp("mam"), request.param)


def mam_daemon(tmp, store: str = "sqlite"):
    """The module's daemon and accounts (also on PostgreSQL: tests/test_store_async.py)."""
    d = Daemon(tmp, hosts=("localhost", "b.test"), plugins=PLUGINS, extra=EXTRA,
               store=store).prepare_store()
    for u in USERS:
        d.adduser(f"{u}@localhost", PW)
    d.adduser("bee@b.test", PW)
    d.ctl("filter", "fil@localhost", "OWN")  # fil takes nothing from other domains
    d.start()
    yield d
    d.stop()


def raw(d, user, resource="r", presence=True, host="localhost"):
    c = RawClient(d.port, host=host)
    c.login(user, PW, resource)
    if presence:
        c.send("<presence/>")
        c.read_until("<presence[^>]*/>|</presence>")
    return c


def send(c, to, body, ident, extra="", kind="chat"):
    body_xml = f"<body>{body}</body>" if body is not None else ""
    c.send(f"<message to='{to}' id='{ident}' type='{kind}'>{body_xml}{extra}</message>")


def form(**fields) -> str:
    out = [f"<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'>"
           f"<value>{MAM}</value></field>"]
    for var, value in fields.items():
        values = value if isinstance(value, list) else [value]
        out.append(f"<field var='{var.rstrip('_').replace('_', '-')}'>"
                   + "".join(f"<value>{v}</value>" for v in values) + "</field>")
    return "".join(out) + "</x>"


def rsm(max=None, after=None, before=None) -> str:
    out = ["<set xmlns='http://jabber.org/protocol/rsm'>"]
    if max is not None:
        out.append(f"<max>{max}</max>")
    if after is not None:
        out.append(f"<after>{after}</after>")
    if before is not None:
        out.append("<before/>" if before == "" else f"<before>{before}</before>")
    return "".join(out) + "</set>"


class Page:
    def __init__(self, text: str, qid: str) -> None:
        self.text = text
        results = re.findall(r"<message[^>]*><result xmlns='urn:xmpp:mam:2' queryid='"
                             + re.escape(qid) + r"' id='([^']+)'>(.*?)</result></message>", text)
        self.ids = [r[0] for r in results]
        self.bodies = [re.search(r"<body>([^<]*)</body>", r[1]).group(1)
                       if "<body>" in r[1] else None for r in results]
        self.stamps = [re.search(r"stamp='([^']+)'", r[1]).group(1) for r in results]
        self.raw = [r[1] for r in results]
        fin = re.search(r"<fin xmlns='urn:xmpp:mam:2'( complete='true')?>(.*?)</fin>", text)
        self.error = None if fin else text[text.rfind("<iq"):]
        self.complete = bool(fin and fin.group(1))
        set_ = fin.group(2) if fin else ""
        first = re.search(r"<first[^>]*>([^<]*)</first>", set_)
        last = re.search(r"<last>([^<]*)</last>", set_)
        count = re.search(r"<count>(\d+)</count>", set_)
        self.first = first.group(1) if first else None
        self.last = last.group(1) if last else None
        self.count = int(count.group(1)) if count else None


_qn = [0]


def query(c, fields="", paging="", extra="") -> Page:
    _qn[0] += 1
    qid = f"q{_qn[0]}"
    text = c.iq(f"<iq type='set' id='{qid}'><query xmlns='{MAM}' queryid='{qid}'>{fields}"
                f"{paging}{extra}</query></iq>", qid)
    return Page(text, qid)


def stanza_ids(text: str, by: str) -> list[str]:
    return re.findall(rf"<stanza-id xmlns='urn:xmpp:sid:0' by='{re.escape(by)}' id='([^']+)'/>", text)


def wait_archived(c, n, fields="", timeout=5.0) -> Page:
    """The archive is written in batches: poll until ``n`` results (queries flush anyway)."""
    deadline = time.monotonic() + timeout
    while True:
        page = query(c, fields, rsm(max=50))
        if len(page.ids) >= n or time.monotonic() > deadline:
            return page
        time.sleep(0.05)


# -- discovery ------------------------------------------------------------------------


def test_disco_features_and_form(md):
    a = raw(md, "alice", presence=False)
    info = a.iq("<iq type='get' id='d' to='alice@localhost'><query "
                "xmlns='http://jabber.org/protocol/disco#info'/></iq>", "d")
    assert f"<feature var='{MAM}'/>" in info and f"<feature var='{MAM}#extended'/>" in info
    fields = a.iq(f"<iq type='get' id='f'><query xmlns='{MAM}'/></iq>", "f")
    for var in ("FORM_TYPE", "with", "start", "end", "before-id", "after-id", "ids"):
        assert f"var='{var}'" in fields, fields
    # someone else's archive is not ours to read
    other = a.iq(f"<iq type='set' id='o' to='bob@localhost'><query xmlns='{MAM}'/></iq>", "o")
    assert "type='error'" in other and "<forbidden" in other
    a.close()


# -- archiving ----------------------------------------------------------------------------


def test_both_directions_with_stanza_ids_and_carbons(md):
    a = raw(md, "alice", "phone")
    a2 = raw(md, "alice", "desk")
    a2.iq("<iq type='set' id='cb'><enable xmlns='urn:xmpp:carbons:2'/></iq>", "cb")
    b = raw(md, "bob")
    send(a, "bob@localhost", "hi bob", "m1")
    got = b.read_until("</message>").decode()
    bob_id = stanza_ids(got, "bob@localhost")
    assert len(bob_id) == 1
    # XEP-0313 §3.5: the sender's archive id is not for the recipient...
    assert "by='alice@localhost'" not in got
    # ...but for the sender's other clients, in the sent carbon (not bob's id).
    carbon = a2.read_until("</sent></message>").decode()
    alice_id = stanza_ids(carbon, "alice@localhost")
    assert len(alice_id) == 1 and "by='bob@localhost'" not in carbon
    send(b, "alice@localhost/phone", "hi alice", "m2")
    got2 = a.read_until("</message>").decode()
    alice_in = stanza_ids(got2, "alice@localhost")
    pa = wait_archived(a, 2)
    assert pa.ids == alice_id + alice_in and pa.bodies == ["hi bob", "hi alice"]
    assert pa.complete and pa.count == 2 and pa.first == pa.ids[0] and pa.last == pa.ids[1]
    assert "<forwarded xmlns='urn:xmpp:forward:0'><delay xmlns='urn:xmpp:delay' stamp=" in pa.raw[0]
    assert "<message xmlns='jabber:client'" in pa.raw[0] and "from='alice@localhost/phone'" in pa.raw[0]
    pb = query(b)
    # bob's id of his own message went nowhere (he has no carbons): not to alice.
    assert "by='bob@localhost'" not in got2
    assert pb.ids[0] == bob_id[0] and len(set(pb.ids)) == 2 and pb.bodies == ["hi bob", "hi alice"]
    # A <stanza-id/> claiming alice's archive that alice's client made up is
    # removed (XEP-0359 §3.3): neither bob nor the carbon sees it.
    forged = "<stanza-id xmlns='urn:xmpp:sid:0' by='alice@localhost' id='forged'/>"
    send(a, "bob@localhost", "forged", "m3", extra=forged)
    got3 = b.read_until("forged</body>.*?</message>").decode()
    assert "by='alice@localhost'" not in got3 and len(stanza_ids(got3, "bob@localhost")) == 1
    carbon3 = a2.read_until("forged</body>.*?</sent></message>").decode()
    carbon3 = carbon3[carbon3.rindex("<sent "):]  # after the received copy of m2
    own3 = stanza_ids(carbon3, "alice@localhost")
    assert len(own3) == 1 and own3 != ["forged"]
    assert wait_archived(a, 3).ids[2:] == own3
    for c in (a, a2, b):
        c.close()


@pytest.fixture(scope="module")
def ninety_five(md):
    """carol sends dave 95 messages while dave is offline (offline storage)."""
    c = raw(md, "carol")
    for i in range(95):
        send(c, "dave@localhost", f"n{i}", f"n{i}")
    page = wait_archived(c, 50, form(with_="dave@localhost"))
    assert page.count == 95 or len(page.ids) == 50, page.text[-1500:]
    # Offline storage is a write per message (on PostgreSQL a round trip on
    # the pool): all of it stored before dave's initial presence reads it.
    deadline = time.monotonic() + 10
    while offline_rows(md, "dave@localhost") < 95:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield c
    c.close()


def test_offline_message_archived_once_with_the_same_ids(md, ninety_five):
    d = raw(md, "dave")  # initial presence: the 95 offline messages arrive
    text = d.read_until("n94</body>.*?</message>").decode()
    offline_ids = stanza_ids(text, "dave@localhost")
    assert len(offline_ids) == 95
    ids = []
    page = query(d, "", rsm(max=50))
    ids += page.ids
    page = query(d, "", rsm(max=50, after=page.last))
    ids += page.ids
    assert ids == offline_ids and page.complete  # archived once; same ids: dedupable
    d.close()


def test_paging_forwards_and_backwards_pages_of_10(md, ninety_five):
    d = raw(md, "dave", "pager", presence=False)
    everything = []
    after, pages = None, 0
    while True:
        page = query(d, form(with_="carol@localhost"), rsm(max=10, after=after))
        pages += 1
        assert page.count == 95 and page.error is None
        assert len(page.ids) == (10 if pages < 10 else 5)
        assert page.first == page.ids[0] and page.last == page.ids[-1]
        everything += page.ids
        assert page.complete == (pages == 10), pages
        if page.complete:
            break
        after = page.last
    assert len(everything) == 95 and len(set(everything)) == 95
    bodies_fw = []
    # backwards: <before/> is the last page, then before=first of each page
    backwards, before, pages = [], "", 0
    while True:
        page = query(d, form(with_="carol@localhost"), rsm(max=10, before=before))
        pages += 1
        assert len(page.ids) == (10 if pages < 10 else 5)
        backwards = page.ids + backwards
        bodies_fw = page.bodies + bodies_fw
        assert page.complete == (pages == 10), pages
        if page.complete:
            break
        before = page.first
    assert backwards == everything
    assert bodies_fw == [f"n{i}" for i in range(95)]
    # max is capped by max_page (50)
    assert len(query(d, "", rsm(max=1000)).ids) == 50
    d.close()


def test_ids_before_after_id_flip_and_unknown_ids(md, ninety_five):
    d = raw(md, "dave", "ids", presence=False)
    all_ids = query(d, "", rsm(max=50)).ids + []
    all_ids += query(d, "", rsm(max=50, after=all_ids[-1])).ids
    pick = [all_ids[7], all_ids[3], all_ids[60]]
    page = query(d, form(ids=pick))
    assert page.ids == [all_ids[3], all_ids[7], all_ids[60]] and page.complete
    page = query(d, form(after_id=all_ids[9], before_id=all_ids[15]))
    assert page.ids == all_ids[10:15] and page.count == 5
    page = query(d, form(after_id=all_ids[9]), rsm(max=3), "<flip-page/>")
    assert page.ids == list(reversed(all_ids[10:13]))
    for bad in (form(ids=[all_ids[0], "nope-1"]), form(after_id="unknown"),
                form(before_id=all_ids[0][:-1] + "zz")):
        page = query(d, bad)
        assert page.error and "<item-not-found" in page.error, page.text
    page = query(d, "", rsm(after="nonexistent-ff"))
    assert "<item-not-found" in page.error
    # another user's id is unknown in this archive
    carol_ids = query(ninety_five, "", rsm(max=1)).ids
    assert "<item-not-found" in query(d, form(ids=carol_ids)).error
    # limits: too many ids
    page = query(d, form(ids=all_ids[:6]))
    assert "<policy-violation" in page.error
    d.close()


def test_with_bare_full_start_end(md):
    e = raw(md, "erin", "home")
    k = raw(md, "kim", "one")
    k2 = raw(md, "kim", "two")
    for i in range(3):
        send(k, "erin@localhost", f"k1-{i}", f"a{i}")
        e.read_until(f"k1-{i}")  # each delivered before the next: a known archive order
        send(k2, "erin@localhost", f"k2-{i}", f"b{i}")
        e.read_until(f"k2-{i}")
        send(e, "kim@localhost/one", f"e-{i}", f"c{i}")
        k.read_until(f"e-{i}")
        time.sleep(0.01)  # distinct archive times for start/end
    page = wait_archived(e, 9)
    assert len(page.ids) == 9
    assert query(e, form(with_="kim@localhost")).bodies == page.bodies
    full = query(e, form(with_="kim@localhost/two"))
    assert full.bodies == ["k2-0", "k2-1", "k2-2"]
    one = query(e, form(with_="Kim@LOCALHOST/one"))  # prepared like any JID
    assert one.bodies == ["k1-0", "e-0", "k1-1", "e-1", "k1-2", "e-2"]
    start, end = page.stamps[3], page.stamps[5]
    assert query(e, form(start=start)).bodies == page.bodies[3:]
    assert query(e, form(end=end)).bodies == page.bodies[:6]
    assert query(e, form(start=start, end=end)).bodies == page.bodies[3:6]
    assert query(e, form(start="2100-01-01T00:00:00Z")).ids == []
    bad = query(e, form(start="yesterday"))
    assert "<bad-request" in bad.error
    for c in (e, k, k2):
        c.close()


def test_no_store_hints_errors_and_headlines(md):
    p = raw(md, "pia")
    q = raw(md, "quin")
    send(p, "quin@localhost", "keep-1", "h1")
    send(p, "quin@localhost", "nostore", "h2", "<no-store xmlns='urn:xmpp:hints'/>")
    send(p, "quin@localhost", "noperm", "h3", "<no-permanent-store xmlns='urn:xmpp:hints'/>")
    send(p, "quin@localhost", None, "h4", "<active xmlns='http://jabber.org/protocol/chatstates'/>")
    send(p, "quin@localhost", None, "h5", "<store xmlns='urn:xmpp:hints'/><x xmlns='urn:example'/>")
    send(p, "quin@localhost", "headline", "h6", kind="headline")
    send(p, "quin@localhost", "err", "h7", kind="error")
    send(p, "quin@localhost", "keep-2", "h8")
    q.read_until("keep-2")
    page = wait_archived(p, 3)
    assert page.bodies == ["keep-1", None, "keep-2"]
    assert "id='h5'" in page.raw[1]
    assert query(q).bodies == ["keep-1", None, "keep-2"]
    p.close()
    q.close()


def test_message_to_no_account_bounces_and_is_not_archived(md):
    o = raw(md, "rita")
    send(o, "ghost@localhost", "to-nobody", "g1")
    reply = o.read_until("</message>").decode()
    assert "type='error'" in reply and "service-unavailable" in reply
    send(o, "alice@localhost", "to-alice", "g2")
    wait_archived(o, 1)
    time.sleep(0.2)  # a few flush intervals: the bounced one would be there by now
    assert query(o).bodies == ["to-alice"]
    o.close()


def test_blocked_and_domain_filtered_not_archived(md):
    jo = raw(md, "jo")
    lea = raw(md, "lea")
    jo.iq("<iq type='set' id='blk'><block xmlns='urn:xmpp:blocking'>"
          "<item jid='lea@localhost'/></block></iq>", "blk")
    send(lea, "jo@localhost", "blocked-in", "x1")   # lea -> jo: refused
    send(jo, "lea@localhost", "blocked-out", "x2")  # jo -> lea: refused
    send(jo, "alice@localhost", "jo-ok", "x3")
    lea.read_until("</error></message>")
    jo.read_until("</error></message>")
    assert wait_archived(jo, 1).bodies == ["jo-ok"]
    assert query(lea).bodies == []
    # domain filter: fil takes nothing from b.test
    bee = raw(md, "bee", host="b.test")
    fil = raw(md, "fil")
    send(bee, "fil@localhost", "filtered", "y1")
    send(bee, "alice@localhost", "bee-ok", "y2")
    bee.read_until("</error></message>")
    assert wait_archived(bee, 1).bodies == ["bee-ok"]
    assert query(fil).bodies == []
    for c in (jo, lea, bee, fil):
        c.close()


def test_preferences_always_never_roster_and_jid_preparation(md):
    g = raw(md, "gus")
    h, i, m = raw(md, "hal"), raw(md, "ivy"), raw(md, "max")
    reply = g.iq(f"<iq type='get' id='p0'><prefs xmlns='{MAM}'/></iq>", "p0")
    assert "default='always'" in reply
    # never by default; always for hal, given unprepared
    reply = g.iq(f"<iq type='set' id='p1'><prefs xmlns='{MAM}' default='never'><always>"
                 f"<jid>Hal@LOCALHOST</jid></always><never/></prefs></iq>", "p1")
    assert "type='result'" in reply and "<jid>hal@localhost</jid>" in reply
    send(h, "gus@localhost", "from-hal", "p1")
    g.read_until("from-hal")  # one connection after the other: a known archive order
    send(i, "gus@localhost", "from-ivy", "p2")
    g.read_until("from-ivy")
    send(g, "hal@localhost/r", "to-hal", "p3")
    send(g, "ivy@localhost", "to-ivy", "p4")
    assert wait_archived(g, 2).bodies == ["from-hal", "to-hal"]
    # the other side's archive follows the other side's preferences
    assert query(i).bodies == ["from-ivy", "to-ivy"]
    # roster: ivy in gus' roster, max not; max also in never (never wins over roster)
    g.iq("<iq type='set' id='r1'><query xmlns='jabber:iq:roster'><item jid='ivy@localhost'/>"
         "</query></iq>", "r1")
    reply = g.iq(f"<iq type='set' id='p2'><prefs xmlns='{MAM}' default='roster'><always/>"
                 f"<never><jid>hal@localhost</jid></never></prefs></iq>", "p2")
    assert "type='result'" in reply
    for c, body in ((i, "ivy-roster"), (m, "max-stranger"), (h, "hal-never")):
        send(c, "gus@localhost", body, body)
        g.read_until(body)
    assert wait_archived(g, 3).bodies == ["from-hal", "to-hal", "ivy-roster"]
    reply = g.iq(f"<iq type='get' id='p3'><prefs xmlns='{MAM}'/></iq>", "p3")
    assert "default='roster'" in reply and "<never><jid>hal@localhost</jid></never>" in reply
    bad = g.iq(f"<iq type='set' id='p4'><prefs xmlns='{MAM}' default='sometimes'/></iq>", "p4")
    assert "<bad-request" in bad
    for c in (g, h, i, m):
        c.close()


def offline_rows(d, user):
    if d.pg_dsn is not None:
        with d.pg.connect(d.pg_dsn.rsplit("/", 1)[1]) as conn:
            return conn.execute("SELECT count(*) FROM kv WHERE store = 'offline' AND username = %s",
                                (user,)).fetchone()[0]
    from xmppd.storage import SQLiteStore

    store = SQLiteStore(str(d.data_dir), read_only=True)
    try:
        return len(store.items("offline", user))
    finally:
        store.close()


def archive_rows(d, user):
    if d.pg_dsn is not None:
        with d.pg.connect(d.pg_dsn.rsplit("/", 1)[1]) as conn:
            return conn.execute("SELECT count(*) FROM archive WHERE username = %s",
                                (user,)).fetchone()[0]
    db = sqlite3.connect(f"file:{d.data_dir}/archive.sqlite3?mode=ro", uri=True)
    try:
        return db.execute("SELECT coalesce(sum(b.n), 0) FROM blocks b JOIN jids j ON j.id=b.uid"
                          " WHERE j.jid=?", (user,)).fetchone()[0]
    finally:
        db.close()


def test_purge_command(md):
    n = raw(md, "ned")
    o = raw(md, "olga")
    for i in range(4):
        send(n, "olga@localhost", f"old-{i}", f"o{i}")
    first = wait_archived(n, 4)
    time.sleep(0.05)
    for i in range(2):
        send(n, "olga@localhost", f"new-{i}", f"w{i}")
    assert len(wait_archived(n, 6).ids) == 6
    out = md.ctl("mam", "purge", "ned@localhost", "--before", wait_archived(n, 6).stamps[4]).stdout
    assert "deleted 4" in out
    assert query(n).bodies == ["new-0", "new-1"]
    assert query(o).bodies == [f"old-{i}" for i in range(4)] + ["new-0", "new-1"]
    out = md.ctl("mam", "purge", "Olga@localhost").stdout
    assert "deleted 6" in out and query(o).ids == []
    bad = md.ctl("mam", "purge", "nobody@elsewhere.test", check=False)
    assert bad.returncode != 0 and "not an account" in bad.stderr
    assert first.ids
    n.close()
    o.close()


def test_account_deletion_removes_archive(md):
    a = raw(md, "alice", "x")
    assert query(a).ids  # alice has history from earlier tests
    assert archive_rows(md, "alice@localhost") > 0
    md.ctl("deluser", "alice@localhost")
    a.close()
    assert archive_rows(md, "alice@localhost") == 0
    # in-band removal (XEP-0077) too
    b = raw(md, "bob", "x")
    assert query(b).ids
    reply = b.iq("<iq type='set' id='rm'><query xmlns='jabber:iq:register'><remove/></query></iq>",
                 "rm")
    assert "type='result'" in reply
    b.close()
    assert archive_rows(md, "bob@localhost") == 0
    md.adduser("alice@localhost", PW)
    a = raw(md, "alice", "y")
    assert query(a).ids == []
    a.close()


def test_slixmpp_xep_0313(md):
    async def scenario():
        sender = await connect("olga@localhost", PW, md.port, plugins=["xep_0313"])
        receiver = await connect("max@localhost", PW, md.port, plugins=["xep_0313"])
        for i in range(12):
            sender.send_message(mto="max@localhost", mbody=f"sx{i}", mtype="chat")
        for _ in range(12):
            await receiver.next_message()
        await asyncio.sleep(0.2)
        got = [m async for m in receiver.plugin["xep_0313"].iterate(
            with_jid="olga@localhost", rsm={"max": 5})]
        bodies = [m["mam_result"]["forwarded"]["stanza"]["body"] for m in got]
        assert bodies == [f"sx{i}" for i in range(12)]
        newest = [m async for m in receiver.plugin["xep_0313"].iterate(
            with_jid="olga@localhost", reverse=True, rsm={"max": 5}, total=5)]
        assert [m["mam_result"]["forwarded"]["stanza"]["body"] for m in newest] == \
            [f"sx{i}" for i in range(11, 6, -1)]
        sender.disconnect()
        receiver.disconnect()

    run(scenario())


# -- retention and quota: a daemon of their own ----------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def rd(request, tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("mamret"), plugins=PLUGINS, store=request.param, extra="""
[mam]
flush_interval = 0.05
retention = "3s"
retention_interval = 0.5
max_messages_per_user = 10
""")
    for u in ("ret1", "ret2", "quo1", "quo2"):
        d.adduser(f"{u}@localhost", PW)
    d.start()
    yield d
    d.stop()


def test_retention_job_deletes_exactly_what_is_past_its_age(rd):
    a, b = raw(rd, "ret1"), raw(rd, "ret2")
    for i in range(3):
        send(a, "ret2@localhost", f"old-{i}", f"o{i}")
    assert len(wait_archived(a, 3).ids) == 3
    time.sleep(1.8)
    for i in range(2):
        send(a, "ret2@localhost", f"young-{i}", f"y{i}")
    assert len(wait_archived(a, 5).ids) == 5
    deadline = time.monotonic() + 6
    while True:
        page = query(a)
        if "old-0" not in page.bodies:
            break
        assert time.monotonic() < deadline, page.bodies
        time.sleep(0.1)
    # the old ones went in one job run; the young ones (1.8 s younger) are all there
    assert page.bodies == ["young-0", "young-1"]
    assert query(b).bodies == ["young-0", "young-1"]
    assert "archive retention: deleted 6 messages older than" in rd.logtext()
    out = rd.ctl("mam", "expire").stdout
    assert "deleted" in out
    a.close()
    b.close()


def test_quota_keeps_the_newest(rd):
    a, b = raw(rd, "quo1"), raw(rd, "quo2")
    for i in range(15):
        send(a, "quo2@localhost", f"q{i}", f"q{i}")
    b.read_until("q14</body>")
    time.sleep(0.2)
    page = query(a)
    assert page.bodies == [f"q{i}" for i in range(5, 15)]
    assert query(b).bodies == [f"q{i}" for i in range(5, 15)]
    log = rd.logtext()
    assert log.count("archive of quo1@localhost is full (10 messages)") == 1
    a.close()
    b.close()


def test_purge_and_expire_with_the_server_stopped(rd):
    """xmppctl opens the archive itself (the file, or the PostgreSQL table)."""
    rd.stop()
    for user in ("quo1@localhost", "quo2@localhost"):
        before = archive_rows(rd, user)  # retention (3 s) may have taken some
        out = rd.ctl("mam", "purge", user).stdout
        assert f"deleted {before} archived messages of {user}" in out
        assert archive_rows(rd, user) == 0
    assert re.search(r"deleted \d+ archived messages past the retention period",
                     rd.ctl("mam", "expire").stdout)


def test_kill_9_keeps_what_was_written_and_a_sound_file(tmp_path):
    """A crash loses at most the rows of one flush_interval; committed ones stay,
    the file passes SQLite's integrity check, and a message between two local
    users is stored once for both archives."""
    from xmppd.msglog import LogQuery, SQLiteMessageLog

    d = Daemon(tmp_path, plugins=PLUGINS, extra=EXTRA.replace("flush_interval = 0.05",
                                                              "flush_interval = 0.05\n"
                                                              "checkpoint_interval = 0.1"))
    for u in ("ann", "ben"):
        d.adduser(f"{u}@localhost", PW)
    d.start()
    try:
        a, b = raw(d, "ann"), raw(d, "ben")
        for i in range(20):
            send(a, "ben@localhost", f"crash-{i}", f"c{i}")
        b.read_until("crash-19")
        time.sleep(0.3)  # several flush intervals: all of it committed
        d.proc.kill()
        d.proc.wait()
    finally:
        d.stop()
    db = sqlite3.connect(f"file:{d.data_dir}/archive.sqlite3?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = b"".join(d for (d,) in db.execute("SELECT data FROM chunks"))
        for i in range(20):  # once for both archives
            assert stored.count(f"<body>crash-{i}</body>".encode()) == 1
    finally:
        db.close()
    log = SQLiteMessageLog(d.data_dir, create=False)
    try:
        for user in ("ann@localhost", "ben@localhost"):
            rows = log.query(LogQuery(user, limit=50))
            assert [r.stanza.count(b"crash-") for r in rows] == [1] * 20
            assert b"<body>crash-0</body>" in rows[0].stanza
    finally:
        log.close()


def test_start_up_refuses_an_archive_of_the_first_layout(tmp_path):
    """Schema 1 (never released) is not misread: one line, and the file is left alone."""
    d = Daemon(tmp_path, plugins=PLUGINS, extra=EXTRA)
    d.data_dir.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(d.data_dir / "archive.sqlite3")
    db.execute("CREATE TABLE archive (seq INTEGER PRIMARY KEY, uid INTEGER NOT NULL)")
    db.commit()
    db.close()
    with pytest.raises(RuntimeError):
        d.start()
    d.stop()
    lines = [line for line in d.logtext().splitlines() if "archive" in line]
    assert lines == [f"xmppd: {d.data_dir}/archive.sqlite3: open archive: written with archive"
                     " schema 1, this xmppd reads schema 3: move the file away (it is not"
                     " converted)"]


def test_archive_in_the_store_dir_and_refused_on_sqlite_in_a_cluster(tmp_path):
    """Issue 18: archive.sqlite3 lives beside the store ([storage] dir, which a
    cluster's nodes share), and a cluster on SQLite does not start MAM (its
    nodes would share one file and one seq space): one line says what to do."""
    shared = tmp_path / "shared"
    d = Daemon(tmp_path / "solo", plugins=PLUGINS, extra=EXTRA + f'\n[storage]\ndir = "{shared}"\n')
    d.adduser("sol@localhost", PW)
    d.start()
    try:
        c = raw(d, "sol")
        send(c, "sol@localhost/other", "to-myself", "m1")
        assert wait_archived(c, 1).bodies == ["to-myself"]
        c.close()
    finally:
        d.stop()
    assert (shared / "archive.sqlite3").is_file()
    assert not (d.data_dir / "archive.sqlite3").exists()
    n = Daemon(tmp_path / "node", plugins=PLUGINS, extra=EXTRA + f"""
[storage]
dir = "{shared}"

[cluster]
redis = "redis://127.0.0.1:9"
node = "n1"
""")
    with pytest.raises(RuntimeError):
        n.start()
    n.stop()
    lines = [line for line in n.logtext().splitlines() if "mam.storage" in line]
    assert len(lines) == 1 and lines[0].endswith(
        "mam.storage = 'sqlite': a cluster's nodes archive into PostgreSQL: set [storage] backend"
        ' = "postgresql" (docs/mam.rst, "Clusters"), or remove urn:xmpp:mam:2 from [sm] plugins'), \
        lines


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_preferences_not_in_memory_are_read_before_archiving(tmp_path, store):
    """A recipient with stored preferences and no session, after a restart (nothing
    cached): the archive waits for their preferences and roster entry (PostgreSQL
    reads are asynchronous) instead of leaving the message out."""
    d = Daemon(tmp_path, plugins=PLUGINS, extra=EXTRA, store=store)
    for u in ("pat", "quin", "rex"):
        d.adduser(f"{u}@localhost", PW)
    d.start()
    try:
        p = raw(d, "pat")
        p.iq("<iq type='set' id='r1'><query xmlns='jabber:iq:roster'>"
             "<item jid='quin@localhost'/></query></iq>", "r1")
        reply = p.iq(f"<iq type='set' id='p1'><prefs xmlns='{MAM}' default='roster'><always/>"
                     f"<never/></prefs></iq>", "p1")
        assert "type='result'" in reply
        p.close()
        d.stop()
        d.start()  # pat's preferences and roster are only in the store now
        q, r = raw(d, "quin"), raw(d, "rex")
        send(q, "pat@localhost", "from-contact", "m1")
        send(r, "pat@localhost", "from-stranger", "m2")
        # each sender's own archive (default always) shows the message went through
        assert wait_archived(q, 1).bodies == ["from-contact"]
        assert wait_archived(r, 1).bodies == ["from-stranger"]
        time.sleep(0.3)  # a few flush intervals for the recipient's row
        p = raw(d, "pat", presence=False)
        assert wait_archived(p, 1).bodies == ["from-contact"]
        time.sleep(0.2)
        assert query(p).bodies == ["from-contact"]  # the stranger's stays out (roster)
        for c in (p, q, r):
            c.close()
    finally:
        d.stop()

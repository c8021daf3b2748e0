"""Issue 14: XEP-0198 stream management, raw XML over TLS and slixmpp, against the daemon."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.daemon import REPO, Daemon
from tests.rawclient import RawClient
from tests.xmpp import connect, run

PW = "pw-secret"
SM = "urn:xmpp:sm:3"
PLUGINS = ["roster", "presence", "disco", "ping", "offline", "urn:xmpp:sid:0",
           "urn:xmpp:carbons:2", "urn:xmpp:csi:0", "urn:xmpp:sm:3"]
RESUME_TIMEOUT = 1.5
CONFIG = f"""
[stream-management]
resume_timeout = {RESUME_TIMEOUT}
max_unacked = 50
request_every = 3
max_detached_per_account = 2

[offline]
max_messages = 1000
"""
USERS = ["alice", "bob", "carol", "dave", "erin", "frank", "gina", "hank", "ivan", "judy"]


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("sm"), plugins=PLUGINS, extra=CONFIG).start()
    for u in USERS:
        d.adduser(f"{u}@localhost", PW)
    yield d
    d.stop()


def authed(d, user):
    """TLS + SASL; returns the client and the features after authentication."""
    c = RawClient(d.port)
    c.open_stream()
    c.starttls()
    c.open_stream()
    assert b"<success" in c.auth_plain(user, PW)
    return c, c.open_stream().decode()


def sm_login(d, user, resource="r", resume=True, presence=True):
    c, features = authed(d, user)
    assert f"<sm xmlns='{SM}'/>" in features, features
    c.bind(resource)
    c.send(f"<enable xmlns='{SM}'{' resume=' + repr('true') if resume else ''}/>")
    enabled = c.read_until("<enabled[^>]*/>").decode()
    previd = re.search(r"id='([^']+)'", enabled)
    if resume:
        assert "resume='true'" in enabled and f"max='{int(RESUME_TIMEOUT)}'" in enabled
    if presence:
        c.send("<presence/>")
        c.read_until("<presence[^>]*/>|</presence>")
    return c, previd.group(1) if previd else None


def plain_login(d, user, resource="p", presence=True):
    c = RawClient(d.port)
    c.login(user, PW, resource)
    if presence:
        c.send("<presence/>")
        c.read_until("<presence[^>]*/>|</presence>")
    return c


def burst(c, to, ids):
    c.send("".join(f"<message to='{to}' id='{i}' type='chat'><body>body-{i}</body></message>"
                   for i in ids))


def message_ids(data: bytes | str) -> list[str]:
    text = data.decode() if isinstance(data, bytes) else data
    return re.findall(r"<message[^>]* id='([^']+)'", text)


def drop(c):
    """The client's connection vanishes (no </stream:stream>)."""
    c.sock.close()


def test_enable_counting_and_acks(d):
    a, _ = sm_login(d, "alice", resume=False)
    b = plain_login(d, "bob")
    # the server asks for an ack every request_every = 3 stanzas (the
    # presence echo was the first)
    burst(b, "alice@localhost/r", ["e1", "e2", "e3"])
    got = a.read_until("id='e3'.*?</message>").decode()
    assert message_ids(got) == ["e1", "e2", "e3"]
    assert re.search(f"id='e2'.*?</message><r xmlns='{SM}'/><message", got), got
    # our h counts the stanzas we sent since <enable/> (presence + 2 IQs)
    assert "type='result'" in a.iq("<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>", "p1")
    assert "type='result'" in a.iq("<iq type='get' id='p2'><ping xmlns='urn:xmpp:ping'/></iq>", "p2")
    a.send(f"<r xmlns='{SM}'/>")
    assert f"<a xmlns='{SM}' h='3'/>" in a.read_until("<a [^>]*/>").decode()
    a.send(f"<a xmlns='{SM}' h='2'/>")
    # enabling twice is refused
    a.send(f"<enable xmlns='{SM}'/>")
    assert "<unexpected-request" in a.read_until("</failed>").decode()
    # acknowledging more than was sent (1 presence echo + 3 messages + 2 IQ results) ends the stream
    a.send(f"<a xmlns='{SM}' h='99'/>")
    end = a.read_all(timeout=3).decode()
    assert "<undefined-condition" in end and f"<handled-count-too-high xmlns='{SM}' h='99'" in end
    b.close()


def test_failed_conditions_before_bind_and_without_enable(d):
    c, _ = authed(d, "alice")
    c.send(f"<enable xmlns='{SM}'/>")  # before resource binding
    assert "<unexpected-request" in c.read_until("</failed>").decode()
    c.bind("late")
    c.send(f"<resume xmlns='{SM}' previd='x' h='0'/>")  # after binding
    assert "<unexpected-request" in c.read_until("</failed>").decode()
    c.send(f"<r xmlns='{SM}'/>")  # SM not enabled
    assert "<unsupported-stanza-type" in c.read_all(timeout=3).decode()


def test_resume_resends_exactly_the_unacked_in_order(d):
    a, previd = sm_login(d, "carol", "phone")
    b = plain_login(d, "bob")
    a.send("<presence to='bob@localhost'/>")  # directed: bob would see carol go offline
    b.read_until("<presence[^>]*from='carol@localhost/phone'")
    burst(b, "carol@localhost/phone", ["m1", "m2", "m3", "m4", "m5"])
    assert message_ids(a.read_until("id='m5'.*?</message>")) == ["m1", "m2", "m3", "m4", "m5"]
    # carol got them all but acknowledged only 3 stanzas (1 presence + m1, m2)
    a.send(f"<a xmlns='{SM}' h='3'/>")
    assert "type='result'" in a.iq("<iq type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>", "p")
    drop(a)
    time.sleep(0.3)
    # detached: still online for routing, no bounce, no unavailable presence
    burst(b, "carol@localhost/phone", ["m6"])
    burst(b, "carol@localhost", ["m7"])
    assert not re.search(rb"type='error'|type='unavailable'", b.read_all(timeout=0.5))
    # a new TCP connection, TLS, SASL as carol, then <resume/> (h: carol handled 4)
    n, features = authed(d, "carol")
    n.send(f"<resume xmlns='{SM}' previd='{previd}' h='4'/>")
    resumed = n.read_until("<resumed[^>]*/>").decode()
    assert f"previd='{previd}'" in resumed and "h='3'" in resumed  # 2 presences + ping
    # m3 was acked by h=4 (presence, m1, m2, m3); the rest comes again in order
    again = n.read_until("id='m7'.*?</message>")
    assert message_ids(again) == ["m4", "m5", "m6", "m7"], again
    assert b"id='p'" in again  # the ping result too, in its place
    # the resumed session is the same one: it can send and is still carol/phone
    n.send("<message to='bob@localhost' id='back' type='chat'><body>back</body></message>")
    assert "from='carol@localhost/phone'" in b.read_until("id='back'.*?</message>").decode()
    n.send(f"<a xmlns='{SM}' h='9'/>")  # everything: no stream error follows
    n.send("</stream:stream>")
    assert b"stream:error" not in n.read_all(timeout=2)
    b.close()


def test_resume_takes_over_a_connection_not_yet_noticed_dead(d):
    a, previd = sm_login(d, "erin", "tab")
    b = plain_login(d, "bob")
    burst(b, "erin@localhost/tab", ["w1", "w2"])
    a.read_until("id='w2'.*?</message>")
    n, _ = authed(d, "erin")  # the old connection is still open
    n.send(f"<resume xmlns='{SM}' previd='{previd}' h='0'/>")
    n.read_until("<resumed[^>]*/>")
    again = n.read_until("id='w2'.*?</message>")
    assert message_ids(again) == ["w1", "w2"]
    a.read_all(timeout=2)  # the old connection was dropped (aborted)
    # one session: no unavailable presence, the new stream receives
    burst(b, "erin@localhost/tab", ["w3"])
    assert message_ids(n.read_until("id='w3'.*?</message>")) == ["w3"]
    assert b"unavailable" not in b.read_all(timeout=0.3)
    n.send(f"<a xmlns='{SM}' h='4'/></stream:stream>")
    assert b"stream:error" not in n.read_all(timeout=2)
    b.close()


def test_inactive_session_held_stanzas_survive_detach_and_resume(d):
    a, previd = sm_login(d, "alice", "csi")
    b = plain_login(d, "bob")
    a.send("<inactive xmlns='urn:xmpp:csi:0'/>")
    assert "type='result'" in a.iq("<iq type='get' id='pp'><ping xmlns='urn:xmpp:ping'/></iq>", "pp")
    b.send("<presence to='alice@localhost/csi'><status>held-status</status></presence>")
    time.sleep(0.3)
    assert b"held-status" not in a.read_all(timeout=0.3)
    drop(a)
    time.sleep(0.2)
    n, _ = authed(d, "alice")
    n.send(f"<resume xmlns='{SM}' previd='{previd}' h='2'/>")  # echo + ping result
    n.read_until("<resumed[^>]*/>")
    assert b"held-status" in n.read_until("held-status.*?</presence>")
    # the new connection starts active: presence passes at once
    b.send("<presence to='alice@localhost/csi'><status>live-status</status></presence>")
    assert b"live-status" in n.read_until("live-status.*?</presence>")
    n.send("</stream:stream>")
    n.read_all(timeout=2)
    b.close()


def test_resume_refused_for_other_account_and_after_timeout(d):
    a, previd = sm_login(d, "dave")
    b = plain_login(d, "bob")
    a.send("<presence to='bob@localhost'/>")
    b.read_until("<presence[^>]*from='dave@localhost/r'")
    drop(a)
    time.sleep(0.2)
    # erin may not resume dave's session
    e, _ = authed(d, "erin")
    e.send(f"<resume xmlns='{SM}' previd='{previd}' h='0'/>")
    failed = e.read_until("</failed>").decode()
    assert "<item-not-found" in failed and " h=" not in failed
    e.bind("e")  # and the stream goes on normally
    e.close()
    # dave's presence goes unavailable only when the session expires
    assert b"unavailable" not in b.read_all(timeout=0.5)
    got = b.read_until("<presence[^>]*type='unavailable'[^>]*>", timeout=RESUME_TIMEOUT + 5)
    assert re.search(rb"<presence[^>]*from='dave@localhost/r'[^>]*>$", got), got
    late, _ = authed(d, "dave")
    late.send(f"<resume xmlns='{SM}' previd='{previd}' h='0'/>")
    failed = late.read_until("</failed>").decode()
    assert "<item-not-found" in failed and " h='2'" in failed  # dave's last h: his two presences
    late.close()
    b.close()


def test_detached_sessions_per_account_are_bounded(d):
    sessions = [sm_login(d, "ivan", f"r{i}") for i in range(3)]
    for c, _ in sessions:
        drop(c)
        time.sleep(0.1)  # detached in this order
    time.sleep(0.3)
    first, _ = authed(d, "ivan")  # max_detached_per_account = 2: the oldest ended
    first.send(f"<resume xmlns='{SM}' previd='{sessions[0][1]}' h='1'/>")
    assert "<item-not-found" in first.read_until("</failed>").decode()
    last, _ = authed(d, "ivan")
    last.send(f"<resume xmlns='{SM}' previd='{sessions[2][1]}' h='1'/>")
    assert f"previd='{sessions[2][1]}'" in last.read_until("<resumed[^>]*/>").decode()
    for c in (first, last):
        c.close()


def test_unacked_at_expiry_stored_offline_delivered_once(d):
    a, _ = sm_login(d, "gina")
    b = plain_login(d, "bob")
    burst(b, "gina@localhost/r", ["o1", "o2", "o3"])
    a.read_until("id='o3'.*?</message>")
    a.send(f"<a xmlns='{SM}' h='1'/>")  # the presence only
    time.sleep(0.2)
    drop(a)
    time.sleep(RESUME_TIMEOUT + 1.0)
    c = plain_login(d, "gina", "again", presence=False)
    c.send("<presence/>")
    got = c.read_until("id='o3'.*?</message>").decode()
    got += c.read_all(timeout=0.8).decode()
    assert message_ids(got).count("o1") == 1 and message_ids(got).count("o3") == 1
    assert [i for i in message_ids(got) if i.startswith("o")] == ["o1", "o2", "o3"]
    assert "urn:xmpp:delay" in got
    c.close()
    c = plain_login(d, "gina", "third", presence=False)
    c.send("<presence/>")
    assert not re.search(rb"id='o\d'", c.read_all(timeout=0.8))  # delivered once
    c.close()
    b.close()


def test_queue_limit_is_policy_violation_and_loses_nothing(d):
    a, _ = sm_login(d, "hank", resume=True)
    b = plain_login(d, "bob")
    ids = [f"q{i}" for i in range(60)]  # max_unacked = 50, hank never acks
    burst(b, "hank@localhost/r", ids)
    end = a.read_all(timeout=5).decode()
    assert "<policy-violation" in end and "unacknowledged" in end
    # not resumable after that; every unacked message went to offline storage
    c = plain_login(d, "hank", "again", presence=False)
    c.send("<presence/>")
    got = c.read_until("id='q59'.*?</message>").decode()
    seen = [i for i in message_ids(got) if i.startswith("q")]
    assert seen == ids[:len(seen)] and set(ids) <= set(seen) | set(message_ids(end))
    c.close()
    b.close()


KILLED_CLIENT = r"""
import re, sys
from tests.rawclient import RawClient
port, out = int(sys.argv[1]), open(sys.argv[2], "w")
c = RawClient(port)
c.login("frank", "pw-secret", "mobile")
c.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/><presence/>")
c.read_until("<enabled[^>]*/>")
out.write("ready\n"); out.flush()
handled = 0
while True:
    chunk = c.sock.recv(65536)
    if not chunk:
        break
    c.buffer += chunk
    while True:
        m = re.search(rb"<message[^>]* id='(k\d+)'.*?</message>|<r xmlns='urn:xmpp:sm:3'/>|<presence[^>]*/>", c.buffer, re.S)
        if not m:
            break
        c.buffer = c.buffer[m.end():]
        if m.group(0).startswith(b"<r "):
            c.send("<a xmlns='urn:xmpp:sm:3' h='%d'/>" % handled)
            continue
        handled += 1
        if m.group(1):
            out.write(m.group(1).decode() + "\n"); out.flush()
"""


@pytest.fixture
def roomy(tmp_path):
    """A daemon whose unacked queue never fills in the burst below (the kill
    decides), and that asks for acks after 1 s."""
    d = Daemon(tmp_path / "roomy", plugins=PLUGINS,
               extra=CONFIG.replace("max_unacked = 50", "max_unacked = 1000\nrequest_interval = 1")
               ).start()
    for u in ("bob", "frank", "gina"):
        d.adduser(f"{u}@localhost", PW)
    yield d
    if d.proc is not None:
        d.stop()


def test_kill9_of_the_client_mid_burst_loses_no_message(roomy, tmp_path):
    d = roomy
    record = tmp_path / "received"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, str(d.port), str(record)],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 15
        while not (record.exists() and record.read_text().startswith("ready")):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        b = plain_login(d, "bob")
        ids = [f"k{i}" for i in range(300)]
        for start in range(0, 300, 20):
            burst(b, "frank@localhost/mobile", ids[start:start + 20])
            if start == 100:
                while len(record.read_text().split()) < 40:
                    assert time.monotonic() < deadline + 15
                    time.sleep(0.01)
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
    finally:
        if proc.poll() is None:
            proc.kill()
    received = set(record.read_text().split()[1:])
    assert 0 < len(received) < 300
    assert b"type='error'" not in b.read_all(timeout=RESUME_TIMEOUT + 1.5)  # nothing bounced
    c = plain_login(d, "frank", "desk", presence=False)
    c.send("<presence/>")
    data = b""
    try:
        while not set(ids) <= received | set(message_ids(data)):
            data += c.read_until("</message>", timeout=5)
    except TimeoutError:
        pass
    missing = set(ids) - received - set(message_ids(data))
    assert not missing, sorted(missing)
    log = d.logtext()
    assert "frank@localhost/mobile from 127.0.0.1: connection lost; session kept" in log
    assert "policy-violation" not in log and "unacknowledged (max_unacked" not in log
    c.close()
    b.close()


def test_slixmpp_xep_0198_enable_and_acks(d):
    async def go():
        a = await connect("erin@localhost/slix", PW, d.port, plugins=["xep_0198"])
        b = await connect("bob@localhost/slix", PW, d.port)
        sm = a.plugin["xep_0198"]
        for _ in range(50):
            if sm.sm_id:
                break
            await asyncio.sleep(0.05)
        assert sm.sm_id and "stream_management" in a.features
        for i in range(7):
            b.send_message(mto="erin@localhost/slix", mbody=f"s{i}", mtype="chat")
        bodies = [(await a.next_message())["body"] for _ in range(7)]
        assert bodies == [f"s{i}" for i in range(7)]
        for i in range(4):
            a.send_message(mto="bob@localhost/slix", mbody=f"t{i}", mtype="chat")
        for _ in range(20):  # the server's <a/> empties the client's unacked queue
            await asyncio.sleep(0.1)  # (slixmpp may write <r/> before the last message)
            sm.request_ack()
            await asyncio.sleep(0.2)
            if not sm.unacked_queue:
                break
        assert not sm.unacked_queue and sm.handled >= 7
        for c in (a, b):
            c.disconnect()

    run(go())


def test_server_stop_stores_what_detached_and_attached_sessions_hold(roomy):
    d = roomy
    f, _ = sm_login(d, "frank")
    g, _ = sm_login(d, "gina")
    b = plain_login(d, "bob")
    burst(b, "frank@localhost/r", ["f1", "f2"])
    burst(b, "gina@localhost/r", ["g1", "g2"])
    f.read_until("id='f2'.*?</message>")
    g.read_until("id='g2'.*?</message>")
    drop(f)  # frank detached, gina still connected; neither acked
    time.sleep(0.3)
    d.stop()
    d.start()
    for user, ids in (("frank", ["f1", "f2"]), ("gina", ["g1", "g2"])):
        c = plain_login(d, user, "after", presence=False)
        c.send("<presence/>")
        got = c.read_until(f"id='{ids[-1]}'.*?</message>")
        assert [i for i in message_ids(got) if i in ids] == ids
        c.close()
    g.close()
    b.close()


def test_slixmpp_xep_0198_resumes_on_a_new_connection(d):
    async def go():
        a = await connect("judy@localhost/slixres", PW, d.port, plugins=["xep_0198"])
        b = await connect("bob@localhost/slixres", PW, d.port)
        sm = a.plugin["xep_0198"]
        for _ in range(50):
            if sm.sm_id:
                break
            await asyncio.sleep(0.05)
        previd = sm.sm_id
        assert previd
        resumed = asyncio.get_running_loop().create_future()
        a.add_event_handler("session_resumed",
                            lambda s: resumed.done() or resumed.set_result(s["previd"]))
        a.abort()  # the TCP connection is gone; the session is not
        await asyncio.sleep(0.3)
        b.send_message(mto="judy@localhost/slixres", mbody="while-away", mtype="chat")
        await asyncio.sleep(0.2)
        a.connect("127.0.0.1", d.port)
        assert await asyncio.wait_for(resumed, 10) == previd
        msg = await a.next_message()
        assert msg["body"] == "while-away" and msg["from"] == "bob@localhost/slixres"
        for c in (a, b):
            c.disconnect()

    run(go())


def test_unacked_stanzas_get_a_request_after_the_interval(roomy):
    a, _ = sm_login(roomy, "gina", presence=False)
    b = plain_login(roomy, "bob")
    burst(b, "gina@localhost/r", ["t1"])  # one stanza: far below request_every
    a.read_until("id='t1'.*?</message>")
    t0 = time.monotonic()
    a.read_until(f"<r xmlns='{SM}'/>", timeout=5)
    assert time.monotonic() - t0 <= 3.5  # between one and two intervals of 1 s
    a.send(f"<a xmlns='{SM}' h='1'/>")
    assert f"<r xmlns='{SM}'/>".encode() not in a.read_all(timeout=2.5)  # nothing left to ask
    b.close()

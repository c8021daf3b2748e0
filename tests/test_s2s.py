"""Federation between two xmppd daemons over STARTTLS, authenticated by SASL EXTERNAL.

``a.test`` and ``b.test`` run as two real daemons on loopback, each with a
certificate from the test CA (serverAuth only: no clientAuth usage, as public
CAs issue them now), each trusting that CA, ``[s2s.routes]`` pointing at the
other (tests/federation.py).  Users are raw clients (tests/rawclient.py), so
every assertion is about what goes over the wire.
"""
from __future__ import annotations

import re
import time

import pytest

from tests.daemon import free_port
from tests.federation import Federation, wait_for_log
from tests.test_metrics import samples, value


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    # a.test pings its links every second (XEP-0199); b.test answers.
    metrics_port = free_port()
    f = Federation(tmp_path_factory.mktemp("s2s"), a_s2s="ping_interval = 1\nping_timeout = 3",
                   a_extra=f'\n[metrics]\nlisten = "tcp:{metrics_port}:interface=127.0.0.1"\n')
    f.metrics_port = metrics_port
    yield f
    f.stop()


def _presence(sender: str, kind: str | None = None) -> str:
    """A regex for a presence stanza from ``sender`` (of type ``kind``), attributes in any order."""
    typed = f"(?=[^>]*type='{kind}')" if kind else ""
    return rf"<presence(?=[^>]*from='{re.escape(sender)}'){typed}[^>]*>"


def _stanza(client, name: str, ident: str, timeout: float = 10.0) -> str:
    return client.read_until(rf"<{name}[^>]*id='{ident}'[^>]*(/>|>.*?</{name}>)", timeout).decode()


def test_messages_both_ways_authenticated_with_external(fed):
    alice = fed.login(fed.a, "alice")
    bob = fed.login(fed.b, "bob")
    try:
        alice.send("<message to='bob@b.test' type='chat' id='m1'><body>hello bob</body></message>")
        got = _stanza(bob, "message", "m1")
        assert "from='alice@a.test/raw'" in got and "<body>hello bob</body>" in got
        assert "xmlns='jabber:server'" not in got  # the client sees its own namespace
        bob.send("<message to='alice@a.test/raw' type='chat' id='m2'><body>hi alice</body></message>")
        got = _stanza(alice, "message", "m2")
        assert "from='bob@b.test/raw'" in got and "<body>hi alice</body>" in got
    finally:
        alice.close()
        bob.close()
    # Each direction has its own stream, each authenticated with the certificate.
    wait_for_log(fed.a, r"s2s out a\.test -> b\.test: authenticated with EXTERNAL")
    wait_for_log(fed.b, r"s2s in \S+: a\.test authenticated for b\.test with EXTERNAL")
    wait_for_log(fed.b, r"s2s out b\.test -> a\.test: authenticated with EXTERNAL")
    assert "dialback" not in fed.a.logtext() + fed.b.logtext()


def test_xmppctl_s2s_lists_live_connections(fed):
    deadline = time.monotonic() + 10
    while True:
        out = fed.a.ctl("s2s").stdout
        rows = [line.split() for line in out.splitlines()[1:]]
        if (["out", "a.test->b.test", "established"] in [r[:3] for r in rows]
                and ["in", "b.test->a.test", "established"] in [r[:3] for r in rows]):
            break
        assert time.monotonic() < deadline, out
        time.sleep(0.2)
    for row in rows:
        assert row[3].startswith("TLSv1.") and row[4] == "EXTERNAL", out
    status = fed.a.ctl("status").stdout
    assert re.search(r"s2s:\s+1 incoming, 1 outgoing established", status), status
    snapshot = samples(fed.metrics_port)
    for direction in ("in", "out"):
        assert value(snapshot, "xmppd_s2s_connections", direction=direction,
                     state="established") == 1, snapshot


def test_disco_info_and_ping_of_the_remote_server(fed):
    alice = fed.login(fed.a, "alice", "disco")
    try:
        reply = alice.iq("<iq type='get' to='b.test' id='d1'>"
                         "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>", "d1", timeout=10)
        assert "type='result'" in reply and "from='b.test'" in reply
        assert re.search(r"<identity[^>]*category='server'", reply)
        assert "urn:xmpp:ping" in reply
        reply = alice.iq("<iq type='get' to='b.test' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>", "p1")
        assert "type='result'" in reply and "from='b.test'" in reply
        # An IQ to a remote account nobody is logged in as: the remote server answers.
        reply = alice.iq("<iq type='get' to='nobody@b.test/x' id='p2'><ping xmlns='urn:xmpp:ping'/></iq>",
                         "p2")
        assert "type='error'" in reply and "service-unavailable" in reply
    finally:
        alice.close()


def test_answered_pings_keep_the_link(fed):
    alice = fed.login(fed.a, "alice", "pings")
    try:
        alice.send("<message to='bob@b.test' type='chat' id='p0'><body>link up</body></message>")
        # Long enough for an unanswered ping (sent at 1 s) to drop the link (at 4-5 s).
        time.sleep(5.5)
        alice.send("<message to='nobody@b.test/x' type='chat' id='p1'><body>still up?</body></message>")
        # b.test answers over the same link (no new authentication in between).
        assert "service-unavailable" in _stanza(alice, "message", "p1")
    finally:
        alice.close()
    log = fed.a.logtext()
    assert "no answer to a ping" not in log
    assert log.count("s2s out a.test -> b.test: authenticated") == 1


def test_subscriptions_presence_probes_and_unavailable(fed):
    alice = fed.login(fed.a, "alice", "home")
    bob = fed.login(fed.b, "bob", "desk")
    try:
        # alice -> bob subscription, approved by bob.
        alice.send("<presence to='bob@b.test' type='subscribe' id='s1'/>")
        bob.read_until(_presence("alice@a.test", "subscribe"), 10)
        bob.send("<presence to='alice@a.test' type='subscribed'/>")
        alice.read_until(_presence("bob@b.test", "subscribed"), 10)
        # bob's current presence follows the approval (RFC 6121 §3.1.5).
        alice.read_until(_presence("bob@b.test/desk"), 10)
        # bob -> alice, approved by alice: now both ways.
        bob.send("<presence to='alice@a.test' type='subscribe'/>")
        alice.read_until(_presence("bob@b.test", "subscribe"), 10)
        alice.send("<presence to='bob@b.test' type='subscribed'/>")
        bob.read_until(_presence("alice@a.test", "subscribed"), 10)
        bob.read_until(_presence("alice@a.test/home"), 10)
        # Rosters say both.
        roster = alice.iq("<iq type='get' id='r1'><query xmlns='jabber:iq:roster'/></iq>", "r1")
        assert re.search(r"jid='bob@b\.test'[^>]*subscription='both'|subscription='both'[^>]*jid='bob@b\.test'",
                         roster), roster
        # Broadcast: a presence change reaches the remote contact.
        alice.send("<presence><status>in a meeting</status></presence>")
        got = bob.read_until(_presence("alice@a.test/home") + ".*?</presence>", 10).decode()
        assert "in a meeting" in got
        # Probe at login: a new session of alice learns bob's presence from b.test.
        second = fed.login(fed.a, "alice", "phone")
        try:
            second.read_until(_presence("bob@b.test/desk"), 10)
        finally:
            second.close()
        # Logout: unavailable reaches the remote contact.
        bob.close()
        alice.read_until(_presence("bob@b.test/desk", "unavailable"), 10)
    finally:
        alice.close()
        bob.close()


def test_offline_message_from_the_remote_user(fed):
    # bob has no session on b.test (the earlier tests' sessions are gone:
    # alice saw bob's unavailable presence).
    alice = fed.login(fed.a, "alice", "late")
    bob = None
    try:
        alice.send("<message to='bob@b.test' type='chat' id='off1'><body>while you were out</body></message>")
        # b.test handles the stanzas of one stream in order: once it answered
        # this ping, the message is stored (and no bounce came back).
        reply = alice.iq("<iq type='get' to='b.test' id='after-off'><ping xmlns='urn:xmpp:ping'/></iq>",
                         "after-off")
        assert "type='result'" in reply
        bob = fed.login(fed.b, "bob", "back")
        got = _stanza(bob, "message", "off1")
        assert "from='alice@a.test/late'" in got and "while you were out" in got
        assert re.search(r"<delay[^>]*from='b.test'", got)
    finally:
        alice.close()
        if bob is not None:
            bob.close()

"""Importing real XEP-0227 exports of Prosody 0.12 and ejabberd 23.01 (Debian packages).

Each peer runs once per module, on loopback, from a private config
(tests/peers.py); its users make their data through the protocol (in-band
registration, subscriptions both ways, roster names and groups, a vCard,
blocking, a message and a subscription request to an offline user), the
peer's own tool writes the export, and the export is imported into a fresh
xmppd, which is then logged into with the same passwords.
"""
from __future__ import annotations

import re
import time

import pytest

from tests.daemon import Daemon
from tests.peers import PASSWORD, Ejabberd, Prosody
from tests.rawclient import RawClient
from tests.test_migrate import scram_login, store_dump


def login(port, user, host):
    c = RawClient(port, host=host, timeout=20)
    c.login(user, PASSWORD)
    return c


def ping(c, ident):
    c.iq(f"<iq type='get' id='{ident}'><ping xmlns='urn:xmpp:ping'/></iq>", ident)


def roster_of(c, ident="ros"):
    return c.iq(f"<iq type='get' id='{ident}'><query xmlns='jabber:iq:roster'/></iq>", ident)


def subscribe_both(a, a_jid, b, b_jid):
    """Mutual subscription through the protocol (RFC 6121 §3), as clients do it."""
    for x, y, y_jid, x_jid in ((a, b, b_jid, a_jid), (b, a, a_jid, b_jid)):
        x.send(f"<presence to='{y_jid}' type='subscribe'/>")
        ping(x, "sub")
        y.read_until(f"<presence[^>]*type=['\"]subscribe['\"][^>]*>|<presence[^>]*from=['\"]{x_jid}")
        y.send(f"<presence to='{x_jid}' type='subscribed'/>")
        ping(y, "ack")
    deadline = time.monotonic() + 10
    while not re.search(rf"jid=['\"]{b_jid}['\"][^>]*subscription=['\"]both|subscription=['\"]both['\"]"
                        rf"[^>]*jid=['\"]{b_jid}", roster_of(a)):
        assert time.monotonic() < deadline, roster_of(a)
        time.sleep(0.1)


def populate(peer, host, blocking=True):
    """alice <-> bob (both), alice's roster name/group, vCard, blocklist; bob -> carol offline."""
    for user in ("alice", "bob", "carol"):
        peer.register(user, host)
    alice, bob = login(peer.port, "alice", host), login(peer.port, "bob", host)
    alice.send("<presence/>")
    bob.send("<presence/>")
    subscribe_both(alice, f"alice@{host}", bob, f"bob@{host}")
    reply = alice.iq(f"<iq type='set' id='rs'><query xmlns='jabber:iq:roster'><item jid='bob@{host}' "
                     "name='Bobby'><group>Friends</group></item></query></iq>", "rs")
    assert "result" in reply, reply
    reply = alice.iq("<iq type='set' id='vc'><vCard xmlns='vcard-temp'><FN>Alice Liddell</FN>"
                     "</vCard></iq>", "vc")
    assert "result" in reply, reply
    if blocking:
        reply = alice.iq(f"<iq type='set' id='bl'><block xmlns='urn:xmpp:blocking'>"
                         f"<item jid='mallory@{host}'/><item jid='spam.example'/></block></iq>", "bl")
        assert "result" in reply, reply
    bob.send(f"<message to='carol@{host}' type='chat' id='off1'><body>while you were out</body></message>")
    bob.send(f"<presence to='carol@{host}' type='subscribe'/>")
    ping(bob, "p")
    alice.close()
    bob.close()


@pytest.fixture(scope="module")
def prosody_export(tmp_path_factory):
    started = time.monotonic()
    peer = Prosody(("prosody.test",))
    try:
        peer.up()
        populate(peer, "prosody.test")
        peer.down()
        out = peer.export(peer.dir / "export")
        yield out, peer
    finally:
        peer.remove()
    print(f"\nProsody fixture: {time.monotonic() - started:.1f} s")


@pytest.fixture(scope="module")
def ejabberd_export(tmp_path_factory):
    started = time.monotonic()
    peer = Ejabberd(("ejabberd.test", "plain.test"))
    try:
        peer.up()
        populate(peer, "ejabberd.test")
        for user in ("dave", "erin"):
            peer.register(user, "plain.test")
        dave, erin = login(peer.port, "dave", "plain.test"), login(peer.port, "erin", "plain.test")
        dave.send("<presence/>")
        erin.send("<presence/>")
        subscribe_both(dave, "dave@plain.test", erin, "erin@plain.test")
        reply = dave.iq("<iq type='set' id='bl'><block xmlns='urn:xmpp:blocking'>"
                        "<item jid='troll@spam.example'/></block></iq>", "bl")
        assert "result" in reply, reply
        dave.close()
        erin.close()
        out = peer.export(peer.dir / "export")
        peer.down()
        yield peer.main_file(out), peer
    finally:
        peer.remove()
    print(f"\nejabberd fixture: {time.monotonic() - started:.1f} s")


def check_alice_and_carol(d, host, local):
    """What alice and carol find after the import (``local``: their host in xmppd)."""
    for mech in ("SCRAM-SHA-1",):  # the peers' own credentials, kept as they were
        assert "<success" in scram_login(d, "alice", PASSWORD, mech, host=local)
    alice = login(d.port, "alice", local)
    roster = roster_of(alice)
    assert re.search(rf"<item jid='bob@{local}' subscription='both' name='Bobby'>"
                     r"<group>Friends</group></item>", roster), roster
    vcard = alice.iq("<iq type='get' id='v'><vCard xmlns='vcard-temp'/></iq>", "v")
    assert "<FN>Alice Liddell</FN>" in vcard, vcard
    alice.close()
    # After that PLAIN login the account has SCRAM-SHA-256 credentials too.
    assert "<success" in scram_login(d, "alice", PASSWORD, "SCRAM-SHA-256", host=local)
    return login(d.port, "carol", local)


def test_prosody_export_imported_and_logged_into(prosody_export, tmp_path):
    out, _peer = prosody_export
    files = sorted(p.name for p in out.iterdir())
    assert files == ["alice@prosody.test.xml", "bob@prosody.test.xml", "carol@prosody.test.xml"], files
    d = Daemon(tmp_path / "xmppd")  # host localhost: the export's host is mapped
    result = d.ctl("import", "--host-map", "prosody.test=localhost", str(out))
    print(result.stdout)
    # Prosody 0.12's xep0227 driver exports no blocklists and no offline messages.
    assert "imported 3 account(s) (0 replaced), 3 roster item(s), 1 subscription request(s), " \
           "1 vCard(s), 0 offline message(s), 0 blocklist item(s)" in result.stdout, result.stdout
    assert "not imported: 0 account(s); 0 imported" in result.stdout
    dump = store_dump(d, ["alice@localhost", "carol@localhost"])
    assert set(dump[("accounts", "alice@localhost")]["scram"]) == {"SCRAM-SHA-1"}  # as Prosody had it
    d.start()
    try:
        carol = check_alice_and_carol(d, "prosody.test", "localhost")
        carol.send("<presence/>")  # the request bob made while carol was offline, now from bob@localhost
        got = carol.read_until(r"<presence[^>]*type='subscribe'[^>]*/?>").decode()
        assert "from='bob@localhost'" in got, got
        carol.close()
    finally:
        d.stop()


def test_ejabberd_export_imported_and_logged_into(ejabberd_export, tmp_path):
    main, _peer = ejabberd_export
    d = Daemon(tmp_path / "xmppd", hosts=("ejabberd.test", "plain.test"))
    result = d.ctl("import", str(main))
    print(result.stdout)
    assert "imported 5 account(s)" in result.stdout, result.stdout
    dump = store_dump(d, ["alice@ejabberd.test", "dave@plain.test"])
    assert set(dump[("accounts", "alice@ejabberd.test")]["scram"]) == {"SCRAM-SHA-1"}
    # plain.test kept clear-text passwords: hashed on import for both mechanisms.
    assert set(dump[("accounts", "dave@plain.test")]["scram"]) == {"SCRAM-SHA-1", "SCRAM-SHA-256"}
    d.start()
    try:
        carol = check_alice_and_carol(d, "ejabberd.test", "ejabberd.test")
        carol.send("<presence/>")
        got = carol.read_until(r"while you were out.*?</message>").decode()
        assert "urn:xmpp:delay" in got, got
        carol.close()
        alice = login(d.port, "alice", "ejabberd.test")
        blocked = alice.iq("<iq type='get' id='b'><blocklist xmlns='urn:xmpp:blocking'/></iq>", "b")
        assert "mallory@ejabberd.test" in blocked and "spam.example" in blocked, blocked
        alice.close()
        assert "<success" in scram_login(d, "dave", PASSWORD, "SCRAM-SHA-256", host="plain.test")
        dave = login(d.port, "dave", "plain.test")
        assert re.search(r"<item jid='erin@plain.test' subscription='both'", roster_of(dave))
        blocked = dave.iq("<iq type='get' id='b'><blocklist xmlns='urn:xmpp:blocking'/></iq>", "b")
        assert "troll@spam.example" in blocked, blocked
        dave.close()
    finally:
        d.stop()

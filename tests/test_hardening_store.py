"""Issue 17 item 7: store failures are never silent.

The daemon's data_dir is a small tmpfs; a filler file takes its last byte
while the daemon runs.  Every write a user causes must then come back as a
stanza error (``resource-constraint``, type wait), a message for an offline
user included, with one log line naming the file and the operation and no
traceback; memory must stay what the disk says; and once the filler is gone
the same connection writes again and nothing stored before is lost.
"""
from __future__ import annotations

import errno
import os
import re
import sqlite3
import subprocess
from pathlib import Path

import pytest
from twisted.logger import formatEvent, globalLogPublisher

from tests.daemon import Daemon
from tests.rawclient import RawClient
from xmppd.storage import SQLiteStore, StoreError
from xmppd.storefail import FailureLog

PW = "pw-secret"
PLUGINS = ["roster", "presence", "disco", "ping", "version", "offline", "vcard",
           "urn:xmpp:blocking", "register"]
FULL = "<resource-constraint xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"


# -- a small filesystem that can be filled ------------------------------------


def mount_tmpfs(path: Path, size: str = "4m") -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0750", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs on {path} (these tests need root): {r.stderr.strip()}")


def umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path) -> Path:
    """Take every free block of ``directory``'s filesystem; returns the filler."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    chunk = b"\0" * 65536
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                return filler
    finally:
        os.close(fd)


@pytest.fixture
def small_dir(tmp_path):
    d = tmp_path / "small"
    mount_tmpfs(d, "1m")
    yield d
    umount(d)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("store"), plugins=PLUGINS)
    mount_tmpfs(d.data_dir)
    try:
        d.start()
        for u in ("alice", "bob", "carol", "dave"):
            d.adduser(f"{u}@localhost", PW)
        yield d
    finally:
        d.stop()
        umount(d.data_dir)


def raw(d, user, resource="raw"):
    c = RawClient(d.port)
    c.login(user, PW, resource)
    return c


def roster_set(c, jid, name, ident):
    return c.iq(f"<iq type='set' id='{ident}'><query xmlns='jabber:iq:roster'>"
                f"<item jid='{jid}' name='{name}'/></query></iq>", ident)


def roster_get(c, ident):
    return c.iq(f"<iq type='get' id='{ident}'><query xmlns='jabber:iq:roster'/></iq>", ident)


def vcard_set(c, fn, ident):
    return c.iq(f"<iq type='set' id='{ident}'><vCard xmlns='vcard-temp'><FN>{fn}</FN></vCard></iq>", ident)


def vcard_get(c, ident):
    return c.iq(f"<iq type='get' id='{ident}'><vCard xmlns='vcard-temp'/></iq>", ident)


def block(c, jid, ident):
    return c.iq(f"<iq type='set' id='{ident}'><block xmlns='urn:xmpp:blocking'>"
                f"<item jid='{jid}'/></block></iq>", ident)


def blocklist(c, ident):
    return c.iq(f"<iq type='get' id='{ident}'><blocklist xmlns='urn:xmpp:blocking'/></iq>", ident)


def message(c, to, body):
    c.send(f"<message to='{to}' id='{body}' type='chat'><body>{body}</body></message>")


def read_message(c, body, timeout=5.0):
    return c.read_until(f"<message[^>]*>(?:(?!</message>).)*{body}.*?</message>", timeout).decode()


def register(d, username, ident):
    c = RawClient(d.port)
    c.open_stream()
    c.starttls()
    c.open_stream()
    reply = c.iq(f"<iq type='set' id='{ident}'><query xmlns='jabber:iq:register'>"
                 f"<username>{username}</username><password>{PW}</password></query></iq>", ident)
    c.close()
    return reply


def is_full_error(reply: str) -> bool:
    return "type='error'" in reply and "<error type='wait'>" in reply and FULL in reply


# -- end to end -----------------------------------------------------------------


def test_full_disk_every_write_answered_logged_once_and_recovered(sd):
    alice, bob = raw(sd, "alice"), raw(sd, "bob")
    alice.send("<presence/>")
    bob.send("<presence/>")
    # What is stored before the disk fills must survive it.
    assert "type='result'" in roster_set(alice, "old@localhost", "Old", "r0")
    assert "type='result'" in vcard_set(alice, "Alice Before", "v0")
    assert "type='result'" in block(alice, "spam@localhost", "b0")
    message(alice, "carol@localhost", "kept-before")
    # A round trip: the daemon has stored the message before the disk fills.
    assert "type='result'" in alice.iq("<iq type='get' id='p0'><ping xmlns='urn:xmpp:ping'/></iq>", "p0")

    filler = fill(sd.data_dir)
    try:
        # IQ writes: resource-constraint (type wait), asked twice for the roster.
        assert is_full_error(roster_set(alice, "new@localhost", "New", "r1"))
        assert is_full_error(roster_set(alice, "new@localhost", "New", "r2"))
        assert is_full_error(vcard_set(alice, "Alice Full", "v1"))
        assert is_full_error(block(alice, "bob@localhost", "b1"))
        assert is_full_error(register(sd, "newbie", "reg1"))
        # A message for an offline user comes back, not into the void.
        message(alice, "carol@localhost", "lost-offline")
        bounce = read_message(alice, "lost-offline")
        assert "type='error'" in bounce and FULL in bounce and "from='carol@localhost'" in bounce
        assert "urn:xmpp:delay" not in bounce  # returned as sent
        # A subscription request (outside any IQ) is refused to its sender.
        alice.send("<presence to='dave@localhost' type='subscribe'/>")
        refused = alice.read_until(r"<presence[^>]*type='error'.*?</presence>").decode()
        assert "from='dave@localhost'" in refused and FULL in refused

        # Memory still says what the disk says.
        roster = roster_get(alice, "r3")
        assert "old@localhost" in roster and "new@localhost" not in roster
        assert "ask=" not in roster  # the failed subscribe left no pending ask
        assert "Alice Before" in vcard_get(alice, "v2")
        listed = blocklist(alice, "b2")
        assert "spam@localhost" in listed and "bob@localhost" not in listed
        message(bob, "alice@localhost/raw", "bob-not-blocked")
        assert "bob-not-blocked" in read_message(alice, "bob-not-blocked")
    finally:
        filler.unlink()

    log = sd.logtext()
    assert "Traceback" not in log and "Unhandled" not in log, log[-3000:]
    lines = [ln for ln in log.splitlines() if "store failure:" in ln]
    db = str(sd.data_dir / "xmppd.sqlite3")
    assert lines and all(db in ln and "database or disk is full" in ln for ln in lines), lines
    for operation in ("write roster+settings for alice@localhost", "put vcard for alice@localhost",
                      "put blocklist for alice@localhost", "put offline for carol@localhost",
                      "put accounts for newbie@localhost"):
        # One line each; the second roster failure is held back, not repeated.
        assert sum(operation in ln for ln in lines) == 1, (operation, lines)

    # Space is back: the same connection writes again.
    assert "type='result'" in roster_set(alice, "new@localhost", "New", "r4")
    assert "type='result'" in vcard_set(alice, "Alice After", "v3")
    assert "type='result'" in block(alice, "bob@localhost", "b3")
    assert "type='result'" in register(sd, "newbie", "reg2")
    message(alice, "carol@localhost", "kept-after")
    alice.close()
    bob.close()

    carol = raw(sd, "carol")
    carol.send("<presence/>")
    got = read_message(carol, "kept-after")
    assert "kept-before" in got and "lost-offline" not in got
    carol.close()

    # Nothing stored before (or after) is lost, across a restart too.
    sd.stop()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    sd.start()
    alice = raw(sd, "alice", "again")
    roster = roster_get(alice, "r5")
    assert "old@localhost" in roster and "new@localhost" in roster
    assert "Alice After" in vcard_get(alice, "v4")
    listed = blocklist(alice, "b4")
    assert "spam@localhost" in listed and "bob@localhost" in listed
    alice.close()


# -- the mechanism ------------------------------------------------------------------


def test_store_error_names_file_operation_and_condition_and_connection_recovers(small_dir):
    store = SQLiteStore(str(small_dir))
    store.put("vcard", "a@b", "vcard", "before")
    filler = fill(small_dir)
    with pytest.raises(StoreError) as e:
        store.put("vcard", "a@b", "vcard", "x" * 10000)
    err = e.value
    assert err.path == str(small_dir / "xmppd.sqlite3")
    assert (err.operation, err.user, err.condition) == ("put vcard", "a@b", "resource-constraint")
    assert err.path in str(err) and "put vcard" in str(err)
    with pytest.raises(StoreError):
        store.batch(puts=[("roster", "a@b", "c@d", {}), ("settings", "a@b", "roster_ver", 2)])
    assert not store._db.in_transaction
    assert store.get("vcard", "a@b", "vcard") == "before"
    filler.unlink()
    store.batch(puts=[("roster", "a@b", "c@d", {}), ("settings", "a@b", "roster_ver", 2)],
                deletes=[("vcard", "a@b", "vcard")])
    assert store.get("roster", "a@b", "c@d") == {} and store.get("vcard", "a@b", "vcard") is None
    store.close()


def test_open_transaction_left_by_a_failure_is_rolled_back(tmp_path):
    """An error SQLite does not roll back by itself must not wedge the connection."""
    store = SQLiteStore(str(tmp_path))

    def fails(db):
        db.execute("INSERT INTO kv VALUES ('s','u','k','1')")
        db.execute("INSERT INTO nosuchtable VALUES (1)")

    with pytest.raises(StoreError) as e:
        store._write("put s", "u", fails)
    assert e.value.condition == "internal-server-error"
    assert not store._db.in_transaction and store.get("s", "u", "k") is None
    store.put("s", "u", "k", 2)
    assert store.get("s", "u", "k") == 2
    store.close()


def test_identical_failures_are_logged_once_per_interval():
    now = [0.0]
    flog = FailureLog(interval=60, clock=lambda: now[0])
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        err = StoreError("/d/xmppd.sqlite3", "put vcard", "database or disk is full", "a@b",
                         "resource-constraint")
        other = StoreError("/d/xmppd.sqlite3", "put vcard", "database or disk is full", "c@d",
                           "resource-constraint")
        for e in (err, other, err):
            flog.report(e)
        now[0] = 61
        flog.report(err)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    lines = [formatEvent(ev) for ev in seen if "store failure" in ev.get("log_format", "")]
    assert len(lines) == 2, lines
    assert "/d/xmppd.sqlite3" in lines[0] and "put vcard for a@b" in lines[0]
    assert re.search(r"2 more like this", lines[1]), lines[1]

"""The PostgreSQL store end to end (issue 18): outage, recovery, migrate-store.

The daemon runs on a private PostgreSQL cluster of its own (not the
session-wide one other tests share), so that stopping it disturbs nothing
else.  What must hold while the database is down: every write is answered
with a stanza error (``resource-constraint``, type wait) and nothing is
acknowledged or pushed that was not stored; one log line for the outage;
when the database is back, the same daemon works again without a restart.
"""
from __future__ import annotations

import pytest

from tests.backends import PostgresServer, pg_storage
from tests.daemon import Daemon
from tests.test_hardening_store import (
    FULL, PLUGINS, PW, block, is_full_error, message, raw, read_message, roster_get, roster_set,
)


@pytest.fixture(scope="module")
def private_pg():
    pg = PostgresServer().start()
    yield pg
    pg.destroy()


@pytest.fixture(scope="module")
def pgd(tmp_path_factory, private_pg):
    d = Daemon(tmp_path_factory.mktemp("pgd"), store="postgresql", pg=private_pg,
               plugins=PLUGINS).start()
    for user in ("alice", "bob", "carol"):
        d.adduser(f"{user}@localhost", PW)
    yield d
    d.stop()


def test_outage_answers_errors_acknowledges_nothing_and_recovers(pgd, private_pg):
    alice = raw(pgd, "alice")
    alice.send("<presence/>")
    assert "type='result'" in roster_get(alice, "g0")  # asks for pushes
    stored = roster_set(alice, "old@localhost", "Old", "r0")
    assert "type='result'" in stored and "id='push" in stored  # pushed, then answered

    private_pg.stop()
    try:
        # A roster set: an error, no push, nothing stored.
        reply = roster_set(alice, "new@localhost", "New", "r1")
        assert is_full_error(reply) and "id='push" not in reply, reply
        assert is_full_error(roster_set(alice, "new2@localhost", "New", "r2"))
        assert is_full_error(block(alice, "spam@localhost", "b1"))
        # A message for an offline user comes back to its sender.
        message(alice, "carol@localhost", "lost-offline")
        bounce = read_message(alice, "lost-offline")
        assert "type='error'" in bounce and FULL in bounce
        # The online user's roster is in memory: read while the database is down.
        roster = roster_get(alice, "g1")
        assert "old@localhost" in roster and "new@localhost" not in roster
    finally:
        private_pg.start()

    # Back without a restart: the same connection's next write is stored and pushed.
    stored = roster_set(alice, "new@localhost", "New", "r3")
    assert "type='result'" in stored and "id='push" in stored, stored
    roster = roster_get(alice, "g2")
    assert "new@localhost" in roster and "new2@localhost" not in roster
    message(alice, "carol@localhost", "kept-after")
    carol = raw(pgd, "carol")
    carol.send("<presence/>")
    assert "kept-after" in read_message(carol, "kept-after")

    log = pgd.logtext()
    assert "Traceback" not in log and "Unhandled" not in log, log[-3000:]
    outage = [ln for ln in log.splitlines() if "database unreachable" in ln]
    assert len(outage) == 1, outage  # one line for the outage, not one per write
    assert "pg-test-secret" not in log  # the DSN's password never reaches the log
    assert "reachable again" in log


def test_create_schema_and_migrate_store(tmp_path, private_pg):
    # An embedded store with data: a daemon on SQLite, an account, a roster item.
    src = Daemon(tmp_path / "src", plugins=["roster", "presence", "offline"]).start()
    try:
        src.adduser("dora@localhost", PW)
        c = raw(src, "dora")
        assert "type='result'" in roster_set(c, "friend@localhost", "Friend", "m1")
        message(c, "ghost@localhost", "for-nobody")  # no such account: bounced, not stored
    finally:
        src.stop()
    conf = pg_storage(private_pg, "xmppd_migrate")
    dst = Daemon(tmp_path / "dst", store="postgresql", pg=private_pg,
                 plugins=["roster", "presence", "offline"])
    dst.pg_dsn = conf.dsn
    dst.write_config(plugins=["roster", "presence", "offline"])
    out = dst.ctl("migrate-store", "--from", str(src.data_dir)).stdout
    assert "copied 3 key-value rows" in out, out  # credentials, roster item, roster version
    again = dst.ctl("migrate-store", "--from", str(src.data_dir), check=False)
    assert again.returncode == 1 and "not empty" in again.stderr and "--force" in again.stderr
    assert "copied 3" in dst.ctl("migrate-store", "--from", str(src.data_dir), "--force").stdout
    dst._schema_made = True  # create-schema ran (pg_storage); a second run only checks
    assert "checked the store schema" in dst.ctl("create-schema").stdout
    dst.start()
    try:
        c = raw(dst, "dora")  # the password works: the credentials came over
        assert "friend@localhost" in roster_get(c, "m2")
    finally:
        dst.stop()

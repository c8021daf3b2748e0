"""The message log (xmppd.msglog): one suite for the SQLite and the in-memory backends."""
from __future__ import annotations

import pytest

from xmppd.msglog import (
    INCOMING, OUTGOING, LogQuery, LogWorker, MemoryMessageLog, Sequence, SQLiteMessageLog,
    seq_of_id,
)
from tests.backends import pg_store_conf, pg_truncate, postgres  # noqa: F401 (fixtures)


@pytest.fixture(params=["sqlite", "memory", "postgresql"])
def msglog(request, tmp_path):
    if request.param == "postgresql":
        from xmppd.msglog_pg import PostgresMessageLog

        conf = request.getfixturevalue("pg_store_conf")
        pg_truncate(conf)
        log = PostgresMessageLog(conf)
    else:
        log = SQLiteMessageLog(str(tmp_path)) if request.param == "sqlite" else MemoryMessageLog()
    yield log
    log.close()


def row(seq, user="a@x", other="b@y/r", direction=INCOMING):
    return (seq, user, other, f"p-{seq:x}", direction, f"<message n='{seq}'/>".encode())


def fill(log, n=30):
    # a@x talks with b@y/r (even seqs) and c@z (odd); d@x has its own rows
    rows = [row(s, other="b@y/r" if s % 2 == 0 else "c@z", direction=s % 2) for s in range(1, n + 1)]
    rows += [row(100 + s, user="d@x") for s in range(5)]
    assert log.append(rows) == {}
    return rows


def seqs(rows):
    return [r.seq for r in rows]


def test_order_ranges_and_paging(msglog):
    fill(msglog)
    assert msglog.last_seq() == 104
    assert seqs(msglog.query(LogQuery("a@x", limit=5))) == [1, 2, 3, 4, 5]
    assert seqs(msglog.query(LogQuery("a@x", lo=5, hi=9, limit=10))) == [6, 7, 8]
    assert seqs(msglog.query(LogQuery("a@x", limit=3, reverse=True))) == [30, 29, 28]
    assert seqs(msglog.query(LogQuery("a@x", hi=10, limit=3, reverse=True))) == [9, 8, 7]
    r = msglog.query(LogQuery("a@x", limit=1))[0]
    assert r.user == "a@x" and r.id == "p-1" and r.stanza == b"<message n='1'/>"
    assert r.with_full == "c@z" and r.direction == OUTGOING


def test_with_bare_and_full(msglog):
    fill(msglog)
    assert seqs(msglog.query(LogQuery("a@x", "b@y", limit=4))) == [2, 4, 6, 8]
    assert seqs(msglog.query(LogQuery("a@x", "b@y/r", True, limit=2))) == [2, 4]
    assert msglog.query(LogQuery("a@x", "b@y/other", True, limit=2)) == []
    assert seqs(msglog.query(LogQuery("a@x", "c@z", lo=20, limit=50))) == [21, 23, 25, 27, 29]


def test_count_with_cap(msglog):
    fill(msglog)
    assert msglog.count(LogQuery("a@x"), 100) == 30
    assert msglog.count(LogQuery("a@x", "b@y"), 100) == 15
    assert msglog.count(LogQuery("a@x"), 29) is None
    assert msglog.count(LogQuery("nobody@x"), 10) == 0


def test_get_is_per_user(msglog):
    fill(msglog)
    assert seqs(msglog.get("a@x", [5, 3, 101])) == [3, 5]  # 101 is d@x's
    assert msglog.get("a@x", []) == []


def test_quota_drops_oldest(msglog):
    fill(msglog)
    dropped = msglog.append([row(200), row(201)], max_per_user=25)
    assert dropped == {"a@x": 7}
    assert seqs(msglog.query(LogQuery("a@x", limit=3))) == [8, 9, 10]
    assert msglog.count(LogQuery("a@x"), 100) == 25
    assert msglog.append([row(202)], max_per_user=25) == {"a@x": 1}
    assert msglog.count(LogQuery("d@x"), 100) == 5


def test_delete_user_and_expire(msglog):
    fill(msglog)
    assert msglog.delete_user("a@x", before=11) == 10
    assert seqs(msglog.query(LogQuery("a@x", limit=1))) == [11]
    assert msglog.expire(before=15, limit=3) == 3
    assert msglog.expire(before=15, limit=3) == 1
    assert msglog.expire(before=15, limit=3) == 0
    assert seqs(msglog.query(LogQuery("a@x", limit=1))) == [15]
    assert msglog.delete_user("a@x") == 16
    assert msglog.query(LogQuery("a@x")) == []
    assert msglog.count(LogQuery("d@x"), 10) == 5


def test_sqlite_survives_reopen(tmp_path):
    log = SQLiteMessageLog(str(tmp_path))
    fill(log)
    log.close()
    assert not (tmp_path / 'archive.sqlite3-wal').exists() or (tmp_path / 'archive.sqlite3-wal').stat().st_size == 0
    log = SQLiteMessageLog(str(tmp_path))
    assert log.last_seq() == 104 and len(log.query(LogQuery("a@x", limit=100))) == 30
    log.close()


def test_sequence_and_ids():
    class Clock:
        now = 1000.0

        def seconds(self):
            return self.now

    clock = Clock()
    s = Sequence(clock, last=0)
    a, b = next(s), next(s)
    assert a == 1_000_000_000 and b == a + 1  # strictly increasing at a standing clock
    clock.now = 999.0  # the clock steps back: order is kept
    assert next(s) == b + 1
    s2 = Sequence(clock, last=5_000_000_000)  # restarted above the stored rows
    assert next(s2) == 5_000_000_001
    assert seq_of_id("AbC_-x-ff") == 255 and seq_of_id("nohex-zz") is None


def test_worker_buffers_and_closes(tmp_path):
    from twisted.internet.task import Clock

    clock = Clock()
    log = MemoryMessageLog()
    w = LogWorker(log, clock, flush_interval=0.5, max_buffer=3, checkpoint_interval=0)
    for s in (1, 2, 3, 4):
        w.append(row(s))
    assert w.dropped == 1 and log.query(LogQuery("a@x")) == []
    clock.advance(0.5)
    assert seqs(log.query(LogQuery("a@x"))) == [1, 2, 3]
    w.append(row(5))
    got = []
    w.run(lambda l: l.query(LogQuery("a@x"))).addCallback(got.append)
    assert seqs(got[0]) == [1, 2, 3, 5]  # a query sees what was buffered before it
    w.append(row(6))
    w.close()
    assert w.pending == [] and seqs(log.query(LogQuery("a@x"))) == [1, 2, 3, 5, 6]


def test_delete_in_chunks(msglog):
    fill(msglog)
    assert msglog.delete_user("a@x", limit=7) == 7
    assert seqs(msglog.query(LogQuery("a@x", limit=1))) == [8]
    assert msglog.delete_user("a@x", before=12, limit=100) == 4
    assert seqs(msglog.query(LogQuery("a@x", limit=1))) == [12]
    msglog.checkpoint()


# -- the SQLite layout (schema 2): one stored message per delivery -------------------

def stored_messages(log) -> int:
    return log._db.execute("SELECT count(*) FROM msgs").fetchone()[0]


def pair(seq, data=None):
    """What the plugin appends for a message a@x -> b@x: one bytes object, two rows."""
    data = data or f"<message n='{seq}'/>".encode()
    return [(seq, "a@x", "b@x/phone", f"p-{seq:x}", OUTGOING, data),
            (seq + 1, "b@x", "a@x/laptop", f"p-{seq + 1:x}", INCOMING, data)]


def test_sqlite_stores_a_local_message_once(tmp_path):
    log = SQLiteMessageLog(str(tmp_path))
    log.append(pair(10) + pair(20) + [row(30)])
    assert stored_messages(log) == 3  # two pairs and a single row
    a, b = log.query(LogQuery("a@x")), log.query(LogQuery("b@x"))
    assert [(r.seq, r.id, r.with_full, r.direction) for r in b] == [
        (11, "p-b", "a@x/laptop", INCOMING), (21, "p-15", "a@x/laptop", INCOMING)]
    assert a[0].stanza == b[0].stanza == b"<message n='10'/>"
    assert log.last_seq() == 30
    # one party's deletion keeps the other's copy; the message goes with the last row
    assert log.delete_user("a@x", before=15) == 1
    assert stored_messages(log) == 3 and log.get("b@x", [11])[0].stanza == b"<message n='10'/>"
    assert log.delete_user("b@x", before=15) == 1
    assert stored_messages(log) == 2
    # expiry takes every row of a message
    assert log.expire(before=25, limit=1) == 2
    assert stored_messages(log) == 1 and log.query(LogQuery("b@x")) == []
    # the quota releases what it drops
    log.append(pair(40) + pair(50), max_per_user=1)
    assert stored_messages(log) == 1 and seqs(log.query(LogQuery("a@x"))) == [50]
    log.close()
    log = SQLiteMessageLog(str(tmp_path))  # the high-water mark survives deletions
    assert log.last_seq() == 51
    log.close()


def test_sqlite_refuses_an_archive_of_another_schema(tmp_path):
    import sqlite3

    from xmppd.msglog import OldArchive

    db = sqlite3.connect(tmp_path / "archive.sqlite3")
    db.execute("CREATE TABLE archive (seq INTEGER PRIMARY KEY, uid INTEGER NOT NULL,"
               " wid INTEGER NOT NULL, with_res TEXT, id TEXT NOT NULL, dir INTEGER NOT NULL,"
               " stanza BLOB NOT NULL)")  # the first layout
    db.execute("INSERT INTO archive VALUES (1, 1, 2, NULL, 'p-1', 0, x'00')")
    db.commit()
    db.close()
    for create in (True, False):
        with pytest.raises(OldArchive) as e:
            SQLiteMessageLog(str(tmp_path), create=create)
        assert "schema 1, this xmppd reads schema 2: move the file away" in str(e.value)
    db = sqlite3.connect(tmp_path / "archive.sqlite3")
    assert db.execute("SELECT count(*) FROM archive").fetchone()[0] == 1  # left as it was
    db.close()


def test_sqlite_refuses_ids_that_do_not_end_with_their_seq(tmp_path):
    from xmppd.storage import StoreError

    log = SQLiteMessageLog(str(tmp_path))
    with pytest.raises(StoreError):
        log.append([(5, "a@x", "b@y", "p-6", INCOMING, b"<message/>")])
    log.close()


# -- the worker: checkpoints that complete, so the WAL restarts -----------------------

def test_worker_checkpoints_right_after_a_commit(monkeypatch):
    from twisted.internet.task import Clock

    clock = Clock()
    w = LogWorker(MemoryMessageLog(), clock, flush_interval=0.2, checkpoint_interval=1.0)
    started = []

    def run_checkpoint():  # instead of the thread: record, and done at once
        started.append(round(clock.seconds(), 1))
        w._checkpoint_done(None)

    monkeypatch.setattr(w, "_run_checkpoint", run_checkpoint)

    def advance(seconds):
        for _ in range(round(seconds / 0.2)):
            clock.advance(0.2)

    w.append(row(1))
    advance(0.2)
    assert started == [0.2]  # none before: at once after the first commit
    for s in (2, 3, 4, 5, 6):
        w.append(row(s))
        advance(0.2)
    assert started == [0.2, 1.2]  # then after the first commit a second later
    advance(5)
    assert started == [0.2, 1.2]  # nothing written since
    w.append(row(7))
    advance(0.2)
    assert started == [0.2, 1.2, 6.4]
    w.append(row(8))
    advance(2)  # no further commit: a timer checkpoints the last one
    assert started == [0.2, 1.2, 6.4, 7.6]


def test_sequence_slots_never_collide_and_stay_times():
    """Issue 18: nodes sharing an archive draw ids with their slot in the low bits."""
    from xmppd.msglog_pg import SLOT_BITS

    class Clock:
        t = 1_700_000_000.0

        def seconds(self):
            return self.t

    clock = Clock()
    a = Sequence(clock, last=0, bits=SLOT_BITS, slot=3)
    b = Sequence(clock, last=0, bits=SLOT_BITS, slot=4)
    values = []
    for _ in range(50):  # a burst within one microsecond, then the clock moves
        values += [next(a), next(b)]
    clock.t += 1
    values += [next(a), next(b)]
    assert len(set(values)) == len(values)
    assert {v % (1 << SLOT_BITS) for v in values[0::2]} == {3}
    assert {v % (1 << SLOT_BITS) for v in values[1::2]} == {4}
    assert all(x < y for x, y in zip(values[0::2], values[2::2]))
    assert abs(values[-1] - int(clock.t * 1_000_000)) < (1 << SLOT_BITS)
    # restarted above rows of another slot: continues above them, in its own slot
    c = Sequence(clock, last=values[-1], bits=SLOT_BITS, slot=1)
    v = next(c)
    assert v > values[-1] and v % (1 << SLOT_BITS) == 1
    with pytest.raises(ValueError):
        Sequence(clock, bits=2, slot=4)


def test_pg_archive_slots_are_exclusive_and_freed(pg_store_conf, monkeypatch):  # noqa: F811
    """Each writer holds its own slot (an advisory lock) until it closes; no free slot: refused."""
    from types import SimpleNamespace

    from xmppd import msglog_pg

    pg_truncate(pg_store_conf)
    store = SimpleNamespace(conf=pg_store_conf, path="pg")
    monkeypatch.setattr(msglog_pg, "SLOTS", 2)
    a = msglog_pg.AsyncPostgresArchive(store)
    b = msglog_pg.AsyncPostgresArchive(store)
    try:
        assert {a.slot, b.slot} == {0, 1}
        with pytest.raises(msglog_pg.SlotTaken, match="all 2 archive slots"):
            msglog_pg.AsyncPostgresArchive(store)
        a.append_now([row(64 + a.slot)])
        b.append_now([row(64 + b.slot)])
        assert a.last_seq() == 65
        freed = a.slot
        a.close()
        c = msglog_pg.AsyncPostgresArchive(store)
        assert c.slot == freed
        c.close()
    finally:
        b.close()

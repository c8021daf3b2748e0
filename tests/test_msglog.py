"""The message log (xmppd.msglog): one suite for the SQLite and the in-memory backends."""
from __future__ import annotations

from collections import Counter

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


def test_worker_message_entries(msglog):
    """The hot path buffers one entry per message (LogWorker.add), rows of both
    parties in it; every backend stores the same rows as if appended one by one,
    mixed with plain rows in one flush; max_buffer counts entries."""
    from twisted.internet.task import Clock

    w = LogWorker(msglog, Clock(), flush_interval=0.2, max_buffer=4, checkpoint_interval=0)
    w.prefix = "p-"
    data = b"<message n='both'/>"
    w.add((10, "a@x", "b@x/phone", 11, "b@x", "a@x/laptop", data))  # local to local
    w.add((12, "a@x", "c@y", 0, None, "", b"<message n='out'/>"))  # to another server
    w.append(row(13, user="b@x", other="c@y/r"))  # a plain row between them
    w.add((0, None, "", 14, "b@x", "c@y/r", b"<message n='in'/>"))  # from another server
    w.add((15, "a@x", "b@x", 16, "b@x", "a@x/laptop", data))  # one over max_buffer
    assert w.dropped == 1 and len(w.pending) == 4
    w.flush()
    a = msglog.query(LogQuery("a@x"))
    b = msglog.query(LogQuery("b@x"))
    assert [(r.seq, r.id, r.with_full, r.direction) for r in a] == [
        (10, "p-a", "b@x/phone", OUTGOING), (12, "p-c", "c@y", OUTGOING)]
    assert [(r.seq, r.id, r.with_full, r.direction) for r in b] == [
        (11, "p-b", "a@x/laptop", INCOMING), (13, "p-d", "c@y/r", INCOMING),
        (14, "p-e", "c@y/r", INCOMING)]
    assert a[0].stanza == b[0].stanza == data and b[2].stanza == b"<message n='in'/>"
    assert msglog.get("b@x", [11, 14])[1].id == "p-e"
    w.close()


def test_delete_in_chunks(msglog):
    fill(msglog)
    assert msglog.delete_user("a@x", limit=7) == 7
    assert seqs(msglog.query(LogQuery("a@x", limit=1))) == [8]
    assert msglog.delete_user("a@x", before=12, limit=100) == 4
    assert seqs(msglog.query(LogQuery("a@x", limit=1))) == [12]
    msglog.checkpoint()


# -- the SQLite layout (schema 3): blocks per user per flush, messages stored once --------

def stored_messages(log) -> int:
    """Stanzas held in the chunks (every test stanza starts with ``<message``)."""
    return sum(d.count(b"<message") for (d,) in log._db.execute("SELECT data FROM chunks"))


def pair(seq, data=None):
    """What the plugin appends for a message a@x -> b@x: one bytes object, two rows."""
    data = data or f"<message n='{seq}'/>".encode()
    return [(seq, "a@x", "b@x/phone", f"p-{seq:x}", OUTGOING, data),
            (seq + 1, "b@x", "a@x/laptop", f"p-{seq + 1:x}", INCOMING, data)]


def test_sqlite_stores_a_local_message_once(tmp_path):
    log = SQLiteMessageLog(str(tmp_path))
    log.append(pair(10) + pair(20) + [row(30)])
    assert stored_messages(log) == 3  # two pairs and a single row
    # one block per user per append, not one row per message
    assert log._db.execute("SELECT count(*) FROM blocks").fetchone()[0] == 2
    a, b = log.query(LogQuery("a@x")), log.query(LogQuery("b@x"))
    assert [(r.seq, r.id, r.with_full, r.direction) for r in b] == [
        (11, "p-b", "a@x/laptop", INCOMING), (21, "p-15", "a@x/laptop", INCOMING)]
    assert a[0].stanza == b[0].stanza == b"<message n='10'/>"
    assert log.last_seq() == 30
    # one party's deletion keeps the other's copy
    assert log.delete_user("a@x", before=15) == 1
    assert log.get("b@x", [11])[0].stanza == b"<message n='10'/>"
    assert log.delete_user("b@x", before=15) == 1
    # expiry cuts inside blocks: exactly the entries before the cut-off
    assert log.expire(before=25, limit=100) == 2
    assert log.query(LogQuery("b@x")) == [] and seqs(log.query(LogQuery("a@x"))) == [30]
    assert log.delete_user("a@x") == 1
    assert log._db.execute("SELECT count(*) FROM chunks").fetchone()[0] == 0  # released
    assert log._db.execute("SELECT count(*) FROM block_with").fetchone()[0] == 0
    # the quota releases what it drops
    log.append(pair(40) + pair(50), max_per_user=1)
    assert seqs(log.query(LogQuery("a@x"))) == [50] and seqs(log.query(LogQuery("b@x"))) == [51]
    assert log._db.execute("SELECT sum(refs) FROM chunks").fetchone()[0] == 2
    log.close()
    log = SQLiteMessageLog(str(tmp_path))  # the high-water mark survives deletions
    assert log.last_seq() == 51
    log.close()


def test_sqlite_blocks_agree_with_the_memory_log(tmp_path, monkeypatch):
    """Small blocks and chunks, random appends (pairs, late rows), quota,
    deletes and expiry: every query, count and get answers as the in-memory
    log does (which keeps one row per message)."""
    import random

    from xmppd import msglog_sqlite

    monkeypatch.setattr(msglog_sqlite, "MAX_ENTRIES", 3)
    monkeypatch.setattr(msglog_sqlite, "CHUNK_BYTES", 40)
    rnd = random.Random(7)
    users = ["a@x", "b@x", "c@x"]
    others = ["b@x/phone", "b@x/pc", "d@y", "a@x/laptop", "e@z/r"]
    sql, mem = SQLiteMessageLog(str(tmp_path)), MemoryMessageLog()
    seq = 1000
    late = []
    for step in range(120):
        batch = []
        for _ in range(rnd.randrange(0, 8)):
            seq += rnd.randrange(1, 4)
            data = f"<message n='{seq}'>{'x' * rnd.randrange(0, 30)}</message>".encode()
            u, o = rnd.choice(users), rnd.choice(others)
            batch.append((seq, u, o, f"pre{seq % 2}-{seq:x}", rnd.randrange(2), data))
            if rnd.random() < 0.3:  # the recipient's row of the same message
                seq += 1
                batch.append((seq, rnd.choice(users), o, f"pre-{seq:x}", INCOMING, data))
            if rnd.random() < 0.1:  # a row that arrives a few batches late
                seq += 1
                late.append((seq, u, o, f"pre-{seq:x}", OUTGOING, data))
        if late and rnd.random() < 0.3:
            batch.append(late.pop(0))
        quota = 25 if step > 60 else 0
        assert sql.append(list(batch), quota) == mem.append(list(batch), quota)
        action = rnd.random()
        if action < 0.05:
            u, cut, limit = rnd.choice(users), seq - rnd.randrange(0, 40), rnd.choice([None, 2, 5])
            assert sql.delete_user(u, cut, limit) == mem.delete_user(u, cut, limit)
        if action < 0.1:
            cut = seq - rnd.randrange(20, 80)
            assert sql.expire(cut, 10**6) == mem.expire(cut, 10**6)
        for _ in range(4):
            u = rnd.choice(users)
            lo = rnd.choice([None, seq - rnd.randrange(0, 100)])
            hi = rnd.choice([None, seq - rnd.randrange(0, 60)])
            w = rnd.choice([None, None, "b@x", "d@y", "b@x/pc", "a@x/laptop"])
            q = LogQuery(u, w, w is not None and "/" in w, lo, hi, rnd.randrange(1, 12),
                         rnd.random() < 0.5)
            assert sql.query(q) == mem.query(q), q
            assert sql.count(q, 30) == mem.count(q, 30), q
        wanted = [rnd.randrange(1000, seq + 1) for _ in range(6)]
        assert sql.get("a@x", wanted) == mem.get("a@x", wanted)
    assert mem.last_seq() <= sql.last_seq() <= seq
    assert sql._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # every chunk is referenced by exactly as many entries as it counts
    refs = Counter()
    for (blob,) in sql._db.execute("SELECT entries FROM blocks"):
        refs.update(e[4] for e in msglog_sqlite.ENTRY.iter_unpack(blob))
    assert dict(sql._db.execute("SELECT id, refs FROM chunks")) == dict(refs)
    sql.close()


SCHEMA_2 = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE jids (id INTEGER PRIMARY KEY, jid TEXT NOT NULL UNIQUE)",
    "CREATE TABLE prefixes (id INTEGER PRIMARY KEY, prefix TEXT NOT NULL UNIQUE)",
    "CREATE TABLE msgs (seq INTEGER PRIMARY KEY, refs INTEGER NOT NULL, uid INTEGER NOT NULL,"
    " uid2 INTEGER, seq2 INTEGER, stanza BLOB NOT NULL)",
    "CREATE TABLE archive (uid INTEGER NOT NULL, seq INTEGER NOT NULL, wid INTEGER NOT NULL,"
    " with_res TEXT, pfx INTEGER NOT NULL, dir INTEGER NOT NULL, msg INTEGER NOT NULL,"
    " PRIMARY KEY (uid, seq)) WITHOUT ROWID",
    "CREATE INDEX archive_with ON archive(uid, wid)",
    "INSERT INTO meta VALUES ('schema', 2), ('last_seq', 0)",
)


def test_sqlite_converts_a_schema_2_archive(tmp_path, monkeypatch):
    """An archive.sqlite3 written by schema 2 (one row per archive entry) is
    converted on open, in one transaction, and reads back entry for entry."""
    import sqlite3

    from xmppd import msglog_sqlite

    monkeypatch.setattr(msglog_sqlite, "MAX_ENTRIES", 4)
    db = sqlite3.connect(tmp_path / "archive.sqlite3")
    for statement in SCHEMA_2:
        db.execute(statement)
    db.executemany("INSERT INTO jids VALUES (?, ?)",
                   [(1, "a@x"), (2, "b@x"), (3, "c@y")])
    db.executemany("INSERT INTO prefixes VALUES (?, ?)", [(1, "old-"), (2, "new-")])
    expected = {"a@x": [], "b@x": []}
    for i in range(10):  # a@x -> b@x, stored once for both; then one from c@y/r to a@x
        s = 100 + 10 * i
        data = f"<message n='{i}'/>".encode()
        db.execute("INSERT INTO msgs VALUES (?, 2, 1, 2, ?, ?)", (s, s + 1, data))
        db.execute("INSERT INTO archive VALUES (1, ?, 2, 'phone', ?, 1, ?)", (s, 1 + i % 2, s))
        db.execute("INSERT INTO archive VALUES (2, ?, 1, NULL, 2, 0, ?)", (s + 1, s))
        db.execute("INSERT INTO msgs VALUES (?, 1, 1, NULL, NULL, ?)", (s + 2, data + b"!"))
        db.execute("INSERT INTO archive VALUES (1, ?, 3, 'r', 2, 0, ?)", (s + 2, s + 2))
        pfx = "old-" if i % 2 == 0 else "new-"
        expected["a@x"] += [(s, "a@x", "b@x/phone", f"{pfx}{s:x}", OUTGOING, data),
                            (s + 2, "a@x", "c@y/r", f"new-{s + 2:x}", INCOMING, data + b"!")]
        expected["b@x"].append((s + 1, "b@x", "a@x", f"new-{s + 1:x}", INCOMING, data))
    db.execute("UPDATE meta SET value=192 WHERE key='last_seq'")
    db.commit()
    db.close()
    log = SQLiteMessageLog(str(tmp_path))
    try:
        for user, rows in expected.items():
            assert [tuple(r) for r in log.query(LogQuery(user, limit=100))] == rows
        assert seqs(log.query(LogQuery("a@x", "c@y", limit=3, reverse=True))) == [192, 182, 172]
        assert log.count(LogQuery("a@x", "b@x"), 100) == 10
        assert log.last_seq() == 192
        assert stored_messages(log) == 20  # the shared message is still stored once
        tables = {r[0] for r in log._db.execute("SELECT name FROM sqlite_master")}
        assert "archive" not in tables and "msgs" not in tables
        # it goes on: new rows, deletes
        log.append([(300, "a@x", "b@x", "new-12c", OUTGOING, b"<message/>")])
        assert log.delete_user("a@x", before=150) == 10
        assert log.count(LogQuery("a@x"), 100) == 11
    finally:
        log.close()
    log = SQLiteMessageLog(str(tmp_path))  # converted once: opens as schema 3
    assert log._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == 3
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
        assert "schema 1, this xmppd reads schema 3: move the file away" in str(e.value)
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


def test_sqlite_refuses_ids_without_a_prefix(tmp_path):
    from xmppd.storage import StoreError

    log = SQLiteMessageLog(str(tmp_path))
    with pytest.raises(StoreError):
        log.append([(5, "a@x", "b@y", "5", INCOMING, b"<message/>")])
    log.append([(5, "a@x", "b@y", "p-5", INCOMING, b"<message/>")])  # the transaction is clean
    assert [r.id for r in log.query(LogQuery("a@x"))] == ["p-5"]
    log.close()

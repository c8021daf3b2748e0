"""The message log: an ordered, indexed archive of messages per user (XEP-0313 MAM).

Not the key-value store (:mod:`xmppd.storage`): an archive is a log read in
pages, by time and by conversation partner, and a key-value scan of a
million rows per page would not do.  :class:`IMessageLog` is the contract a
backend implements (SQLite here and an in-memory one for tests; a
PostgreSQL one can follow the same schema).

Ordering key: every row has a ``seq``, an integer that is at the same time
its archive time in microseconds since the epoch.  The writer hands out
strictly increasing values (``max(now, last + 1)``, see
:class:`Sequence`), so one integer orders the log, bounds time ranges
(``start``/``end`` become ``seq`` bounds, no time index needed), and points
to a row: archive ids are the XEP-0359 stanza ids, ``<process prefix><seq
in hex>``, so an id is resolved by its primary key and checked against the
id rebuilt from the row (its prefix is stored as a number), with no id
column or index.  A clock that steps back makes the
archive times run up to that much ahead for a while; order stays right.

The calls are synchronous and cheap (no fsync: checkpoints run on a thread
of their own, see :class:`LogWorker`); deletes take a ``limit`` so that a
large one is made of short transactions.
"""
from __future__ import annotations

import bisect
import os
import sqlite3
import threading
from collections import Counter
from operator import itemgetter
from typing import Callable, NamedTuple

from zope.interface import Interface, implementer

from xmppd.storage import StoreError, StoreNotFound, connect_sqlite

__all__ = ["Row", "LogQuery", "IMessageLog", "SQLiteMessageLog", "MemoryMessageLog",
           "Sequence", "LogWorker", "seq_of_id", "OldArchive"]

INCOMING, OUTGOING = 0, 1


class Row(NamedTuple):
    """One archived message of one user's archive."""

    seq: int          # order and time (microseconds since the epoch), unique
    user: str         # whose archive (bare JID)
    with_full: str    # the other party, as it appeared on the message
    id: str           # the archive id (the XEP-0359 stanza-id by=user)
    direction: int    # INCOMING or OUTGOING
    stanza: bytes     # the message, jabber:client namespace spelled out


class LogQuery(NamedTuple):
    """One page of one user's archive.

    ``lo``/``hi`` are exclusive ``seq`` bounds (None: open).  ``with_jid``
    matches the bare JID of the other party, or its full JID when
    ``with_full`` is set.  ``reverse``: the ``limit`` rows just below
    ``hi``, newest first (backward paging).
    """

    user: str
    with_jid: str | None = None
    with_full: bool = False
    lo: int | None = None
    hi: int | None = None
    limit: int = 50
    reverse: bool = False


def seq_of_id(archive_id: str) -> int | None:
    """The ``seq`` an archive id points to, or None if it is not one of ours."""
    dash = archive_id.rfind("-")
    tail = archive_id[dash + 1:]
    if not tail or len(tail) > 16:
        return None
    try:
        return int(tail, 16)
    except ValueError:
        return None


class IMessageLog(Interface):
    """An append-only log per user with ranged reads and bulk deletes."""

    def last_seq() -> int:
        """The highest ``seq`` stored (0 when empty): the writer continues above it."""

    def append(rows: list, max_per_user: int = 0) -> dict:
        """Store ``rows`` (one transaction).  With ``max_per_user`` > 0, then
        drop each affected user's oldest rows beyond that many; returns
        ``{user: rows dropped}`` for users that were trimmed."""

    def query(q: LogQuery) -> list:
        """Rows of ``q``, oldest first (newest first when ``q.reverse``)."""

    def count(q: LogQuery, cap: int) -> int | None:
        """How many rows ``q`` matches ignoring its limit; None when more than ``cap``."""

    def get(user: str, seqs: list) -> list:
        """The rows of ``user`` with these ``seq`` values, oldest first."""

    def delete_user(user: str, before: int | None = None, limit: int | None = None) -> int:
        """Remove ``user``'s rows (only those with ``seq < before`` if given),
        the oldest ``limit`` of them at most (None: all)."""

    def expire(before: int, limit: int) -> int:
        """Remove up to ``limit`` of the oldest rows with ``seq < before``."""

    def checkpoint() -> None:
        """Make what was committed durable (may be called from another thread)."""

    def close() -> None:
        """Release resources."""


_COLUMNS = ("a.seq, ?, CASE WHEN a.with_res IS NULL THEN j.jid ELSE j.jid || '/' || a.with_res END,"
            " p.prefix || printf('%x', a.seq), a.dir, m.stanza")
_FROM = ("archive a JOIN jids j ON j.id=a.wid JOIN prefixes p ON p.id=a.pfx"
         " JOIN msgs m ON m.seq=a.msg")
JID_CACHE = 100_000
# The WAL file is cut back to this size when a checkpoint has emptied it.
WAL_SIZE_LIMIT = 64 << 20
# Page cache of the writing connection (KiB): the pages that a batch touches
# (the end of every active user's range) stay in memory between batches.
CACHE_KIB = 8192
SCHEMA = 2  # the on-disk layout this code reads and writes (meta table, key 'schema')


def _where(q: LogQuery, uid: int, wid: int | None) -> tuple[str, list]:
    clauses, args = ["a.uid=?"], [uid]
    if wid is not None:
        clauses.append("a.wid=?")
        args.append(wid)
        if q.with_full:
            clauses.append("a.with_res=?")
            args.append(q.with_jid.split("/", 1)[1])
    if q.lo is not None:
        clauses.append("a.seq>?")
        args.append(q.lo)
    if q.hi is not None:
        clauses.append("a.seq<?")
        args.append(q.hi)
    return " AND ".join(clauses), args


_CREATE = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE jids (id INTEGER PRIMARY KEY, jid TEXT NOT NULL UNIQUE)",
    "CREATE TABLE prefixes (id INTEGER PRIMARY KEY, prefix TEXT NOT NULL UNIQUE)",
    # One stored message, shared by the (at most two) archive rows that
    # point to it: (uid, seq) is the first, (uid2, seq2) the second.
    "CREATE TABLE msgs (seq INTEGER PRIMARY KEY, refs INTEGER NOT NULL, uid INTEGER NOT NULL,"
    " uid2 INTEGER, seq2 INTEGER, stanza BLOB NOT NULL)",
    "CREATE TABLE archive (uid INTEGER NOT NULL, seq INTEGER NOT NULL, wid INTEGER NOT NULL,"
    " with_res TEXT, pfx INTEGER NOT NULL, dir INTEGER NOT NULL, msg INTEGER NOT NULL,"
    " PRIMARY KEY (uid, seq)) WITHOUT ROWID",
    "CREATE INDEX archive_with ON archive(uid, wid)",
    f"INSERT INTO meta VALUES ('schema', {SCHEMA}), ('last_seq', 0)",
)


class OldArchive(StoreError):
    """The archive file has a layout this version does not read."""


@implementer(IMessageLog)
class SQLiteMessageLog:
    """The archive in ``<data_dir>/archive.sqlite3`` (WAL, synchronous=NORMAL).

    A file of its own, so that its batched writes never wait for (or hold)
    the key-value store's write lock.  Commits do not fsync (WAL with
    ``synchronous=NORMAL``: a crash of the process loses nothing committed,
    a power loss what was committed since the last checkpoint); automatic
    checkpoints are off and :meth:`checkpoint` (WAL fsync, copy, database
    fsync) runs on a thread of its own connection, so no fsync is ever
    made on the reactor.

    Layout (schema 2, bench/RESULTS.md "archive write path"): a message is
    stored once in ``msgs`` (keyed by the ``seq`` of its first archive row)
    and each archive that holds it has a small row in ``archive``, a
    WITHOUT ROWID table keyed ``(uid, seq)``: a user's page is one range of
    the primary key, a conversation one range of the ``(uid, wid)`` index,
    with no separate per-user index to maintain.  A message between two
    local users (archived twice) is written once, with two small rows: five
    B-tree inserts instead of six and about half the bytes of schema 1's
    two full rows with two indexes each (bench/RESULTS.md).  The
    archive id is not stored: it is ``<prefix><seq in hex>`` (the XEP-0359
    id the message was delivered with) and rows keep a reference to their
    prefix.  ``msgs.refs`` counts the rows that point to a message; it is
    deleted with the last of them.  Bare JIDs are numbered in ``jids``.
    ``meta`` holds the schema version (a file of another version is
    refused, never misread) and the highest ``seq`` ever stored.
    """

    FILENAME = "archive.sqlite3"

    def __init__(self, data_dir: str, create: bool = True) -> None:
        self.path = os.path.join(data_dir, self.FILENAME)
        if not create and not os.path.isfile(self.path):
            raise StoreNotFound(self.path)
        try:
            self._db = connect_sqlite(self.path, create)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            self._db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._open_schema()
        except (OSError, sqlite3.Error) as e:
            raise StoreError(self.path, "open archive", str(e)) from e
        self._lock = threading.Lock()
        # uid -> rows stored, loaded on first need (quota); kept exact by
        # every write and delete made through this object.
        self._counts: dict[int, int] = {}
        self._jids: dict[str, int] = {}  # bare JID -> id, bounded
        self._prefixes: dict[str, int] = {}  # id prefix -> number
        self._others: dict[str, tuple] = {}  # full JID -> (bare JID's number, resource)
        self._checkpointer: sqlite3.Connection | None = None

    def _open_schema(self) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not tables:
                for statement in _CREATE:
                    db.execute(statement)
                version = SCHEMA
            elif "meta" not in tables:
                version = 1  # the first archive layout (one full row per archive)
            else:
                row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
                version = row[0] if row else None
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            db.close()
            raise
        if version != SCHEMA:
            db.close()
            raise OldArchive(self.path, "open archive",
                             f"written with archive schema {version}, this xmppd reads schema "
                             f"{SCHEMA}: move the file away (it is not converted)")

    def _jid(self, db, jid: str, create: bool) -> int | None:
        known = self._jids.get(jid)
        if known is not None:
            return known
        row = db.execute("SELECT id FROM jids WHERE jid=?", (jid,)).fetchone()
        if row is None:
            if not create:
                return None
            number = db.execute("INSERT INTO jids (jid) VALUES (?)", (jid,)).lastrowid
        else:
            number = row[0]
        if len(self._jids) >= JID_CACHE:
            self._jids.clear()
            self._others.clear()  # holds numbers of the same JIDs
        self._jids[jid] = number
        return number

    def _prefix(self, db, prefix: str) -> int:
        row = db.execute("SELECT id FROM prefixes WHERE prefix=?", (prefix,)).fetchone()
        number = (row[0] if row is not None else
                  db.execute("INSERT INTO prefixes (prefix) VALUES (?)", (prefix,)).lastrowid)
        self._prefixes[prefix] = number
        return number

    # -- reads ---------------------------------------------------------------

    def _read(self, operation: str, user: str, work: Callable):
        try:
            with self._lock:
                return work(self._db)
        except sqlite3.Error as e:
            raise StoreError.from_sqlite(self.path, operation, user, e) from None

    def last_seq(self) -> int:
        return self._read("read archive", "", lambda db: db.execute(
            "SELECT value FROM meta WHERE key='last_seq'").fetchone()[0])

    def _ids(self, db, q: LogQuery):
        """(uid, wid) of a query; None when one of them was never archived."""
        uid = self._jid(db, q.user, False)
        if uid is None:
            return None
        wid = None
        if q.with_jid is not None:
            wid = self._jid(db, q.with_jid.split("/", 1)[0], False)
            if wid is None:
                return None
        return uid, wid

    def query(self, q: LogQuery) -> list:
        def work(db):
            ids = self._ids(db, q)
            if ids is None:
                return []
            where, args = _where(q, *ids)
            order = "DESC" if q.reverse else "ASC"
            return db.execute(
                f"SELECT {_COLUMNS} FROM {_FROM} WHERE {where}"
                f" ORDER BY a.seq {order} LIMIT ?", (q.user, *args, q.limit)).fetchall()

        return [Row(*r) for r in self._read("query archive", q.user, work)]

    def count(self, q: LogQuery, cap: int) -> int | None:
        def work(db):
            ids = self._ids(db, q)
            if ids is None:
                return 0
            where, args = _where(q, *ids)
            return db.execute(f"SELECT count(*) FROM (SELECT 1 FROM archive a WHERE {where}"
                              " LIMIT ?)", (*args, cap + 1)).fetchone()[0]

        n = self._read("count archive", q.user, work)
        return None if n > cap else n

    def get(self, user: str, seqs: list) -> list:
        if not seqs:
            return []

        def work(db):
            uid = self._jid(db, user, False)
            if uid is None:
                return []
            marks = ",".join("?" * len(seqs))
            return db.execute(
                f"SELECT {_COLUMNS} FROM {_FROM} WHERE a.uid=? AND a.seq IN ({marks})"
                " ORDER BY a.seq", (user, uid, *seqs)).fetchall()

        return [Row(*r) for r in self._read("read archive", user, work)]

    # -- writes --------------------------------------------------------------

    def _write(self, operation: str, user: str, work: Callable) -> object:
        db = self._db
        with self._lock:
            try:
                db.execute("BEGIN IMMEDIATE")
                result = work(db)
                db.execute("COMMIT")
                return result
            except sqlite3.Error as e:
                if db.in_transaction:
                    try:
                        db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                # What was counted or numbered in the failed transaction is gone.
                self._counts.clear()
                self._jids.clear()
                self._others.clear()
                self._prefixes.clear()
                raise StoreError.from_sqlite(self.path, operation, user, e) from None

    def _count(self, db, uid: int) -> int:
        n = self._counts.get(uid)
        if n is None:
            n = db.execute("SELECT count(*) FROM archive WHERE uid=?", (uid,)).fetchone()[0]
        return n

    @staticmethod
    def _release(db, victims: list) -> None:
        """The rows ``(uid, seq, msg)`` were deleted: drop the messages no row points to."""
        refs: dict[int, int] = {}
        for _uid, _seq, msg in victims:
            refs[msg] = refs.get(msg, 0) + 1
        db.executemany("UPDATE msgs SET refs=refs-? WHERE seq=?", [(n, m) for m, n in refs.items()])
        db.executemany("DELETE FROM msgs WHERE seq=? AND refs<=0", [(m,) for m in refs])

    def _delete_oldest(self, db, uid: int, n: int, before: int | None = None) -> int:
        """Delete ``uid``'s ``n`` oldest rows (below ``before`` if given)."""
        if before is None:
            victims = db.execute("SELECT uid, seq, msg FROM archive WHERE uid=? ORDER BY seq"
                                 " LIMIT ?", (uid, n)).fetchall()
        else:
            victims = db.execute("SELECT uid, seq, msg FROM archive WHERE uid=? AND seq<?"
                                 " ORDER BY seq LIMIT ?", (uid, before, n)).fetchall()
        if victims:
            db.execute("DELETE FROM archive WHERE uid=? AND seq<=?", (uid, victims[-1][1]))
            self._release(db, victims)
        return len(victims)

    def _other(self, db, with_full: str) -> tuple:
        """(wid, resource) of the other party's full JID, cached (bounded)."""
        slash = with_full.find("/")
        if slash < 0:
            other = (self._jid(db, with_full, True), None)
        else:
            other = (self._jid(db, with_full[:slash], True), with_full[slash + 1:])
        if len(self._others) >= JID_CACHE:
            self._others.clear()
        self._others[with_full] = other
        return other

    def append(self, rows: list, max_per_user: int = 0) -> dict:
        if not rows:
            return {}

        def work(db):
            # Per row, on the reactor: a few dict look-ups and one tuple.
            jids, others, prefixes = self._jids, self._others, self._prefixes
            values, messages = [], []
            shared = message = None
            for seq, user, with_full, ident, direction, stanza in rows:
                uid = jids.get(user) or self._jid(db, user, True)
                wid, res = others.get(with_full) or self._other(db, with_full)
                tail = f"{seq:x}"
                if not ident.endswith(tail):
                    raise sqlite3.IntegrityError(f"archive id {ident!r} does not end with {tail}")
                prefix = ident[:len(ident) - len(tail)]
                pfx = prefixes.get(prefix) or self._prefix(db, prefix)
                if stanza is shared and message[1] == 1:
                    # The same delivered message, archived for the other party
                    # (the plugin appends both rows one after the other): stored once.
                    message[1] = 2
                    message[3] = uid
                    message[4] = seq
                else:
                    message = [seq, 1, uid, None, None, stanza]
                    messages.append(message)
                    shared = stanza
                values.append((uid, seq, wid, res, pfx, direction, message[0]))
            added = Counter(map(itemgetter(0), values))
            counts = {}
            if max_per_user > 0:
                # Counted before the insert: a first count of a big archive is
                # one index range scan, once per user per process.
                counts = {u: self._count(db, u) for u in added}
            db.executemany("INSERT INTO msgs VALUES (?,?,?,?,?,?)", messages)
            db.executemany("INSERT INTO archive VALUES (?,?,?,?,?,?,?)", values)
            db.execute("UPDATE meta SET value=max(value, ?) WHERE key='last_seq'",
                       (max(map(itemgetter(1), values)),))
            dropped = {}
            for uid, n in counts.items():
                total = n + added[uid]
                excess = total - max_per_user
                if excess > 0:
                    self._delete_oldest(db, uid, excess)
                    dropped[uid] = excess
                    total = max_per_user
                counts[uid] = total
            if max_per_user <= 0:
                for uid, n in added.items():
                    if uid in self._counts:
                        counts[uid] = self._counts[uid] + n
            if dropped:
                names = {jids.get(r[1]) or self._jid(db, r[1], False): r[1] for r in rows}
                dropped = {names[uid]: n for uid, n in dropped.items()}
            return counts, dropped

        counts, dropped = self._write("append archive", rows[0][1], work)
        self._counts.update(counts)
        return dropped

    def delete_user(self, user: str, before: int | None = None, limit: int | None = None) -> int:
        def work(db):
            uid = self._jid(db, user, False)
            if uid is None:
                return 0, None
            return self._delete_oldest(db, uid, -1 if limit is None else limit, before), uid

        n, uid = self._write("delete archive", user, work)
        self._counts.pop(uid, None)
        return n

    def expire(self, before: int, limit: int) -> int:
        """The oldest messages first, each with all its archive rows: stops at
        the first message that reaches ``limit`` rows (so it deletes at most
        ``limit + 1``, and at least ``limit`` unless nothing is left)."""
        def work(db):
            doomed, total = [], 0
            for seq, refs, uid, uid2, seq2 in db.execute(
                    "SELECT seq, refs, uid, uid2, seq2 FROM msgs WHERE seq<? ORDER BY seq LIMIT ?",
                    (before, limit)).fetchall():
                doomed.append((seq, uid, uid2, seq2))
                total += refs
                if total >= limit:
                    break
            gone = []
            for seq, uid, uid2, seq2 in doomed:
                for key in ((uid, seq), (uid2, seq2)) if uid2 is not None else ((uid, seq),):
                    if db.execute("DELETE FROM archive WHERE uid=? AND seq=?", key).rowcount:
                        gone.append(key[0])
            if doomed:
                db.execute("DELETE FROM msgs WHERE seq<=?", (doomed[-1][0],))
            return gone

        gone = self._write("expire archive", "", work)
        for uid in gone:
            if uid in self._counts:
                self._counts[uid] -= 1
        return len(gone)

    def checkpoint(self) -> None:
        """Copy the WAL into the database, with the fsyncs (own connection, any thread)."""
        try:
            if self._checkpointer is None:
                self._checkpointer = sqlite3.connect(self.path, isolation_level=None,
                                                     check_same_thread=False)
                self._checkpointer.execute("PRAGMA busy_timeout=5000")
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as e:
            raise StoreError.from_sqlite(self.path, "checkpoint archive", "", e) from None

    def close(self) -> None:
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # the next open recovers from the WAL
            self._db.close()
            if self._checkpointer is not None:
                self._checkpointer.close()


@implementer(IMessageLog)
class MemoryMessageLog:
    """The same contract in memory (unit tests, in-process benchmarks)."""

    def __init__(self) -> None:
        self._rows: dict[int, Row] = {}
        self._by_user: dict[str, list[int]] = {}

    def last_seq(self) -> int:
        return max(self._rows, default=0)

    def append(self, rows: list, max_per_user: int = 0) -> dict:
        for r in rows:
            if r[0] in self._rows:
                raise StoreError("memory", "append archive", f"seq {r[0]} exists", r[1])
        touched = set()
        for r in rows:
            row = Row(*r)
            self._rows[row.seq] = row
            seqs = self._by_user.setdefault(row.user, [])
            if seqs and seqs[-1] > row.seq:
                bisect.insort(seqs, row.seq)
            else:
                seqs.append(row.seq)
            touched.add(row.user)
        dropped = {}
        if max_per_user > 0:
            for user in touched:
                seqs = self._by_user[user]
                excess = len(seqs) - max_per_user
                if excess > 0:
                    for s in seqs[:excess]:
                        del self._rows[s]
                    del seqs[:excess]
                    dropped[user] = excess
        return dropped

    def _matching(self, q: LogQuery):
        seqs = self._by_user.get(q.user, [])
        start = 0 if q.lo is None else bisect.bisect_right(seqs, q.lo)
        end = len(seqs) if q.hi is None else bisect.bisect_left(seqs, q.hi)
        rng = range(end - 1, start - 1, -1) if q.reverse else range(start, end)
        for i in rng:
            row = self._rows[seqs[i]]
            if q.with_jid is not None:
                if q.with_full:
                    if row.with_full != q.with_jid:
                        continue
                elif row.with_full.split("/", 1)[0] != q.with_jid:
                    continue
            yield row

    def query(self, q: LogQuery) -> list:
        out = []
        for row in self._matching(q):
            if len(out) >= q.limit:
                break
            out.append(row)
        return out

    def count(self, q: LogQuery, cap: int) -> int | None:
        n = 0
        for _ in self._matching(q):
            n += 1
            if n > cap:
                return None
        return n

    def get(self, user: str, seqs: list) -> list:
        rows = [self._rows.get(s) for s in sorted(set(seqs))]
        return [r for r in rows if r is not None and r.user == user]

    def delete_user(self, user: str, before: int | None = None, limit: int | None = None) -> int:
        seqs = self._by_user.get(user, [])
        cut = len(seqs) if before is None else bisect.bisect_left(seqs, before)
        if limit is not None:
            cut = min(cut, limit)
        for s in seqs[:cut]:
            del self._rows[s]
        del seqs[:cut]
        if not seqs:
            self._by_user.pop(user, None)
        return cut

    def expire(self, before: int, limit: int) -> int:
        victims = sorted(s for s in self._rows if s < before)[:limit]
        for s in victims:
            row = self._rows.pop(s)
            self._by_user[row.user].remove(s)
        return len(victims)

    def checkpoint(self) -> None:
        pass

    def close(self) -> None:
        pass


class Sequence:
    """Strictly increasing ``seq`` values that are also times (microseconds).

    An iterator, so that the XEP-0359 plugin can draw its ids from it
    (:meth:`StanzaIdPlugin.use_sequence`): the archive id of a message is
    then the stanza-id it was delivered with.

    With ``bits`` > 0, the low ``bits`` bits of every value are ``slot``:
    several nodes writing one archive (PostgreSQL, :mod:`xmppd.msglog_pg`)
    each hold a different slot, so their values never collide, and values
    stay times to within ``2 ** bits`` microseconds.  One node then hands
    out at most one value per ``2 ** bits`` microseconds before running
    ahead of the clock (order stays right, times drift ahead while the
    burst lasts).
    """

    def __init__(self, clock, last: int = 0, bits: int = 0, slot: int = 0) -> None:
        if not 0 <= slot < (1 << bits) or bits < 0:
            raise ValueError(f"slot {slot} does not fit in {bits} bits")
        self.clock = clock
        self.step = 1 << bits
        self.mask = self.step - 1
        self.slot = slot
        # Below the next value this node may use: anything above ``last``
        # (the highest stored by any node) with our slot in the low bits.
        self.last = (last & ~self.mask) | slot

    def __iter__(self) -> "Sequence":
        return self

    def __next__(self) -> int:
        now = (int(self.clock.seconds() * 1_000_000) & ~self.mask) | self.slot
        if now <= self.last:
            now = self.last + self.step
        self.last = now
        return now


class LogWorker:
    """Buffers archive rows, writes them in batches, checkpoints off the reactor.

    Rows wait in memory until the next flush: one transaction per
    ``flush_interval`` on the reactor thread, which costs CPU only (no
    fsync: see :class:`SQLiteMessageLog`).  Queries and deletes go through
    :meth:`run`, after a flush, so they see every row archived before them.
    Right after the first write ``checkpoint_interval`` seconds after the
    last checkpoint, the log's :meth:`~IMessageLog.checkpoint` (the fsyncs)
    runs on a thread of its own (see :meth:`_wrote`).

    Why not write from a thread: measured (bench/RESULTS.md), a writer
    thread makes ``executemany`` hand the GIL to and fro for every row, and
    on a server pinned to one core that tripled the CPU per archived
    message; a batch on the reactor costs a few microseconds a row.

    What a crash loses: ``kill -9``, the rows still buffered (at most
    ``flush_interval`` seconds of messages); a power loss, also what was
    committed since the last checkpoint.  A clean stop writes and
    checkpoints everything (:meth:`close`).  The buffer holds at most
    ``max_buffer`` rows: beyond that rows are dropped, counted and logged.
    """

    def __init__(self, log: IMessageLog, clock, *, flush_interval: float = 0.2,
                 max_buffer: int = 50_000, max_per_user: int = 0,
                 checkpoint_interval: float = 1.0,
                 on_trimmed: Callable[[dict], None] | None = None,
                 on_overflow: Callable[[int], None] | None = None,
                 on_failure: Callable | None = None) -> None:
        self.log = log
        self.clock = clock
        self.flush_interval = flush_interval
        self.max_buffer = max_buffer
        self.max_per_user = max_per_user
        self.checkpoint_interval = checkpoint_interval
        self.on_trimmed = on_trimmed
        self.on_overflow = on_overflow
        self.on_failure = on_failure
        self.pending: list = []
        self.dropped = 0
        self._call = None
        self._checkpoint_call = None
        self._checkpointing = False
        self._last_checkpoint = float("-inf")
        self._pool = None
        self.closed = False

    # -- writes ------------------------------------------------------------------

    def append(self, row: tuple) -> None:
        if len(self.pending) >= self.max_buffer or self.closed:
            self.dropped += 1
            if self.on_overflow is not None:
                self.on_overflow(self.dropped)
            return
        self.pending.append(row)
        if self._call is None:
            self._call = self.clock.callLater(self.flush_interval, self._timer)

    def _timer(self) -> None:
        self._call = None
        self.flush()

    def flush(self) -> dict:
        """Write the buffered rows now (one transaction); returns the users trimmed."""
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None
        rows, self.pending = self.pending, []
        if not rows:
            return {}
        try:
            dropped = self.log.append(rows, self.max_per_user)
        except StoreError as e:
            if self.on_failure is not None:
                self.on_failure(e, len(rows))
            return {}
        self._wrote()
        if dropped and self.on_trimmed is not None:
            self.on_trimmed(dropped)
        return dropped

    def _wrote(self) -> None:
        """After a commit: checkpoint now if the last one is ``checkpoint_interval`` old.

        Right after a commit, so that the checkpoint has a whole
        ``flush_interval`` to finish before the next one: a checkpoint that
        copies everything lets the next commit restart the WAL from its
        start.  One that overlaps a commit leaves the WAL growing, and every
        page read then searches a longer WAL index (measured: a 190 MB WAL
        in the saturation benchmark, bench/RESULTS.md).
        """
        if self.closed or self.checkpoint_interval <= 0:
            return
        due = self._last_checkpoint + self.checkpoint_interval - self.clock.seconds()
        if due <= 0 and not self._checkpointing:
            self._checkpoint()
        elif self._checkpoint_call is None:
            # In case no later commit comes: a timer, one flush_interval after
            # the commit that would have started it.
            self._checkpoint_call = self.clock.callLater(max(due, 0) + self.flush_interval,
                                                         self._checkpoint)

    def _checkpoint(self) -> None:
        if self._checkpoint_call is not None:
            if self._checkpoint_call.active():
                self._checkpoint_call.cancel()
            self._checkpoint_call = None
        if self._checkpointing or self.closed:
            return
        self._last_checkpoint = self.clock.seconds()
        self._checkpointing = True
        self._run_checkpoint()

    def _run_checkpoint(self) -> None:
        """The log's checkpoint (the fsyncs) on a thread of its own; then
        :meth:`_checkpoint_done` on the reactor."""
        from twisted.internet import reactor
        from twisted.internet.threads import deferToThreadPool
        from twisted.python.threadpool import ThreadPool

        if self._pool is None:
            self._pool = ThreadPool(1, 1, name="mam-checkpoint")
            self._pool.start()

        def failed(failure):
            if self.on_failure is not None:
                self.on_failure(failure.value, 0)

        deferToThreadPool(reactor, self._pool, self.log.checkpoint).addBoth(
            self._checkpoint_done).addErrback(failed)

    def _checkpoint_done(self, result):
        self._checkpointing = False
        return result

    # -- other calls ---------------------------------------------------------------

    def run(self, work: Callable):
        """``work(log)`` after everything buffered so far is stored; a Deferred."""
        from twisted.internet import defer

        self.flush()
        d = defer.maybeDeferred(work, self.log)
        d.addCallback(self._after_run)
        return d

    def _after_run(self, result):
        self._wrote()  # deletes want a checkpoint too
        return result

    def close(self) -> None:
        """Stop: write what is left, checkpoint, close the log."""
        self.flush()
        self.closed = True
        for call in (self._call, self._checkpoint_call):
            if call is not None and call.active():
                call.cancel()
        self._call = self._checkpoint_call = None
        if self._pool is not None:
            self._pool.stop()  # joins: a checkpoint under way finishes first
            self._pool = None
        self.log.close()

"""The message archive (:class:`xmppd.msglog.IMessageLog`) in SQLite: schema 3, blocks.

Why blocks: with one row per archived message (schema 2) SQLite made two
B-tree inserts per archive row and one per message, ~3 µs per archive row
at the end of every active user's range: the largest part of what the
archive cost per message (bench/RESULTS.md, issue 16).  Schema 3 stores,
per flush, one row per user holding that user's entries of the batch
packed (:data:`ENTRY`), so the SQLite work grows with users per flush, not
with messages; the per-message work at a flush is a tuple and a few dict
look-ups in Python and ``struct`` packing in C.

Layout (``archive.sqlite3``):

``chunks(id, refs, data)``
    The delivered stanzas of one flush, concatenated, cut into pieces of
    about :data:`CHUNK_BYTES` (a page reads a few small chunks, never a
    whole flush).  A message between two local users is in it once, for
    both archives; ``refs`` counts the entries that point into a chunk,
    which is deleted with the last of them.
``blocks(id, uid, first, last, n, others, entries)``
    ``n`` (at most :data:`MAX_ENTRIES`) entries of one user's archive, the
    ``seq`` range ``first..last``.  ``others`` is the block's list of
    correspondents' full JIDs (NUL-separated: XML has no NUL); an entry is
    ``(seq, other, prefix, direction, chunk, offset, length)``.  The
    blocks of one user never overlap in ``seq`` (a late row is merged into
    the blocks it falls in), so index ``(uid, last)`` seeks a page by
    ``seq`` or time in both directions, and ``first`` (indexed) orders
    retention.  Archive ids are ``<prefix><seq in hex>`` (the XEP-0359 id
    the message was delivered with; ``prefix`` numbered in ``prefixes``):
    an id resolves to a ``seq`` and the block holding it, with no index
    per message.
``block_with(uid, wid, last, first, n, block)``
    One row per block per correspondent's bare JID (``n`` entries of it):
    a ``with`` page reads only blocks that hold the correspondent.

Deletions (quota, purge, retention, account removal) remove exactly the
entries asked for: a block straddling the cut is rewritten without them.
``meta`` holds the schema version and the highest ``seq`` stored.  A schema
2 file (one row per archive entry) is converted on open, in one
transaction; a file of another version is refused, never misread.
"""
from __future__ import annotations

import bisect
import os
import sqlite3
import struct
import threading
from collections import Counter
from itertools import starmap
from operator import itemgetter
from typing import Callable

from twisted.logger import Logger
from zope.interface import implementer

from xmppd.logfilter import log_observer
from xmppd.msglog import INCOMING, OUTGOING, IMessageLog, LogQuery, Row
from xmppd.storage import StoreError, StoreNotFound, connect_sqlite

log = Logger(observer=log_observer)

__all__ = ["SQLiteMessageLog", "OldArchive", "SCHEMA", "ENTRY", "MAX_ENTRIES", "CHUNK_BYTES"]

# seq, other (index in the block's ``others``), prefix number, direction,
# chunk id, offset and length of the stanza in the chunk.
ENTRY = struct.Struct("<qHIBqII")
MAX_ENTRIES = 256   # entries per block: a page decodes a few small blocks
CHUNK_BYTES = 16384  # a chunk is closed once it holds this many bytes
SCHEMA = 3  # the on-disk layout this code reads and writes (meta table, key 'schema')
JID_CACHE = 100_000
# The WAL file is cut back to this size when a checkpoint has emptied it.
WAL_SIZE_LIMIT = 64 << 20
# Page cache of the writing connection (KiB): the pages a batch touches stay
# in memory between batches.
CACHE_KIB = 8192
_LOWEST = -(1 << 63)
_HIGHEST = (1 << 63) - 1
_SEQ = itemgetter(0)

_TABLES = (
    "CREATE TABLE chunks (id INTEGER PRIMARY KEY, refs INTEGER NOT NULL, data BLOB NOT NULL)",
    "CREATE TABLE blocks (id INTEGER PRIMARY KEY, uid INTEGER NOT NULL, first INTEGER NOT NULL,"
    " last INTEGER NOT NULL, n INTEGER NOT NULL, others TEXT NOT NULL, entries BLOB NOT NULL)",
    "CREATE UNIQUE INDEX blocks_user ON blocks(uid, last)",
    "CREATE INDEX blocks_first ON blocks(first)",
    "CREATE TABLE block_with (uid INTEGER NOT NULL, wid INTEGER NOT NULL, last INTEGER NOT NULL,"
    " first INTEGER NOT NULL, n INTEGER NOT NULL, block INTEGER NOT NULL,"
    " PRIMARY KEY (uid, wid, last)) WITHOUT ROWID",
)
_CREATE = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE jids (id INTEGER PRIMARY KEY, jid TEXT NOT NULL UNIQUE)",
    "CREATE TABLE prefixes (id INTEGER PRIMARY KEY, prefix TEXT NOT NULL UNIQUE)",
    *_TABLES,
    f"INSERT INTO meta VALUES ('schema', {SCHEMA}), ('last_seq', 0)",
)
_BLOCK = "id, first, last, n, others, entries"


class OldArchive(StoreError):
    """The archive file has a layout this version does not read."""


def _bare(full: str) -> str:
    return full.split("/", 1)[0]


def _block_with(uid: int, bid: int, first: int, last: int, others: list, entries,
                wid_of: Callable[[str], int]) -> list:
    """The ``block_with`` rows of a block: one per bare JID among its entries."""
    per_other = Counter(map(itemgetter(1), entries))
    per_wid: dict[int, int] = {}
    for oi, n in per_other.items():
        wid = wid_of(_bare(others[oi]))
        per_wid[wid] = per_wid.get(wid, 0) + n
    return [(uid, wid, last, first, n, bid) for wid, n in per_wid.items()]


@implementer(IMessageLog)
class SQLiteMessageLog:
    """The archive in ``<data_dir>/archive.sqlite3`` (WAL, synchronous=NORMAL).

    A file of its own, so that its batched writes never wait for (or hold)
    the key-value store's write lock.  Commits do not fsync (WAL with
    ``synchronous=NORMAL``: a crash of the process loses nothing committed,
    a power loss what was committed since the last checkpoint); automatic
    checkpoints are off and :meth:`checkpoint` (WAL fsync, copy, database
    fsync) runs on a thread of its own connection, so no fsync is ever
    made on the reactor.  Layout: the module's docstring.
    """

    FILENAME = "archive.sqlite3"

    def __init__(self, data_dir: str, create: bool = True) -> None:
        self.path = os.path.join(data_dir, self.FILENAME)
        if not create and not os.path.isfile(self.path):
            raise StoreNotFound(self.path)
        self._jids: dict[str, int] = {}  # bare JID -> id, bounded
        self._names: dict[int, str] = {}  # id -> bare JID (reads), bounded
        self._prefixes: dict[str, int] = {}  # id prefix without its last '-' -> number
        self._prefix_names: dict[int, str] = {}  # number -> id prefix (reads)
        try:
            self._db = connect_sqlite(self.path, create)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            self._db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._open_schema()
            self._load_ids()
        except (OSError, sqlite3.Error) as e:
            raise StoreError(self.path, "open archive", str(e)) from e
        self._lock = threading.Lock()
        # uid -> entries stored / highest seq stored, loaded on first need;
        # kept exact by every write and delete made through this object.
        self._counts: dict[int, int] = {}
        self._lasts: dict[int, int] = {}
        self._checkpointer: sqlite3.Connection | None = None

    # -- schema ------------------------------------------------------------------

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
            migrated = None
            if version == 2:
                migrated = self._migrate_2(db)
                version = SCHEMA
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
        if migrated is not None:
            log.info("{path}: archive converted from schema 2 to schema {schema}: {n} entries "
                     "in {blocks} blocks", path=self.path, schema=SCHEMA, n=migrated[0],
                     blocks=migrated[1])

    def _migrate_2(self, db) -> tuple[int, int]:
        """Schema 2 (a row per archive entry, a row per message) -> blocks, in place.

        Each old message becomes a chunk of its own (same number: its old
        ``seq``), so no message is copied twice or lost; each user's entries
        are packed into blocks of :data:`MAX_ENTRIES`.  Runs inside the
        caller's transaction: a failure leaves the schema 2 file as it was.
        """
        for statement in _TABLES:
            db.execute(statement)
        db.execute("INSERT INTO chunks SELECT seq, refs, stanza FROM msgs")
        jids = dict(db.execute("SELECT id, jid FROM jids"))
        numbers = {jid: number for number, jid in jids.items()}
        nblocks = nentries = 0
        blocks, withs = [], []
        current_uid, others, entries = None, {}, []

        def close_block() -> None:
            nonlocal nblocks
            if not entries:
                return
            nblocks += 1
            names = list(others)
            first, last = entries[0][0], entries[-1][0]
            blocks.append((nblocks, current_uid, first, last, len(entries), "\0".join(names),
                           b"".join(starmap(ENTRY.pack, entries))))
            withs.extend(_block_with(current_uid, nblocks, first, last, names, entries,
                                     numbers.__getitem__))
            if len(blocks) >= 1000:
                flush()

        def flush() -> None:
            db.executemany("INSERT INTO blocks VALUES (?,?,?,?,?,?,?)", blocks)
            db.executemany("INSERT INTO block_with VALUES (?,?,?,?,?,?)", withs)
            blocks.clear()
            withs.clear()

        for uid, seq, wid, res, pfx, direction, msg, length in db.execute(
                "SELECT a.uid, a.seq, a.wid, a.with_res, a.pfx, a.dir, a.msg, length(m.stanza)"
                " FROM archive a JOIN msgs m ON m.seq=a.msg ORDER BY a.uid, a.seq"):
            if uid != current_uid or len(entries) >= MAX_ENTRIES:
                close_block()
                current_uid, others, entries = uid, {}, []
            full = jids[wid] if res is None else f"{jids[wid]}/{res}"
            oi = others.get(full)
            if oi is None:
                oi = others[full] = len(others)
            entries.append((seq, oi, pfx, direction, msg, 0, length))
            nentries += 1
        close_block()
        flush()
        db.execute("DROP TABLE archive")
        db.execute("DROP TABLE msgs")
        db.execute("UPDATE meta SET value=? WHERE key='schema'", (SCHEMA,))
        return nentries, nblocks

    def _load_ids(self) -> None:
        db = self._db
        self._next_chunk = db.execute("SELECT coalesce(max(id), 0) + 1 FROM chunks").fetchone()[0]
        self._next_block = db.execute("SELECT coalesce(max(id), 0) + 1 FROM blocks").fetchone()[0]

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
        self._jids[jid] = number
        return number

    def _prefix(self, db, head: str, dash: str) -> int:
        """The number of id prefix ``head + dash`` (an id without a dash is refused)."""
        if not dash:
            raise sqlite3.IntegrityError(f"archive id prefix {head!r} does not end with '-'")
        prefix = head + dash
        row = db.execute("SELECT id FROM prefixes WHERE prefix=?", (prefix,)).fetchone()
        number = (row[0] if row is not None else
                  db.execute("INSERT INTO prefixes (prefix) VALUES (?)", (prefix,)).lastrowid)
        self._prefixes[head] = number
        return number

    def _prefix_name(self, db, number: int) -> str:
        name = self._prefix_names.get(number)
        if name is None:
            self._prefix_names = dict(db.execute("SELECT id, prefix FROM prefixes"))
            name = self._prefix_names[number]
        return name

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
            wid = self._jid(db, _bare(q.with_jid), False)
            if wid is None:
                return None
        return uid, wid

    @staticmethod
    def _blocks(db, uid: int, wid: int | None, lo: int | None, hi: int | None, reverse: bool):
        """The blocks of ``uid`` (holding ``wid`` if given) that may hold a
        ``seq`` in ``(lo, hi)``, in order, read lazily: a page reads the
        blocks it needs, whatever the archive's size.  Rows ``(id, first,
        last, n, others, entries)``."""
        lo = _LOWEST if lo is None else lo
        if wid is None:
            cols, src, key, args = _BLOCK, "blocks", "uid=?", (uid,)
        else:
            cols = "b.id, b.first, b.last, b.n, b.others, b.entries"
            src = "block_with w JOIN blocks b ON b.id=w.block"
            key, args = "w.uid=? AND w.wid=?", (uid, wid)
        last = "last" if wid is None else "w.last"
        if not reverse:
            for block in db.execute(f"SELECT {cols} FROM {src} WHERE {key} AND {last}>?"
                                    f" ORDER BY {last}", (*args, lo)):
                if hi is not None and block[1] >= hi:
                    return
                yield block
            return
        if hi is not None:
            # The one block that may straddle ``hi`` (blocks do not overlap).
            block = db.execute(f"SELECT {cols} FROM {src} WHERE {key} AND {last}>=?"
                               f" ORDER BY {last} LIMIT 1", (*args, hi)).fetchone()
            if block is not None and block[1] < hi and block[2] > lo:
                yield block
        for block in db.execute(f"SELECT {cols} FROM {src} WHERE {key} AND {last}<? AND {last}>?"
                                f" ORDER BY {last} DESC", (*args, _HIGHEST if hi is None else hi,
                                                          lo)):
            yield block

    @staticmethod
    def _matcher(q: LogQuery, others: list):
        """The indexes of ``others`` that ``q.with_jid`` matches (None: all)."""
        if q.with_jid is None:
            return None
        if q.with_full:
            return {i for i, o in enumerate(others) if o == q.with_jid}
        return {i for i, o in enumerate(others) if _bare(o) == q.with_jid}

    def _selected(self, db, q: LogQuery, uid: int, wid: int | None, limit: int | None):
        """(entry, others) of ``q`` in order, at most ``limit`` (None: all, lazily)."""
        lo = _LOWEST if q.lo is None else q.lo
        hi = _HIGHEST if q.hi is None else q.hi
        for _bid, first, last, _n, others_text, blob in self._blocks(db, uid, wid, q.lo, q.hi,
                                                                      q.reverse):
            others = others_text.split("\0")
            entries = list(ENTRY.iter_unpack(blob))
            if first <= lo or last >= hi:
                seqs = [e[0] for e in entries]
                entries = entries[bisect.bisect_right(seqs, lo):bisect.bisect_left(seqs, hi)]
            wanted = self._matcher(q, others)
            if wanted is not None:
                entries = [e for e in entries if e[1] in wanted]
            if q.reverse:
                entries.reverse()
            for e in entries:
                yield e, others

    def _rows(self, db, user: str, selected: list) -> list:
        """Rows of ``(entry, others)`` pairs: the stanzas read from their chunks."""
        if not selected:
            return []
        wanted = {e[4] for e, _ in selected}
        marks = ",".join("?" * len(wanted))
        chunks = dict(db.execute(f"SELECT id, data FROM chunks WHERE id IN ({marks})",
                                 tuple(wanted)))
        out = []
        for (seq, oi, pfx, direction, chunk, off, length), others in selected:
            data = chunks[chunk]
            out.append(Row(seq, user, others[oi], f"{self._prefix_name(db, pfx)}{seq:x}",
                           direction, bytes(data[off:off + length])))
        return out

    def query(self, q: LogQuery) -> list:
        def work(db):
            ids = self._ids(db, q)
            if ids is None or q.limit <= 0:
                return []
            selected = []
            for item in self._selected(db, q, *ids, q.limit):
                selected.append(item)
                if len(selected) >= q.limit:
                    break
            return self._rows(db, q.user, selected)

        return self._read("query archive", q.user, work)

    def count(self, q: LogQuery, cap: int) -> int | None:
        def work(db):
            ids = self._ids(db, q)
            if ids is None:
                return 0
            uid, wid = ids
            lo = _LOWEST if q.lo is None else q.lo
            hi = _HIGHEST if q.hi is None else q.hi
            # Block spans and counts only (an index range): the entries of a
            # block are read where the range or a full JID cuts into it.
            if wid is None:
                spans = db.execute("SELECT id, first, last, n FROM blocks WHERE uid=? AND last>?"
                                   " ORDER BY last", (uid, lo))
            else:
                spans = db.execute("SELECT block, first, last, n FROM block_with WHERE uid=?"
                                   " AND wid=? AND last>? ORDER BY last", (uid, wid, lo))
            total = 0
            for bid, first, last, n in spans:
                if first >= hi:
                    break
                if first > lo and last < hi and not q.with_full:
                    total += n  # the whole block (or all of wid's entries in it)
                else:
                    others_text, blob = db.execute(
                        "SELECT others, entries FROM blocks WHERE id=?", (bid,)).fetchone()
                    wanted = self._matcher(q, others_text.split("\0"))
                    total += sum(1 for e in ENTRY.iter_unpack(blob)
                                 if lo < e[0] < hi and (wanted is None or e[1] in wanted))
                if total > cap:
                    break
            return total

        n = self._read("count archive", q.user, work)
        return None if n > cap else n

    def get(self, user: str, seqs: list) -> list:
        if not seqs:
            return []

        def work(db):
            uid = self._jid(db, user, False)
            if uid is None:
                return []
            selected = []
            block = None
            for seq in sorted(set(seqs)):
                if block is None or not block[0] <= seq <= block[1]:
                    found = db.execute(f"SELECT {_BLOCK} FROM blocks WHERE uid=? AND last>=?"
                                       " ORDER BY last LIMIT 1", (uid, seq)).fetchone()
                    if found is None:
                        break
                    entries = list(ENTRY.iter_unpack(found[5]))
                    block = (found[1], found[2], [e[0] for e in entries], entries,
                             found[4].split("\0"))
                first, last, keys, entries, others = block
                if seq < first:
                    continue
                i = bisect.bisect_left(keys, seq)
                if i < len(keys) and keys[i] == seq:
                    selected.append((entries[i], others))
            return self._rows(db, user, selected)

        return self._read("read archive", user, work)

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
                self._lasts.clear()
                self._jids.clear()
                self._prefixes.clear()
                try:
                    self._load_ids()
                except sqlite3.Error:
                    pass
                raise StoreError.from_sqlite(self.path, operation, user, e) from None

    def _count(self, db, uid: int) -> int:
        n = self._counts.get(uid)
        if n is None:
            n = db.execute("SELECT coalesce(sum(n), 0) FROM blocks WHERE uid=?",
                           (uid,)).fetchone()[0]
        return n

    def _wid_of(self, db) -> Callable[[str], int]:
        jids = self._jids

        def wid_of(bare: str) -> int:
            return jids.get(bare) or self._jid(db, bare, True)

        return wid_of

    def _put_blocks(self, db, uid: int, others: list, entries: list) -> None:
        """Write ``entries`` (sorted by seq) of ``uid`` as new blocks."""
        wid_of = self._wid_of(db)
        text = "\0".join(others)
        blocks, withs = [], []
        for i in range(0, len(entries), MAX_ENTRIES):
            part = entries[i:i + MAX_ENTRIES]
            bid = self._next_block
            self._next_block = bid + 1
            first, last = part[0][0], part[-1][0]
            blocks.append((bid, uid, first, last, len(part), text,
                           b"".join(starmap(ENTRY.pack, part))))
            withs += _block_with(uid, bid, first, last, others, part, wid_of)
        db.executemany("INSERT INTO blocks VALUES (?,?,?,?,?,?,?)", blocks)
        db.executemany("INSERT INTO block_with VALUES (?,?,?,?,?,?)", withs)

    def _drop_block(self, db, uid: int, bid: int, last: int, others: list) -> None:
        db.execute("DELETE FROM blocks WHERE id=?", (bid,))
        wids = {self._jid(db, _bare(o), False) for o in others}
        db.executemany("DELETE FROM block_with WHERE uid=? AND wid=? AND last=?",
                       [(uid, wid, last) for wid in wids if wid is not None])

    def _merge(self, db, uid: int, others: dict, entries: list) -> list:
        """``entries`` fall inside stored blocks of ``uid`` (a late row): take
        those blocks out and return everything merged, to be written anew."""
        for bid, _first, last, _n, others_text, blob in db.execute(
                f"SELECT {_BLOCK} FROM blocks WHERE uid=? AND last>=? ORDER BY last",
                (uid, entries[0][0])).fetchall():
            old = others_text.split("\0")
            remap = []
            for o in old:
                oi = others.get(o)
                if oi is None:
                    oi = others[o] = len(others)
                remap.append(oi)
            entries += [(e[0], remap[e[1]], *e[2:]) for e in ENTRY.iter_unpack(blob)]
            self._drop_block(db, uid, bid, last, old)
        entries.sort(key=_SEQ)
        for a, b in zip(entries, entries[1:]):
            if a[0] == b[0]:
                raise sqlite3.IntegrityError(f"seq {a[0]} is archived twice")
        return entries

    takes_messages = True  # append() takes LogWorker message entries as they are

    def append(self, rows: list, max_per_user: int = 0, messages: list = (),
               prefix: str = "") -> dict:
        """:meth:`IMessageLog.append`; also ``messages``, :class:`~xmppd.msglog.LogWorker`
        entries (one per message, both parties' rows; ids ``prefix`` + seq in hex),
        stored without making a row of each (the hot path's flush)."""
        if not rows and not messages:
            return {}

        def work(db):
            prefixes = self._prefixes
            groups: dict[str, tuple] = {}  # user -> (others {full JID: index}, entries)
            chunks, parts = [], []
            cid = self._next_chunk
            size = refs = 0
            shared = None
            off = length = 0
            # Per row, on the reactor: a few dict look-ups and one tuple.
            for seq, user, with_full, ident, direction, stanza in rows:
                if stanza is not shared:
                    # A new message (both rows of a message between local users
                    # carry one bytes object: stored once).
                    if size >= CHUNK_BYTES:
                        chunks.append((cid, refs, b"".join(parts)))
                        cid += 1
                        parts = []
                        size = refs = 0
                    shared = stanza
                    off = size
                    length = len(stanza)
                    size += length
                    parts.append(stanza)
                refs += 1
                group = groups.get(user)
                if group is None:
                    group = groups[user] = ({}, [])
                others, entries = group
                oi = others.get(with_full)
                if oi is None:
                    oi = others[with_full] = len(others)
                head, dash, tail = ident.rpartition("-")
                pfx = prefixes.get(head) or self._prefix(db, head, dash)
                if tail != f"{seq:x}":
                    raise sqlite3.IntegrityError(f"archive id {ident!r} is not <prefix>-{seq:x}")
                entries.append((seq, oi, pfx, direction, cid, off, length))
            if messages:
                # One message, up to two entries: no row tuples, no id to split
                # (every id is ``prefix`` + seq in hex, made so by the archive).
                head, dash, _ = prefix.rpartition("-")
                pfx = prefixes.get(head) or self._prefix(db, head, dash)
                for out_seq, out_user, to_full, in_seq, in_user, sender_full, stanza in messages:
                    if size >= CHUNK_BYTES:
                        chunks.append((cid, refs, b"".join(parts)))
                        cid += 1
                        parts = []
                        size = refs = 0
                    off = size
                    length = len(stanza)
                    size += length
                    parts.append(stanza)
                    if out_user is not None:
                        refs += 1
                        group = groups.get(out_user)
                        if group is None:
                            group = groups[out_user] = ({}, [])
                        others = group[0]
                        oi = others.get(to_full)
                        if oi is None:
                            oi = others[to_full] = len(others)
                        group[1].append((out_seq, oi, pfx, OUTGOING, cid, off, length))
                    if in_user is not None:
                        refs += 1
                        group = groups.get(in_user)
                        if group is None:
                            group = groups[in_user] = ({}, [])
                        others = group[0]
                        oi = others.get(sender_full)
                        if oi is None:
                            oi = others[sender_full] = len(others)
                        group[1].append((in_seq, oi, pfx, INCOMING, cid, off, length))
            chunks.append((cid, refs, b"".join(parts)))
            self._next_chunk = cid + 1
            db.executemany("INSERT INTO chunks VALUES (?,?,?)", chunks)
            jids, lasts = self._jids, self._lasts
            added, high = {}, 0
            for user, (others, entries) in groups.items():
                uid = jids.get(user) or self._jid(db, user, True)
                entries.sort(key=_SEQ)
                added[uid] = len(entries)
                last = lasts.get(uid)
                if last is None:
                    last = db.execute("SELECT coalesce(max(last), 0) FROM blocks WHERE uid=?",
                                      (uid,)).fetchone()[0]
                if entries[0][0] <= last:
                    entries = self._merge(db, uid, others, entries)
                self._put_blocks(db, uid, list(others), entries)
                lasts[uid] = max(last, entries[-1][0])
                high = max(high, lasts[uid])
            db.execute("UPDATE meta SET value=max(value, ?) WHERE key='last_seq'", (high,))
            counts, dropped = {}, {}
            if max_per_user > 0:
                for uid, n in added.items():
                    total = self._count(db, uid) if uid not in self._counts else \
                        self._counts[uid] + n
                    excess = total - max_per_user
                    if excess > 0:
                        self._delete_oldest(db, uid, excess)
                        dropped[uid] = excess
                        total = max_per_user
                    counts[uid] = total
            else:
                for uid, n in added.items():
                    if uid in self._counts:
                        counts[uid] = self._counts[uid] + n
            if dropped:
                names = {self._jids.get(u) or self._jid(db, u, False): u for u in groups}
                dropped = {names[uid]: n for uid, n in dropped.items()}
            return counts, dropped

        first = rows[0][1] if rows else (messages[0][1] or messages[0][4])
        counts, dropped = self._write("append archive", first, work)
        self._counts.update(counts)
        return dropped

    def _cut(self, db, uid: int, block: tuple, before: int | None, n: int,
             released: Counter) -> int:
        """Delete the oldest ``n`` (-1: all) entries of ``block`` with ``seq <
        before`` (None: any); rewrite or drop the block; count the chunks'
        released references in ``released``.  Returns how many went."""
        bid, first, last, count, others_text, blob = block
        others = others_text.split("\0")
        entries = list(ENTRY.iter_unpack(blob))
        cut = len(entries) if before is None else bisect.bisect_left(
            [e[0] for e in entries], before)
        if n >= 0:
            cut = min(cut, n)
        if cut <= 0:
            return 0
        released.update(map(itemgetter(4), entries[:cut]))
        self._drop_block(db, uid, bid, last, others)
        rest = entries[cut:]
        if rest:
            # The block keeps its number and ``last``: only its head goes.
            db.execute("INSERT INTO blocks VALUES (?,?,?,?,?,?,?)",
                       (bid, uid, rest[0][0], last, len(rest), others_text,
                        b"".join(starmap(ENTRY.pack, rest))))
            db.executemany("INSERT INTO block_with VALUES (?,?,?,?,?,?)",
                           _block_with(uid, bid, rest[0][0], last, others, rest,
                                       self._wid_of(db)))
        return cut

    @staticmethod
    def _release(db, released: Counter) -> None:
        """Entries pointing into these chunks were deleted: drop the unreferenced chunks."""
        if released:
            db.executemany("UPDATE chunks SET refs=refs-? WHERE id=?",
                           [(n, c) for c, n in released.items()])
            db.executemany("DELETE FROM chunks WHERE id=? AND refs<=0", [(c,) for c in released])

    def _delete_oldest(self, db, uid: int, n: int, before: int | None = None) -> int:
        """Delete ``uid``'s ``n`` (-1: all) oldest entries (below ``before`` if given)."""
        done, after = 0, _LOWEST
        released: Counter = Counter()
        while n < 0 or done < n:
            block = db.execute(f"SELECT {_BLOCK} FROM blocks WHERE uid=? AND last>?"
                               " ORDER BY last LIMIT 1", (uid, after)).fetchone()
            if block is None or (before is not None and block[1] >= before):
                break
            done += self._cut(db, uid, block, before, -1 if n < 0 else n - done, released)
            after = block[2]
        self._release(db, released)
        return done

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
        """Up to ``limit`` entries with ``seq < before``, the oldest blocks first."""
        def work(db):
            done = 0
            released: Counter = Counter()
            gone: Counter = Counter()
            while done < limit:
                found = db.execute(f"SELECT uid, {_BLOCK} FROM blocks WHERE first<?"
                                   " ORDER BY first LIMIT 1", (before,)).fetchone()
                if found is None:
                    break
                n = self._cut(db, found[0], found[1:], before, limit - done, released)
                gone[found[0]] += n
                done += n
            self._release(db, released)
            return gone

        gone = self._write("expire archive", "", work)
        for uid, n in gone.items():
            if uid in self._counts:
                self._counts[uid] -= n
        return sum(gone.values())

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

"""The message log: an ordered, indexed archive of messages per user (XEP-0313 MAM).

Not the key-value store (:mod:`xmppd.storage`): an archive is a log read in
pages, by time and by conversation partner, and a key-value scan of a
million rows per page would not do.  :class:`IMessageLog` is the contract a
backend implements (SQLite in :mod:`xmppd.msglog_sqlite`, PostgreSQL in
:mod:`xmppd.msglog_pg`, and an in-memory one here for tests).

Ordering key: every row has a ``seq``, an integer that is at the same time
its archive time in microseconds since the epoch.  The writer hands out
strictly increasing values (``max(now, last + 1)``, see
:class:`Sequence`), so one integer orders the log, bounds time ranges
(``start``/``end`` become ``seq`` bounds, no time index needed), and points
to a row: archive ids are the XEP-0359 stanza ids, ``<process prefix><seq
in hex>``, so an id is resolved by its ``seq`` and checked against the id
rebuilt from the stored entry (its prefix is stored as a number), with no
id column or index.  A clock that steps back makes the
archive times run up to that much ahead for a while; order stays right.

The calls are synchronous and cheap (no fsync: checkpoints run on a thread
of their own, see :class:`LogWorker`); deletes take a ``limit`` so that a
large one is made of short transactions.
"""
from __future__ import annotations

import bisect
from typing import Callable, NamedTuple

from zope.interface import Interface, implementer

from xmppd.storage import StoreError

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
        self._keep = ~self.mask  # the bits of a time this node's values keep
        self.slot = slot
        # Below the next value this node may use: anything above ``last``
        # (the highest stored by any node) with our slot in the low bits.
        self.last = (last & ~self.mask) | slot

    def __iter__(self) -> "Sequence":
        return self

    def __next__(self) -> int:
        now = (int(self.clock.seconds() * 1_000_000) & self._keep) | self.slot
        if now <= self.last:
            now = self.last + self.step
        self.last = now
        return now


def rows_of(messages: list, prefix: str) -> list:
    """The rows (:class:`Row` fields) of :meth:`LogWorker.add` entries."""
    rows = []
    for out_seq, out_user, to_full, in_seq, in_user, sender_full, stanza in messages:
        if out_user is not None:
            rows.append((out_seq, out_user, to_full, f"{prefix}{out_seq:x}", OUTGOING, stanza))
        if in_user is not None:
            rows.append((in_seq, in_user, sender_full, f"{prefix}{in_seq:x}", INCOMING, stanza))
    return rows


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
    ``max_buffer`` entries (rows, or messages: :meth:`add`): beyond that
    they are dropped, counted and logged.
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
        # Message entries (add()): ids are prefix + seq in hex.
        self.prefix = ""
        self._rows = False  # rows (append()) among the entries
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
        self._rows = True
        if self._call is None:
            self._call = self.clock.callLater(self.flush_interval, self._timer)

    def add(self, entry: tuple) -> None:
        """One message's rows as one entry (the hot path: no tuple per row).

        ``(out_seq, out_user, to_full, in_seq, in_user, sender_full, stanza)``:
        the sender's row (``out_user`` None: none) and the recipient's
        (``in_user`` None: none), ids :attr:`prefix` + seq in hex.  A log
        with ``takes_messages`` stores entries as they are; for the others
        :meth:`flush` makes the rows (:func:`rows_of`).
        """
        pending = self.pending
        if len(pending) >= self.max_buffer or self.closed:
            self.dropped += 1
            if self.on_overflow is not None:
                self.on_overflow(self.dropped)
            return
        pending.append(entry)
        if self._call is None:
            self._call = self.clock.callLater(self.flush_interval, self._timer)

    def _batch(self, pending: list) -> tuple[list, list]:
        """(rows, message entries) of a buffer: the log's ``append`` takes
        entries as they are if it can, else they become rows here."""
        if not self._rows:
            rows, messages = [], pending
        else:
            self._rows = False
            rows = [e for e in pending if len(e) == 6]
            messages = [e for e in pending if len(e) == 7]
        if messages and not getattr(self.log, "takes_messages", False):
            rows += rows_of(messages, self.prefix)
            messages = []
        return rows, messages

    def _timer(self) -> None:
        self._call = None
        self.flush()

    def flush(self) -> dict:
        """Write the buffered rows now (one transaction); returns the users trimmed."""
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None
        pending, self.pending = self.pending, []
        if not pending:
            return {}
        rows, messages = self._batch(pending)
        try:
            if messages:
                dropped = self.log.append(rows, self.max_per_user, messages, self.prefix)
            else:
                dropped = self.log.append(rows, self.max_per_user)
        except StoreError as e:
            if self.on_failure is not None:
                self.on_failure(e, len(pending))
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


def __getattr__(name: str):
    """``SQLiteMessageLog`` and ``OldArchive`` live in :mod:`xmppd.msglog_sqlite`
    (schema 3, blocks), which imports this module: named here lazily, so that
    ``xmppd.msglog`` names every backend whichever module is imported first."""
    if name in ("SQLiteMessageLog", "OldArchive"):
        from xmppd import msglog_sqlite

        return getattr(msglog_sqlite, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The message archive (:class:`xmppd.msglog.IMessageLog`) on PostgreSQL.

Table ``archive`` (made by ``xmppctl create-schema``, xmppd.storage_pg):
one row per archived message, keyed by ``(username, seq)``; ``with_bare``
is stored beside ``with_full`` so that the with= filter is an index range
(``archive_with``), and ``archive_seq`` serves expiry, oldest first.

Two faces, as for the key-value store.  :class:`PostgresMessageLog` is
synchronous (``xmppctl``, ``migrate-store``, the shared test suite).  The
server uses :class:`AsyncPostgresArchive` with :class:`AsyncLogWorker`:
batched appends and every query or delete run on the store's thread pool
(:class:`xmppd.storage_pg.AsyncPostgresStore`), so the reactor never waits
for the database.

Several nodes, one archive: ``seq`` is a time in microseconds, and two
nodes archiving for one user in the same microsecond would collide on the
primary key (and make one id point to two messages).  So each node's
values carry a *slot* in their low :data:`SLOT_BITS` bits
(:class:`xmppd.msglog.Sequence`), a number no other live node holds: the
writer's connection takes a session-level advisory lock on it
(``pg_try_advisory_lock``), which the database releases when the process
or its connection goes away, with no lease to renew.  Should the writer's
connection be lost, the new one claims the same slot again before its
first write, and refuses to write (rows are dropped and logged) while
another process holds it.  :data:`SLOTS` nodes at most archive into one
database; one more refuses to start.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

from twisted.internet import defer
from zope.interface import implementer

from xmppd.msglog import IMessageLog, LogQuery, LogWorker, Row
from xmppd.storage import StoreError
from xmppd.storage_pg import Connection

#: Low bits of every ``seq`` that name the writing node's slot (see above):
#: 32 nodes per database, times exact to 32 microseconds, and about 31,000
#: archive ids a second per node before its ids run ahead of the clock.
SLOT_BITS = 5
SLOTS = 1 << SLOT_BITS
#: First key of the advisory locks (``pg_try_advisory_lock(LOCK_SPACE, slot)``):
#: "xmam", so that they do not meet another application's locks by chance.
LOCK_SPACE = 0x786D616D

_COLUMNS = "seq, username, with_full, id, dir, stanza"


def _where(q: LogQuery) -> tuple[str, list]:
    sql, args = ["username = %s"], [q.user]
    if q.with_jid is not None:
        sql.append("with_full = %s" if q.with_full else "with_bare = %s")
        args.append(q.with_jid)
    if q.lo is not None:
        sql.append("seq > %s")
        args.append(q.lo)
    if q.hi is not None:
        sql.append("seq < %s")
        args.append(q.hi)
    return " AND ".join(sql), args


def _row(r) -> Row:
    return Row(r[0], r[1], r[2], r[3], r[4], bytes(r[5]))


@implementer(IMessageLog)
class PostgresMessageLog:
    """Synchronous, one connection of its own (or ``connection``)."""

    def __init__(self, conf: Any, connection: Connection | None = None) -> None:
        self._conn = connection or Connection(conf.dsn, conf.connect_timeout,
                                              conf.statement_timeout)
        self.path = self._conn.path

    def _run(self, operation: str, user: str, work):
        return self._conn.run(operation, user, work)

    def last_seq(self) -> int:
        return self._run("read archive", "", lambda c: c.execute(
            "SELECT coalesce(max(seq), 0) FROM archive").fetchone()[0])

    def append(self, rows: list, max_per_user: int = 0) -> dict:
        data = [(r[1], r[0], r[2], r[2].split("/", 1)[0], r[3], r[4], bytes(r[5])) for r in rows]
        users = sorted({r[1] for r in rows})

        def work(conn):
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO archive (username, seq, with_full, with_bare, id, dir, stanza)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s)", data)
            dropped = {}
            if max_per_user > 0:
                for user in users:
                    n = conn.execute(
                        "DELETE FROM archive WHERE username = %s AND seq <= (SELECT seq FROM"
                        " archive WHERE username = %s ORDER BY seq DESC OFFSET %s LIMIT 1)",
                        (user, user, max_per_user)).rowcount
                    if n > 0:
                        dropped[user] = n
            return dropped

        return self._run("append archive", ", ".join(users), work)

    def query(self, q: LogQuery) -> list:
        where, args = _where(q)
        order = "DESC" if q.reverse else "ASC"
        return self._run("read archive", q.user, lambda c: [_row(r) for r in c.execute(
            f"SELECT {_COLUMNS} FROM archive WHERE {where} ORDER BY seq {order} LIMIT %s",
            args + [q.limit]).fetchall()])

    def count(self, q: LogQuery, cap: int) -> int | None:
        where, args = _where(q)
        n = self._run("count archive", q.user, lambda c: c.execute(
            f"SELECT count(*) FROM (SELECT 1 FROM archive WHERE {where} LIMIT %s) t",
            args + [cap + 1]).fetchone()[0])
        return None if n > cap else n

    def get(self, user: str, seqs: list) -> list:
        if not seqs:
            return []
        return self._run("read archive", user, lambda c: [_row(r) for r in c.execute(
            f"SELECT {_COLUMNS} FROM archive WHERE username = %s AND seq = ANY(%s) ORDER BY seq",
            (user, sorted(set(seqs)))).fetchall()])

    def delete_user(self, user: str, before: int | None = None, limit: int | None = None) -> int:
        sql, args = "username = %s", [user]
        if before is not None:
            sql += " AND seq < %s"
            args.append(before)
        tail = "" if limit is None else " ORDER BY seq LIMIT %s"
        if limit is not None:
            args.append(limit)
        return self._run("delete archive", user, lambda c: c.execute(
            f"DELETE FROM archive WHERE (username, seq) IN"
            f" (SELECT username, seq FROM archive WHERE {sql}{tail})", args).rowcount)

    def expire(self, before: int, limit: int) -> int:
        return self._run("expire archive", "", lambda c: c.execute(
            "DELETE FROM archive WHERE (username, seq) IN (SELECT username, seq FROM archive"
            " WHERE seq < %s ORDER BY seq LIMIT %s)", (before, limit)).rowcount)

    def checkpoint(self) -> None:
        pass  # every commit is durable (the server's synchronous_commit decides)

    def close(self) -> None:
        self._conn.close()


class SlotTaken(StoreError):
    """Every slot is held by another process (or ours, after a reconnection)."""


class _PoolLog(PostgresMessageLog):
    """The same statements on the calling pool thread's own connection."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.path = store.path

    def _run(self, operation: str, user: str, work):
        return self._store.thread_connection().run(operation, user, work)

    def close(self) -> None:
        pass  # the store closes its threads' connections


class AsyncPostgresArchive:
    """The server's archive on PostgreSQL: one writer connection, the store's pool.

    Appends go through the writer connection (which holds this node's
    slot), one batch at a time, run on a thread of the store's pool;
    queries and deletes (:meth:`run`) run there on that thread's own
    connection.  Built at start-up, where it blocks on purpose (claiming a
    slot, reading the highest ``seq``): nothing is served yet.
    """

    def __init__(self, store: Any) -> None:
        conf = store.conf
        self.store = store
        self.path = store.path
        self.slot: int | None = None
        self._writer_conn = Connection(conf.dsn, conf.connect_timeout, conf.statement_timeout,
                                       on_connect=self._claim)
        self._writer = PostgresMessageLog(conf, self._writer_conn)
        self._write_lock = threading.Lock()
        self._reader = _PoolLog(store)
        self._writer_conn.run("claim archive slot", "", lambda conn: None)  # connects, claims

    def _claim(self, conn) -> None:
        """On every new writer connection: hold our slot (the first free one at start)."""
        wanted = range(SLOTS) if self.slot is None else (self.slot,)
        for slot in wanted:
            if conn.execute("SELECT pg_try_advisory_lock(%s, %s)",
                            (LOCK_SPACE, slot)).fetchone()[0]:
                self.slot = slot
                return
        if self.slot is None:
            raise SlotTaken(self.path, "claim archive slot",
                            f"all {SLOTS} archive slots are held by other xmppd nodes "
                            "(at most that many nodes archive into one database)")
        raise SlotTaken(self.path, "claim archive slot",
                        f"archive slot {self.slot} is held by another session (another node, "
                        "or this node's lost connection not yet ended): not archiving until "
                        "it is free")

    def last_seq(self) -> int:
        with self._write_lock:
            return self._writer.last_seq()

    def append_now(self, rows: list, max_per_user: int = 0) -> dict:
        """Blocking: on a pool thread, or at stop for the last rows."""
        with self._write_lock:
            return self._writer.append(rows, max_per_user)

    def append(self, rows: list, max_per_user: int = 0) -> defer.Deferred:
        return self.store.in_pool("append archive", self.append_now, rows, max_per_user)

    def run(self, work: Callable) -> defer.Deferred:
        """``work(log)`` on a pool thread, ``log`` a synchronous :class:`IMessageLog`."""
        return self.store.in_pool("read archive", work, self._reader)

    def checkpoint(self) -> None:
        pass

    def close(self) -> None:
        with self._write_lock:
            self._writer_conn.close()  # releases the slot


class AsyncLogWorker(LogWorker):
    """:class:`LogWorker` for an archive that answers with Deferreds.

    One batch in flight at a time: rows that arrive meanwhile wait for the
    next, which starts when the current one is stored (so a slow database
    makes batches larger, not more numerous).  :meth:`run` answers after
    every row archived before the call is stored.  No checkpoints (each
    commit is durable: the database's ``synchronous_commit`` decides).
    """

    def __init__(self, log: AsyncPostgresArchive, clock, **kwargs) -> None:
        kwargs["checkpoint_interval"] = 0
        super().__init__(log, clock, **kwargs)
        self._writing = False
        self._current: list = []  # run() calls waiting for the batch in flight
        self._next: list = []  # ... for the batch after it

    def flush(self) -> dict:
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None
        if self._writing or not self.pending:
            return {}
        pending, self.pending = self.pending, []
        rows, _ = self._batch(pending)  # the archive takes rows: entries become rows
        self._writing = True
        self._current, self._next = self._next, []
        d = self.log.append(rows, self.max_per_user)
        d.addCallbacks(self._stored, self._not_stored, errbackArgs=(len(pending),))
        d.addBoth(self._batch_done)
        return {}

    def _stored(self, dropped: dict) -> None:
        if dropped and self.on_trimmed is not None:
            self.on_trimmed(dropped)

    def _not_stored(self, failure, n: int) -> None:
        if self.on_failure is not None:
            self.on_failure(failure.value, n)

    def _batch_done(self, _) -> None:
        self._writing = False
        waiting, self._current = self._current, []
        if self.pending and not self.closed:
            self.flush()
        for d in waiting:
            d.callback(None)

    def run(self, work: Callable) -> defer.Deferred:
        self.flush()
        if not self._writing:
            return self.log.run(work)
        d = defer.Deferred()
        (self._next if self.pending else self._current).append(d)
        return d.addCallback(lambda _: self.log.run(work))

    def close(self) -> None:
        """At stop: the rows still buffered are written here, blocking (the
        reactor is stopping); a batch in flight finishes first."""
        self.closed = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        pending, self.pending = self.pending, []
        if pending:
            rows, _ = self._batch(pending)
            try:
                self.log.append_now(rows, self.max_per_user)
            except StoreError as e:
                if self.on_failure is not None:
                    self.on_failure(e, len(pending))
        self.log.close()

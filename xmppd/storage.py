"""The embedded key-value store: ``(store, user, key) -> JSON value``.

Why not ``dbm``/``shelve``: this interpreter has neither ``dbm.gnu`` nor
``dbm.ndbm``, so they fall back to ``dbm.dumb``, which loses overwritten values
when the process dies mid-write.  The embedded default is therefore built on
stdlib ``sqlite3`` in WAL mode with ``synchronous=FULL`` (the design of Python
3.13's ``dbm.sqlite3``): each write is one transaction, atomic and durable, and
a ``kill -9`` at any point leaves either the old or the new value.

Values are JSON of plain types, never pickles, so a store written by one
version can be read (and audited) by anything.

Two faces.  :class:`IKeyValueStore` is synchronous: the embedded backends
implement it, and the offline tools (``xmppctl``, imports) use it directly,
outside any reactor.  :class:`IAsyncKeyValueStore` is what the running server
uses: every call returns a Deferred, so that a networked backend (PostgreSQL,
:mod:`xmppd.storage_pg`) never blocks the reactor.  :class:`FiredStore` gives
an embedded store that face with already-fired Deferreds: the server's code
runs on in the same call, so behaviour and ordering with SQLite are what
they were when the calls were synchronous (see docs/design.rst, "Storage").
Every hot path (routing, blocklist checks) works from in-memory copies held
per online session, so the store is touched at login, logout and on changes.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import urllib.parse
from typing import Any, Callable

from twisted.internet import defer
from zope.interface import Interface, implementer

__all__ = ["IKeyValueStore", "IAsyncKeyValueStore", "FiredStore", "SQLiteStore", "MemoryStore",
           "StoreError", "StoreNotFound", "as_async"]


# SQLite result codes (primary part) that mean "out of room or busy, try
# again later" rather than "something is broken": the user is told
# ``resource-constraint`` (type wait) for these, ``internal-server-error``
# for the rest.  ENOSPC surfaces as SQLITE_FULL; a quota (EDQUOT) surfaces
# as a generic SQLITE_IOERR_WRITE and cannot be told from a failing disk.
_TRANSIENT = {
    5: "busy",        # SQLITE_BUSY, after busy_timeout
    6: "locked",      # SQLITE_LOCKED
    7: "no memory",   # SQLITE_NOMEM
    13: "disk full",  # SQLITE_FULL
}


class StoreError(Exception):
    """A store operation failed.

    Carries what the single log line and the stanza error need, so no
    caller has to parse messages: ``path`` (the file), ``operation`` (e.g.
    ``put roster``), ``user`` (whose data, may be empty), ``reason`` (the
    SQLite message) and ``condition`` (the RFC 6120 stanza error condition
    for the user who caused the write).
    """

    def __init__(self, path: str, operation: str, reason: str, user: str = "",
                 condition: str = "internal-server-error") -> None:
        super().__init__(f"{path}: {operation}{f' ({user})' if user else ''}: {reason}")
        self.path = path
        self.operation = operation
        self.user = user
        self.reason = reason
        self.condition = condition

    @classmethod
    def from_sqlite(cls, path: str, operation: str, user: str, error: sqlite3.Error) -> "StoreError":
        code = getattr(error, "sqlite_errorcode", None)
        transient = code is not None and (code & 0xFF) in _TRANSIENT
        return cls(path, operation, str(error), user,
                   "resource-constraint" if transient else "internal-server-error")


class StoreNotFound(StoreError):
    """An existing store was asked for and there is none."""

    def __init__(self, path: str) -> None:
        super().__init__(path, "open store", "no store")
        self.args = (f"no store at {path}",)

    def __str__(self) -> str:
        return self.args[0]


class IKeyValueStore(Interface):
    """A tiny dbm-style store, partitioned by store name and user (bare JID)."""

    def get(store: str, user: str, key: str, default: Any = None) -> Any:
        """Return the JSON-decoded value or ``default``."""

    def put(store: str, user: str, key: str, value: Any) -> None:
        """Atomically set one value."""

    def put_many(store: str, user: str, items: dict) -> None:
        """Atomically set several values of one user (one transaction)."""

    def batch(puts: list = (), deletes: list = ()) -> None:
        """Several changes in one transaction, across stores and users.

        ``puts`` are ``(store, user, key, value)``, ``deletes`` ``(store,
        user, key)``; either all happen or none (for changes that must stay
        together, such as a roster item and the roster version).
        """

    def delete(store: str, user: str, key: str) -> None:
        """Remove one value; absent keys are ignored."""

    def delete_many(store: str, user: str, keys: list) -> None:
        """Remove several values of one user (one transaction)."""

    def items(store: str, user: str) -> list:
        """All ``(key, value)`` pairs of one user in one store, key order."""

    def users(store: str) -> list:
        """All users that have at least one key in ``store``."""

    def delete_user(store: str | None, user: str) -> None:
        """Remove everything of ``user`` in ``store`` (or in every store)."""

    def close() -> None:
        """Release the underlying resources."""


class IAsyncKeyValueStore(Interface):
    """:class:`IKeyValueStore` as the running server uses it.

    Same methods, same meaning; each returns a Deferred that fires with the
    result (or fails with :class:`StoreError`) once the change is stored.
    A caller acknowledges nothing before it fires.  ``close`` returns a
    Deferred too.
    """

    def get(store: str, user: str, key: str, default: Any = None) -> defer.Deferred:
        """A Deferred of the JSON-decoded value or ``default``."""

    def put(store: str, user: str, key: str, value: Any) -> defer.Deferred:
        """Atomically set one value."""

    def put_many(store: str, user: str, items: dict) -> defer.Deferred:
        """Atomically set several values of one user."""

    def batch(puts: list = (), deletes: list = ()) -> defer.Deferred:
        """Several changes in one transaction (see :meth:`IKeyValueStore.batch`)."""

    def delete(store: str, user: str, key: str) -> defer.Deferred:
        """Remove one value."""

    def delete_many(store: str, user: str, keys: list) -> defer.Deferred:
        """Remove several values of one user in one transaction."""

    def items(store: str, user: str) -> defer.Deferred:
        """A Deferred of all ``(key, value)`` pairs of one user in one store."""

    def users(store: str) -> defer.Deferred:
        """A Deferred of all users with at least one key in ``store``."""

    def delete_user(store: str | None, user: str) -> defer.Deferred:
        """Remove everything of ``user`` in ``store`` (or in every store)."""

    def close() -> defer.Deferred:
        """Release the underlying resources."""


_METHODS = ("get", "put", "put_many", "batch", "delete", "delete_many", "items", "users",
            "delete_user", "close")


@implementer(IAsyncKeyValueStore)
class FiredStore:
    """An embedded (local, synchronous) store behind the asynchronous face.

    Each call runs at once and returns an already-fired Deferred (a
    :class:`StoreError` becomes a failed one), so code written for a
    networked store keeps the embedded store's order exactly: with
    ``yield``/``await`` on a fired Deferred, nothing else runs in between.
    ``sync`` is the wrapped store, for the few callers that need it
    (metrics' write histogram).  There is no synchronous path for the
    server's plugins: a networked store has none (docs/design.rst,
    "Storage"), and tests/test_store_async.py checks that no server module
    looks for one.
    """

    def __init__(self, sync: Any) -> None:
        self.sync = sync
        for name in _METHODS:
            setattr(self, name, _fired(getattr(sync, name)))

    @property
    def observe_write(self):
        return getattr(self.sync, "observe_write", None)

    @observe_write.setter
    def observe_write(self, observe) -> None:
        self.sync.observe_write = observe


def _fired(method: Callable) -> Callable:
    def call(*args, **kwargs) -> defer.Deferred:
        return defer.execute(method, *args, **kwargs)

    call.__name__ = method.__name__
    return call


def as_async(store: Any) -> Any:
    """``store`` as an :class:`IAsyncKeyValueStore` (embedded ones wrapped)."""
    return store if IAsyncKeyValueStore.providedBy(store) else FiredStore(store)


def _encode(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def connect_sqlite(path: str, create: bool) -> sqlite3.Connection:
    """One autocommit connection to the SQLite file ``path``, shared across threads.

    ``create``: the file (and its directory, 0750) may be made; otherwise it
    must exist and is opened read-write without being created (SQLite would
    otherwise make an empty database where a wrong path points).  Raises
    ``OSError``/``sqlite3.Error`` for the caller to name in its own error.
    """
    if create:
        os.makedirs(os.path.dirname(path) or ".", mode=0o750, exist_ok=True)
        target, uri = path, False
    else:
        target, uri = f"file:{urllib.parse.quote(path)}?mode=rw", True
    return sqlite3.connect(target, isolation_level=None, check_same_thread=False, uri=uri)


@implementer(IKeyValueStore)
class SQLiteStore:
    """Key-value store in ``<data_dir>/xmppd.sqlite3`` (WAL, synchronous=FULL)."""

    FILENAME = "xmppd.sqlite3"

    #: Called with the seconds each write transaction took (lock wait
    #: included, failed ones too) when set: the metrics page's histogram.
    observe_write: Callable[[float], None] | None = None

    def __init__(self, data_dir: str, create: bool = True, read_only: bool = False) -> None:
        """
        ``create=False``: the store must exist already (operator commands
        must not make an empty one where a wrong config points).
        ``read_only=True`` (implies ``create=False``): nothing is written, not
        even SQLite's ``-wal``/``-shm`` files, which a tool run as root would
        otherwise leave owned by root.  When the WAL file exists (the server
        runs, or stopped uncleanly) it is shared read-only; when it does not,
        the database file is complete and is read as immutable.
        """
        self.path = os.path.join(data_dir, self.FILENAME)
        if (read_only or not create) and not os.path.isfile(self.path):
            raise StoreNotFound(self.path)
        if read_only:
            self._db = self._open_read_only()
            self._lock = threading.Lock()
            return
        try:
            self._db = connect_sqlite(self.path, create)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS kv ("
                " store TEXT NOT NULL, user TEXT NOT NULL, key TEXT NOT NULL,"
                " value TEXT NOT NULL, PRIMARY KEY (store, user, key))"
                " WITHOUT ROWID"
            )
        except (OSError, sqlite3.Error) as e:
            raise StoreError(self.path, "open store", str(e)) from e
        # One connection shared with the ctl tool's threads is fine; the
        # lock keeps multi-statement transactions whole.
        self._lock = threading.Lock()

    def _open_read_only(self) -> sqlite3.Connection:
        mode = "ro" if os.path.exists(self.path + "-wal") else "ro&immutable=1"
        try:
            db = sqlite3.connect(f"file:{urllib.parse.quote(self.path)}?mode={mode}",
                                 uri=True, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA busy_timeout=5000")
            db.execute("SELECT 1 FROM kv LIMIT 1").fetchall()
        except sqlite3.Error as e:
            raise StoreError(self.path, "open store read-only", str(e)) from e
        return db

    def get(self, store: str, user: str, key: str, default: Any = None) -> Any:
        row = self._read(
            f"read {store}", user,
            "SELECT value FROM kv WHERE store=? AND user=? AND key=?", (store, user, key),
        )
        return default if not row else json.loads(row[0][0])

    def put(self, store: str, user: str, key: str, value: Any) -> None:
        self.put_many(store, user, {key: value})

    def put_many(self, store: str, user: str, items: dict) -> None:
        rows = [(store, user, k, _encode(v)) for k, v in items.items()]
        self._write(
            f"put {store}", user,
            lambda db: db.executemany("INSERT OR REPLACE INTO kv VALUES (?,?,?,?)", rows),
        )

    def delete(self, store: str, user: str, key: str) -> None:
        self.delete_many(store, user, [key])

    def delete_many(self, store: str, user: str, keys: list) -> None:
        self._write(
            f"delete {store}", user,
            lambda db: db.executemany(
                "DELETE FROM kv WHERE store=? AND user=? AND key=?",
                [(store, user, k) for k in keys],
            ),
        )

    def batch(self, puts: list = (), deletes: list = ()) -> None:
        rows = [(s, u, k, _encode(v)) for s, u, k, v in puts]
        gone = list(deletes)
        stores = sorted({r[0] for r in rows} | {d[0] for d in gone})
        users = sorted({r[1] for r in rows} | {d[1] for d in gone})

        def statement(db) -> None:
            db.executemany("INSERT OR REPLACE INTO kv VALUES (?,?,?,?)", rows)
            db.executemany("DELETE FROM kv WHERE store=? AND user=? AND key=?", gone)

        self._write(f"write {'+'.join(stores)}", ", ".join(users), statement)

    def items(self, store: str, user: str) -> list:
        rows = self._read(
            f"read {store}", user,
            "SELECT key, value FROM kv WHERE store=? AND user=? ORDER BY key", (store, user),
        )
        return [(k, json.loads(v)) for k, v in rows]

    def users(self, store: str) -> list:
        rows = self._read(
            f"list {store}", "", "SELECT DISTINCT user FROM kv WHERE store=? ORDER BY user", (store,)
        )
        return [r[0] for r in rows]

    def delete_user(self, store: str | None, user: str) -> None:
        if store is None:
            self._write("delete all stores", user,
                        lambda db: db.execute("DELETE FROM kv WHERE user=?", (user,)))
        else:
            self._write(f"delete {store}", user,
                        lambda db: db.execute("DELETE FROM kv WHERE store=? AND user=?", (store, user)))

    def _read(self, operation: str, user: str, sql: str, args: tuple) -> list:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise StoreError.from_sqlite(self.path, operation, user, e) from None

    def _write(self, operation: str, user: str, statement) -> None:
        """Run ``statement`` in one transaction; on any failure, leave none open.

        SQLite rolls a transaction back by itself after some errors (a full
        disk at COMMIT does) and not after others (SQLITE_BUSY): rolling
        back only while one is still open keeps the shared connection usable,
        so the next write after space is freed succeeds.
        """
        db = self._db
        observe = self.observe_write
        start = time.perf_counter() if observe is not None else 0.0
        with self._lock:
            try:
                db.execute("BEGIN IMMEDIATE")
                statement(db)
                db.execute("COMMIT")
            except sqlite3.Error as e:
                self._rollback()
                raise StoreError.from_sqlite(self.path, operation, user, e) from None
            except BaseException:
                self._rollback()
                raise
            finally:
                if observe is not None:
                    observe(time.perf_counter() - start)

    def _rollback(self) -> None:
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # nothing more to undo; the original error is what matters

    def close(self) -> None:
        self._db.close()


@implementer(IKeyValueStore)
class MemoryStore:
    """In-memory store for unit tests; same semantics, JSON round-trip included."""

    def __init__(self) -> None:
        self._data: dict[tuple[str, str], dict[str, str]] = {}

    def get(self, store: str, user: str, key: str, default: Any = None) -> Any:
        raw = self._data.get((store, user), {}).get(key)
        return default if raw is None else json.loads(raw)

    def put(self, store: str, user: str, key: str, value: Any) -> None:
        self.put_many(store, user, {key: value})

    def put_many(self, store: str, user: str, items: dict) -> None:
        encoded = {k: _encode(v) for k, v in items.items()}
        self._data.setdefault((store, user), {}).update(encoded)

    def delete(self, store: str, user: str, key: str) -> None:
        self._data.get((store, user), {}).pop(key, None)

    def delete_many(self, store: str, user: str, keys: list) -> None:
        for k in keys:
            self.delete(store, user, k)

    def batch(self, puts: list = (), deletes: list = ()) -> None:
        encoded = [(s, u, k, _encode(v)) for s, u, k, v in puts]  # may raise: before any change
        for s, u, k, raw in encoded:
            self._data.setdefault((s, u), {})[k] = raw
        for s, u, k in deletes:
            self.delete(s, u, k)

    def items(self, store: str, user: str) -> list:
        part = self._data.get((store, user), {})
        return [(k, json.loads(part[k])) for k in sorted(part)]

    def users(self, store: str) -> list:
        return sorted(u for (s, u), part in self._data.items() if s == store and part)

    def delete_user(self, store: str | None, user: str) -> None:
        for s, u in list(self._data):
            if u == user and (store is None or s == store):
                del self._data[(s, u)]

    def close(self) -> None:
        pass



"""The key-value store on PostgreSQL (psycopg 3): one database for several nodes.

Same contract as the embedded store (:mod:`xmppd.storage`): values are JSON
text, each call is one transaction, keys come back in byte order (``COLLATE
"C"``, as SQLite sorts them, whatever the database's locale).

Two faces, as for the embedded store.  :class:`PostgresStore` is synchronous
(one connection), for ``xmppctl`` and the imports, which run outside the
reactor.  :class:`AsyncPostgresStore` is what the server uses: the same
statements run on a small thread pool, each thread with a connection of its
own, and every call returns a Deferred; the reactor never waits for the
database.  Why threads and not psycopg's asyncio API: twistd runs the epoll
reactor, and switching the whole daemon to the asyncio reactor for its store
would change every other part's event loop; a thread per connection costs a
context switch per call, measured in docs/design.rst ("Storage").

The schema is made by ``xmppctl create-schema`` (:func:`create_schema`), never
by the server: a server pointed at the wrong database refuses to start
rather than fill it with tables.

Failures: a lost or refused connection is the same :class:`StoreError`
whatever the statement (``connect``, "database unreachable",
``resource-constraint``), so :mod:`xmppd.storefail` logs one line per outage,
not one per user; the next call opens a new connection, so the store recovers
when the database is back, without a restart.
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from xmppd.logfilter import log_observer
from xmppd.storage import IAsyncKeyValueStore, IKeyValueStore, StoreError, _encode

log = Logger(observer=log_observer)

#: Tests only (tests/daemon.py sets it for PostgreSQL daemons): a statement
#: run on the reactor's thread while the reactor runs is refused with this
#: text in the log, so a test proves that nothing waits for the database
#: there.  Read once, at import; unset in production (no cost but a bool).
GUARD_ENV = "XMPPD_TEST_REACTOR_GUARD"
_GUARD = os.environ.get(GUARD_ENV) == "1"
GUARD_TEXT = "PostgreSQL statement on the reactor thread"


def _on_reactor_thread() -> bool:
    from twisted.internet import reactor

    return bool(getattr(reactor, "running", False)) and \
        threading.current_thread() is threading.main_thread()

SCHEMA_VERSION = 1

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS xmppd_schema (version integer NOT NULL)",
    # username, not user: USER is a reserved word in PostgreSQL.
    "CREATE TABLE IF NOT EXISTS kv ("
    " store text NOT NULL, username text NOT NULL, key text NOT NULL,"
    " value text NOT NULL, PRIMARY KEY (store, username, key))",
    # delete_user(None, user): every store of one account.
    "CREATE INDEX IF NOT EXISTS kv_username ON kv (username)",
    # The message archive (xmppd.msglog.IMessageLog): seq orders one user's
    # rows and is their time; with_bare serves the with= filter.
    "CREATE TABLE IF NOT EXISTS archive ("
    " username text NOT NULL, seq bigint NOT NULL, with_full text NOT NULL,"
    " with_bare text NOT NULL, id text NOT NULL, dir smallint NOT NULL,"
    " stanza bytea NOT NULL, PRIMARY KEY (username, seq))",
    "CREATE INDEX IF NOT EXISTS archive_with ON archive (username, with_bare, seq)",
    "CREATE INDEX IF NOT EXISTS archive_seq ON archive (seq)",  # expiry, oldest first
)

# SQLSTATE classes that mean "busy, full or slow: try again later" (the
# user gets resource-constraint, type wait): 40 transaction rollback
# (serialization failure, deadlock), 53 insufficient resources (disk full,
# out of memory, too many connections), 57014 a statement timeout.
_TRANSIENT_CLASSES = ("40", "53")
_TRANSIENT_STATES = ("57014",)

UNREACHABLE = "database unreachable"


def display(dsn: str) -> str:
    """The DSN without its password, for log lines and errors."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        parts = conninfo_to_dict(dsn)
    except Exception:
        return "postgresql"
    host = parts.get("host", "") or "localhost"
    port = parts.get("port", "")
    return f"postgresql://{host}{':' + str(port) if port else ''}/{parts.get('dbname', '')}"


class SchemaMissing(StoreError):
    """The database has no xmppd schema (``xmppctl create-schema`` was not run)."""


def create_schema(conn) -> bool:
    """Create the tables (idempotent); True when they were not there before."""
    with conn.transaction():
        existed = conn.execute("SELECT to_regclass('xmppd_schema') IS NOT NULL").fetchone()[0]
        for statement in SCHEMA:
            conn.execute(statement)
        if not existed or conn.execute("SELECT count(*) FROM xmppd_schema").fetchone()[0] == 0:
            conn.execute("INSERT INTO xmppd_schema VALUES (%s)", (SCHEMA_VERSION,))
        # Later versions migrate here: UPDATE xmppd_schema after each step.
    return not existed


class Connection:
    """One psycopg connection, opened on demand and opened again after a loss."""

    def __init__(self, dsn: str, connect_timeout: float, statement_timeout: float,
                 on_connect: Callable | None = None) -> None:
        """``on_connect(conn)`` runs on every new connection before its first
        statement (the archive's writer claims its node slot there, see
        :mod:`xmppd.msglog_pg`); what it raises fails the call."""
        self.dsn = dsn
        self.path = display(dsn)
        self.connect_timeout = connect_timeout
        self.statement_timeout = statement_timeout
        self.on_connect = on_connect
        self._conn = None

    def get(self):
        import psycopg

        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            self._conn = None
            conn = psycopg.connect(
                self.dsn, autocommit=True, connect_timeout=max(1, round(self.connect_timeout)),
                options=f"-c statement_timeout={int(self.statement_timeout * 1000)}",
            )
            if self.on_connect is not None:
                try:
                    self.on_connect(conn)
                except BaseException:
                    conn.close()
                    raise
            self._conn = conn
        return conn

    def run(self, operation: str, user: str, work: Callable) -> Any:
        """``work(conn)`` in one transaction; psycopg errors become :class:`StoreError`."""
        import psycopg

        if _GUARD and _on_reactor_thread():
            log.critical("{text}: {operation} ({user})", text=GUARD_TEXT, operation=operation,
                         user=user)
            raise StoreError(self.path, operation, GUARD_TEXT, user)

        try:
            conn = self.get()
        except psycopg.Error as e:
            raise self._unreachable(operation, user, e) from None
        try:
            with conn.transaction():
                return work(conn)
        except psycopg.Error as e:
            if conn.closed or conn.broken or isinstance(e, psycopg.OperationalError) and \
                    (e.sqlstate or "").startswith("08"):
                self.close()
                raise self._unreachable(operation, user, e) from None
            state = e.sqlstate or ""
            transient = state[:2] in _TRANSIENT_CLASSES or state in _TRANSIENT_STATES
            raise StoreError(self.path, operation, str(e).splitlines()[0] if str(e) else state,
                             user, "resource-constraint" if transient
                             else "internal-server-error") from None

    def _unreachable(self, operation: str, user: str, error: Exception) -> StoreError:
        # One key for storefail's rate limit whatever the statement: one
        # line per outage (per LOG_INTERVAL), not one per user.
        err = StoreError(self.path, "connect", UNREACHABLE, user, "resource-constraint")
        err.text = "the server's database is unreachable; try again later"
        err.detail = f"{operation}: {str(error).strip().splitlines()[0] if str(error) else error!r}"
        return err

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass


# -- the statements, shared by both faces: each takes a connection ----------------

_UPSERT = ("INSERT INTO kv (store, username, key, value) VALUES (%s, %s, %s, %s)"
           " ON CONFLICT (store, username, key) DO UPDATE SET value = EXCLUDED.value")


def _get(store, user, key):
    def work(conn):
        row = conn.execute("SELECT value FROM kv WHERE store=%s AND username=%s AND key=%s",
                           (store, user, key)).fetchone()
        return None if row is None else row[0]
    return work


def _put_many(rows):
    def work(conn):
        if rows:
            with conn.cursor() as cur:
                cur.executemany(_UPSERT, rows)
    return work


def _batch(rows, gone):
    def work(conn):
        with conn.cursor() as cur:
            if rows:
                cur.executemany(_UPSERT, rows)
            if gone:
                cur.executemany("DELETE FROM kv WHERE store=%s AND username=%s AND key=%s", gone)
    return work


def _delete_many(store, user, keys):
    def work(conn):
        conn.execute("DELETE FROM kv WHERE store=%s AND username=%s AND key = ANY(%s)",
                     (store, user, list(keys)))
    return work


def _items(store, user):
    def work(conn):
        return conn.execute(
            'SELECT key, value FROM kv WHERE store=%s AND username=%s ORDER BY key COLLATE "C"',
            (store, user)).fetchall()
    return work


def _users(store):
    def work(conn):
        return [r[0] for r in conn.execute(
            'SELECT DISTINCT username COLLATE "C" FROM kv WHERE store=%s ORDER BY 1',
            (store,)).fetchall()]
    return work


def _delete_user(store, user):
    def work(conn):
        if store is None:
            conn.execute("DELETE FROM kv WHERE username=%s", (user,))
        else:
            conn.execute("DELETE FROM kv WHERE store=%s AND username=%s", (store, user))
    return work


def _check_schema(conn) -> int | None:
    if not conn.execute("SELECT to_regclass('xmppd_schema') IS NOT NULL").fetchone()[0]:
        return None
    row = conn.execute("SELECT max(version) FROM xmppd_schema").fetchone()
    return row[0]


class _Calls:
    """The store's methods in terms of ``self._call(operation, user, work, convert)``."""

    def _call(self, operation: str, user: str, work: Callable, convert: Callable | None = None):
        raise NotImplementedError

    def get(self, store: str, user: str, key: str, default: Any = None):
        return self._call(f"read {store}", user, _get(store, user, key),
                          lambda raw: default if raw is None else json.loads(raw))

    def put(self, store: str, user: str, key: str, value: Any):
        return self.put_many(store, user, {key: value})

    def put_many(self, store: str, user: str, items: dict):
        rows = [(store, user, k, _encode(v)) for k, v in items.items()]  # may raise: before any I/O
        return self._call(f"put {store}", user, _put_many(rows))

    def delete(self, store: str, user: str, key: str):
        return self.delete_many(store, user, [key])

    def delete_many(self, store: str, user: str, keys: list):
        return self._call(f"delete {store}", user, _delete_many(store, user, keys))

    def batch(self, puts: list = (), deletes: list = ()):
        rows = [(s, u, k, _encode(v)) for s, u, k, v in puts]
        gone = [tuple(d) for d in deletes]
        stores = sorted({r[0] for r in rows} | {d[0] for d in gone})
        users = sorted({r[1] for r in rows} | {d[1] for d in gone})
        return self._call(f"write {'+'.join(stores)}", ", ".join(users), _batch(rows, gone))

    def items(self, store: str, user: str):
        return self._call(f"read {store}", user, _items(store, user),
                          lambda rows: [(k, json.loads(v)) for k, v in rows])

    def users(self, store: str):
        return self._call(f"list {store}", "", _users(store))

    def delete_user(self, store: str | None, user: str):
        return self._call("delete all stores" if store is None else f"delete {store}", user,
                          _delete_user(store, user))


@implementer(IKeyValueStore)
class PostgresStore(_Calls):
    """Synchronous, one connection: for offline tools (and the tests' shared suite)."""

    def __init__(self, conf: Any, require_schema: bool = True) -> None:
        self.conf = conf
        self._conn = Connection(conf.dsn, conf.connect_timeout, conf.statement_timeout)
        self.path = self._conn.path
        self._lock = threading.Lock()
        if require_schema:
            version = self._conn.run("check schema", "", _check_schema)
            if version is None:
                raise SchemaMissing(self.path, "open store",
                                    "no xmppd schema: run xmppctl create-schema first")

    def _call(self, operation, user, work, convert=None):
        with self._lock:
            result = self._conn.run(operation, user, work)
        return result if convert is None else convert(result)

    def run(self, operation: str, work: Callable) -> Any:
        """``work(conn)`` in one transaction (migrations, counts)."""
        with self._lock:
            return self._conn.run(operation, "", work)

    def close(self) -> None:
        self._conn.close()


@implementer(IAsyncKeyValueStore)
class AsyncPostgresStore(_Calls):
    """What the server uses: statements on ``pool_size`` threads, one connection each.

    It has no synchronous path: every call returns a Deferred, so no plugin
    can wait for the database on the reactor (tests/test_store_async.py).
    """

    def __init__(self, conf: Any, reactor: Any) -> None:
        self.conf = conf
        self.reactor = reactor
        self.path = display(conf.dsn)
        # Checked at start-up, blocking on purpose: a server without its
        # schema must not start (nothing is served yet).  That connection is
        # closed at once: the server's statements all go through the pool.
        PostgresStore(conf).close()
        self._local = threading.local()
        self._pool = ThreadPool(1, conf.pool_size, name="xmppd-postgresql")
        self._pool.start()
        self._down_since: float | None = None
        self._closed = False

    def _connection(self) -> Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = Connection(self.conf.dsn, self.conf.connect_timeout,
                                                 self.conf.statement_timeout)
        return conn

    def _in_thread(self, operation, user, work):
        return self._connection().run(operation, user, work)

    def thread_connection(self) -> Connection:
        """The calling pool thread's connection (for code run by :meth:`in_pool`)."""
        return self._connection()

    def in_pool(self, operation: str, fn: Callable, *args: Any) -> defer.Deferred:
        """``fn(*args)`` on the store's thread pool; a Deferred of its result.

        For work of several statements that is not a key-value call (the
        message archive's queries, :mod:`xmppd.msglog_pg`): ``fn`` reaches
        the database through :meth:`thread_connection`.
        """
        if self._closed:
            return defer.fail(StoreError(self.path, operation, "store closed"))
        d = deferToThreadPool(self.reactor, self._pool, fn, *args)
        d.addCallbacks(self._up, self._failed)
        return d

    def _call(self, operation, user, work, convert=None):
        if self._closed:
            return defer.fail(StoreError(self.path, operation, "store closed", user))
        d = deferToThreadPool(self.reactor, self._pool, self._in_thread, operation, user, work)
        d.addCallbacks(self._up, self._failed)
        if convert is not None:
            d.addCallback(convert)
        return d

    def _up(self, result):
        if self._down_since is not None:
            log.info("PostgreSQL {path} reachable again after {s:.1f} s", path=self.path,
                     s=time.monotonic() - self._down_since)
            self._down_since = None
        return result

    def _failed(self, failure):
        err = failure.value
        if isinstance(err, StoreError) and err.reason == UNREACHABLE and self._down_since is None:
            self._down_since = time.monotonic()
        return failure

    def close(self):
        self._closed = True
        pool = self._pool

        def close_all():
            conn = getattr(self._local, "conn", None)
            if conn is not None:
                conn.close()

        # Each worker closes its own connection when the pool stops.
        for _ in range(pool.max):
            pool.callInThread(close_all)
        pool.stop()
        return defer.succeed(None)

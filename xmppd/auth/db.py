"""SQL access for the sql and drupal connectors, over ``twisted.enterprise.adbapi``.

* The database is named by a URI: ``sqlite:///absolute/path.db``,
  ``sqlite:relative/path.db`` (relative to the config file's directory), or
  ``postgresql://user:password@host:port/dbname?sslmode=...`` (psycopg 3;
  ``postgres://`` is accepted too; the query string takes libpq options).
* Queries are written with named placeholders (``:user``) and compiled once,
  at start-up, to the driver's own paramstyle; values always travel as bound
  parameters, never inside the SQL text.
* Every request has a deadline (``timeout``); a database that is down, too
  slow, or answers with an error becomes :class:`TemporaryAuthFailure`, logged
  once per outage by :class:`~xmppd.auth.health.BackendHealth`.
* A broken pooled connection (server restarted, network cut) is dropped on
  the failing request and re-opened by the next one, without adbapi's
  per-attempt tracebacks in the log.
* A SQLite file is opened read-write but never created by accident: a
  mistyped path is an error, not an empty user table.  ``create`` (used by
  ``create_schema``) is the only path that may create it.
"""
from __future__ import annotations

import math
import os
import re
import sqlite3
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

from twisted.enterprise import adbapi
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from xmppd.auth.base import NoSuchUser, NotSupported, TemporaryAuthFailure, UserExists
from xmppd.auth.health import BackendHealth
from xmppd.config import ConfigError
from xmppd.logfilter import log_observer

log = Logger(namespace="xmppd.auth.db", observer=log_observer)

# Our own outcomes pass through the error mapping untouched.
PASS_THROUGH = (UserExists, NoSuchUser, NotSupported, TemporaryAuthFailure)


def redact_uri(uri: str) -> str:
    """The URI with any password replaced by ``***`` (for logs and errors)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparsable URI>"
    if parts.password is None:
        return uri
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))


# -- placeholders --------------------------------------------------------------

_TOKENS = re.compile(
    r"""
      '(?:[^']|'')*'              # string literal
    | "(?:[^"]|"")*"              # quoted identifier
    | --[^\n]*                    # line comment
    | /\*.*?\*/                   # block comment
    | ::                          # PostgreSQL cast, not a placeholder
    | :(?P<name>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<percent>%)
    """,
    re.S | re.X,
)


@dataclass(frozen=True)
class Query:
    """A query with named placeholders, compiled for one driver."""

    source: str
    text: str
    names: tuple[str, ...]  # placeholder names in order of appearance
    style: str

    def params(self, values: dict):
        """Bound parameters in the driver's shape (None when there are none)."""
        if not self.names:
            return None
        if self.style in ("named", "pyformat"):
            return {n: values[n] for n in set(self.names)}
        return tuple(values[n] for n in self.names)

    def execute(self, cursor, values: dict, prefix: str = "") -> None:
        """Run on ``cursor`` with ``values`` bound (no parameters: none passed)."""
        params = self.params(values)
        if params is None:
            cursor.execute(prefix + self.text)
        else:
            cursor.execute(prefix + self.text, params)


def placeholders(sql: str) -> list[str]:
    """Names of the ``:name`` placeholders outside literals and comments."""
    return [m.group("name") for m in _TOKENS.finditer(sql) if m.group("name")]


def compile_query(sql: str, paramstyle: str) -> Query:
    """Rewrite ``:name`` placeholders to ``paramstyle`` (PEP 249)."""
    names: list[str] = []
    has_params = bool(placeholders(sql))

    def repl(m: re.Match) -> str:
        name = m.group("name")
        if name:
            names.append(name)
            if paramstyle == "qmark":
                return "?"
            if paramstyle == "numeric":
                return f":{len(names)}"
            if paramstyle == "named":
                return f":{name}"
            if paramstyle == "format":
                return "%s"
            if paramstyle == "pyformat":
                return f"%({name})s"
            raise ValueError(f"unsupported paramstyle {paramstyle!r}")
        # With bound parameters, format-style drivers read every % as markup,
        # inside string literals and comments too.
        if has_params and paramstyle in ("format", "pyformat"):
            return m.group(0).replace("%", "%%")
        return m.group(0)

    text = _TOKENS.sub(repl, sql)
    return Query(sql, text, tuple(names), paramstyle)


def validate_placeholders(sql: str, allowed: tuple[str, ...], path: str, key: str,
                          required_any: tuple[str, ...] = (), required: tuple[str, ...] = ()) -> None:
    """ConfigError naming ``key`` when ``sql`` uses a placeholder not in ``allowed``."""
    used = placeholders(sql)
    listed = ", ".join(":" + a for a in allowed)
    for name in used:
        if name not in allowed:
            raise ConfigError(path, key, sql, f"unknown placeholder :{name}; this query may use {listed}")
    if required_any and not any(r in used for r in required_any):
        need = " or ".join(":" + r for r in required_any)
        raise ConfigError(path, key, sql, f"must select the account with {need}")
    for r in required:
        if r not in used:
            raise ConfigError(path, key, sql, f"must use :{r}")


# -- the database ----------------------------------------------------------------


def _dead(conn) -> bool:
    """Has the driver marked this (wrapped) connection as lost?"""
    raw = getattr(conn, "_connection", None)
    return bool(getattr(raw, "broken", False) or getattr(raw, "closed", False))


class _Connection(adbapi.Connection):
    """adbapi's connection wrapper, minus the log noise, plus a liveness check.

    After any failed request the transaction is rolled back and the
    connection probed; a dead one is closed and forgotten so the next request
    on this thread opens a fresh one.  Nothing is logged here: the connector
    reports outages once, through BackendHealth.
    """

    def rollback(self):
        try:
            self._connection.rollback()
            cursor = self._connection.cursor()
            cursor.execute(self._pool.good_sql)
            cursor.fetchall()
            cursor.close()
            self._connection.commit()
        except Exception:
            try:
                self._pool.disconnect(self._connection)
            except Exception:
                pass


class _Pool(adbapi.ConnectionPool):
    connectionFactory = _Connection

    def _close(self, conn):
        try:
            conn.close()
        except Exception:
            pass

    def _runWithConnection(self, func, *args, **kw):
        conn = self.connectionFactory(self)
        try:
            result = func(conn, *args, **kw)
            conn.commit()
            return result
        except BaseException:
            conn.rollback()
            raise


class Database:
    """One pooled database named by a URI; every call fails closed."""

    def __init__(
        self, uri: str, *, path: str, key: str, name: str, timeout: float = 5.0,
        pool_size: int = 4, reactor=None, base_dir: str | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.uri, self.path, self.key = uri, path, key
        self.reactor = reactor
        self.timeout = timeout
        self.health = BackendHealth(name, clock=reactor)
        self.uri_key = f"{key}.uri"
        self.display_uri = redact_uri(uri)
        try:
            parts = urlsplit(uri)
        except ValueError as e:
            raise ConfigError(path, self.uri_key, self.display_uri, f"not a URI ({e})") from None
        scheme = parts.scheme.lower()
        if scheme == "sqlite":
            self.dialect = "sqlite"
            if parts.netloc:
                raise ConfigError(path, self.uri_key, self.display_uri,
                                  "sqlite URIs are sqlite:///absolute/path or sqlite:relative/path")
            file = parts.path
            if not file:
                raise ConfigError(path, self.uri_key, self.display_uri, "names no database file")
            if not os.path.isabs(file):
                file = os.path.join(base_dir or os.getcwd(), file)
            self.file = file
            self.module = "sqlite3"
            self._connargs = (f"file:{quote(file)}?mode=rw",)
            self._connkw = dict(uri=True, timeout=timeout, check_same_thread=False)
            good_sql = "SELECT 1"
            openfun = None
        elif scheme in ("postgresql", "postgres"):
            self.dialect = "postgresql"
            self.file = None
            try:
                import psycopg  # noqa: F401
            except ImportError:
                raise ConfigError(path, self.uri_key, self.display_uri,
                                  "needs psycopg 3: pip install 'psycopg[binary]'") from None
            self.module = "psycopg"
            self._connargs = (uri,)
            # libpq's connect_timeout is whole seconds, at least 2.
            self._connkw = dict(
                connect_timeout=max(2, math.ceil(timeout)),
                tcp_user_timeout=int(timeout * 1000),
                application_name="xmppd",
            )
            good_sql = "SELECT 1"
            statement_ms = str(int(timeout * 1000))

            def openfun(conn):
                cursor = conn.cursor()
                cursor.execute("SELECT set_config('statement_timeout', %s, false)", (statement_ms,))
                cursor.close()
                conn.commit()
        else:
            raise ConfigError(path, self.uri_key, self.display_uri,
                              "scheme must be sqlite: or postgresql:")
        self.paramstyle = __import__(self.module).paramstyle
        self.pool = _Pool(
            self.module, *self._connargs, cp_min=1, cp_max=pool_size, cp_noisy=False,
            cp_reconnect=True, cp_good_sql=good_sql, cp_openfun=openfun,
            cp_reactor=reactor, **self._connkw,
        )

    def compile(self, sql: str) -> Query:
        return compile_query(sql, self.paramstyle)

    # -- running requests ---------------------------------------------------------

    def run(self, func, *args) -> defer.Deferred:
        """Run ``func(cursor, *args)`` in a pooled connection's thread, one transaction.

        Fires with its result, or fails with TemporaryAuthFailure (backend
        trouble, timeouts) or the connector's own UserExists/NoSuchUser/...
        """
        d = self.pool.runWithConnection(self._with_cursor, func, *args)
        d.addTimeout(self.timeout, self.reactor)
        d.addCallbacks(self._ok, self._failed)
        return d

    @staticmethod
    def _with_cursor(conn, func, *args):
        # A pooled connection may have died since its last use (database
        # restarted, idle connection cut): then nothing of this transaction
        # happened, and it is retried once on a fresh connection instead of
        # failing the first login after every database restart.
        for attempt in (1, 2):
            cursor = None
            try:
                cursor = conn.cursor()
                return func(cursor, *args)
            except PASS_THROUGH:
                raise
            except Exception:
                if attempt == 1 and _dead(conn):
                    cursor = None
                    conn.reconnect()
                    continue
                raise
            finally:
                if cursor is not None:
                    try:
                        cursor.close()
                    except Exception:
                        pass

    def _ok(self, result):
        self.health.success()
        return result

    def _failed(self, failure: Failure):
        if failure.check(*PASS_THROUGH):
            if not failure.check(TemporaryAuthFailure):
                self.health.success()  # the database answered
            return failure
        raise self.health.failure(self.describe(failure)) from None

    def describe(self, failure: Failure) -> str:
        if failure.check(defer.TimeoutError, defer.CancelledError):
            return f"no answer within {self.timeout:g}s from {self.display_uri}"
        err = failure.value
        text = " ".join(str(err).split()) or type(err).__name__
        return f"{type(err).__name__} from {self.display_uri}: {text}"

    def is_integrity_error(self, exc: BaseException) -> bool:
        mod = __import__(self.module)
        return isinstance(exc, mod.IntegrityError)

    # -- schema and checks --------------------------------------------------------

    def create(self, statements: list[str]) -> defer.Deferred:
        """Run DDL; for SQLite this may create the file (and only here)."""
        if self.dialect == "sqlite":
            def work():
                os.makedirs(os.path.dirname(self.file) or ".", exist_ok=True)
                conn = sqlite3.connect(self.file, timeout=self.timeout)
                try:
                    for s in statements:
                        conn.execute(s)
                    conn.commit()
                finally:
                    conn.close()

            d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), work)
            d.addTimeout(self.timeout, self.reactor)
            d.addCallbacks(self._ok, self._failed)
            return d

        def ddl(cursor):
            for s in statements:
                cursor.execute(s)

        return self.run(ddl)

    def check(self, queries: dict[str, tuple[Query, dict]]) -> defer.Deferred:
        """Problems for ``xmppctl check``: reachability, then each query compiled.

        ``queries`` maps a config key to (query, sample values).  Each is
        run under ``EXPLAIN`` (planned, never executed) in a transaction that
        is rolled back, so missing tables or columns are found before a user
        hits them.
        """

        def work(conn):
            problems = []
            cursor = conn.cursor()
            cursor.execute("SELECT 1")
            cursor.fetchall()
            for key, (query, sample) in queries.items():
                try:
                    query.execute(cursor, sample, prefix="EXPLAIN ")
                    cursor.fetchall()
                except Exception as e:
                    problems.append(str(ConfigError(
                        self.path, key, query.source, f"the database rejects it: {' '.join(str(e).split())}"
                    )))
                    conn.rollback()
                    cursor = conn.cursor()
            conn.rollback()
            return problems

        d = self.pool.runWithConnection(work)
        d.addTimeout(self.timeout, self.reactor)

        def failed(failure):
            reason = self.describe(failure)
            return [str(ConfigError(self.path, self.uri_key, self.display_uri, f"cannot use the database: {reason}"))]

        d.addErrback(failed)
        return d

    def close(self) -> None:
        if self.pool.running or self.pool.startID:
            self.pool.close()

"""The ``sql`` connector: accounts in any SQL table, through configurable queries.

Each operation is one parameterised query from ``[auth.sql.queries]``, with
named placeholders that are bound by the driver (never formatted into the
SQL).  Placeholders, per query (anything else is a start-up ConfigError
naming the key):

============  ==============================  =================================
query         placeholders                    what it must do
============  ==============================  =================================
user_login    :user :domain :jid              return the stored password of one
                                              account (first column of one row)
user_add      :user :domain :jid :password    insert an account
user_del      :user :domain :jid              delete an account
user_passwd   :user :domain :jid :password    change the stored password
users_count   :domain                         return the number of accounts
on_login      :user :domain :jid :ip          optional bookkeeping at login
on_logout     :user :domain :jid :ip          optional bookkeeping at logout
============  ==============================  =================================

``:user`` is the PRECIS-prepared localpart, ``:domain`` the virtual host,
``:jid`` the bare JID ``user@domain``, ``:password`` the *encoded* value
(see ``password_encoding``), ``:ip`` the client's address.  An empty query
disables that operation (``NotSupported``), e.g. for a read-only database.

``password_encoding`` decides what the password column holds and so which
SASL mechanisms can be offered:

* ``scram`` (default): JSON with SCRAM-SHA-1 and SCRAM-SHA-256 credentials
  (salt, iteration count, StoredKey, ServerKey; RFC 5802) -- SCRAM and PLAIN;
  no password is stored.
* ``plain``: the clear password -- SCRAM (derived per login) and PLAIN.
* ``md5``, ``sha256``, ``sha512`` (unsalted hex digests), ``bcrypt`` --
  PLAIN only (the SASL layer offers PLAIN on TLS streams only).
"""
from __future__ import annotations

from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from xmppd.auth import passwords
from xmppd.auth.base import IAuthConnector, NoSuchUser, NotSupported, UserExists
from xmppd.auth.db import Database, Query, validate_placeholders
from xmppd.logfilter import log_observer

log = Logger(namespace="xmppd.auth.sql", observer=log_observer)

TABLE = "xmppd_users"

_ACCOUNT = ("user", "domain", "jid")
QUERY_PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "user_login": _ACCOUNT,
    "user_add": _ACCOUNT + ("password",),
    "user_del": _ACCOUNT,
    "user_passwd": _ACCOUNT + ("password",),
    "users_count": ("domain",),
    "on_login": _ACCOUNT + ("ip",),
    "on_logout": _ACCOUNT + ("ip",),
}
# Queries that act on one account must name it, or one row would serve all.
_MUST_SELECT_ACCOUNT = ("user_login", "user_add", "user_del", "user_passwd")
_MUST_USE_PASSWORD = ("user_add", "user_passwd")

DEFAULT_QUERIES = {
    "user_login": f"SELECT password FROM {TABLE} WHERE username = :user AND domain = :domain",
    "user_add": f"INSERT INTO {TABLE} (username, domain, password) VALUES (:user, :domain, :password)",
    "user_del": f"DELETE FROM {TABLE} WHERE username = :user AND domain = :domain",
    "user_passwd": f"UPDATE {TABLE} SET password = :password WHERE username = :user AND domain = :domain",
    "users_count": f"SELECT COUNT(*) FROM {TABLE} WHERE domain = :domain",
    "on_login": "",
    "on_logout": "",
}

# What to put in on_login/on_logout to use the default schema's columns.
EXAMPLE_BOOKKEEPING = {
    "on_login": f"UPDATE {TABLE} SET last_login = CURRENT_TIMESTAMP, last_ip = :ip "
                "WHERE username = :user AND domain = :domain",
    "on_logout": f"UPDATE {TABLE} SET last_logout = CURRENT_TIMESTAMP "
                 "WHERE username = :user AND domain = :domain",
}


def default_schema(dialect: str) -> list[str]:
    """DDL for the table the default queries use, per dialect ('sqlite', 'postgresql')."""
    if dialect == "sqlite":
        ts, now = "TEXT", "CURRENT_TIMESTAMP"
    elif dialect == "postgresql":
        ts, now = "TIMESTAMPTZ", "now()"
    else:
        raise ValueError(f"no default schema for {dialect!r}")
    return [
        f"""CREATE TABLE IF NOT EXISTS {TABLE} (
    username    TEXT NOT NULL,
    domain      TEXT NOT NULL,
    password    TEXT NOT NULL,
    created_at  {ts} NOT NULL DEFAULT {now},
    last_login  {ts},
    last_logout {ts},
    last_ip     TEXT,
    PRIMARY KEY (username, domain)
)""",
        f"CREATE INDEX IF NOT EXISTS {TABLE}_domain ON {TABLE} (domain)",
    ]


def _values(username: str, domain: str, **extra) -> dict:
    return {"user": username, "domain": domain, "jid": f"{username}@{domain}", **extra}


def _text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, memoryview):
        value = value.tobytes()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8")
    return str(value)


@implementer(IAuthConnector)
class SQLConnector:
    """Accounts in a SQL database; see the module docstring for the queries."""

    name = "sql"

    def __init__(
        self, db: Database, queries: dict[str, str], *, password_encoding: str = "scram",
        scram_iterations: int = 4096, bcrypt_rounds: int = 12, reactor=None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        if password_encoding not in passwords.ENCODINGS:
            raise ValueError(f"unknown password encoding {password_encoding!r}")
        self.db = db
        self.reactor = reactor
        self.encoding = password_encoding
        # Read by passwords.check_new_password: bcrypt hashes only 72 bytes.
        self.max_password_bytes = (
            passwords.BCRYPT_MAX_BYTES if password_encoding == "bcrypt" else None)
        self.scram_iterations = scram_iterations
        self.bcrypt_rounds = bcrypt_rounds
        self.queries: dict[str, Query | None] = {}
        for qname in QUERY_PLACEHOLDERS:
            sql = queries.get(qname, DEFAULT_QUERIES[qname])
            key = f"{db.key}.queries.{qname}"
            if not sql.strip():
                if qname == "user_login":
                    from xmppd.config import ConfigError

                    raise ConfigError(db.path, key, sql, "required: the query that reads a password")
                self.queries[qname] = None
                continue
            validate_placeholders(
                sql, QUERY_PLACEHOLDERS[qname], db.path, key,
                required_any=("user", "jid") if qname in _MUST_SELECT_ACCOUNT else (),
                required=("password",) if qname in _MUST_USE_PASSWORD else (),
            )
            self.queries[qname] = db.compile(sql)
        # A stand-in verified for unknown accounts, so that "no such user"
        # costs as long as "wrong password" (no enumeration by timing).
        self._dummy: str | None = None

    # -- helpers ---------------------------------------------------------------

    def _query(self, qname: str) -> Query:
        q = self.queries[qname]
        if q is None:
            raise NotSupported(f"{qname} is not configured for this database")
        return q

    def _in_thread(self, func, *args):
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), func, *args)

    def _fetch_stored(self, username: str, domain: str):
        q = self._query("user_login")
        values = _values(username, domain)

        def work(cursor):
            q.execute(cursor, values)
            return cursor.fetchmany(2)

        d = self.db.run(work)

        def one(rows):
            if not rows:
                return None
            if len(rows) > 1:
                log.error(
                    "sql user_login returned several rows for {jid}: login refused; the query "
                    "must select exactly one account", jid=values["jid"],
                )
                return None
            return _text(rows[0][0])

        return d.addCallback(one)

    def _verify(self, stored: str | None, password: str) -> bool:
        """Runs in a worker thread for slow encodings: no logging here."""
        if stored is None:
            if self._dummy is None:
                self._dummy = passwords.encode(
                    self.encoding, "xmppd-no-such-account",
                    scram_iterations=self.scram_iterations, bcrypt_rounds=self.bcrypt_rounds,
                )
            passwords.verify(self.encoding, self._dummy, password)
            return False
        return passwords.verify(self.encoding, stored, password)

    def _unusable(self, failure, jid: str) -> bool:
        failure.trap(passwords.BadStoredPassword)
        log.error("sql: stored password of {jid} is unusable with password_encoding "
                  "{encoding!r}: {reason}", jid=jid, encoding=self.encoding,
                  reason=str(failure.value))
        return False

    # -- IAuthConnector ---------------------------------------------------------

    def mechanisms(self) -> frozenset:
        if self.encoding in ("plain", "scram"):
            return frozenset({"PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-256"})
        return frozenset({"PLAIN"})

    def check_password(self, username: str, domain: str, password: str):
        if not password:
            return defer.succeed(False)
        jid = f"{username}@{domain}"
        d = self._fetch_stored(username, domain)
        if self.encoding in passwords.SLOW_ENCODINGS:
            d.addCallback(lambda stored: self._in_thread(self._verify, stored, password))
        else:
            d.addCallback(self._verify, password)
        d.addErrback(self._unusable, jid)
        return d

    def get_scram_credentials(self, username: str, domain: str, mechanism: str):
        if mechanism not in passwords.SCRAM_MECHANISMS or self.encoding not in ("plain", "scram"):
            return defer.succeed(None)
        jid = f"{username}@{domain}"

        def convert(stored):
            if stored is None:
                return None
            if self.encoding == "plain":
                if not stored:
                    return None
                return self._in_thread(
                    passwords.derive_scram, stored, mechanism,
                    passwords.derived_salt(mechanism, jid), self.scram_iterations,
                )
            try:
                return passwords.parse_scram(stored).get(mechanism)
            except passwords.BadStoredPassword as e:
                log.error("sql: stored SCRAM credentials of {jid} unusable: {reason}",
                          jid=jid, reason=str(e))
                return None

        return self._fetch_stored(username, domain).addCallback(convert)

    def user_exists(self, username: str, domain: str):
        return self._fetch_stored(username, domain).addCallback(lambda s: s is not None)

    def _encode(self, password: str) -> str:
        return passwords.encode(
            self.encoding, password, scram_iterations=self.scram_iterations,
            bcrypt_rounds=self.bcrypt_rounds,
        )

    def add_user(self, username: str, domain: str, password: str):
        try:
            login, add = self._query("user_login"), self._query("user_add")
        except NotSupported as e:
            return defer.fail(e)
        jid = f"{username}@{domain}"

        def work(cursor, encoded):
            values = _values(username, domain, password=encoded)
            login.execute(cursor, values)
            if cursor.fetchall():
                raise UserExists(jid)
            try:
                add.execute(cursor, values)
            except Exception as e:
                if self.db.is_integrity_error(e):
                    raise UserExists(jid) from None
                raise

        d = self._in_thread(self._encode, password)
        d.addCallback(lambda encoded: self.db.run(work, encoded))
        return d.addCallback(lambda _: None)

    def set_password(self, username: str, domain: str, password: str):
        try:
            login, passwd = self._query("user_login"), self._query("user_passwd")
        except NotSupported as e:
            return defer.fail(e)

        def work(cursor, encoded):
            values = _values(username, domain, password=encoded)
            login.execute(cursor, values)
            if not cursor.fetchall():
                raise NoSuchUser(values["jid"])
            passwd.execute(cursor, values)

        d = self._in_thread(self._encode, password)
        d.addCallback(lambda encoded: self.db.run(work, encoded))
        return d.addCallback(lambda _: None)

    def remove_user(self, username: str, domain: str):
        try:
            login, delete = self._query("user_login"), self._query("user_del")
        except NotSupported as e:
            return defer.fail(e)
        values = _values(username, domain)

        def work(cursor):
            login.execute(cursor, values)
            if not cursor.fetchall():
                raise NoSuchUser(values["jid"])
            delete.execute(cursor, values)

        return self.db.run(work).addCallback(lambda _: None)

    def count_users(self, domain: str):
        try:
            q = self._query("users_count")
        except NotSupported as e:
            return defer.fail(e)

        def work(cursor):
            q.execute(cursor, {"domain": domain})
            row = cursor.fetchone()
            return int(row[0]) if row and row[0] is not None else 0

        return self.db.run(work)

    def check(self):
        samples = _values("xmppd-check", "example.invalid", password="x", ip="192.0.2.1")
        queries = {
            f"{self.db.key}.queries.{qname}": (q, samples)
            for qname, q in self.queries.items() if q is not None
        }
        return self.db.check(queries)

    # -- extras (not in IAuthConnector) ----------------------------------------

    def record_login(self, username: str, domain: str, ip: str = ""):
        """Run ``on_login`` if configured; Deferred[None]."""
        return self._bookkeeping("on_login", username, domain, ip)

    def record_logout(self, username: str, domain: str, ip: str = ""):
        """Run ``on_logout`` if configured; Deferred[None]."""
        return self._bookkeeping("on_logout", username, domain, ip)

    def _bookkeeping(self, qname: str, username: str, domain: str, ip: str):
        q = self.queries[qname]
        if q is None:
            return defer.succeed(None)
        values = _values(username, domain, ip=ip)

        def work(cursor):
            q.execute(cursor, values)

        return self.db.run(work).addCallback(lambda _: None)

    def create_schema(self):
        """Create the default table (``xmppctl`` calls this); Deferred[None]."""
        return self.db.create(default_schema(self.db.dialect)).addCallback(lambda _: None)

    def close(self) -> None:
        self.db.close()

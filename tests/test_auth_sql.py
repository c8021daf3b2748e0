"""The sql connector against real databases: a SQLite file and a PostgreSQL server."""
from __future__ import annotations

import socket
import sqlite3
import time

import pytest
import pytest_twisted
from scramp import ScramClient, ScramMechanism
from twisted.internet import reactor

from tests.backends import (  # noqa: F401 (fixtures)
    captured_log, make_sql_db, postgres, sql_auth_table,
)
from xmppd.auth import passwords
from xmppd.auth.base import NoSuchUser, NotSupported, TemporaryAuthFailure, UserExists
from xmppd.auth.factory import build_connector, check_table
from xmppd.config import ConfigError

DOMAIN = "example.org"
ACCOUNTS = [("alice", DOMAIN, "alice-secret"), ("bob", DOMAIN, "bob-secret"),
            ("alice", "other.example", "other-secret")]


@pytest.fixture
def connectors():
    """Build connectors from tables; all closed after the test."""
    made = []

    def build(table, key="auth", path="test.toml"):
        c = build_connector(table, path, key, None, reactor)
        made.append(c)
        return c

    yield build
    for c in made:
        c.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend_uri(request, tmp_path):
    """A factory: (accounts, encoding) -> URI of a fresh default-schema database."""
    def make(accounts=ACCOUNTS, encoding="scram"):
        if request.param == "sqlite":
            return make_sql_db(tmp_path / "users.db", accounts, encoding)
        pg = request.getfixturevalue("postgres")
        uri = pg.create_database("xmppd_sql_test")
        return make_sql_db(uri, accounts, encoding)
    return make


def scram_exchange(creds, mechanism, username, password) -> bool:
    """A full RFC 5802 exchange (scramp client and server) with ``creds`` on the server."""
    server = ScramMechanism(mechanism).make_server(
        lambda _u: (creds.salt, creds.stored_key, creds.server_key, creds.iterations)
    )
    client = ScramClient([mechanism], username, password)
    server.set_client_first(client.get_client_first())
    client.set_server_first(server.get_server_first())
    try:
        server.set_client_final(client.get_client_final())
    except Exception:
        return False
    client.set_server_final(server.get_server_final())
    return True


@pytest.mark.parametrize("encoding", passwords.ENCODINGS)
@pytest_twisted.ensureDeferred
async def test_login_each_encoding_sqlite(tmp_path, connectors, encoding):
    uri = make_sql_db(tmp_path / "users.db", ACCOUNTS, encoding)
    c = connectors(sql_auth_table(uri, encoding, bcrypt_rounds=4))
    assert await c.check_password("alice", DOMAIN, "alice-secret") is True
    assert await c.check_password("alice", DOMAIN, "bob-secret") is False
    assert await c.check_password("alice", "other.example", "other-secret") is True
    assert await c.check_password("alice", "other.example", "alice-secret") is False
    assert await c.check_password("nobody", DOMAIN, "alice-secret") is False
    assert await c.check_password("alice", DOMAIN, "") is False
    scram = encoding in ("plain", "scram")
    assert c.mechanisms() == (
        {"PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-256"} if scram else {"PLAIN"}
    )
    for mech in ("SCRAM-SHA-1", "SCRAM-SHA-256"):
        creds = await c.get_scram_credentials("alice", DOMAIN, mech)
        if not scram:
            assert creds is None
            continue
        assert scram_exchange(creds, mech, "alice", "alice-secret")
        assert not scram_exchange(creds, mech, "alice", "wrong")
        assert await c.get_scram_credentials("nobody", DOMAIN, mech) is None
    if encoding == "plain":
        # Derived credentials are stable (clients may cache SaltedPassword).
        again = await c.get_scram_credentials("alice", DOMAIN, "SCRAM-SHA-256")
        assert again == await c.get_scram_credentials("alice", DOMAIN, "SCRAM-SHA-256")


@pytest_twisted.ensureDeferred
async def test_account_management(backend_uri, connectors):
    c = connectors(sql_auth_table(backend_uri(), "scram"))
    assert await c.count_users(DOMAIN) == 2
    assert await c.user_exists("bob", DOMAIN) is True
    assert await c.user_exists("carol", DOMAIN) is False
    await c.add_user("carol", DOMAIN, "carol-secret")
    assert await c.check_password("carol", DOMAIN, "carol-secret")
    with pytest.raises(UserExists):
        await c.add_user("carol", DOMAIN, "again")
    await c.set_password("carol", DOMAIN, "new-secret")
    assert not await c.check_password("carol", DOMAIN, "carol-secret")
    assert await c.check_password("carol", DOMAIN, "new-secret")
    with pytest.raises(NoSuchUser):
        await c.set_password("nobody", DOMAIN, "x")
    assert await c.count_users(DOMAIN) == 3
    await c.remove_user("carol", DOMAIN)
    with pytest.raises(NoSuchUser):
        await c.remove_user("carol", DOMAIN)
    assert await c.user_exists("carol", DOMAIN) is False
    assert await c.count_users(DOMAIN) == 2
    assert await c.count_users("other.example") == 1


@pytest_twisted.ensureDeferred
async def test_values_are_bound_never_formatted(backend_uri, connectors):
    c = connectors(sql_auth_table(backend_uri(), "plain"))
    for evil in ["alice' --", "x' OR '1'='1", "alice'; DROP TABLE xmppd_users; --",
                 ":domain", "%(user)s", "%s", "?"]:
        assert await c.check_password(evil, DOMAIN, "alice-secret") is False
        assert await c.check_password("alice", DOMAIN, evil) is False
    await c.add_user("o'hara%:user?", DOMAIN, "it's 100% ok")
    assert await c.check_password("o'hara%:user?", DOMAIN, "it's 100% ok")
    assert await c.count_users(DOMAIN) == 3  # the table survived


@pytest_twisted.ensureDeferred
async def test_custom_schema_and_queries_on_postgres(postgres, connectors):
    """A legacy table: one 'jid' column, sha256 digests, % literals in a query."""
    uri = postgres.create_database("xmppd_legacy")
    with postgres.connect("xmppd_legacy") as conn:
        conn.execute("CREATE TABLE accounts (jid TEXT PRIMARY KEY, pw_hash TEXT, disabled BOOLEAN)")
        for jid, pw, disabled in [("alice@example.org", "a-pw", False), ("eve@example.org", "e-pw", True)]:
            conn.execute("INSERT INTO accounts VALUES (%s, %s, %s)",
                         (jid, passwords.encode("sha256", pw), disabled))
    queries = {
        "user_login": "SELECT pw_hash FROM accounts WHERE jid = :jid AND NOT disabled",
        "user_add": "INSERT INTO accounts (jid, pw_hash, disabled) VALUES (:jid, :password, false)",
        "user_del": "DELETE FROM accounts WHERE jid = :jid",
        "user_passwd": "UPDATE accounts SET pw_hash = :password WHERE jid = :jid",
        "users_count": "SELECT COUNT(*) FROM accounts WHERE jid LIKE '%@' || :domain",
    }
    c = connectors(sql_auth_table(uri, "sha256", queries))
    assert c.mechanisms() == {"PLAIN"}
    assert await c.check_password("alice", DOMAIN, "a-pw")
    assert not await c.check_password("eve", DOMAIN, "e-pw")  # disabled by the query
    assert await c.count_users(DOMAIN) == 2
    await c.add_user("carol", DOMAIN, "c-pw")
    assert await c.check_password("carol", DOMAIN, "c-pw")
    assert await c.check() == []


@pytest_twisted.ensureDeferred
async def test_read_only_database(tmp_path, connectors):
    uri = make_sql_db(tmp_path / "ro.db", ACCOUNTS, "plain")
    c = connectors(sql_auth_table(uri, "plain", {"user_add": "", "user_del": "", "user_passwd": "",
                                                 "users_count": ""}))
    assert await c.check_password("bob", DOMAIN, "bob-secret")
    for op in (c.add_user("x", DOMAIN, "pw"), c.set_password("bob", DOMAIN, "pw"),
               c.remove_user("bob", DOMAIN), c.count_users(DOMAIN)):
        with pytest.raises(NotSupported):
            await op


@pytest_twisted.ensureDeferred
async def test_several_rows_refuse_the_login(tmp_path, connectors, captured_log):
    uri = make_sql_db(tmp_path / "u.db", ACCOUNTS, "plain")
    # A wrong query: selects by domain only... plus the localpart to pass validation.
    bad = {"user_login": "SELECT password FROM xmppd_users WHERE domain = :domain OR username = :user"}
    c = connectors(sql_auth_table(uri, "plain", bad))
    assert await c.check_password("alice", DOMAIN, "alice-secret") is False
    assert "several rows" in captured_log.text()


@pytest_twisted.ensureDeferred
async def test_login_bookkeeping(tmp_path, connectors):
    from xmppd.auth.sql import EXAMPLE_BOOKKEEPING

    path = tmp_path / "u.db"
    uri = make_sql_db(path, ACCOUNTS, "scram")
    c = connectors(sql_auth_table(uri, "scram", EXAMPLE_BOOKKEEPING))
    await c.record_login("alice", DOMAIN, "192.0.2.7")
    await c.record_logout("alice", DOMAIN, "192.0.2.7")
    row = sqlite3.connect(path).execute(
        "SELECT last_login IS NOT NULL, last_logout IS NOT NULL, last_ip FROM xmppd_users "
        "WHERE username = 'alice' AND domain = ?", (DOMAIN,)).fetchone()
    assert row == (1, 1, "192.0.2.7")


@pytest_twisted.ensureDeferred
async def test_create_schema(tmp_path, postgres, connectors):
    path = tmp_path / "sub" / "new.db"
    c = connectors(sql_auth_table(f"sqlite://{path}"))
    # Before create_schema the missing file is an error, never silently created.
    with pytest.raises(TemporaryAuthFailure):
        await c.check_password("alice", DOMAIN, "pw")
    assert not path.exists()
    await c.create_schema()
    await c.add_user("alice", DOMAIN, "pw")
    assert await c.check_password("alice", DOMAIN, "pw")
    assert await c.check() == []

    uri = postgres.create_database("xmppd_schema")
    p = connectors(sql_auth_table(uri))
    await p.create_schema()
    await p.create_schema()  # idempotent
    await p.add_user("alice", DOMAIN, "pw")
    assert await p.check_password("alice", DOMAIN, "pw")
    assert await p.check() == []


# -- configuration problems -------------------------------------------------------------


def test_unknown_placeholder_is_a_config_error(connectors):
    table = sql_auth_table("sqlite:///nonexistent.db", queries={
        "user_login": "SELECT password FROM t WHERE username = :usr AND domain = :domain"})
    with pytest.raises(ConfigError) as e:
        connectors(table)
    assert e.value.key == "auth.sql.queries.user_login"
    assert ":usr" in str(e.value)


@pytest.mark.parametrize("queries,key,needle", [
    ({"users_count": "SELECT COUNT(*) FROM t WHERE d = :domain AND p = :password"},
     "auth.sql.queries.users_count", ":password"),
    ({"user_login": "SELECT password FROM t WHERE domain = :domain"},
     "auth.sql.queries.user_login", "must select the account"),
    ({"user_passwd": "UPDATE t SET p = 'x' WHERE u = :user"},
     "auth.sql.queries.user_passwd", "must use :password"),
    ({"user_login": ""}, "auth.sql.queries.user_login", "required"),
    ({"user_logon": "SELECT 1"}, "auth.sql.queries.user_logon", "unknown key"),
])
def test_query_validation(connectors, queries, key, needle):
    with pytest.raises(ConfigError) as e:
        connectors(sql_auth_table("sqlite:///x.db", queries=queries))
    assert e.value.key == key and needle in str(e.value)


@pytest.mark.parametrize("table,key", [
    ({"uri": "mysql://db/x"}, "auth.sql.uri"),
    ({"uri": "sqlite://host/x.db"}, "auth.sql.uri"),
    ({"uri": "sqlite:///x.db", "password_encoding": "rot13"}, "auth.sql.password_encoding"),
    ({"uri": "sqlite:///x.db", "timeout": -1}, "auth.sql.timeout"),
    ({"uri": "sqlite:///x.db", "colour": "blue"}, "auth.sql.colour"),
    ({"pool_size": 2}, "auth.sql.uri"),
])
def test_bad_tables(connectors, table, key):
    with pytest.raises(ConfigError) as e:
        connectors({"connector": "sql", "sql": table})
    assert e.value.key == key


def test_missing_connector_table(connectors):
    with pytest.raises(ConfigError) as e:
        connectors({"connector": "sql"}, key='hosts."example.org".auth')
    assert e.value.key == 'hosts."example.org".auth.sql'



@pytest_twisted.ensureDeferred
async def test_check_finds_problems(tmp_path, postgres, connectors):
    # Unknown placeholder: check_table reports the ConfigError as a problem line.
    problems = await check_table(sql_auth_table("sqlite:///x.db", queries={
        "user_del": "DELETE FROM t WHERE u = :user AND x = :nope"}), "xmppd.toml", "auth", None, reactor)
    assert len(problems) == 1 and "auth.sql.queries.user_del" in problems[0] and ":nope" in problems[0]

    # A query the database rejects (no such column), found before any login.
    uri = make_sql_db(tmp_path / "u.db", ACCOUNTS)
    c = connectors(sql_auth_table(uri, queries={
        "user_login": "SELECT pwd FROM xmppd_users WHERE username = :user AND domain = :domain"}))
    problems = await c.check()
    assert len(problems) == 1 and "auth.sql.queries.user_login" in problems[0]

    # Unreachable server: names the uri key, never shows the password.
    dead_port = _closed_port()
    uri = f"postgresql://xmppd:hunter2@127.0.0.1:{dead_port}/x"
    problems = await check_table(sql_auth_table(uri, timeout=3), "xmppd.toml",
                                 'hosts."example.org".auth', None, reactor)
    assert len(problems) == 1
    assert 'hosts."example.org".auth.sql.uri' in problems[0]
    assert "hunter2" not in problems[0] and "***" in problems[0]

    # A SQLite file that is not there.
    problems = await check_table(sql_auth_table(f"sqlite://{tmp_path}/missing.db"), "xmppd.toml",
                                 "auth", None, reactor)
    assert len(problems) == 1 and "auth.sql.uri" in problems[0]

    # And a good one has no problems.
    assert await check_table(sql_auth_table(postgres.create_database("xmppd_ok")), "x", "auth",
                             None, reactor) != []  # no table yet: the queries fail to plan
    uri = make_sql_db(postgres.create_database("xmppd_ok"), ACCOUNTS)
    assert await check_table(sql_auth_table(uri), "x", "auth", None, reactor) == []


# -- failing closed -----------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest_twisted.ensureDeferred
async def test_stopped_postgres_fails_closed_and_logs_once(postgres, connectors, captured_log):
    uri = make_sql_db(postgres.create_database("xmppd_outage"), ACCOUNTS)
    c = connectors(sql_auth_table(uri))
    assert await c.check_password("alice", DOMAIN, "alice-secret")
    postgres.stop()
    try:
        for _ in range(3):
            with pytest.raises(TemporaryAuthFailure) as e:
                await c.check_password("alice", DOMAIN, "alice-secret")
            assert "127.0.0.1" not in str(e.value)  # the client sees no internals
        for op in (c.user_exists("alice", DOMAIN), c.get_scram_credentials("alice", DOMAIN, "SCRAM-SHA-1"),
                   c.count_users(DOMAIN)):
            with pytest.raises(TemporaryAuthFailure):
                await op
    finally:
        postgres.start()
    # The pooled connection died with the server: the next request reconnects.
    assert await c.check_password("alice", DOMAIN, "alice-secret")
    assert await c.check_password("alice", DOMAIN, "wrong") is False
    down = captured_log.with_key("xmppd_auth_outage", "down")
    up = captured_log.with_key("xmppd_auth_outage", "up")
    assert len(down) == 1 and len(up) == 1
    assert "pg-test-secret" not in captured_log.text()


@pytest_twisted.ensureDeferred
async def test_silent_server_times_out(connectors, captured_log):
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        c = connectors(sql_auth_table(f"postgresql://x:y@127.0.0.1:{port}/db", timeout=0.5))
        started = time.monotonic()
        with pytest.raises(TemporaryAuthFailure):
            await c.check_password("alice", DOMAIN, "pw")
        assert time.monotonic() - started < 2
    assert "no answer within 0.5s" in captured_log.text()


@pytest_twisted.ensureDeferred
async def test_vanished_sqlite_file_fails_closed(tmp_path, connectors):
    path = tmp_path / "u.db"
    c = connectors(sql_auth_table(make_sql_db(path, ACCOUNTS)))
    assert await c.check_password("bob", DOMAIN, "bob-secret")
    c.close()  # drop pooled connections, then the file
    path.unlink()
    c2 = connectors(sql_auth_table(f"sqlite://{path}"))
    with pytest.raises(TemporaryAuthFailure):
        await c2.check_password("bob", DOMAIN, "bob-secret")

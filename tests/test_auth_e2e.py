"""Logging in through every connector, end to end: slixmpp -> daemon -> real backend.

One daemon serves one vhost per connector ([hosts."x".auth] overrides), so
the per-vhost selection is tested on the way.
"""
from __future__ import annotations

import base64

import pytest

from tests.backends import (
    DrupalUser,
    SlapdServer,
    auth_toml,
    drupal_auth_table,
    ldap_auth_table,
    make_drupal_db,
    make_sql_db,
    postgres_server,
    slapd_server,
    sql_auth_table,
)
from tests.daemon import Daemon
from tests.rawclient import RawClient
from tests.xmpp import connect, login_fails, run
from xmppd.auth.passwords import drupal_hash
from xmppd.auth.sql import EXAMPLE_BOOKKEEPING, TABLE

HOSTS = ("localhost", "sqlite.test", "pg.test", "drupal.test", "d7.test", "ldap.test",
         "ldapt.test", "down.test")


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth-e2e")
    pg = postgres_server()
    slapd = slapd_server()
    down = SlapdServer().start()  # a directory we will stop during the test
    sqlite_uri = make_sql_db(tmp / "accounts.db", [("sam", "sqlite.test", "sam-secret")], encoding="scram")
    pg_uri = make_sql_db(pg.create_database("xmppd_e2e"), [("pat", "pg.test", "pat-secret")],
                         encoding="bcrypt")
    d8_uri = make_drupal_db(tmp / "drupal8.db", 8, [
        DrupalUser("Dru", "dru-secret", drupal_hash("dru-secret")),
        DrupalUser("blocked", "blocked-secret", drupal_hash("blocked-secret"), status=0),
    ])
    d7_uri = make_drupal_db(pg.create_database("drupal7_e2e"), 7, [
        DrupalUser("seven", "seven-secret", drupal_hash("seven-secret")),
    ])
    extra = "[limits]\nauth_failures_per_ip = 0  # this module fails logins on purpose\n" + "".join([
        auth_toml(sql_auth_table(sqlite_uri, "scram", queries=EXAMPLE_BOOKKEEPING),
                  'hosts."sqlite.test".auth'),
        auth_toml(sql_auth_table(pg_uri, "bcrypt"), 'hosts."pg.test".auth'),
        auth_toml(drupal_auth_table(d8_uri, 8), 'hosts."drupal.test".auth'),
        auth_toml(drupal_auth_table(d7_uri, 7), 'hosts."d7.test".auth'),
        auth_toml(ldap_auth_table(slapd, "search"), 'hosts."ldap.test".auth'),
        auth_toml(ldap_auth_table(slapd, "template"), 'hosts."ldapt.test".auth'),
        auth_toml(ldap_auth_table(down, "search"), 'hosts."down.test".auth'),
    ])
    d = Daemon(tmp, hosts=HOSTS, extra=extra).start()
    d.down = down
    d.sqlite_path = tmp / "accounts.db"
    yield d
    d.stop()
    down.destroy()


def login(d, jid, pw, mech=None):
    async def go():
        c = await connect(jid, pw, d.port, mech=mech)
        c.disconnect()
        return True

    return run(go())


def failure(d, jid, pw, mech="PLAIN"):
    return run(login_fails(jid, pw, d.port, mech=mech))[0]["condition"]


def mechanisms(d, host):
    c = RawClient(d.port, host=host)
    c.open_stream()
    c.starttls()
    features = c.open_stream().decode()
    c.close()
    return features


def test_sql_sqlite_scram(e2e):
    assert login(e2e, "sam@sqlite.test/x", "sam-secret", "SCRAM-SHA-256")
    assert login(e2e, "sam@sqlite.test/x", "sam-secret", "PLAIN")
    assert failure(e2e, "sam@sqlite.test", "wrong", "SCRAM-SHA-1") == "not-authorized"


def test_sql_postgresql_bcrypt_is_plain_only(e2e):
    features = mechanisms(e2e, "pg.test")
    assert "<mechanism>PLAIN</mechanism>" in features and "SCRAM" not in features
    assert login(e2e, "pat@pg.test/x", "pat-secret", "PLAIN")
    assert failure(e2e, "pat@pg.test", "wrong") == "not-authorized"


def test_drupal_8_and_7(e2e):
    assert login(e2e, "dru@drupal.test/x", "dru-secret", "PLAIN")
    assert failure(e2e, "dru@drupal.test", "wrong") == "not-authorized"
    assert failure(e2e, "blocked@drupal.test", "blocked-secret") == "not-authorized"
    assert login(e2e, "seven@d7.test/x", "seven-secret", "PLAIN")


@pytest.mark.parametrize("host", ["ldap.test", "ldapt.test"])
def test_ldap_search_and_template(e2e, host):
    assert login(e2e, f"alice@{host}/x", "alice-secret", "PLAIN")
    assert failure(e2e, f"alice@{host}", "wrong") == "not-authorized"


def _raw_plain(d, host, user, password):
    c = RawClient(d.port, host=host)
    c.open_stream()
    c.starttls()
    c.open_stream()
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    c.send(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>")
    reply = c.read_until(b"</success>|<success[^>]*/>|</failure>").decode()
    c.close()
    return reply


@pytest.mark.parametrize("user", ["*", "alice)(uid=*", "*)(uid=alice", "al*", "alice,ou=people"])
@pytest.mark.parametrize("host", ["ldap.test", "ldapt.test"])
def test_ldap_injection_attempts_fail(e2e, host, user):
    reply = _raw_plain(e2e, host, user, "alice-secret")
    assert "<not-authorized/>" in reply, reply


def test_ldap_dn_specials_are_real_users(e2e):
    # Users whose names need RFC 4514 escaping log in with their own password only.
    assert "<success" in _raw_plain(e2e, "ldapt.test", "comma,user", "comma-secret")
    assert "<not-authorized/>" in _raw_plain(e2e, "ldapt.test", "comma,user", "alice-secret")


def test_stopped_backend_is_temporary_failure_not_wrong_password(e2e):
    assert login(e2e, "alice@down.test/x", "alice-secret", "PLAIN")
    e2e.down.stop()
    try:
        reply = _raw_plain(e2e, "down.test", "alice", "alice-secret")
        assert "<temporary-auth-failure/>" in reply, reply
        assert "not-authorized" not in reply
    finally:
        e2e.down.start()
    assert login(e2e, "alice@down.test/x", "alice-secret", "PLAIN")


def test_internal_still_serves_the_default_host(e2e):
    e2e.adduser("ivan@localhost", "ivan-secret")
    assert login(e2e, "ivan@localhost/x", "ivan-secret", "SCRAM-SHA-1")


def test_sql_login_logout_bookkeeping(e2e):
    import sqlite3
    import time

    assert login(e2e, "sam@sqlite.test/book", "sam-secret", "SCRAM-SHA-1")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        row = sqlite3.connect(e2e.sqlite_path).execute(
            f"SELECT last_login, last_ip, last_logout FROM {TABLE} WHERE username='sam'").fetchone()
        if row[2] is not None:
            break
        time.sleep(0.1)
    assert row[0] is not None and row[1] == "127.0.0.1" and row[2] is not None


def test_ctl_creates_sql_schema_then_accounts(tmp_path):
    from tests.backends import auth_toml, sql_auth_table

    db = tmp_path / "fresh.db"
    extra = auth_toml(sql_auth_table(f"sqlite://{db}", "scram"), "auth")
    d = Daemon(tmp_path, extra=extra)
    r = d.ctl("adduser", "nora@localhost", "nora-secret", check=False)
    assert r.returncode == 1  # no table yet: a clear error, not a traceback
    assert "Traceback" not in r.stderr
    assert "created the default sql schema" in d.ctl("create-schema").stdout
    d.ctl("adduser", "nora@localhost", "nora-secret")
    d.start()
    try:
        assert login(d, "nora@localhost/x", "nora-secret", "SCRAM-SHA-256")
    finally:
        d.stop()

"""build_connector: the [auth] table and its per-vhost overrides."""
from __future__ import annotations

import textwrap
import tomllib

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.backends import (
    auth_toml, drupal_auth_table, make_sql_db, sql_auth_table,
)
from xmppd import config as configmod
from xmppd.auth.base import IAuthConnector
from xmppd.auth.drupal import DrupalConnector
from xmppd.auth.factory import build_connector, check_table
from xmppd.auth.internal import InternalConnector
from xmppd.auth.ldap import LDAPConnector
from xmppd.auth.sql import SQLConnector
from xmppd.config import ConfigError
from xmppd.storage import MemoryStore


def test_default_is_internal():
    store = MemoryStore()
    c = build_connector({}, "x.toml", "auth", store, reactor)
    assert isinstance(c, InternalConnector) and c.iterations == 4096
    assert IAuthConnector.providedBy(c)
    c = build_connector({"connector": "internal", "scram_iterations": 10000}, "x.toml", "auth", store)
    assert c.iterations == 10000
    assert isinstance(build_connector(None, "x.toml", "auth", store), InternalConnector)


@pytest_twisted.ensureDeferred
async def test_internal_connector_works_through_the_factory():
    c = build_connector({"connector": "internal"}, "x.toml", "auth", MemoryStore(), reactor)
    await c.add_user("alice", "example.org", "pw")
    assert await c.check_password("alice", "example.org", "pw")
    assert await check_table({}, "x.toml", "auth", MemoryStore(), reactor) == []


@pytest.mark.parametrize("table,key,needle", [
    ({"connector": "nis"}, "auth.connector", "'internal', 'sql', 'drupal', 'ldap'"),
    ({"connector": "internal", "scram_iterations": 1000}, "auth.scram_iterations", "4096"),
    ({"connector": "internal", "conector": "sql"}, "auth.conector", "unknown key"),
    ({"connector": "ldap"}, "auth.ldap", "needs a"),
    ({"connector": "sql", "sql": "sqlite:///x"}, "auth.sql", "must be a table"),
])
def test_config_errors_name_the_key(table, key, needle):
    with pytest.raises(ConfigError) as e:
        build_connector(table, "xmppd.toml", "auth", MemoryStore(), reactor)
    assert e.value.key == key and needle in str(e.value)
    assert str(e.value).startswith("xmppd.toml: ")


def test_unselected_tables_may_stay():
    table = {"connector": "internal", "sql": {"uri": "mysql://nonsense"}, "ldap": {}}
    assert isinstance(build_connector(table, "x.toml", "auth", MemoryStore()), InternalConnector)


def test_per_vhost_override_from_a_config_file(tmp_path):
    """Wired the way xmppd.core does it: [auth] default, [hosts."x".auth] override."""
    db = make_sql_db(tmp_path / "users.db", [("alice", "b.example", "pw")], "plain")
    ldap = {"connector": "ldap", "ldap": {"uri": "ldaps://ldap.example.org",
                                          "bind_dn_template": "uid={user},ou=people,dc=example,dc=org"}}
    text = textwrap.dedent("""\
        [server]
        hosts = ["a.example", "b.example", "c.example", "d.example"]
        """) + auth_toml({"connector": "internal"}) + "\n" \
        + auth_toml(sql_auth_table(db, "plain"), 'hosts."b.example".auth') + "\n" \
        + auth_toml(drupal_auth_table(f"sqlite://{tmp_path}/drupal.db", 8), 'hosts."c.example".auth') \
        + "\n" + auth_toml(ldap, 'hosts."d.example".auth')
    path = tmp_path / "xmppd.toml"
    path.write_text(text)
    cfg = configmod.load(str(path))
    store = MemoryStore()
    default = build_connector(cfg.auth.table, cfg.path, "auth", store, reactor)
    made = {}
    for host in cfg.hosts:
        section = cfg.host_sections.get(host)
        table = section.table.get("auth") if section else None
        made[host] = (build_connector(table, cfg.path, f'hosts."{host}".auth', store, reactor)
                      if table is not None else default)
    try:
        assert made["a.example"] is default and isinstance(default, InternalConnector)
        assert isinstance(made["b.example"], SQLConnector)
        assert isinstance(made["c.example"], DrupalConnector)
        assert isinstance(made["d.example"], LDAPConnector)
        # Relative paths in URIs would be relative to the config file: here absolute.
        assert made["b.example"].db.file == str(tmp_path / "users.db")
    finally:
        for c in made.values():
            getattr(c, "close", lambda: None)()


def test_per_vhost_errors_carry_the_vhost_key():
    with pytest.raises(ConfigError) as e:
        build_connector({"connector": "sql", "sql": {"uri": "oracle://x"}}, "xmppd.toml",
                        'hosts."b.example".auth', MemoryStore(), reactor)
    assert e.value.key == 'hosts."b.example".auth.sql.uri'


def test_relative_sqlite_path_is_relative_to_the_config_file(tmp_path):
    c = build_connector(sql_auth_table("sqlite:users.db"), str(tmp_path / "etc" / "xmppd.toml"),
                        "auth", None, reactor)
    try:
        assert c.db.file == str(tmp_path / "etc" / "users.db")
    finally:
        c.close()


def test_auth_toml_roundtrip():
    table = sql_auth_table("sqlite:///x.db", "bcrypt", {"user_login": 'SELECT "p" FROM t WHERE u = :user'},
                           bcrypt_rounds=10)
    assert tomllib.loads(auth_toml(table))["auth"] == table


@pytest_twisted.ensureDeferred
async def test_log_problems_at_startup(tmp_path):
    from tests.backends import LogCapture
    from twisted.logger import Logger

    from xmppd.auth.factory import log_problems

    cap = LogCapture()
    good = build_connector({}, "x.toml", "auth", MemoryStore(), reactor)
    bad = build_connector(sql_auth_table(f"sqlite://{tmp_path}/missing.db"), "x.toml",
                          'hosts."b.example".auth', None, reactor)
    try:
        problems = await log_problems([good, bad, good, bad], Logger(observer=cap))
    finally:
        bad.close()
    assert len(problems) == 1 and 'hosts."b.example".auth.sql.uri' in problems[0]
    assert len(cap.events) == 1 and cap.events[0]["log_level"].name == "error"

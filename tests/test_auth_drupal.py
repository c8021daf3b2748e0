"""The drupal connector against Drupal 7 and Drupal 8+ shaped databases (SQLite, PostgreSQL).

Hashes are computed here from Drupal's documented algorithm, plus the known
vectors of tests/test_auth_passwords.py (Drupal 7's own fixture site,
phpass, php-src).
"""
from __future__ import annotations

import hashlib

import bcrypt
import pytest
import pytest_twisted
from argon2 import PasswordHasher
from twisted.internet import reactor

from tests.backends import (  # noqa: F401 (fixtures)
    DrupalUser, captured_log, drupal_auth_table, make_drupal_db, postgres,
)
from tests.test_auth_passwords import (
    DRUPAL7_ODO, DRUPAL7_ROOT, PHP_ARGON2I, PHP_BCRYPT, PHPASS_H, PHPASS_P,
)
from xmppd.auth.base import NotSupported, TemporaryAuthFailure
from xmppd.auth.factory import build_connector, check_table
from xmppd.auth.passwords import drupal_hash
from xmppd.config import ConfigError

DOMAIN = "example.org"


def site_users() -> list[DrupalUser]:
    md5 = hashlib.md5(b"legacy-pw").hexdigest()
    return [
        DrupalUser("root", "root", DRUPAL7_ROOT, uid=1),
        DrupalUser("Odo", "password", DRUPAL7_ODO),
        DrupalUser("Jane.Doe", "jane-secret", drupal_hash("jane-secret", 15), translations=["fr", "de"]),
        DrupalUser("d8user", "d8-secret", drupal_hash("d8-secret", 16)),
        DrupalUser("legacy", "legacy-pw", "U" + drupal_hash(md5, 11)),
        DrupalUser("wp", "test12345", PHPASS_P),
        DrupalUser("phpbb", "test1", PHPASS_H),
        DrupalUser("modern", "modern-pw",
                   bcrypt.hashpw(b"modern-pw", bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$", 1)),
        DrupalUser("rasmus", "rasmuslerdorf", PHP_BCRYPT),
        DrupalUser("argon", "argon-pw",
                   PasswordHasher(time_cost=2, memory_cost=1024, parallelism=1).hash("argon-pw")),
        DrupalUser("argon2i", "test", PHP_ARGON2I),
        DrupalUser("blocked", "blocked-pw", drupal_hash("blocked-pw", 7), status=0),
        DrupalUser("Dup", "dup-pw", drupal_hash("dup-pw", 7)),
        DrupalUser("dup", "dup-pw", drupal_hash("dup-pw", 7)),
        DrupalUser("junk", "junk-pw", "not-a-hash-at-all"),
        DrupalUser("with space", "space-pw", drupal_hash("space-pw", 7)),
    ]


ACTIVE = 15  # users above with status 1 (uid > 0)

# (localpart as the SASL layer gives it, password, expected)
LOGINS = [
    ("root", "root", True),
    ("root", "Root", False),
    ("odo", "password", True),          # Drupal name "Odo": case-insensitive mapping
    ("jane.doe", "jane-secret", True),
    ("jane.doe", "jane-secreT", False),
    ("d8user", "d8-secret", True),
    ("legacy", "legacy-pw", True),
    ("legacy", hashlib.md5(b"legacy-pw").hexdigest(), False),
    ("wp", "test12345", True),
    ("phpbb", "test1", True),
    ("modern", "modern-pw", True),
    ("modern", "modern-PW", False),
    ("rasmus", "rasmuslerdorf", True),
    ("argon", "argon-pw", True),
    ("argon", "argon-pw ", False),
    ("argon2i", "test", True),
    ("blocked", "blocked-pw", False),   # status 0
    ("dup", "dup-pw", False),           # two site accounts map to one JID
    ("junk", "junk-pw", False),         # unknown hash format
    ("nobody", "root", False),
    ("root", "", False),
]


@pytest.fixture
def connectors():
    made = []

    def build(table, key="auth"):
        c = build_connector(table, "test.toml", key, None, reactor)
        made.append(c)
        return c

    yield build
    for c in made:
        c.close()


@pytest.fixture(params=[(7, "sqlite"), (8, "postgresql")], ids=["d7-sqlite", "d8-postgresql"])
def site(request, tmp_path):
    version, backend = request.param
    if backend == "sqlite":
        target = tmp_path / "drupal.db"
    else:
        target = request.getfixturevalue("postgres").create_database(f"drupal{version}")
    return version, make_drupal_db(target, version, site_users())


@pytest_twisted.ensureDeferred
async def test_logins(site, connectors, captured_log):
    version, uri = site
    c = connectors(drupal_auth_table(uri, version))
    for user, password, expected in LOGINS:
        got = await c.check_password(user, DOMAIN, password)
        assert got is expected, (user, password)
    text = captured_log.text()
    assert "map to the localpart 'dup'" in text
    assert "not in a known format" in text


@pytest_twisted.ensureDeferred
async def test_account_queries(site, connectors):
    version, uri = site
    c = connectors(drupal_auth_table(uri, version))
    assert c.mechanisms() == {"PLAIN"}
    assert await c.get_scram_credentials("root", DOMAIN, "SCRAM-SHA-256") is None
    assert await c.user_exists("jane.doe", DOMAIN) is True
    assert await c.user_exists("blocked", DOMAIN) is False
    assert await c.user_exists("nobody", DOMAIN) is False
    # Translations (Drupal 8+) are not extra accounts; uid 0 is not one.
    assert await c.count_users(DOMAIN) == ACTIVE
    for op in (c.add_user("x", DOMAIN, "pw"), c.remove_user("root", DOMAIN),
               c.set_password("root", DOMAIN, "pw")):
        with pytest.raises(NotSupported):
            await op
    assert await c.check() == []


@pytest.mark.parametrize("version", [7, 8])
@pytest_twisted.ensureDeferred
async def test_other_backend_and_prefix(version, tmp_path, postgres, connectors):
    """D7 on PostgreSQL and D8 on SQLite, with a table prefix, non-ASCII names."""
    users = [DrupalUser("Élodie", "elodie-pw", drupal_hash("elodie-pw", 8)),
             DrupalUser("Zoë", "zoe-pw", drupal_hash("zoe-pw", 8), status=0)]
    if version == 7:
        uri = make_drupal_db(postgres.create_database("drupal_prefixed"), 7, users, prefix="site1_")
    else:
        uri = make_drupal_db(tmp_path / "d.db", 8, users, prefix="site1_")
    c = connectors(drupal_auth_table(uri, version, table_prefix="site1_"))
    if version == 7:  # PostgreSQL's LOWER() folds non-ASCII; SQLite's does not
        assert await c.check_password("élodie", DOMAIN, "elodie-pw") is True
        assert await c.check_password("élodie", DOMAIN, "elodie-PW") is False
        assert await c.check_password("zoë", DOMAIN, "zoe-pw") is False  # blocked
    assert await c.count_users(DOMAIN) == 1
    assert await c.check() == []


@pytest_twisted.ensureDeferred
async def test_check_catches_wrong_version_and_missing_site(tmp_path, connectors):
    uri = make_drupal_db(tmp_path / "d7.db", 7, site_users()[:2])
    problems = await check_table(drupal_auth_table(uri, 8), "xmppd.toml", "auth", None, reactor)
    assert len(problems) == 1 and "auth.drupal.version" in problems[0]
    problems = await check_table(drupal_auth_table(f"sqlite://{tmp_path}/nope.db", 7), "xmppd.toml",
                                 "auth", None, reactor)
    assert len(problems) == 1 and "auth.drupal.uri" in problems[0]


@pytest.mark.parametrize("table,key", [
    ({"uri": "sqlite:///x.db", "version": 6}, "auth.drupal.version"),
    ({"uri": "sqlite:///x.db"}, "auth.drupal.version"),
    ({"uri": "sqlite:///x.db", "version": 7, "table_prefix": "x; DROP"}, "auth.drupal.table_prefix"),
    ({"uri": "sqlite:///x.db", "version": 7, "password_encoding": "plain"},
     "auth.drupal.password_encoding"),
])
def test_bad_tables(connectors, table, key):
    with pytest.raises(ConfigError) as e:
        connectors({"connector": "drupal", "drupal": table})
    assert e.value.key == key


@pytest_twisted.ensureDeferred
async def test_missing_database_fails_closed(tmp_path, connectors, captured_log):
    c = connectors(drupal_auth_table(f"sqlite://{tmp_path}/gone.db", 7))
    for _ in range(3):
        with pytest.raises(TemporaryAuthFailure):
            await c.check_password("root", DOMAIN, "root")
    assert len(captured_log.with_key("xmppd_auth_outage", "down")) == 1

"""The ldap connector against a real OpenLDAP slapd (StartTLS, LDAPS, plain)."""
from __future__ import annotations

import socket
import time

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.backends import (  # noqa: F401 (fixtures)
    LDAP_PEOPLE, LDAP_SERVICE_DN, LDAP_USERS, captured_log, ldap_auth_table, slapd,
)
from xmppd.auth.base import NotSupported, TemporaryAuthFailure
from xmppd.auth.factory import build_connector, check_table
from xmppd.config import ConfigError

DOMAIN = "example.org"

# ldaptor's filter parser calls pyparsing's old camelCase names.
pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated.*:DeprecationWarning")

# Usernames that try to widen the search filter (RFC 4515) or change the DN
# (RFC 4514).  Unescaped, several would bind as alice with alice's password:
#   (uid=al*)                              matches only alice
#   (&(...)(uid=alice)(uid=*))             matches alice
#   (&(...)(uid=*)(uid=alice))             matches alice
INJECTIONS = [
    "*", "al*", "alice)(uid=*", "*)(uid=alice", "alice)(|(uid=*", "alice\\29", "ali\\2ace",
    "alice,ou=people,dc=example,dc=org", "alice+cn=alice", "alice\0",
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


@pytest.mark.parametrize("mode,tls", [
    ("search", "starttls"), ("search", "ldaps"), ("search", "none"),
    ("template", "starttls"), ("template", "ldaps"),
])
@pytest_twisted.ensureDeferred
async def test_logins(slapd, connectors, mode, tls):
    c = connectors(ldap_auth_table(slapd, mode, tls))
    assert c.mechanisms() == {"PLAIN"}
    assert await c.check_password("alice", DOMAIN, "alice-secret") is True
    assert await c.check_password("alice", DOMAIN, "bob-secret") is False
    assert await c.check_password("nobody", DOMAIN, "alice-secret") is False
    assert await c.check_password("alice", DOMAIN, "") is False
    # Values special in DNs or filters, and non-ASCII, work as plain values.
    for uid in ("comma,user", "plus+user", "back\\slash", "star*", "élodie"):
        assert await c.check_password(uid, DOMAIN, LDAP_USERS[uid]) is True, uid
        assert await c.check_password(uid, DOMAIN, "alice-secret") is False, uid
    assert await c.check() == []


@pytest.mark.parametrize("mode", ["search", "template"])
@pytest_twisted.ensureDeferred
async def test_injection_attempts_are_only_values(slapd, connectors, mode):
    c = connectors(ldap_auth_table(slapd, mode, "none"))
    for name in INJECTIONS:
        assert await c.check_password(name, DOMAIN, "alice-secret") is False, name
        assert await c.user_exists(name, DOMAIN) is False, name
    # "star*" is a real account: its '*' must not match "star" + anything else.
    assert await c.check_password("sta*", DOMAIN, "star-secret") is False


@pytest_twisted.ensureDeferred
async def test_control_without_escaping_the_injections_work(slapd, connectors, monkeypatch):
    """Proof that the directory and names above are a real test: unescaped, they log in."""
    import xmppd.auth.ldap as ldapmod

    monkeypatch.setattr(ldapmod, "escape_filter_value", lambda v: v)
    c = connectors(ldap_auth_table(slapd, "search", "none"))
    for name in ("al*", "alice)(uid=*", "*)(uid=alice"):
        assert await c.check_password(name, DOMAIN, "alice-secret") is True, name
    monkeypatch.setattr(ldapmod, "escape_dn_value", lambda v: v)
    t = connectors(ldap_auth_table(slapd, "template", "none"))
    assert await t.check_password("comma,user", DOMAIN, "comma-secret") is False


@pytest.mark.parametrize("mode", ["search", "template"])
@pytest_twisted.ensureDeferred
async def test_user_exists_and_read_only(slapd, connectors, mode):
    c = connectors(ldap_auth_table(slapd, mode, "starttls"))
    assert await c.user_exists("alice", DOMAIN) is True
    assert await c.user_exists("comma,user", DOMAIN) is True
    assert await c.user_exists("nobody", DOMAIN) is False
    assert await c.get_scram_credentials("alice", DOMAIN, "SCRAM-SHA-1") is None
    for op in (c.add_user("x", DOMAIN, "pw"), c.remove_user("alice", DOMAIN),
               c.set_password("alice", DOMAIN, "pw"), c.count_users(DOMAIN)):
        with pytest.raises(NotSupported):
            await op


@pytest_twisted.ensureDeferred
async def test_empty_password_never_reaches_the_server(connectors):
    # Nothing listens on this port: any network use would be a TemporaryAuthFailure.
    port = _closed_port()
    for mode in ("search", "template"):
        table = _table_for(f"ldap://127.0.0.1:{port}", mode)
        c = connectors(table)
        assert await c.check_password("alice", DOMAIN, "") is False


@pytest_twisted.ensureDeferred
async def test_service_connection_is_reused(slapd, connectors):
    c = connectors(ldap_auth_table(slapd, "search", "starttls"))
    assert await c.check_password("alice", DOMAIN, "alice-secret")
    first = c._service
    assert first is not None and first.connected
    assert await c.check_password("bob", DOMAIN, "bob-secret")
    assert await c.user_exists("alice", DOMAIN)
    assert c._service is first


@pytest.mark.parametrize("tls", ["starttls", "ldaps"])
@pytest_twisted.ensureDeferred
async def test_certificate_verification(slapd, connectors, tls):
    # A CA that did not sign the server's certificate: refuse to talk.
    c = connectors(ldap_auth_table(slapd, "search", tls, ca_file=str(slapd.tls.other_ca)))
    with pytest.raises(TemporaryAuthFailure):
        await c.check_password("alice", DOMAIN, "alice-secret")
    problems = await c.check()
    assert len(problems) == 1 and "auth.ldap.ca_file" in problems[0]
    # The right CA but a name the certificate does not carry.
    c = connectors(ldap_auth_table(slapd, "template", tls, tls_hostname="ldap.example.org"))
    with pytest.raises(TemporaryAuthFailure):
        await c.check_password("alice", DOMAIN, "alice-secret")


@pytest_twisted.ensureDeferred
async def test_stopped_directory_fails_closed_and_logs_once(slapd, connectors, captured_log):
    search = connectors(ldap_auth_table(slapd, "search", "starttls"))
    template = connectors(ldap_auth_table(slapd, "template", "none"))
    assert await search.check_password("alice", DOMAIN, "alice-secret")
    slapd.stop()
    try:
        for _ in range(3):
            for c in (search, template):
                with pytest.raises(TemporaryAuthFailure) as e:
                    await c.check_password("alice", DOMAIN, "alice-secret")
                assert "127.0.0.1" not in str(e.value)
        with pytest.raises(TemporaryAuthFailure):
            await search.user_exists("alice", DOMAIN)
    finally:
        slapd.start()
    # The shared service connection died with the server; it is reopened.
    assert await search.check_password("alice", DOMAIN, "alice-secret")
    assert await template.check_password("alice", DOMAIN, "alice-secret")
    # One line per connector when it went down, one when it came back.
    assert len(captured_log.with_key("xmppd_auth_outage", "down")) == 2
    assert len(captured_log.with_key("xmppd_auth_outage", "up")) == 2


@pytest_twisted.ensureDeferred
async def test_restarted_directory_reused_connection_retried(slapd, connectors):
    c = connectors(ldap_auth_table(slapd, "search", "none"))
    assert await c.check_password("alice", DOMAIN, "alice-secret")
    slapd.stop()
    slapd.start()
    # The reused connection is dead; the login must still succeed (one retry).
    assert await c.check_password("alice", DOMAIN, "alice-secret")


@pytest_twisted.ensureDeferred
async def test_silent_server_times_out(connectors, captured_log):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"ldap://127.0.0.1:{silent.getsockname()[1]}"
        for mode in ("search", "template"):
            c = connectors(_table_for(uri, mode, timeout=0.5))
            started = time.monotonic()
            with pytest.raises(TemporaryAuthFailure):
                await c.check_password("alice", DOMAIN, "alice-secret")
            assert time.monotonic() - started < 2
    assert "no answer within 0.5s" in captured_log.text()


@pytest_twisted.ensureDeferred
async def test_check_names_the_bad_key(slapd, connectors):
    good = ldap_auth_table(slapd, "search", "starttls")

    def variant(**changes):
        t = {"connector": "ldap", "ldap": {**good["ldap"], **changes}}
        return check_table(t, "xmppd.toml", "auth", None, reactor)

    assert await variant() == []
    problems = await variant(service_password="wrong")
    assert len(problems) == 1 and "auth.ldap.service_dn" in problems[0]
    problems = await variant(search_base="ou=nowhere,dc=example,dc=org")
    assert len(problems) == 1 and "auth.ldap.search_base" in problems[0]
    problems = await variant(uri=f"ldap://127.0.0.1:{_closed_port()}")
    assert len(problems) == 1 and "auth.ldap.uri" in problems[0]
    problems = await variant(search_filter="(&(objectClass=inetOrgPerson)(uid={user})")
    assert len(problems) == 1 and "auth.ldap.search_filter" in problems[0]


@pytest.mark.parametrize("changes,key,needle", [
    ({"search_filter": "(&(objectClass=inetOrgPerson)(uid={user})"}, "search_filter", "RFC 4515"),
    ({"search_filter": "(uid={username})"}, "search_filter", "unknown field"),
    ({"search_filter": "(objectClass=inetOrgPerson)"}, "search_filter", "{user}"),
    ({"search_base": "ou=people,,dc=example"}, "search_base", "not a DN"),
    ({"bind_dn_template": "uid={user},ou=people,dc=example,dc=org"}, "bind_dn_template", "not both"),
    ({"starttls": False}, "uri", "clear"),
    ({"uri": "ldaps://127.0.0.1:636"}, "starttls", "ldaps"),
    ({"uri": "http://127.0.0.1"}, "uri", "ldap://"),
    ({"uri": "ldap://127.0.0.1/dc=example,dc=org"}, "uri", "only scheme"),
    ({"ca_file": "/nonexistent/ca.pem"}, "ca_file", "cannot read"),
    ({"service_password": ""}, "service_password", "required"),
    ({"timeout": "5"}, "timeout", "number"),
    ({"bind_dn": "cn=x"}, "bind_dn", "unknown key"),
])
def test_config_errors(slapd, connectors, changes, key, needle):
    table = ldap_auth_table(slapd, "search", "starttls")
    table["ldap"].update(changes)
    with pytest.raises(ConfigError) as e:
        connectors(table)
    assert e.value.key == f"auth.ldap.{key}"
    assert needle in str(e.value)


def test_template_config_errors(slapd, connectors):
    table = ldap_auth_table(slapd, "search", "starttls", search_filter="(&(objectClass=*)({user}=x))")
    with pytest.raises(ConfigError) as e:
        connectors(table)
    assert e.value.key == "auth.ldap.search_filter" and "value" in str(e.value)
    for template, needle in [("uid={user},,dc=example,dc=org", "not a DN"),
                             ("uid=fixed,dc=example,dc=org", "{user}"),
                             ("{user}=x,dc=example,dc=org", "value")]:
        table = ldap_auth_table(slapd, "template", "starttls", bind_dn_template=template)
        with pytest.raises(ConfigError) as e:
            connectors(table)
        assert e.value.key == "auth.ldap.bind_dn_template" and needle in str(e.value)


def test_service_password_file(slapd, connectors, tmp_path):
    secret = tmp_path / "ldap.secret"
    secret.write_text("service-secret\n")
    table = ldap_auth_table(slapd, "search", "starttls")
    del table["ldap"]["service_password"]
    table["ldap"]["service_password_file"] = str(secret)
    c = connectors(table)
    assert c.service_password == "service-secret"


# -- helpers -------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _table_for(uri: str, mode: str, **extra) -> dict:
    ldap = {"uri": uri, "allow_plaintext": True, "timeout": extra.pop("timeout", 2)}
    if mode == "search":
        ldap.update(search_base=LDAP_PEOPLE, search_filter="(uid={user})",
                    service_dn=LDAP_SERVICE_DN, service_password="service-secret")
    else:
        ldap["bind_dn_template"] = f"uid={{user}},{LDAP_PEOPLE}"
    ldap.update(extra)
    return {"connector": "ldap", "ldap": ldap}

"""Password formats, query placeholders and LDAP escaping: no backend needed.

Known-good vectors come from the projects that define the formats:

* Drupal 7: ``core/modules/migrate_drupal/tests/fixtures/drupal7.php`` in
  drupal/drupal (a dump of a real Drupal 7.37 site) has ``root`` with
  ``$S$D/HVkgCg1Hvi...`` and ``Odo`` with ``$S$DZ4P7zZO...``; their clear
  passwords ("root", "password") are not written next to them -- they were
  found by checking candidate passwords against the hashes, which only a
  correct implementation can match.
* phpass: ``$P$9IQRaTwmfeRo7ud9Fh4E2PdI0S3r.L0`` is "test12345" (phpass's
  own test.php); ``$H$9aaaaaSXBjgypwqm.JsMssPLiS8YQ00`` is "test1" (passlib's
  phpass test vectors).
* PHP ``password_hash``: php-src's ext/standard/tests/password tests:
  ``$2y$07$usesomesillystringfore2uDLvp1Ii2e./U9C8sBjqp8I90dH6hi`` is
  "rasmuslerdorf"; ``$argon2i$v=19$m=65536,t=3,p=1$OEVjWWs2Z3YvWlNZQ0ZmNw$...``
  is "test".
"""
from __future__ import annotations

import hashlib

import bcrypt
import pytest
from argon2 import PasswordHasher

from xmppd.auth import passwords
from xmppd.auth.db import compile_query, placeholders, redact_uri, validate_placeholders
from xmppd.auth.ldap import escape_dn_value, escape_filter_value, render, split_dn
from xmppd.config import ConfigError

DRUPAL7_ROOT = "$S$D/HVkgCg1Hvi7DN5KVSgNl.2C5g8W6oe/OoIRMUlyjkmPugQRhoB"
DRUPAL7_ODO = "$S$DZ4P7zZOh92vgrgZDBbv8Pu6lQB337OJ1wsOy21602G4A5F7.M9K"
PHPASS_P = "$P$9IQRaTwmfeRo7ud9Fh4E2PdI0S3r.L0"
PHPASS_H = "$H$9aaaaaSXBjgypwqm.JsMssPLiS8YQ00"
PHP_BCRYPT = "$2y$07$usesomesillystringfore2uDLvp1Ii2e./U9C8sBjqp8I90dH6hi"
PHP_ARGON2I = "$argon2i$v=19$m=65536,t=3,p=1$OEVjWWs2Z3YvWlNZQ0ZmNw$JKin7ahjmh8JYvMyFcXri0Ss/Uvd3uYpD7MG6C/5Cy0"


@pytest.mark.parametrize("stored,good,bad", [
    (DRUPAL7_ROOT, "root", "Root"),
    (DRUPAL7_ODO, "password", "a password"),
    (PHPASS_P, "test12345", "test12346"),
    (PHPASS_H, "test1", "test2"),
    (PHP_BCRYPT, "rasmuslerdorf", "rasmuslerdorF"),
    (PHP_ARGON2I, "test", "argon2"),
])
def test_known_vectors(stored, good, bad):
    assert passwords.drupal_check_password(good, stored)
    assert not passwords.drupal_check_password(bad, stored)


def test_drupal_hash_roundtrip_and_shape():
    h = passwords.drupal_hash("s3cret ünïcode", 15)
    assert h.startswith("$S$D") and len(h) == 55
    assert passwords.drupal_check_password("s3cret ünïcode", h)
    assert not passwords.drupal_check_password("s3cret unicode", h)
    # Re-hashing with the same setting gives the same hash (determinism).
    assert passwords.drupal_hash("x", 15, salt=h[4:12]) == passwords.portable_crypt(
        "sha512", b"x", h[:12])


def test_md5_portable_hash_is_34_chars():
    h = passwords.drupal_hash("pw", 8, prefix="$P$")
    assert len(h) == 34 and passwords.drupal_check_password("pw", h)


def test_upgraded_drupal6_hash():
    # user_update_7000(): 'U' + hash of the old md5 hex digest.
    old_md5 = hashlib.md5(b"legacy-pw").hexdigest()
    stored = "U" + passwords.drupal_hash(old_md5, 11)
    assert passwords.drupal_check_password("legacy-pw", stored)
    assert not passwords.drupal_check_password(old_md5, stored)  # the md5 itself is no password


def test_php_formats_written_by_drupal_10():
    b = bcrypt.hashpw(b"modern-pw", bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$", 1)
    assert passwords.drupal_check_password("modern-pw", b)
    a = PasswordHasher(time_cost=2, memory_cost=1024, parallelism=1).hash("argon-pw")
    assert a.startswith("$argon2id$")
    assert passwords.drupal_check_password("argon-pw", a)
    assert not passwords.drupal_check_password("argon-PW", a)


def test_bcrypt_uses_the_first_72_bytes_like_php():
    long = "x" * 72
    h = bcrypt.hashpw(long.encode(), bcrypt.gensalt(4)).decode()
    assert passwords.verify_bcrypt(h, long + "ignored by bcrypt")
    assert not passwords.verify_bcrypt(h, "x" * 71 + "\0")


@pytest.mark.parametrize("stored", [
    "", "plainpassword", "$S$", "$S$Dshort", "$X$DZ4P7zZOh92vgrgZDBbv8Pu6lQB337OJ1wsOy21602G4A5F7.M9K",
    "$2y$07$tooshort", "$argon2id$v=19$m=99999999,t=3,p=1$c2FsdHNhbHQ$aGFzaGhhc2g",
])
def test_junk_hashes_raise(stored):
    with pytest.raises(passwords.BadStoredPassword):
        passwords.drupal_check_password("pw", stored)


def test_drupal_refuses_empty_and_overlong_passwords():
    assert not passwords.drupal_check_password("", DRUPAL7_ROOT)
    assert not passwords.drupal_check_password("r" * 513, DRUPAL7_ROOT)
    assert passwords.portable_crypt("sha512", b"r" * 513, DRUPAL7_ROOT) is None


def test_out_of_range_count_is_malformed():
    bad = "$S$" + passwords.ITOA64[31] + DRUPAL7_ROOT[4:]
    with pytest.raises(passwords.BadStoredPassword):
        passwords.drupal_check_password("root", bad)


@pytest.mark.parametrize("encoding", passwords.ENCODINGS)
def test_sql_encodings_roundtrip(encoding):
    stored = passwords.encode(encoding, "pässword", bcrypt_rounds=4)
    assert passwords.verify(encoding, stored, "pässword")
    assert not passwords.verify(encoding, stored, "password")


def test_hex_digest_values():
    assert passwords.encode("md5", "pw") == hashlib.md5(b"pw").hexdigest()
    assert passwords.verify("sha256", hashlib.sha256(b"pw").hexdigest().upper(), "pw")
    with pytest.raises(passwords.BadStoredPassword):
        passwords.verify("sha512", "not-hex", "pw")


def test_scram_encoding_holds_both_mechanisms():
    stored = passwords.encode("scram", "pw", scram_iterations=4096)
    creds = passwords.parse_scram(stored)
    assert set(creds) == {"SCRAM-SHA-1", "SCRAM-SHA-256"}
    assert creds["SCRAM-SHA-256"].iterations == 4096
    assert "pw" not in stored


# -- query placeholders ---------------------------------------------------------------


def test_placeholders_ignore_literals_comments_and_casts():
    sql = ("SELECT password::text FROM t WHERE u = :user AND d = ':domain' -- :jid\n"
           "AND x = \":ip\" /* :password */ AND j = :jid")
    assert placeholders(sql) == ["user", "jid"]


@pytest.mark.parametrize("style,text,params", [
    ("qmark", "SELECT a FROM t WHERE u = ? AND d = ? AND x LIKE 'a%'", ("u1", "d1")),
    ("pyformat", "SELECT a FROM t WHERE u = %(user)s AND d = %(domain)s AND x LIKE 'a%%'",
     {"user": "u1", "domain": "d1"}),
    ("format", "SELECT a FROM t WHERE u = %s AND d = %s AND x LIKE 'a%%'", ("u1", "d1")),
    ("named", "SELECT a FROM t WHERE u = :user AND d = :domain AND x LIKE 'a%'",
     {"user": "u1", "domain": "d1"}),
    ("numeric", "SELECT a FROM t WHERE u = :1 AND d = :2 AND x LIKE 'a%'", ("u1", "d1")),
])
def test_compile_to_each_paramstyle(style, text, params):
    q = compile_query("SELECT a FROM t WHERE u = :user AND d = :domain AND x LIKE 'a%'", style)
    assert q.text == text
    assert q.params({"user": "u1", "domain": "d1", "jid": "unused"}) == params


def test_unknown_placeholder_names_the_key():
    with pytest.raises(ConfigError) as e:
        validate_placeholders("SELECT p FROM t WHERE u = :username", ("user", "domain"),
                              "x.toml", "auth.sql.queries.user_login")
    assert e.value.key == "auth.sql.queries.user_login"
    assert ":username" in str(e.value)


def test_account_queries_must_select_an_account():
    with pytest.raises(ConfigError):
        validate_placeholders("SELECT p FROM t WHERE d = :domain", ("user", "domain", "jid"),
                              "x.toml", "k", required_any=("user", "jid"))


def test_redact_uri():
    assert redact_uri("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_uri("sqlite:///var/x.db") == "sqlite:///var/x.db"


# -- LDAP escaping --------------------------------------------------------------------


@pytest.mark.parametrize("value,escaped", [
    ("alice", "alice"),
    ("*", r"\2a"),
    (")(uid=*", r"\29\28uid=\2a"),
    ("a\\b", r"a\5cb"),
    ("nul\0", r"nul\00"),
    ("élodie", "élodie"),
])
def test_filter_escaping_rfc4515(value, escaped):
    assert escape_filter_value(value) == escaped


@pytest.mark.parametrize("value,escaped", [
    ("alice", "alice"),
    ("a,ou=admins", r"a\,ou\=admins"),
    ("a+b", r"a\+b"),
    ("back\\slash", r"back\\slash"),
    ('q"<>;', r'q\"\<\>\;'),
    (" lead", r"\ lead"),
    ("trail ", r"trail\ "),
    ("#hash", r"\#hash"),
    ("in#side", "in#side"),
    ("nul\0", r"nul\00"),
])
def test_dn_escaping_rfc4514(value, escaped):
    assert escape_dn_value(value) == escaped
    # Whatever the value, it stays inside one attribute value of one RDN.
    rdns = split_dn(render("uid={user},ou=people,dc=example,dc=org", {"user": value}, escape_dn_value))
    assert len(rdns) == 4 and len(rdns[0]) == 1 and rdns[0][0][0] == "uid"


@pytest.mark.parametrize("dn", ["", "uid", "uid=a,,dc=x", "uid=a,dc=x\\", "=a", "uid=a,dc="])
def test_split_dn_rejects_typos(dn):
    with pytest.raises(ValueError):
        split_dn(dn)


# -- the limit on new passwords (docs/auth.rst, "Password length") -------------


class _Bcrypt:
    max_password_bytes = passwords.BCRYPT_MAX_BYTES


def test_new_password_limit_in_bytes_before_and_after_saslprep():
    check = passwords.check_new_password
    check("x" * 1024)
    check("\u00e9" * 512)  # 2 bytes each: exactly 1024
    with pytest.raises(passwords.UnacceptablePassword, match="longer than 1024 bytes"):
        check("x" * 1025)
    with pytest.raises(passwords.UnacceptablePassword, match="longer than 1024 bytes"):
        check("\u00e9" * 513)
    # U+FDFA is 3 bytes but becomes 18 characters (33 bytes) under NFKC.
    with pytest.raises(passwords.UnacceptablePassword, match="after SASLprep"):
        check("\ufdfa" * 40)
    with pytest.raises(passwords.UnacceptablePassword, match="SASLprep"):
        check("bell\x07")
    with pytest.raises(passwords.UnacceptablePassword, match="empty after SASLprep"):
        check("\u00ad")  # soft hyphen: mapped to nothing
    with pytest.raises(passwords.UnacceptablePassword, match="shorter than 8"):
        check("short", min_length=8)


def test_bcrypt_connectors_lower_the_limit_to_72_bytes():
    passwords.check_new_password("x" * 72, _Bcrypt())
    with pytest.raises(passwords.UnacceptablePassword, match="72 bytes.*bcrypt"):
        passwords.check_new_password("x" * 73, _Bcrypt())


def test_xmppctl_refuses_overlong_passwords_in_one_line(tmp_path):
    from tests.daemon import Daemon

    d = Daemon(tmp_path)  # not started: xmppctl works on the config and store
    for args in (("adduser", "long@localhost", "x" * 1025),
                 ("addusers", "bulk", "2", "x" * 1025)):
        r = d.ctl(*args, check=False)
        assert r.returncode == 1
        assert r.stderr == "xmppctl: password refused: password longer than 1024 bytes\n"
    r = d.ctl("adduser", "long@localhost", input="y" * 2000 + "\n", check=False)
    assert r.stderr.startswith("xmppctl: password refused")
    d.adduser("long@localhost", "fine-password")
    r = d.ctl("passwd", "long@localhost", "x" * 1025, check=False)
    assert r.returncode == 1 and "password longer than 1024 bytes" in r.stderr
    assert "no such account" in d.ctl("passwd", "bulk1@localhost", "pw-long-enough", check=False).stderr

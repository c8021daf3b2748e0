"""Build a connector from its config table (``[auth]`` or ``[hosts."x".auth]``).

Shape (documented for operators in docs/auth.rst)::

    [auth]
    connector = "internal"          # internal | sql | drupal | ldap
    scram_iterations = 4096         # internal only

    [auth.sql]
    uri = "postgresql://xmppd:secret@127.0.0.1/xmppd"   # or sqlite:///path.db
    password_encoding = "scram"     # plain | md5 | sha256 | sha512 | bcrypt | scram
    scram_iterations = 4096
    bcrypt_rounds = 12
    timeout = 5
    pool_size = 4
    [auth.sql.queries]              # all optional; defaults use table xmppd_users
    user_login = "SELECT password FROM xmppd_users WHERE username = :user AND domain = :domain"

    [auth.drupal]
    uri = "postgresql://drupal@db/drupal"
    version = 7                     # 7, or 8 (= 8, 9, 10, 11)
    table_prefix = ""
    timeout = 5

    [auth.ldap]
    uri = "ldap://ldap.example.org"  # or ldaps://
    starttls = true
    ca_file = "/etc/xmppd/ldap-ca.pem"
    bind_dn_template = "uid={user},ou=people,dc=example,dc=org"
    # or: search_base, search_filter, service_dn, service_password[_file]
    timeout = 5

A ``[hosts."x".auth]`` table has the same shape and replaces ``[auth]``
entirely for that host (nothing is merged).  Only the selected connector's
sub-table is read; the others may stay in the file.  Every problem is a
ConfigError naming the full key (e.g. ``hosts."example.org".auth.sql.uri``).
"""
from __future__ import annotations

import os

from twisted.internet import defer

from xmppd.auth.internal import InternalConnector
from xmppd.config import ConfigError, Section

CONNECTORS = ("internal", "sql", "drupal", "ldap")


def build_connector(table: dict | None, path: str, key: str, store, reactor=None):
    """An IAuthConnector for ``table``; ConfigError for anything wrong in it."""
    if reactor is None:
        from twisted.internet import reactor
    if table is None:
        table = {}
    if not isinstance(table, dict):
        raise ConfigError(path, key, table, "must be a table")
    sec = Section(path, key, table)
    name = sec.choice("connector", CONNECTORS, "internal")
    if name == "internal":
        iterations = sec.int("scram_iterations", 4096, minimum=4096)
        sec.reject_unknown(extra_allowed=("sql", "drupal", "ldap"))
        return InternalConnector(store, iterations)
    sec.reject_unknown(extra_allowed=("sql", "drupal", "ldap", "scram_iterations"))
    sub = sec.table_of(name)
    if not sub.table:
        raise sec.error(name, None, f"connector = {name!r} needs a [{sec.key(name)}] table")
    base_dir = os.path.dirname(os.path.abspath(path)) if path and not path.startswith("<") else None
    if name == "sql":
        return _sql(sub, reactor, base_dir)
    if name == "drupal":
        return _drupal(sub, reactor, base_dir)
    return _ldap(sub, reactor, base_dir)


def check_table(table: dict | None, path: str, key: str, store, reactor=None) -> defer.Deferred:
    """Deferred[list[str]]: static and live problems of one auth table.

    What ``xmppctl check`` needs in one call: a ConfigError from building
    becomes the one problem; otherwise the connector's own ``check()`` runs
    (and the connector is closed afterwards).
    """
    try:
        connector = build_connector(table, path, key, store, reactor)
    except ConfigError as e:
        return defer.succeed([str(e)])

    def close(result):
        closer = getattr(connector, "close", None)
        if closer is not None:
            closer()
        return result

    return connector.check().addBoth(close)


def _database(sec: Section, reactor, base_dir, name: str):
    from xmppd.auth.db import Database

    return Database(
        sec.str("uri"), path=sec.path, key=sec.prefix, name=name,
        timeout=sec.number("timeout", 5.0, minimum=0.1),
        pool_size=sec.int("pool_size", 4, minimum=1),
        reactor=reactor, base_dir=base_dir,
    )


def _sql(sec: Section, reactor, base_dir):
    from xmppd.auth import passwords
    from xmppd.auth.sql import QUERY_PLACEHOLDERS, SQLConnector

    encoding = sec.choice("password_encoding", passwords.ENCODINGS, "scram")
    iterations = sec.int("scram_iterations", 4096, minimum=4096)
    rounds = sec.int("bcrypt_rounds", 12, minimum=4)
    if rounds > 31:
        raise sec.error("bcrypt_rounds", rounds, "must be between 4 and 31")
    qsec = sec.table_of("queries")
    queries = {}
    for qname in QUERY_PLACEHOLDERS:
        value = qsec.str(qname, None)
        if value is not None:
            queries[qname] = value
    qsec.reject_unknown()
    db = _database(sec, reactor, base_dir, "sql")
    sec.reject_unknown()
    try:
        return SQLConnector(db, queries, password_encoding=encoding, scram_iterations=iterations,
                            bcrypt_rounds=rounds, reactor=reactor)
    except ConfigError:
        db.close()
        raise


def _drupal(sec: Section, reactor, base_dir):
    from xmppd.auth.drupal import DrupalConnector

    version = sec.int("version")
    if version not in (7, 8, 9, 10, 11):
        raise sec.error("version", version, "must be 7, or 8 for Drupal 8 and later (9, 10, 11 accepted)")
    prefix = sec.str("table_prefix", "")
    if not all(c.isascii() and (c.isalnum() or c == "_") for c in prefix):
        raise sec.error("table_prefix", prefix, "letters, digits and _ only")
    db = _database(sec, reactor, base_dir, "drupal")
    sec.reject_unknown()
    return DrupalConnector(db, 7 if version == 7 else 8, prefix, reactor=reactor)


def _ldap(sec: Section, reactor, base_dir):
    from xmppd.auth.ldap import LDAPConnector

    def file_key(name):
        value = sec.str(name, None)
        if value is not None and base_dir and not os.path.isabs(value):
            value = os.path.join(base_dir, value)
        return value

    password = sec.str("service_password", None)
    password_file = file_key("service_password_file")
    if password_file is not None:
        if password is not None:
            raise sec.error("service_password_file", password_file,
                            "give service_password or service_password_file, not both")
        try:
            with open(password_file, encoding="utf-8") as f:
                password = f.read().rstrip("\r\n")
        except OSError as e:
            raise sec.error("service_password_file", password_file, f"cannot read ({e.strerror})") from None
    kwargs = dict(
        uri=sec.str("uri"),
        starttls=sec.bool("starttls", False),
        ca_file=file_key("ca_file"),
        tls_hostname=sec.str("tls_hostname", None),
        bind_dn_template=sec.str("bind_dn_template", None),
        search_base=sec.str("search_base", None),
        search_filter=sec.str("search_filter", None),
        service_dn=sec.str("service_dn", None),
        service_password=password,
        timeout=sec.number("timeout", 5.0, minimum=0.1),
        allow_plaintext=sec.bool("allow_plaintext", False),
    )
    sec.reject_unknown()
    return LDAPConnector(path=sec.path, key=sec.prefix, reactor=reactor, **kwargs)


def log_problems(connectors, log=None) -> defer.Deferred:
    """Run ``check()`` of each distinct connector and log what it finds.

    For start-up: a backend that is unreachable when the server starts is
    reported (one error line per problem, naming the config key) without
    stopping the server -- logins through it fail closed until it answers.
    ``connectors`` is an iterable of connectors (duplicates are checked once).
    Fires with the list of problem lines.
    """
    from twisted.logger import Logger

    from xmppd.logfilter import log_observer

    log = log if log is not None else Logger(namespace="xmppd.auth", observer=log_observer)
    seen, ds = set(), []
    for c in connectors:
        if id(c) in seen:
            continue
        seen.add(id(c))
        d = c.check()

        def report(problems, name=c.name):
            for p in problems:
                log.error("auth ({name}): {problem}", name=name, problem=p)
            return problems

        def crashed(failure, name=c.name):
            log.failure("auth ({name}): check failed", failure, name=name)
            return [f"auth ({name}): check failed: {failure.value}"]

        ds.append(d.addCallbacks(report, crashed))
    d = defer.gatherResults(ds, consumeErrors=True)
    return d.addCallback(lambda lists: [p for ps in lists for p in ps])

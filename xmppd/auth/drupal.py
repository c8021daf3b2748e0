"""The ``drupal`` connector: log in with the account of a Drupal site.

Read-only: it reads the site's user table and verifies the password hash
the way Drupal does (see :mod:`xmppd.auth.passwords` for the formats:
``$S$``, ``$P$``/``$H$``, ``U$``-upgraded Drupal 6 hashes, and the
bcrypt/argon2 hashes of Drupal 10.1+).  Accounts are created, blocked and
given new passwords on the site; ``add_user``/``remove_user``/
``set_password`` raise ``NotSupported``.

Tables: Drupal 7 keeps accounts in ``users``; Drupal 8 and later in
``users_field_data`` (one row per translation; the row with
``default_langcode = 1`` is the account).  uid 0 is the anonymous user and
is never matched.  An optional ``table_prefix`` covers sites installed with
Drupal's table prefix.

Name mapping (JID localpart <-> Drupal ``name``): the JID's localpart is the
RFC 7622 (PRECIS UsernameCaseMapped) preparation of the Drupal user name.
Drupal compares names case-insensitively, and so does XMPP, so "Jane.Doe"
on the site logs in as ``jane.doe@<vhost>``.  Consequences:

* a Drupal name that is not a valid localpart (one with a space, ``@``,
  ``:``, ``/``, quotes, ``&``, ``<`` or ``>``) cannot log in over XMPP;
* if two Drupal names prepare to the same localpart, the login is refused
  for both and an error is logged, rather than picking one;
* blocked accounts (``status = 0``) are refused, and do not "exist" for
  routing.

Every vhost served by this connector shares the same site's accounts.
"""
from __future__ import annotations

import functools
import re

from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from xmppd import jid as jidlib
from xmppd.auth import passwords
from xmppd.auth.base import IAuthConnector, NotSupported
from xmppd.auth.db import Database
from xmppd.logfilter import log_observer

log = Logger(namespace="xmppd.auth.drupal", observer=log_observer)



@functools.lru_cache(maxsize=1)
def _dummy_hash() -> str:
    """A stand-in hash checked for unknown accounts (same cost as a real one)."""
    return passwords.drupal_hash("xmppd-no-such-account", 15, salt="xmppdxmp")


def user_table(version: int, prefix: str = "") -> str:
    if not re.fullmatch(r"[A-Za-z0-9_]*", prefix):
        raise ValueError("table prefix may contain letters, digits and _ only")
    return prefix + ("users" if version == 7 else "users_field_data")


def site_queries(version: int, prefix: str = "") -> dict[str, str]:
    """The read queries for a Drupal site (named placeholders)."""
    table = user_table(version, prefix)
    only_account = "" if version == 7 else " AND default_langcode = 1"
    return {
        # The candidates are narrowed in SQL (case-insensitively, as Drupal
        # does); the exact PRECIS comparison happens in Python.
        "login": f"SELECT name, pass, status FROM {table} "
                 f"WHERE uid > 0{only_account} AND LOWER(name) = LOWER(:name)",
        "count": f"SELECT COUNT(*) FROM {table} WHERE uid > 0{only_account} AND status = 1",
    }


def _check(password: str, stored: str | None) -> bool:
    return passwords.drupal_check_password(password, stored if stored is not None else _dummy_hash())


def _prepared(name: str) -> str | None:
    try:
        return jidlib.prep_localpart(name)
    except jidlib.InvalidJID:
        return None


@implementer(IAuthConnector)
class DrupalConnector:
    """Read-only accounts of a Drupal 7 or 8+ site."""

    name = "drupal"

    def __init__(self, db: Database, version: int, table_prefix: str = "", reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.db = db
        self.reactor = reactor
        self.version = version
        self.sql = site_queries(version, table_prefix)
        self._login = db.compile(self.sql["login"])
        self._count = db.compile(self.sql["count"])

    def _account(self, username: str):
        """Deferred[(pass, status) | None] of the one Drupal account for ``username``."""
        q = self._login

        def work(cursor):
            q.execute(cursor, {"name": username})
            return cursor.fetchmany(50)

        def pick(rows):
            matches = [r for r in rows if r[0] is not None and _prepared(str(r[0])) == username]
            if not matches:
                return None
            if len(matches) > 1:
                log.error(
                    "drupal: {count} site accounts map to the localpart {user!r} "
                    "({names}); login refused until the names are made unique",
                    count=len(matches), user=username, names=", ".join(str(r[0]) for r in matches),
                )
                return None
            _, stored, status = matches[0]
            if isinstance(stored, (bytes, bytearray, memoryview)):
                stored = bytes(stored).decode("utf-8", "replace")
            return (stored or "", int(status or 0))

        return self.db.run(work).addCallback(pick)

    def mechanisms(self) -> frozenset:
        return frozenset({"PLAIN"})

    def check_password(self, username: str, domain: str, password: str):
        if not password:
            return defer.succeed(False)

        def verify(account):
            if account is None or account[1] != 1 or not account[0]:
                stored, result = None, False  # unknown, blocked, or no password set
            else:
                stored, result = account[0], None
            return threads.deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), _check, password, stored,
            ).addCallback(lambda ok: ok if result is None else False)

        def unusable(failure):
            failure.trap(passwords.BadStoredPassword)
            log.error("drupal: the password hash of {user!r} is not in a known format: {reason}",
                      user=username, reason=str(failure.value))
            return False

        return self._account(username).addCallback(verify).addErrback(unusable)

    def get_scram_credentials(self, username: str, domain: str, mechanism: str):
        return defer.succeed(None)  # the site stores one-way hashes only

    def user_exists(self, username: str, domain: str):
        return self._account(username).addCallback(lambda a: a is not None and a[1] == 1)

    def add_user(self, username: str, domain: str, password: str):
        return defer.fail(NotSupported("Drupal accounts are created on the site"))

    def remove_user(self, username: str, domain: str):
        return defer.fail(NotSupported("Drupal accounts are removed or blocked on the site"))

    def set_password(self, username: str, domain: str, password: str):
        return defer.fail(NotSupported("Drupal passwords are changed on the site"))

    def count_users(self, domain: str):
        q = self._count

        def work(cursor):
            q.execute(cursor, {})
            row = cursor.fetchone()
            return int(row[0]) if row and row[0] is not None else 0

        return self.db.run(work)

    def check(self):
        return self.db.check({
            f"{self.db.key}.version": (self._login, {"name": "xmppd-check"}),
        })

    def close(self) -> None:
        self.db.close()

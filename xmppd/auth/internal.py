"""The default connector: accounts in the embedded store, SCRAM only.

Passwords are never stored: an account is the SCRAM-SHA-1 and SCRAM-SHA-256
credentials (salt, iteration count, StoredKey, ServerKey) of RFC 5802/7677.
PLAIN logins are verified by deriving the same keys from the offered password.
"""
from __future__ import annotations

import os

from twisted.internet.defer import fail, succeed
from zope.interface import implementer

from xmppd.auth.base import (
    IAuthConnector,
    NoSuchUser,
    ScramCredentials,
    UserExists,
)
from xmppd.auth.passwords import SCRAM_MECHANISMS, derive_scram, make_scram, scram_matches
from xmppd.storage import IKeyValueStore, StoreError
from xmppd.storefail import report

STORE = "accounts"


@implementer(IAuthConnector)
class InternalConnector:
    """Accounts as ``accounts/<bare JID>/scram`` in the key-value store."""

    name = "internal"

    def __init__(self, store: IKeyValueStore, iterations: int = 4096) -> None:
        self.store = store
        self.iterations = iterations

    def mechanisms(self) -> frozenset:
        return frozenset({"PLAIN", *SCRAM_MECHANISMS})

    def _creds(self, username: str, domain: str) -> dict | None:
        return self.store.get(STORE, f"{username}@{domain}", "scram")

    def check_password(self, username: str, domain: str, password: str):
        """Check against the strongest credentials stored.

        An account imported with credentials for one mechanism only (Prosody
        and ejabberd keep SCRAM-SHA-1 alone; docs/migration.rst) gets the
        missing ones here, at its first PLAIN login: the only moment the
        password is known.
        """
        creds = self._creds(username, domain)
        if creds is None:
            return succeed(False)
        mech = next((m for m in reversed(SCRAM_MECHANISMS) if m in creds), None)
        if mech is None:
            return succeed(False)
        if not scram_matches(ScramCredentials.from_json(creds[mech]), mech, password):
            return succeed(False)
        missing = [m for m in SCRAM_MECHANISMS if m not in creds]
        if missing:
            self._complete(username, domain, creds, missing, password)
        return succeed(True)

    def _complete(self, username: str, domain: str, creds: dict, missing: list,
                  password: str) -> None:
        full = dict(creds)
        for mech in missing:
            full[mech] = derive_scram(password, mech, os.urandom(16), self.iterations).to_json()
        try:
            self.store.put(STORE, f"{username}@{domain}", "scram", full)
        except StoreError as e:
            report(e)  # the login stands; the credentials are completed at a later one

    def get_scram_credentials(self, username: str, domain: str, mechanism: str):
        creds = self._creds(username, domain)
        if creds is None or mechanism not in creds:
            return succeed(None)
        return succeed(ScramCredentials.from_json(creds[mechanism]))

    def user_exists(self, username: str, domain: str):
        return succeed(self._creds(username, domain) is not None)

    def add_user(self, username: str, domain: str, password: str):
        if self._creds(username, domain) is not None:
            return fail(UserExists(f"{username}@{domain}"))
        self._write(username, domain, password)
        return succeed(None)

    def add_users(self, accounts: list[tuple[str, str, str]]) -> None:
        """Bulk provisioning (benchmarks, imports); one transaction per account."""
        for username, domain, password in accounts:
            self._write(username, domain, password)

    def set_password(self, username: str, domain: str, password: str):
        if self._creds(username, domain) is None:
            return fail(NoSuchUser(f"{username}@{domain}"))
        self._write(username, domain, password)
        return succeed(None)

    def remove_user(self, username: str, domain: str):
        bare = f"{username}@{domain}"
        if self._creds(username, domain) is None:
            return fail(NoSuchUser(bare))
        # Every store keyed by this bare JID goes with the account.
        self.store.delete_user(None, bare)
        return succeed(None)

    def count_users(self, domain: str):
        suffix = "@" + domain
        return succeed(sum(1 for u in self.store.users(STORE) if u.endswith(suffix)))

    def list_users(self, domain: str):
        """Deferred[list[str]]: the bare JIDs of ``domain``, sorted (``xmppctl users``)."""
        suffix = "@" + domain
        return succeed([u for u in self.store.users(STORE) if u.endswith(suffix)])

    def check(self):
        return succeed([])

    def _write(self, username: str, domain: str, password: str) -> None:
        self.store.put(
            STORE, f"{username}@{domain}", "scram",
            make_scram(password, self.iterations),
        )

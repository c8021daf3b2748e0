"""The default connector: accounts in the embedded store, SCRAM only.

Passwords are never stored: an account is the SCRAM-SHA-1 and SCRAM-SHA-256
credentials (salt, iteration count, StoredKey, ServerKey) of RFC 5802/7677.
PLAIN logins are verified by deriving the same keys from the offered password.
"""
from __future__ import annotations

import os

from twisted.internet.defer import gatherResults, inlineCallbacks, succeed
from zope.interface import implementer

from xmppd.auth.base import (
    IAuthConnector,
    NoSuchUser,
    ScramCredentials,
    UserExists,
)
from xmppd.auth.passwords import SCRAM_MECHANISMS, derive_scram, make_scram, scram_matches
from xmppd.storage import IAsyncKeyValueStore, IKeyValueStore, StoreError, as_async
from xmppd.storefail import report

STORE = "accounts"


@implementer(IAuthConnector)
class InternalConnector:
    """Accounts as ``accounts/<bare JID>/scram`` in the key-value store."""

    name = "internal"

    def __init__(self, store: IKeyValueStore | IAsyncKeyValueStore, iterations: int = 4096) -> None:
        self.store = as_async(store)
        self.iterations = iterations

    def mechanisms(self) -> frozenset:
        return frozenset({"PLAIN", *SCRAM_MECHANISMS})

    def _creds(self, username: str, domain: str):
        """Deferred[dict | None]."""
        return self.store.get(STORE, f"{username}@{domain}", "scram")

    @inlineCallbacks
    def check_password(self, username: str, domain: str, password: str):
        """Check against the strongest credentials stored.

        An account imported with credentials for one mechanism only (Prosody
        and ejabberd keep SCRAM-SHA-1 alone; docs/migration.rst) gets the
        missing ones here, at its first PLAIN login: the only moment the
        password is known.
        """
        creds = yield self._creds(username, domain)
        if creds is None:
            return False
        mech = next((m for m in reversed(SCRAM_MECHANISMS) if m in creds), None)
        if mech is None:
            return False
        if not scram_matches(ScramCredentials.from_json(creds[mech]), mech, password):
            return False
        missing = [m for m in SCRAM_MECHANISMS if m not in creds]
        if missing:
            self._complete(username, domain, creds, missing, password)
        return True

    def _complete(self, username: str, domain: str, creds: dict, missing: list,
                  password: str) -> None:
        full = dict(creds)
        for mech in missing:
            full[mech] = derive_scram(password, mech, os.urandom(16), self.iterations).to_json()
        # The login stands; on failure the credentials are completed at a later one.
        self.store.put(STORE, f"{username}@{domain}", "scram", full).addErrback(
            lambda f: report(f.trap(StoreError) and f.value))

    def get_scram_credentials(self, username: str, domain: str, mechanism: str):
        def found(creds):
            if creds is None or mechanism not in creds:
                return None
            return ScramCredentials.from_json(creds[mechanism])

        return self._creds(username, domain).addCallback(found)

    def user_exists(self, username: str, domain: str):
        return self._creds(username, domain).addCallback(lambda creds: creds is not None)

    @inlineCallbacks
    def add_user(self, username: str, domain: str, password: str):
        if (yield self._creds(username, domain)) is not None:
            raise UserExists(f"{username}@{domain}")
        yield self._write(username, domain, password)

    def add_users(self, accounts: list[tuple[str, str, str]]):
        """Bulk provisioning (benchmarks, imports); one transaction per account.
        A Deferred that fires when all are stored."""
        return gatherResults([self._write(u, d, p) for u, d, p in accounts], consumeErrors=True)

    @inlineCallbacks
    def set_password(self, username: str, domain: str, password: str):
        if (yield self._creds(username, domain)) is None:
            raise NoSuchUser(f"{username}@{domain}")
        yield self._write(username, domain, password)

    @inlineCallbacks
    def remove_user(self, username: str, domain: str):
        bare = f"{username}@{domain}"
        if (yield self._creds(username, domain)) is None:
            raise NoSuchUser(bare)
        # Every store keyed by this bare JID goes with the account.
        yield self.store.delete_user(None, bare)

    def count_users(self, domain: str):
        suffix = "@" + domain
        return self.store.users(STORE).addCallback(
            lambda users: sum(1 for u in users if u.endswith(suffix)))

    def list_users(self, domain: str):
        """Deferred[list[str]]: the bare JIDs of ``domain``, sorted (``xmppctl users``)."""
        suffix = "@" + domain
        return self.store.users(STORE).addCallback(
            lambda users: [u for u in users if u.endswith(suffix)])

    def check(self):
        return succeed([])

    def _write(self, username: str, domain: str, password: str):
        return self.store.put(
            STORE, f"{username}@{domain}", "scram",
            make_scram(password, self.iterations),
        )

"""The one interface every authentication connector implements.

The SASL layer (``xmppd.sasl``) asks a connector only these questions, so a
connector for a new backend is one class.  Every call returns a Deferred
because real backends (SQL, LDAP) are networked; the internal connector
answers synchronously with ``succeed``.

Failure modes are explicit: a backend that is down or too slow raises
``TemporaryAuthFailure`` (the SASL layer answers ``<temporary-auth-failure/>``,
never ``<not-authorized/>``, and never success).
"""
from __future__ import annotations

from dataclasses import dataclass

from zope.interface import Attribute, Interface

PASSWORD_MECHANISMS = frozenset({"PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-256"})


class TemporaryAuthFailure(Exception):
    """The backend could not answer (down, timeout, misbehaving)."""


class NotSupported(Exception):
    """The connector cannot do this operation (e.g. add a user to LDAP)."""


class UserExists(Exception):
    """``add_user`` for a name that is taken."""


class NoSuchUser(Exception):
    """An operation on an account that does not exist."""


@dataclass(frozen=True)
class ScramCredentials:
    """What RFC 5802 lets a server store instead of the password."""

    salt: bytes
    stored_key: bytes
    server_key: bytes
    iterations: int

    def to_json(self) -> dict:
        return {
            "salt": self.salt.hex(),
            "stored_key": self.stored_key.hex(),
            "server_key": self.server_key.hex(),
            "iterations": self.iterations,
        }

    @classmethod
    def from_json(cls, data: dict) -> "ScramCredentials":
        return cls(
            bytes.fromhex(data["salt"]),
            bytes.fromhex(data["stored_key"]),
            bytes.fromhex(data["server_key"]),
            int(data["iterations"]),
        )


class IAuthConnector(Interface):
    """An account backend.  ``username`` is always the PRECIS-prepared localpart."""

    name = Attribute("Short connector name used in logs and config ('internal', 'sql', ...).")

    def mechanisms() -> frozenset:
        """Password SASL mechanisms this backend can serve (subset of PASSWORD_MECHANISMS)."""

    def check_password(username: str, domain: str, password: str):
        """Deferred[bool]; errback TemporaryAuthFailure when the backend is unavailable."""

    def get_scram_credentials(username: str, domain: str, mechanism: str):
        """Deferred[ScramCredentials | None] for 'SCRAM-SHA-1' / 'SCRAM-SHA-256'."""

    def user_exists(username: str, domain: str):
        """Deferred[bool]."""

    def add_user(username: str, domain: str, password: str):
        """Deferred[None]; UserExists, NotSupported."""

    def remove_user(username: str, domain: str):
        """Deferred[None]; NoSuchUser, NotSupported."""

    def set_password(username: str, domain: str, password: str):
        """Deferred[None]; NoSuchUser, NotSupported."""

    def count_users(domain: str):
        """Deferred[int]."""

    def check():
        """Deferred[list[str]]: configuration/backend problems for ``xmppctl check``."""

"""The login throttle's default modes through the daemon, over STARTTLS.

Clients connect from different loopback addresses (127.0.0.2, 127.0.0.3,
...) so the daemon sees them as different hosts.  Defaults under test: 10
failures per address+account, 20 per address, 100 per account.
"""
from __future__ import annotations

import pytest

from tests.daemon import Daemon
from tests.rawclient import RawClient


@pytest.fixture(scope="module")
def td(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("throttle")).start()
    for user in ("alice", "bob", "carol"):
        d.adduser(f"{user}@localhost", f"{user}-secret")
    yield d
    d.stop()


def attempt(d: Daemon, source: str, user: str, password: str) -> bytes:
    """One PLAIN login over STARTTLS from ``source``; the server's answer."""
    c = RawClient(d.port, source=source)
    try:
        c.open_stream()
        c.starttls()
        c.open_stream()
        return c.auth_plain(user, password)
    finally:
        c.close()


def test_guesses_from_many_addresses_do_not_lock_the_owner_out(td):
    for i in range(2, 12):  # ten addresses, one wrong password each
        assert b"<not-authorized/>" in attempt(td, f"127.0.0.{i}", "alice", "guess")
    assert b"<success" in attempt(td, "127.0.0.1", "alice", "alice-secret")
    assert b"<success" in attempt(td, "127.0.0.2", "alice", "alice-secret")
    assert "login throttle engaged" not in td.logtext()


def test_guesses_from_one_address_lock_that_address_for_that_account(td):
    for _ in range(10):
        assert b"<not-authorized/>" in attempt(td, "127.0.0.12", "bob", "guess")
    # The right password no longer helps from there...
    reply = attempt(td, "127.0.0.12", "bob", "bob-secret")
    assert b"<temporary-auth-failure/>" in reply and b"retry in" in reply
    # ...but the owner elsewhere, and other accounts from there, are not affected.
    assert b"<success" in attempt(td, "127.0.0.1", "bob", "bob-secret")
    assert b"<success" in attempt(td, "127.0.0.12", "carol", "carol-secret")
    assert "login throttle engaged for address+account bob@localhost from 127.0.0.12" in td.logtext()

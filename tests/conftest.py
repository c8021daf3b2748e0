"""Shared fixtures: a running daemon per test module, accounts on demand."""
from __future__ import annotations

import pytest

from tests.daemon import Daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("xmppd")).start()
    d.adduser("alice@localhost", "alice-secret")
    d.adduser("bob@localhost", "bob-secret")
    yield d
    d.stop()

"""Shared fixtures: a running daemon per test module, accounts on demand."""
from __future__ import annotations

import pytest

from tests.daemon import Daemon

# slixmpp-omemo's dependencies (oldmemo, twomemo) build XML schemas with
# xmlschema when imported; xmlschema cannot build one any more once
# zope.interface.common.mapping has declared its interfaces on the ABCs
# (AttributeError: __provides__), and wokkel.data_form imports that module
# (in-process tests of the PEP and MAM plugins do).  Importing them first
# keeps tests/test_omemo.py independent of the order tests run in.
try:
    import oldmemo.etree  # noqa: F401
    import twomemo.etree  # noqa: F401
except ImportError:  # not installed: test_omemo.py says so itself
    pass


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("xmppd")).start()
    d.adduser("alice@localhost", "alice-secret")
    d.adduser("bob@localhost", "bob-secret")
    yield d
    d.stop()

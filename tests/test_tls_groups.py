"""[tls] groups: the key-exchange groups the daemon accepts, over real STARTTLS.

Clients are Python's ``ssl`` (the system OpenSSL, not the one pyOpenSSL
bundles for the server), each offering exactly one group through
``set_ecdh_curve``; a handshake succeeds only if the server accepts it.
"""
from __future__ import annotations

import ssl

import pytest

from tests.daemon import Daemon
from tests.rawclient import RawClient, unverified_context
from xmppd import tlsgroups
from xmppd.certs import TLSPolicy
from xmppd.config import ConfigError, from_dict


def handshake_with(port: int, curve: str, tls13: bool = True) -> bool:
    """Does a STARTTLS handshake offering only ``curve`` (OpenSSL short name) succeed?"""
    ctx = unverified_context()
    ctx.set_ecdh_curve(curve)
    if not tls13:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    c = RawClient(port)
    try:
        c.open_stream()
        try:
            c.starttls(context=ctx)
        except (ssl.SSLError, ConnectionError):
            return False
        return b"<mechanisms" in c.open_stream()
    finally:
        c.close()


@pytest.fixture(scope="module")
def default_daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("groups-default")).start()
    yield d
    d.stop()


@pytest.mark.parametrize("curve,accepted", [
    ("X25519", True), ("prime256v1", True), ("secp384r1", True),
    ("X448", False), ("secp521r1", False),
])
def test_default_groups_are_mozilla_intermediate(default_daemon, curve, accepted):
    assert handshake_with(default_daemon.port, curve) is accepted


def test_tls12_is_restricted_too(default_daemon):
    assert handshake_with(default_daemon.port, "prime256v1", tls13=False)
    assert not handshake_with(default_daemon.port, "secp521r1", tls13=False)


def test_configured_groups_serve_only_those(tmp_path):
    d = Daemon(tmp_path, extra='[tls]\ngroups = ["P-256"]\n').start()
    try:
        assert handshake_with(d.port, "prime256v1")
        for curve in ("X25519", "secp384r1", "X448"):
            assert not handshake_with(d.port, curve), curve
    finally:
        d.stop()


@pytest.mark.parametrize("groups,bad", [
    (["X25519", "X999"], "'X999'"),
    (["P-256:X25519"], "'P-256:X25519'"),
    ([], "at least one"),
])
def test_unknown_or_empty_groups_are_config_errors_naming_the_key(groups, bad):
    with pytest.raises(ConfigError) as e:
        from_dict({"tls": {"groups": groups}}, "x.toml")
    assert str(e.value).startswith("x.toml: tls.groups = ") and bad in str(e.value)
    with pytest.raises(ValueError, match=r"\[tls\] groups"):
        TLSPolicy(groups=tuple(groups))


def test_defaults_and_aliases():
    assert from_dict({}).tls.groups == ("X25519", "P-256", "P-384")
    assert TLSPolicy().groups == tlsgroups.DEFAULT_GROUPS
    assert tlsgroups.validate(["prime256v1", "secp384r1"]) == ("prime256v1", "secp384r1")

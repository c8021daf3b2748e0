"""SCRAM-*-PLUS with every channel-binding type, against independent clients."""
from __future__ import annotations

import re
import ssl

import pytest
from OpenSSL import SSL

from tests.tlsclient import TLSClient
from tests.xmpp import Client, run


def _connect(daemon, version):
    c = TLSClient(daemon.port, tls_version=version)
    c.open_stream()
    c.starttls()
    return c


def test_features_advertise_plus_and_binding_types(daemon):
    c = _connect(daemon, SSL.TLS1_3_VERSION)
    features = c.open_stream()
    assert "<mechanism>SCRAM-SHA-256-PLUS</mechanism>" in features
    assert "<sasl-channel-binding xmlns='urn:xmpp:sasl-cb:0'>" in features
    assert "type='tls-exporter'" in features and "type='tls-server-end-point'" in features
    assert "type='tls-unique'" not in features
    c.close()
    c = _connect(daemon, SSL.TLS1_2_VERSION)
    features = c.open_stream()
    assert "type='tls-unique'" in features and "type='tls-exporter'" not in features
    c.close()


@pytest.mark.parametrize("mech", ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS"])
@pytest.mark.parametrize("version,cb", [
    (SSL.TLS1_3_VERSION, "tls-exporter"),
    (SSL.TLS1_3_VERSION, "tls-server-end-point"),
    (SSL.TLS1_2_VERSION, "tls-unique"),
    (SSL.TLS1_2_VERSION, "tls-server-end-point"),
])
def test_plus_succeeds_with_each_binding(daemon, mech, version, cb):
    c = _connect(daemon, version)
    c.open_stream()
    result = c.scram("alice", "alice-secret", mech, cb_name=cb)
    assert "<success" in result, result
    c.close()


@pytest.mark.parametrize("version,cb", [
    (SSL.TLS1_3_VERSION, "tls-exporter"),
    (SSL.TLS1_3_VERSION, "tls-server-end-point"),
    (SSL.TLS1_2_VERSION, "tls-unique"),
])
def test_plus_fails_with_wrong_binding_data(daemon, cb, version):
    c = _connect(daemon, version)
    c.open_stream()
    result = c.scram("alice", "alice-secret", "SCRAM-SHA-256-PLUS", cb_name=cb, cb_data=b"\x00" * 32)
    assert "<not-authorized/>" in result, result
    c.close()


def test_unavailable_binding_type_is_refused(daemon):
    c = _connect(daemon, SSL.TLS1_3_VERSION)
    c.open_stream()
    result = c.scram("alice", "alice-secret", "SCRAM-SHA-256-PLUS", cb_name="tls-unique", cb_data=b"x" * 12)
    assert "<failure" in result and "<success" not in result
    c.close()


def test_downgrade_is_detected(daemon):
    """A client saying 'y' (it supports binding, thinks we do not) while we offered -PLUS."""
    c = _connect(daemon, SSL.TLS1_3_VERSION)
    c.open_stream()
    result = c.scram("alice", "alice-secret", "SCRAM-SHA-256", gs2_flag="y")
    assert "<not-authorized/>" in result and "downgrade" in result
    c.close()


def test_plain_scram_with_n_flag_still_works(daemon):
    c = _connect(daemon, SSL.TLS1_3_VERSION)
    c.open_stream()
    assert "<success" in c.scram("alice", "alice-secret", "SCRAM-SHA-1")
    c.close()


def test_slixmpp_scram_plus_tls_unique(daemon):
    """slixmpp's own SCRAM implementation, -PLUS with tls-unique over TLS 1.2."""

    async def go():
        c = Client("alice@localhost/plus", "alice-secret", mech="SCRAM-SHA-256-PLUS")
        c.ssl_context.maximum_version = ssl.TLSVersion.TLSv1_2
        c.connect("127.0.0.1", daemon.port)
        import asyncio

        done, _ = await asyncio.wait([c.session, c.failed_auth], timeout=10,
                                     return_when=asyncio.FIRST_COMPLETED)
        assert c.session in done
        c.disconnect()

    run(go())
    assert re.search(r"c2s alice@localhost/\S+ from 127\.0\.0\.1: session bound, authenticated with SCRAM-SHA-256-PLUS\n",
                     daemon.logtext())

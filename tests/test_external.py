"""SASL EXTERNAL with TLS client certificates (XEP-0178), end to end.

One daemon serves two vhosts:

* ``localhost`` -- client certificates optional (CA file + CRL), passwords
  allowed, identities from id-on-xmppAddr only, no auto-provisioning;
* ``cert.test`` -- client certificates required (CA directory), certificate
  only (``password_mechanisms = false``), identities from xmppAddr, e-mail
  and CN, accounts auto-provisioned.

Clients are tests/tlsclient.py (raw pyOpenSSL, STARTTLS; direct TLS with SNI
below) and slixmpp (its own EXTERNAL and ssl stack).  The PKI is generated
here with ``cryptography``.
"""
from __future__ import annotations

import asyncio
import base64
import re
import socket
import struct
import time

import pytest
from OpenSSL import SSL

from tests.daemon import Daemon
from tests.pki import CA, _write_pair
from tests.tlsclient import TLSClient
from tests.xmpp import Client, run
from twisted.internet import defer

from xmppd import config as configlib
from xmppd import sasl
from xmppd.auth.base import NotSupported, TemporaryAuthFailure, UserExists
from xmppd.certs import (
    CertificateError,
    CertificateStore,
    ClientCertificate,
    ClientCertPolicy,
    check_certificates,
    client_certificate,
)

REVOKED_SERIAL = 0x5E7
SERIALS = {"alice-two-domains": 0xA2D, "alice": 0xA11CE, "bob-other-domain": 0xB0B, "both": 0xB07, "nobody": 0x404,
           "dave-email": 0xDA7E, "frank": 0xF4A, "grace-email": 0x64AC, "heidi-cn": 0x4E1D,
           "alice-expired": 0xE4B, "alice-revoked": REVOKED_SERIAL, "alice-untrusted": 0xBAD}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, rogue = CA("xmppd Test CA"), CA("Untrusted CA")
    (d / "ca.pem").write_bytes(ca.pem())
    (d / "cadir").mkdir()
    (d / "cadir" / "test-ca.crt").write_bytes(ca.pem())
    (d / "ca.crl").write_bytes(ca.crl((REVOKED_SERIAL,)))
    specs = {
        "alice": (ca, dict(cn="Alice", xmpp=("alice@localhost",))),
        "bob-other-domain": (ca, dict(cn="Bob", xmpp=("bob@cert.test",))),
        "both": (ca, dict(cn="Alice and Bob", xmpp=("alice@localhost", "bob@localhost"))),
        "alice-two-domains": (ca, dict(cn="Alice", xmpp=("alice@cert.test", "alice@localhost"))),
        "nobody": (ca, dict(cn="Nobody", xmpp=("nobody@localhost",))),
        "dave-email": (ca, dict(cn="Dave", emails=("dave@localhost",))),
        "frank": (ca, dict(cn="Frank", xmpp=("frank@cert.test",))),
        "grace-email": (ca, dict(cn="Grace", emails=("grace@cert.test",))),
        "heidi-cn": (ca, dict(cn="heidi@cert.test")),
        "alice-expired": (ca, dict(cn="Alice", xmpp=("alice@localhost",), expired=True)),
        "alice-revoked": (ca, dict(cn="Alice", xmpp=("alice@localhost",))),
        "alice-untrusted": (rogue, dict(cn="Alice", xmpp=("alice@localhost",))),
    }
    paths = {"dir": d, "ca": ca}
    for name, (issuer, kw) in specs.items():
        cert, key = issuer.issue(serial=SERIALS[name], **kw)
        paths[name] = _write_pair(d, name, cert, key)
    return paths


@pytest.fixture(scope="module")
def xd(tmp_path_factory, pki):
    d = pki["dir"]
    extra = f"""
        [tls]
        client_ca = ["{d}/ca.pem"]
        client_crl = ["{d}/ca.crl"]

        [hosts."cert.test".tls]
        client_cert = "required"
        client_ca = ["{d}/cadir"]
        client_cert_identity = ["xmppaddr", "email", "cn"]

        [hosts."cert.test".sasl]
        password_mechanisms = false
        external_auto_provision = true

        [limits]
        auth_failures_per_ip = 0    # this module fails on purpose, all from 127.0.0.1
        """
    daemon = Daemon(tmp_path_factory.mktemp("xmppd-external"), hosts=("localhost", "cert.test"),
                    extra=extra, tls="optional", direct_tls=True).start()
    daemon.adduser("alice@localhost", "alice-secret")
    daemon.adduser("bob@localhost", "bob-secret")
    daemon.adduser("dave@localhost", "dave-secret")
    daemon.adduser("bob@cert.test", "bob-secret")
    yield daemon
    daemon.stop()


# --------------------------------------------------------------------------
# helpers


class DirectTLSClient(TLSClient):
    """tests/tlsclient.py over direct TLS (XEP-0368), with SNI."""

    def __init__(self, port: int, host: str, sni: str | None, cert: str | None = None,
                 version: int | None = None) -> None:
        super().__init__(port, host=host, cert=cert, key=cert)
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        if version is not None:
            ctx.set_min_proto_version(version)
            ctx.set_max_proto_version(version)
        if cert:
            ctx.use_certificate_chain_file(cert)
            ctx.use_privatekey_file(cert)
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 10, 0))
        conn = SSL.Connection(ctx, self.sock)
        if sni:
            conn.set_tlsext_host_name(sni.encode())
        conn.set_connect_state()
        conn.do_handshake()
        self.conn = conn


def starttls(xd, cert: str | None = None, host: str = "localhost",
             version: int | None = None) -> tuple[TLSClient, str]:
    """A STARTTLS stream to ``host``; returns the client and the features after TLS."""
    c = TLSClient(xd.port, host=host, cert=cert, key=cert, tls_version=version)
    c.open_stream()
    c.starttls()
    return c, c.open_stream()


def mechanisms(features: str) -> list[str]:
    return re.findall(r"<mechanism>([^<]+)</mechanism>", features)


def external(c: TLSClient, authzid: str = "") -> str:
    return c.sasl("EXTERNAL", authzid.encode())


def wait_log(xd, pattern: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = xd.logtext()
        m = re.search(pattern, text)
        if m:
            return m.group(0)
        if time.monotonic() > deadline:
            raise AssertionError(f"{pattern!r} not in the log:\n{text[-3000:]}")
        time.sleep(0.05)


def bind(c: TLSClient) -> str:
    c.open_stream()
    c.send("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
    return re.search(r"<jid>([^<]+)</jid>", c.read_until("</iq>")).group(1)


# --------------------------------------------------------------------------
# EXTERNAL succeeds


def test_external_success_and_log_line(xd, pki):
    c, features = starttls(xd, pki["alice"])
    assert mechanisms(features)[0] == "EXTERNAL"
    assert "SCRAM-SHA-256" in mechanisms(features)  # passwords stay allowed on localhost
    assert "<success" in external(c)
    assert bind(c).startswith("alice@localhost/")
    c.close()
    line = wait_log(xd, r"certificate subject '[^']*CN=Alice[^']*', serial 0xa11ce, issuer "
                        r"'[^']*CN=xmppd Test CA[^']*' authenticated alice@localhost \(EXTERNAL\)")
    assert "O=xmppd tests" in line


def test_external_with_challenge_and_explicit_authzid(xd, pki):
    """No initial response: empty challenge, then the authzid in <response/>."""
    c, _ = starttls(xd, pki["alice"], version=SSL.TLS1_2_VERSION)
    c.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'/>")
    assert re.search(r"<challenge[^>]*(/>|></challenge>)", c.read_until("</challenge>|<challenge[^>]*/>"))
    c.send("<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
           f"{base64.b64encode(b'alice@localhost').decode()}</response>")
    assert "<success" in c.read_until("</success>|<success[^>]*/>|</failure>")
    c.close()


def test_slixmpp_external(xd, pki):
    """slixmpp with certfile/keyfile and its own EXTERNAL."""

    async def go():
        client = Client("alice@localhost/slix", "", mech="EXTERNAL")
        client.certfile = client.keyfile = pki["alice"]
        client.connect("127.0.0.1", xd.port)
        done, _ = await asyncio.wait([client.session, client.failed_auth], timeout=10,
                                     return_when=asyncio.FIRST_COMPLETED)
        assert client.session in done, "slixmpp EXTERNAL login failed"
        assert str(client.boundjid.bare) == "alice@localhost"
        client.disconnect()

    run(go())


def test_slixmpp_direct_tls_sni_and_auto_provision(xd, pki):
    """Direct TLS: SNI picks cert.test (required, certificate-only); frank is created."""

    async def go():
        client = Client("frank@cert.test/slix", "", mech="EXTERNAL")
        client.certfile = client.keyfile = pki["frank"]
        client.enable_direct_tls, client.enable_starttls, client.enable_plaintext = True, False, False
        client.connect("127.0.0.1", xd.tls_port)
        done, _ = await asyncio.wait([client.session, client.failed_auth], timeout=10,
                                     return_when=asyncio.FIRST_COMPLETED)
        assert client.session in done, "slixmpp direct-TLS EXTERNAL login failed"
        client.disconnect()

    run(go())
    wait_log(xd, r"created account frank@cert.test for certificate subject '[^']*CN=Frank")
    wait_log(xd, r"serial 0xf4a, issuer '[^']*' authenticated frank@cert.test "
                 r"\(EXTERNAL, account created\)")
    # The account now exists in the store (passwd refuses unknown accounts).
    xd.ctl("passwd", "frank@cert.test", "unused-password")


def test_direct_tls_external_on_default_host(xd, pki):
    c = DirectTLSClient(xd.tls_port, "localhost", "localhost", cert=pki["alice"])
    assert "EXTERNAL" in mechanisms(c.open_stream())
    assert "<success" in external(c, "alice@localhost")
    c.close()


def test_several_identities_need_an_authzid(xd, pki):
    c, _ = starttls(xd, pki["both"])
    result = external(c)
    assert "<invalid-authzid/>" in result and "several" in result
    assert "<success" in external(c, "bob@localhost")
    assert bind(c).startswith("bob@localhost/")
    c.close()


def test_addresses_of_other_domains_do_not_make_it_ambiguous(xd, pki):
    """Only localhost addresses can be used on a stream to localhost."""
    c, _ = starttls(xd, pki["alice-two-domains"])
    assert "<success" in external(c)
    assert bind(c).startswith("alice@localhost/")
    c.close()


@pytest.mark.parametrize("cert,expected", [("grace-email", "grace@cert.test"),
                                           ("heidi-cn", "heidi@cert.test")])
def test_email_and_cn_fallback_where_configured(xd, pki, cert, expected):
    c, features = starttls(xd, pki[cert], host="cert.test")
    assert mechanisms(features) == ["EXTERNAL"]
    assert "<success" in external(c)
    assert bind(c).startswith(expected + "/")
    c.close()


# --------------------------------------------------------------------------
# refusals


def test_no_certificate_no_external(xd):
    c, features = starttls(xd)
    assert "EXTERNAL" not in mechanisms(features)
    assert "<invalid-mechanism/>" in external(c)
    assert "<success" in c.scram("alice", "alice-secret", "SCRAM-SHA-256")
    c.close()


@pytest.mark.parametrize("cert,reason", [
    ("alice-untrusted", "issuer is not a trusted client CA"),
    ("alice-expired", "certificate has expired"),
    ("alice-revoked", "certificate is revoked"),
])
def test_unverified_certificate_not_offered(xd, pki, cert, reason):
    """The handshake succeeds (optional mode); EXTERNAL is not offered, and refused if tried."""
    c, features = starttls(xd, pki[cert])
    assert "EXTERNAL" not in mechanisms(features)
    assert "<invalid-mechanism/>" in external(c)
    assert "<success" in c.scram("alice", "alice-secret", "SCRAM-SHA-1")  # passwords still work
    c.close()
    wait_log(xd, rf"client certificate subject [^\n]*serial {SERIALS[cert]:#x}[^\n]* not accepted "
                 rf"for localhost: {re.escape(reason)}")


def test_certificate_for_another_domain(xd, pki):
    c, features = starttls(xd, pki["bob-other-domain"])
    assert "EXTERNAL" in mechanisms(features)  # the chain is fine ...
    result = external(c)
    assert "<not-authorized/>" in result and "not for localhost" in result  # ... the name is not
    result = external(c, "bob@cert.test")
    assert "<invalid-authzid/>" in result
    c.close()
    wait_log(xd, r"EXTERNAL refused for certificate subject '[^']*CN=Bob[^']*', serial 0xb0b")


@pytest.mark.parametrize("authzid", ["bob@localhost", "alice@localhost/res", "not a jid@@",
                                     "localhost"])
def test_wrong_authzid(xd, pki, authzid):
    c, _ = starttls(xd, pki["alice"])
    assert "<invalid-authzid/>" in external(c, authzid)
    c.close()


def test_unknown_account_without_auto_provisioning(xd, pki):
    c, _ = starttls(xd, pki["nobody"])
    result = external(c)
    assert "<not-authorized/>" in result and "no such account" in result
    c.close()


def test_identity_sources_follow_config(xd, pki):
    """localhost uses xmppAddr only: an e-mail-only certificate names no address there."""
    c, features = starttls(xd, pki["dave-email"])
    assert "EXTERNAL" in mechanisms(features)
    result = external(c)
    assert "<not-authorized/>" in result and "names no XMPP address" in result
    c.close()


def test_sni_vhost_must_match_stream_vhost(xd, pki):
    """Verified against cert.test's settings (SNI) does not count for a stream to localhost."""
    c = DirectTLSClient(xd.tls_port, "localhost", "cert.test", cert=pki["alice"])
    assert "EXTERNAL" not in mechanisms(c.open_stream())
    c.close()


# --------------------------------------------------------------------------
# certificate-only and required


@pytest.mark.parametrize("mech", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-1", "SCRAM-SHA-256-PLUS"])
def test_certificate_only_vhost_refuses_passwords(xd, pki, mech):
    c, features = starttls(xd, pki["frank"], host="cert.test")
    assert mechanisms(features) == ["EXTERNAL"]
    if mech == "PLAIN":
        result = c.sasl("PLAIN", b"\x00bob\x00bob-secret")
    else:
        result = c.sasl(mech, b"n,,n=bob,r=abcdefgh")
    assert "<invalid-mechanism/>" in result
    c.close()


def test_slixmpp_password_login_refused_on_certificate_only_vhost(xd, pki):
    async def go():
        client = Client("bob@cert.test/pw", "bob-secret", mech="PLAIN")
        client.certfile = client.keyfile = pki["frank"]  # get through the required handshake
        client.connect("127.0.0.1", xd.port)
        done, _ = await asyncio.wait([client.session, client.failed_auth], timeout=10,
                                     return_when=asyncio.FIRST_COMPLETED)
        client.disconnect()
        assert client.failed_auth in done and client.session not in done

    run(go())


@pytest.mark.parametrize("version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION])
@pytest.mark.parametrize("cert", [None, "alice-untrusted", "alice-expired"])
def test_required_mode_refuses_starttls_without_valid_certificate(xd, pki, version, cert):
    with pytest.raises((SSL.Error, ConnectionError)):
        c, features = starttls(xd, pki[cert] if cert else None, host="cert.test", version=version)
        c.close()


def test_required_mode_is_logged(xd, pki):
    with pytest.raises((SSL.Error, ConnectionError)):
        starttls(xd, None, host="cert.test", version=SSL.TLS1_3_VERSION)
    wait_log(xd, r"TLS failed for cert.test: .*peer did not return a certificate")
    wait_log(xd, r"cert.test: refusing TLS client certificate: certificate has expired")


@pytest.mark.parametrize("cert", [None, "alice-untrusted"])
def test_required_mode_refuses_direct_tls_by_sni(xd, pki, cert):
    with pytest.raises((SSL.Error, ConnectionError)):
        c = DirectTLSClient(xd.tls_port, "cert.test", "cert.test", cert=pki[cert] if cert else None)
        c.open_stream()
    # Without SNI the default host (optional mode) answers, and the handshake works.
    c = DirectTLSClient(xd.tls_port, "localhost", None)
    assert "SCRAM-SHA-256" in mechanisms(c.open_stream())
    c.close()


def test_required_vhost_needs_tls_even_when_tls_is_optional(xd):
    """[c2s] tls = "optional", but a vhost that requires certificates demands STARTTLS."""
    c = TLSClient(xd.port, host="cert.test")
    features = c.open_stream()
    assert "<required/>" in features and "<mechanisms" not in features
    c.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>")
    assert "<policy-violation" in c.read_until("</stream:stream>")
    c.close()
    c = TLSClient(xd.port, host="localhost")
    assert "<required/>" not in c.open_stream()  # the optional host keeps the global setting
    c.close()


# --------------------------------------------------------------------------
# configuration and store (no daemon)


def _cfg(data: dict) -> configlib.Config:
    data = {"server": {"hosts": ["a.test", "b.test"]}, **data}
    return configlib.from_dict(data, "/etc/xmppd.toml")


def test_config_defaults_and_per_host_overrides():
    cfg = _cfg({
        "tls": {"client_ca": ["/ca.pem"], "client_crl": ["/ca.crl"]},
        "sasl": {"external_auto_provision": True},
        "hosts": {"b.test": {"tls": {"client_cert": "required",
                                     "client_cert_identity": ["xmppaddr", "cn"]},
                             "sasl": {"password_mechanisms": False}}},
    })
    a, b = cfg.client_cert("a.test"), cfg.client_cert("b.test")
    assert (a.mode, a.ca, a.crl, a.identity) == ("optional", ("/ca.pem",), ("/ca.crl",), ("xmppaddr",))
    assert (b.mode, b.ca, b.identity) == ("required", ("/ca.pem",), ("xmppaddr", "cn"))
    assert cfg.sasl_for("a.test") == configlib.SASLConfig(True, True)
    assert cfg.sasl_for("b.test") == configlib.SASLConfig(False, True)
    off = _cfg({})
    assert not off.client_cert("a.test").enabled and off.sasl_for("a.test").password_mechanisms
    system = _cfg({"tls": {"client_ca_system": True}})
    assert system.client_cert("a.test").mode == "optional"
    per_host = _cfg({"tls": {"client_cert": "required"},
                     "hosts": {"a.test": {"tls": {"client_ca": ["/a.pem"]}},
                               "b.test": {"tls": {"client_ca": ["/b.pem"]}}}})
    assert per_host.client_cert("b.test").mode == "required"
    switched_off = _cfg({"tls": {"client_ca": ["/ca.pem"]},
                         "hosts": {"b.test": {"tls": {"client_cert": "off"}}}})
    assert not switched_off.client_cert("b.test").enabled


@pytest.mark.parametrize("data,key", [
    ({"tls": {"client_cert": "sometimes"}}, "tls.client_cert"),
    ({"tls": {"client_cert": "required"}}, "tls.client_cert"),
    ({"tls": {"client_ca": "/ca.pem"}}, "tls.client_ca"),
    ({"tls": {"client_ca": [""]}}, "tls.client_ca"),
    ({"tls": {"client_crl": [1]}}, "tls.client_crl"),
    ({"tls": {"client_ca_system": "yes"}}, "tls.client_ca_system"),
    ({"tls": {"client_ca": ["/c"], "client_cert_identity": ["dns"]}}, "tls.client_cert_identity"),
    ({"tls": {"client_ca": ["/c"], "client_cert_identity": []}}, "tls.client_cert_identity"),
    ({"tls": {"client_certs": ["/c"]}}, "tls.client_certs"),
    ({"sasl": {"password_mechanisms": "no"}}, "sasl.password_mechanisms"),
    ({"sasl": {"external_auto_provision": 1}}, "sasl.external_auto_provision"),
    ({"hosts": {"a.test": {"tls": {"client_cert": "optional"}}}}, 'hosts."a.test".tls.client_cert'),
    ({"hosts": {"a.test": {"tls": {"client_cert": "on"}}}}, 'hosts."a.test".tls.client_cert'),
    ({"hosts": {"a.test": {"sasl": {"mechanisms": ["EXTERNAL"]}}}}, 'hosts."a.test".sasl.mechanisms'),
])
def test_config_errors_name_file_and_key(data, key):
    with pytest.raises(configlib.ConfigError) as err:
        _cfg(data)
    assert err.value.path == "/etc/xmppd.toml" and err.value.key == key
    assert str(err.value).startswith(f"/etc/xmppd.toml: {key} = ")


def test_store_refuses_missing_or_empty_client_ca(tmp_path):
    missing = str(tmp_path / "nope.pem")
    store = CertificateStore(["a.test"], str(tmp_path / "var"),
                             client_certs={"a.test": ClientCertPolicy("optional", ca=(missing,))})
    with pytest.raises(CertificateError) as err:
        store.load()
    assert str(err.value).startswith(missing) and "client_ca of host a.test" in str(err.value)
    assert any(p.startswith("error: a.test: " + missing) for p in check_certificates(store))
    (tmp_path / "empty").mkdir()
    store = CertificateStore(["a.test"], str(tmp_path / "var"), client_certs={
        "a.test": ClientCertPolicy("required", ca=(str(tmp_path / "empty"),))})
    with pytest.raises(CertificateError, match="holds no certificate"):
        store.load()
    with pytest.raises(ValueError):
        ClientCertPolicy("required")


def test_identity_sources_and_order(pki):
    ca = CA("Unit CA")
    cert, _ = ca.issue("carol@b.test", 7, xmpp=("carol@a.test",), emails=("carol@c.test",),
                       subject_email="carol@d.test")
    cc = ClientCertificate(cert, "a.test", None)
    assert cc.verified_for("A.TEST.") and not cc.verified_for("b.test")
    assert cc.identities() == ["carol@a.test"]
    assert cc.identities(("cn", "email", "xmppaddr")) == [
        "carol@b.test", "carol@c.test", "carol@d.test", "carol@a.test"]
    assert not ClientCertificate(cert, "a.test", "certificate has expired").verified
    assert "serial 0x7" in cc.describe() and "CN=Unit CA" in cc.describe()


def _memory_handshake(server_ctx: SSL.Context, cert: str | None, sni: str | None = None
                      ) -> SSL.Connection:
    """A full handshake over memory BIOs; returns the server side."""
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if cert:
        ctx.use_certificate_chain_file(cert)
        ctx.use_privatekey_file(cert)
    client = SSL.Connection(ctx, None)
    if sni:
        client.set_tlsext_host_name(sni.encode())
    client.set_connect_state()
    for _ in range(10):
        for a, b in ((client, server), (server, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                b.bio_write(a.bio_read(1 << 16))
            except SSL.WantReadError:
                pass
    return server


def test_crl_reload_revokes_without_restart(tmp_path, pki):
    """A new CRL takes effect on reload (SIGHUP / polling), for new handshakes."""
    crl = tmp_path / "ca.crl"
    crl.write_bytes((pki["dir"] / "ca.crl").read_bytes())
    store = CertificateStore(["a.test", "b.test"], str(tmp_path / "var"), client_certs={
        "a.test": ClientCertPolicy("optional", ca=(str(pki["dir"] / "ca.pem"),),
                                   crl=(str(crl),))})
    store.load()
    assert str(crl) in store._watch_paths()
    # No session resumption where client certificates are asked for: a resumed
    # session would skip verification (and "required").
    assert store.context_for("a.test").get_session_cache_mode() == SSL.SESS_CACHE_OFF
    assert store.context_for("b.test").get_session_cache_mode() != SSL.SESS_CACHE_OFF
    assert not store._current().front_resumes
    server = _memory_handshake(store.context_for("a.test"), pki["alice"])
    assert client_certificate(server).verified_for("a.test")
    # b.test asks for no certificate at all
    assert client_certificate(_memory_handshake(store.context_for("b.test"), pki["alice"])) is None
    crl.write_bytes(pki["ca"].crl((REVOKED_SERIAL, SERIALS["alice"])))
    store.reload()
    cc = client_certificate(_memory_handshake(store.context_for("a.test"), pki["alice"]))
    assert cc is not None and not cc.verified and "certificate is revoked" in cc.problem
    assert "serial 0xa11ce" in cc.describe()


class _Connector:
    """Just what EXTERNAL asks of a connector."""

    def __init__(self, users=(), exists_error=None, add_error=None):
        self.users, self.exists_error, self.add_error = set(users), exists_error, add_error
        self.added = []

    def user_exists(self, username, domain):
        if self.exists_error is not None:
            return defer.fail(self.exists_error)
        return defer.succeed(f"{username}@{domain}" in self.users)

    def add_user(self, username, domain, password):
        if self.add_error is not None:
            return defer.fail(self.add_error)
        self.added.append((f"{username}@{domain}", password))
        self.users.add(f"{username}@{domain}")
        return defer.succeed(None)


def _external(connector, cert, authzid=b"", host="a.test", provision=False, verified_for="a.test"):
    ctx = sasl.SASLContext(host=host, connector=connector, secure=True, peer="test",
                           client_cert=ClientCertificate(cert, verified_for, None),
                           auto_provision=provision)
    out = []
    sasl.create("EXTERNAL", ctx).start(authzid).addBoth(out.append)
    result = out[0]
    if isinstance(result, sasl.Success):
        return result.username
    return result.value.condition


def test_external_mechanism_backend_cases():
    ca = CA("Unit CA")
    cert, _ = ca.issue("Carol", 9, xmpp=("carol@a.test",))
    assert _external(_Connector({"carol@a.test"}), cert) == "carol"
    assert _external(_Connector(), cert) == "not-authorized"
    # a certificate verified under another vhost's settings is refused outright
    assert _external(_Connector({"carol@a.test"}), cert, verified_for="b.test") == "not-authorized"
    # backend down: never 'wrong credentials', never success
    down = _Connector(exists_error=TemporaryAuthFailure("db down"))
    assert _external(down, cert) == "temporary-auth-failure"
    # auto-provisioning: a random password nobody knows
    conn = _Connector()
    assert _external(conn, cert, provision=True) == "carol"
    assert conn.added[0][0] == "carol@a.test" and len(conn.added[0][1]) >= 32
    assert _external(_Connector(add_error=UserExists("x")), cert, provision=True) == "carol"
    assert _external(_Connector(add_error=NotSupported("ldap")), cert,
                     provision=True) == "not-authorized"
    assert _external(_Connector({"carol@a.test"}), cert, authzid=b"\xff") == "malformed-request"
    assert "EXTERNAL" not in sasl.available_mechanisms(_Plain(), True, external=False)
    assert sasl.available_mechanisms(_Plain(), True, external=True)[0] == "EXTERNAL"
    assert sasl.available_mechanisms(_Plain(), False, external=True) == ["SCRAM-SHA-256"]
    assert sasl.available_mechanisms(_Plain(), True, binding=True, external=True,
                                     passwords=False) == ["EXTERNAL"]


class _Plain:
    def mechanisms(self):
        return frozenset({"PLAIN", "SCRAM-SHA-256"})

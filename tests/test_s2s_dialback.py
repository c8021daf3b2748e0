"""Peers whose certificate does not verify: dialback, or refusal, by policy.

``b.test`` presents a certificate from a CA ``a.test`` does not trust (and
``a.test`` one from the CA ``b.test`` trusts), so ``a.test`` cannot
authenticate ``b.test`` by certificate in either direction:

* by default it falls back to dialback (XEP-0220, keys per XEP-0185), both
  ways, and messages flow;
* with ``b.test`` in ``secure_domains`` (or ``require_certificates``) both
  directions are refused and the stanzas bounce;
* with ``dialback = false`` both directions are refused as well.

Plus the XEP-0185 key itself, against its published definition.
"""
from __future__ import annotations

import hashlib
import hmac
import re

from tests.federation import Federation, wait_for_log

from xmppd.s2s.dialback import DialbackKeys, load_secret


def _exchange(fed: Federation) -> tuple[str, str]:
    """alice -> bob and bob -> alice; returns what each side got back."""
    alice = fed.login(fed.a, "alice")
    bob = fed.login(fed.b, "bob")
    try:
        alice.send("<message to='bob@b.test/raw' type='chat' id='ab'><body>to bob</body></message>")
        bob.send("<message to='alice@a.test/raw' type='chat' id='ba'><body>to alice</body></message>")
        at_bob = bob.read_until(r"<message[^>]*id='(ab|ba)'.*?</message>", 15).decode()
        at_alice = alice.read_until(r"<message[^>]*id='(ab|ba)'.*?</message>", 15).decode()
        return at_alice, at_bob
    finally:
        alice.close()
        bob.close()


def test_untrusted_certificate_falls_back_to_dialback(tmp_path):
    fed = Federation(tmp_path, b_trusted=False)
    try:
        at_alice, at_bob = _exchange(fed)
        assert "id='ab'" in at_bob and "to bob" in at_bob and "type='error'" not in at_bob
        assert "id='ba'" in at_alice and "to alice" in at_alice and "type='error'" not in at_alice
        # A dialback-authenticated stream (no restart) has the full stanza size, not the
        # 16 KiB of an unauthenticated one.
        bob = fed.login(fed.b, "bob", "big")
        alice = fed.login(fed.a, "alice", "big")
        try:
            bob.send("<message to='alice@a.test/big' id='big'><body>" + "x" * 40000 + "</body></message>")
            got = alice.read_until(r"<message[^>]*id='big'.*?</message>", 15).decode()
            assert "type='error'" not in got and got.count("x") >= 40000
        finally:
            alice.close()
            bob.close()
        # a.test -> b.test: b.test trusts a.test's certificate (EXTERNAL),
        # but a.test does not trust b.test's: still, a.test only needs b.test
        # to accept it, and b.test -> a.test has to use dialback.
        wait_for_log(fed.a, r"s2s in \S+: b\.test authenticated for a\.test with dialback")
        wait_for_log(fed.b, r"dialback verify for b\.test -> a\.test: valid")
        wait_for_log(fed.a, r"s2s out a\.test -> b\.test: certificate of b\.test not verified")
    finally:
        fed.stop()


def test_untrusted_certificate_refused_for_a_secure_domain(tmp_path):
    fed = Federation(tmp_path, b_trusted=False, a_s2s='secure_domains = ["b.test"]')
    try:
        at_alice, at_bob = _exchange(fed)
        assert "id='ab'" in at_alice and "type='error'" in at_alice
        assert "remote-server-not-found" in at_alice
        assert "id='ba'" in at_bob and "type='error'" in at_bob and "remote-server-not-found" in at_bob
        log = fed.a.logtext()
        assert "certificate of b.test refused" in log
        assert re.search(r"b\.test cannot authenticate here: .*a valid certificate is required", log)
        assert not re.search(r"b\.test authenticated for a\.test", log)
    finally:
        fed.stop()


def test_require_certificates_refuses_every_unverified_peer(tmp_path):
    fed = Federation(tmp_path, b_trusted=False, a_s2s="require_certificates = true")
    try:
        at_alice, at_bob = _exchange(fed)
        assert "id='ab'" in at_alice and "remote-server-not-found" in at_alice
        assert "id='ba'" in at_bob and "remote-server-not-found" in at_bob
    finally:
        fed.stop()


def test_dialback_disabled_refuses_unverified_peer(tmp_path):
    fed = Federation(tmp_path, b_trusted=False, a_s2s="dialback = false")
    try:
        at_alice, at_bob = _exchange(fed)
        assert "id='ab'" in at_alice and "remote-server-not-found" in at_alice
        assert "id='ba'" in at_bob and "remote-server-not-found" in at_bob
        assert "dialback is disabled" in fed.a.logtext()
    finally:
        fed.stop()


def test_dialback_key_is_xep_0185(tmp_path):
    secret = load_secret(str(tmp_path))
    assert (tmp_path / "s2s-dialback.secret").stat().st_mode & 0o777 == 0o600
    assert load_secret(str(tmp_path)) == secret  # kept across restarts
    keys = DialbackKeys(secret)
    # XEP-0185 §3: HMAC-SHA256 keyed with hex(SHA256(secret)) over "recv orig id", in hex.
    expected = hmac.new(hashlib.sha256(secret).hexdigest().encode(),
                        b"b.test a.test D60000229F", hashlib.sha256).hexdigest()
    assert keys.generate("b.test", "a.test", "D60000229F") == expected
    assert keys.check(expected, "b.test", "a.test", "D60000229F")
    assert not keys.check(expected, "b.test", "a.test", "D60000229G")  # another stream
    assert not keys.check(expected, "c.test", "a.test", "D60000229F")  # another receiver
    assert not keys.check(expected.upper() + "x", "b.test", "a.test", "D60000229F")

"""Every filter runs on federated traffic, in both directions.

Stanzas from a peer enter the router where local ones do, and stanzas for a
peer leave after the same filter chain, so:

* a XEP-0191 blocklist item for a remote JID, or for the whole remote
  domain, refuses the user's stanzas to it (``not-acceptable`` +
  ``<blocked/>``) and bounces its stanzas to the user
  (``service-unavailable``, carried back over s2s);
* the domain filter's LOCAL policy does the same with its own errors;
* ``[s2s] blocked_domains`` refuses the connection itself, both ways.
"""
from __future__ import annotations

import re

import pytest

from tests.federation import Federation, wait_for_log


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    f = Federation(tmp_path_factory.mktemp("s2s-filters"))
    yield f
    f.stop()


def _reply(client, ident: str, timeout: float = 10.0) -> str:
    return client.read_until(rf"<message[^>]*id='{ident}'.*?</message>", timeout).decode()


def _both_ways_refused(alice, bob, tag: str) -> tuple[str, str]:
    alice.send(f"<message to='bob@b.test/raw' type='chat' id='{tag}-ab'><body>x</body></message>")
    bob.send(f"<message to='alice@a.test/raw' type='chat' id='{tag}-ba'><body>y</body></message>")
    return _reply(alice, f"{tag}-ab"), _reply(bob, f"{tag}-ba")


def _block(alice, item: str, ident: str, action: str = "block") -> None:
    reply = alice.iq(f"<iq type='set' id='{ident}'><{action} xmlns='urn:xmpp:blocking'>"
                     f"<item jid='{item}'/></{action}></iq>", ident)
    assert "type='result'" in reply, reply


@pytest.mark.parametrize("item", ["bob@b.test", "b.test"])
def test_blocklist_item_for_remote_jid_and_domain_blocks_both_ways(fed, item):
    alice = fed.login(fed.a, "alice")
    bob = fed.login(fed.b, "bob")
    try:
        # The link works before the block.
        alice.send("<message to='bob@b.test/raw' type='chat' id='pre'><body>hi</body></message>")
        assert "type='error'" not in _reply(bob, "pre")
        _block(alice, item, "blk")
        at_alice, at_bob = _both_ways_refused(alice, bob, item.replace("@", "-"))
        # Outbound: XEP-0191 §3.4, the user's own block.
        assert "type='error'" in at_alice and "<not-acceptable" in at_alice
        assert "urn:xmpp:blocking:errors" in at_alice
        # Inbound: the remote sender gets service-unavailable, over s2s.
        assert "type='error'" in at_bob and "<service-unavailable" in at_bob
        assert "from='alice@a.test/raw'" in at_bob
        _block(alice, item, "unblk", "unblock")
        alice.send("<message to='bob@b.test/raw' type='chat' id='post'><body>back</body></message>")
        assert "type='error'" not in _reply(bob, "post")
    finally:
        alice.close()
        bob.close()


def test_domain_filter_local_stops_remote_traffic_both_ways(tmp_path):
    from xmppd.config import DEFAULT_PLUGINS

    fed = Federation(tmp_path, plugins=list(DEFAULT_PLUGINS) + ["domain-filter"],
                     a_extra='\n[domain-filter]\ndefault = "LOCAL"\n')
    try:
        alice = fed.login(fed.a, "alice")
        bob = fed.login(fed.b, "bob")
        try:
            at_alice, at_bob = _both_ways_refused(alice, bob, "df")
        finally:
            alice.close()
            bob.close()
        assert "<policy-violation" in at_alice and "LOCAL" in at_alice
        assert "<service-unavailable" in at_bob
        assert "to alice" not in at_bob
    finally:
        fed.stop()


def test_blocked_domains_stops_the_connection(tmp_path):
    fed = Federation(tmp_path, a_s2s='blocked_domains = ["b.test"]')
    try:
        alice = fed.login(fed.a, "alice")
        bob = fed.login(fed.b, "bob")
        try:
            at_alice, at_bob = _both_ways_refused(alice, bob, "bd")
        finally:
            alice.close()
            bob.close()
        assert "<remote-server-not-found" in at_alice and "blocked" in at_alice
        assert "<remote-server-not-found" in at_bob
        wait_for_log(fed.a, r"s2s in \S+: refusing b\.test: b\.test is blocked")
        assert not re.search(r"s2s out a\.test -> b\.test", fed.a.logtext())
    finally:
        fed.stop()

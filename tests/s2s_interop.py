"""Federation between xmppd and a real peer (Prosody 0.12, ejabberd 23.01), both directions.

Shared by tests/test_s2s_prosody.py and tests/test_s2s_ejabberd.py: a test
class there subclasses :class:`InteropTests` and names the peer class.

The set-up, all on loopback, with no DNS and no system file touched:

* a test CA (tests/pki.py) issues one server certificate (serverAuth only)
  for ``xmppd.test`` and one for the peer's domain; each server trusts that
  CA and nothing else (xmppd: ``[s2s] ca_file``, ``ca_system = false``;
  Prosody: ``ssl.cafile`` with ``s2s_secure_auth``; ejabberd: ``s2s_cafile``
  with ``s2s_use_starttls: required``), so an unverified peer is refused and
  each side may authenticate the other with SASL EXTERNAL;
* xmppd reaches the peer through ``[s2s.routes]``;
* the peer reaches xmppd without touching the system's DNS:

  - Prosody 0.12 has no routing option (mod_s2s always resolves the domain
    through net.resolvers.service, against /etc/resolv.conf's servers), so
    a test-only plugin written for these tests (tests/peers.py) replaces
    that resolver by a fixed loopback target for ``xmppd.test``;
  - ejabberd 23.01 has none either (``outgoing_s2s_port`` is one port for
    every domain, and the SRV target or the domain is resolved with the
    system's getaddrinfo, which ignores Erlang's inetrc host list), so a
    loopback DNS server (bench/srvdns.py, twisted.names) answers
    ``_xmpp-server._tcp.xmppd.test`` with ``localhost`` and xmppd's port,
    and ejabberd's own inetrc (ERL_INETRC, in its config dir) names that
    server and no other.

What the peers do with xmppd's serverAuth-only certificate differs:
Prosody accepts it for SASL EXTERNAL both ways; ejabberd 23.01 refuses it
on its incoming side ("unsupported certificate purpose": it wants the
clientAuth usage), and xmppd falls back to dialback, which ejabberd checks
by connecting back (and authenticating xmppd's certificate there).

Users on both sides are raw clients (tests/rawclient.py) logged in over
STARTTLS; the peer's users are made by in-band registration.  Each side's
log says how the other was authenticated (EXTERNAL or dialback): the tests
print it and accept only those two.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.daemon import Daemon
from tests.federation import configure, wait_for_log
from tests.peers import PASSWORD
from tests.pki import CA
from tests.rawclient import RawClient

XMPPD = "xmppd.test"
Q = "['\"]"  # the peers quote attributes with either


def presence(sender: str, kind: str | None = None) -> str:
    """A regex for a presence from ``sender`` (bare JID matches any resource), of type ``kind``."""
    typed = f"(?=[^>]*type={Q}{kind}{Q})" if kind else f"(?![^>]*type={Q})"
    return rf"<presence(?=[^>]*from={Q}{re.escape(sender)}[/'\"]){typed}[^>]*?(/>|>.*?</presence>)"


def message(ident: str) -> str:
    return rf"<message(?=[^>]*id={Q}{re.escape(ident)}{Q})[^>]*>.*?</message>"


def read(client: RawClient, pattern: str, timeout: float = 15.0) -> str:
    """``client.read_until`` whose failure shows what did arrive."""
    try:
        return client.read_until(pattern, timeout).decode()
    except (TimeoutError, ConnectionError) as e:
        raise AssertionError(f"no {pattern!r}; received: {client.buffer[-3000:]!r}") from e


class Interop:
    """xmppd serving ``xmppd.test`` and one peer serving its own domain."""

    def __init__(self, tmp: Path, peer_cls, peer_domain: str) -> None:
        self.peer_domain = peer_domain
        ca = CA("xmppd interop test CA")
        ca_file = tmp / "ca.pem"
        ca_file.write_bytes(ca.pem())
        self.xmppd = Daemon(tmp / "xmppd", hosts=(XMPPD,), s2s="")
        self.peer = peer_cls(peer_domain, ca, ca_file, {XMPPD: self.xmppd.s2s_port})
        cert, key = ca.issue_server(XMPPD, tmp / "certs")
        configure(self.xmppd, XMPPD, cert, key, ca_file,
                  {peer_domain: f"tcp:127.0.0.1:{self.peer.s2s_port}"})

    def start(self) -> "Interop":
        self.xmppd.start()
        self.xmppd.adduser(f"alice@{XMPPD}", PASSWORD)
        self.peer.up()
        self.peer.register("bob", self.peer_domain)
        return self

    def stop(self) -> None:
        try:
            self.peer.remove()
        finally:
            if self.xmppd.proc is not None:
                self.xmppd.stop()

    def alice(self, resource: str) -> RawClient:
        return self._login(self.xmppd.port, XMPPD, "alice", resource)

    def bob(self, resource: str) -> RawClient:
        return self._login(self.peer.port, self.peer_domain, "bob", resource)

    @staticmethod
    def _login(port: int, host: str, user: str, resource: str) -> RawClient:
        """Logged in and an "interested resource" (RFC 6121 §2.1.6: it fetched
        the roster), as clients are: Prosody gives subscription approvals and
        roster pushes only to those."""
        c = RawClient(port, host=host, timeout=20)
        c.login(user, PASSWORD, resource)
        c.iq("<iq type='get' id='roster0'><query xmlns='jabber:iq:roster'/></iq>", "roster0")
        return c


class InteropTests:
    peer_cls = None
    peer_domain = ""

    @pytest.fixture(scope="class")
    @classmethod
    def fed(cls, tmp_path_factory):
        f = Interop(tmp_path_factory.mktemp("interop"), cls.peer_cls, cls.peer_domain)
        try:
            f.start()
            yield f
        finally:
            f.stop()

    def test_messages_both_ways(self, fed):
        peer, bob_jid = fed.peer_domain, f"bob@{fed.peer_domain}"
        alice, bob = fed.alice("desk"), fed.bob("phone")
        try:
            # Directed presence is not needed for chat: full JIDs, both ways.
            alice.send(f"<message to='{bob_jid}/phone' type='chat' id='x1'><body>hello from xmppd</body></message>")
            got = read(bob, message("x1"))
            assert re.search(rf"from={Q}alice@xmppd\.test/desk{Q}", got), got
            assert "hello from xmppd" in got
            bob.send(f"<message to='alice@{XMPPD}/desk' type='chat' id='p1'><body>hello from {peer}</body></message>")
            got = read(alice, message("p1"))
            assert re.search(rf"from='{re.escape(bob_jid)}/phone'", got), got
            assert f"hello from {peer}" in got
        finally:
            alice.close()
            bob.close()
        # How each direction was authenticated, as xmppd saw it.
        out = wait_for_log(fed.xmppd, rf"s2s out {XMPPD} -> {re.escape(peer)}: authenticated with \S+")
        inc = wait_for_log(fed.xmppd, rf"s2s in \S+: {re.escape(peer)} authenticated for {XMPPD} with \S+")
        print(f"\n{out}\n{inc}")
        for line in (out, inc):
            assert line.split(" with ")[-1] in ("EXTERNAL", "dialback"), line
        assert "forged" not in fed.xmppd.logtext()

    def test_subscription_handshakes_and_presence(self, fed):
        bob_jid = f"bob@{fed.peer_domain}"
        alice, bob = fed.alice("home"), fed.bob("laptop")
        try:
            alice.send("<presence><status>alice here</status></presence>")
            bob.send("<presence><status>bob here</status></presence>")
            # xmppd -> peer: alice asks, bob approves, alice gets bob's presence.
            alice.send(f"<presence to='{bob_jid}' type='subscribe'/>")
            read(bob, presence(f"alice@{XMPPD}", "subscribe"))
            bob.send(f"<presence to='alice@{XMPPD}' type='subscribed'/>")
            read(alice, presence(bob_jid, "subscribed"))
            got = read(alice, presence(f"{bob_jid}/laptop"))
            assert "bob here" in got, got
            # peer -> xmppd: bob asks, alice approves, bob gets alice's presence.
            bob.send(f"<presence to='alice@{XMPPD}' type='subscribe'/>")
            read(alice, presence(bob_jid, "subscribe"))
            alice.send(f"<presence to='{bob_jid}' type='subscribed'/>")
            read(bob, presence(f"alice@{XMPPD}", "subscribed"))
            got = read(bob, presence(f"alice@{XMPPD}/home"))
            assert "alice here" in got, got
            # Both rosters say "both".
            for client, contact in ((alice, bob_jid), (bob, f"alice@{XMPPD}")):
                deadline = time.monotonic() + 10
                while True:
                    roster = client.iq("<iq type='get' id='r1'><query xmlns='jabber:iq:roster'/></iq>", "r1")
                    item = re.search(rf"<item[^>]*jid={Q}{re.escape(contact)}{Q}[^>]*>", roster)
                    if item and re.search(rf"subscription={Q}both{Q}", item.group(0)):
                        break
                    assert time.monotonic() < deadline, roster
                    time.sleep(0.1)
            # Broadcast both ways.
            alice.send("<presence><show>away</show><status>alice away</status></presence>")
            got = read(bob, presence(f"alice@{XMPPD}/home"))
            assert "alice away" in got, got
            bob.send("<presence><show>dnd</show><status>bob busy</status></presence>")
            got = read(alice, presence(f"{bob_jid}/laptop"))
            assert "bob busy" in got, got
            # A new session of alice is told bob's presence (probe answered by the peer).
            second = fed.alice("tablet")
            try:
                second.send("<presence/>")
                got = read(second, presence(f"{bob_jid}/laptop"))
                assert "bob busy" in got, got
                # ... and its initial presence is broadcast to the remote contact.
                read(bob, presence(f"alice@{XMPPD}/tablet"))
            finally:
                second.close()
            read(bob, presence(f"alice@{XMPPD}/tablet", "unavailable"))
            # A new session of bob is told alice's presence (probe answered by xmppd).
            other = fed.bob("tablet")
            try:
                other.send("<presence/>")
                got = read(other, presence(f"alice@{XMPPD}/home"))
                assert "alice away" in got, got
            finally:
                other.close()
            # Logout on the peer: unavailable reaches xmppd.
            bob.close()
            read(alice, presence(f"{bob_jid}/laptop", "unavailable"))
        finally:
            alice.close()
            bob.close()

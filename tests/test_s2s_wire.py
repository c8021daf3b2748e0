"""Messages from a peer reach clients as received, or serialised after any change (issue 12 cost).

Against the daemon, over TLS both ways: a hand-driven peer server
(:class:`tests.federation.S2SPeer`, SASL EXTERNAL) sends messages to
``alice@a.test``, a raw TLS client.  The peer writes its messages in a
formatting the server's serialiser never produces (double quotes, extra
spaces, a character reference), so the client sees which way each came:

* unchanged: the exact received bytes (what saves a serialisation);
* every path that changes a message still reaches the client changed:
  carbons (``<private/>`` removed), offline storage (``<delay/>`` added),
  XEP-0359 (``<stanza-id/>`` added, a forged one removed), CSI (held while
  inactive), stream management (counted and acknowledged);
* namespace and prefix tricks (the message declaring ``jabber:server``, a
  prefix bound only in the peer's stream header, ``jabber:server`` declared
  inside) reach the client serialised from the tree the server checked,
  well-formed in ``jabber:client``.
"""
from __future__ import annotations

import re
from xml.parsers import expat

import pytest

from tests.federation import PASSWORD, Federation, S2SPeer
from tests.rawclient import RawClient

BASE = ["roster", "presence", "disco", "ping", "offline", "urn:xmpp:carbons:2", "urn:xmpp:sm:3",
        "urn:xmpp:csi:0"]


def _fancy(ident: str, inner: str = "<body>A&#x42;C</body>", to: str = "alice@a.test") -> str:
    """A message as no serialiser writes it (the received bytes are recognisable)."""
    return (f'<message  from="bob@b.test/x"  to="{to}" type="chat" id="{ident}">'
            f"{inner}</message >")


def _serialised(ident: str) -> bytes:
    return f"<message from='bob@b.test/x' to='alice@a.test' type='chat' id='{ident}'>".encode()


def _start(tmp, plugins) -> Federation:
    fed = Federation(tmp, plugins=plugins, start=False)
    fed.a.start()
    fed.a.adduser("alice@a.test", PASSWORD)
    return fed


def _peer(fed: Federation) -> S2SPeer:
    cert, key = fed.ca.issue_server("b.test", fed.tmp / "peer", name="peer-b")
    peer = S2SPeer(fed.a.s2s_port, "b.test", "a.test", cert, key)
    peer.authenticate()
    return peer


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    f = _start(tmp_path_factory.mktemp("s2s-wire"), BASE)
    peer = _peer(f)
    yield f, peer
    peer.close()
    f.stop()


def _alice(fed: Federation, resource: str, carbons: bool = False) -> RawClient:
    client = RawClient(fed.a.port, host="a.test")
    client.login("alice", PASSWORD, resource)
    if carbons:
        reply = client.iq("<iq type='set' id='cb'><enable xmlns='urn:xmpp:carbons:2'/></iq>", "cb")
        assert "type='result'" in reply
    client.send("<presence/>")
    client.read_until("<presence[^>]*/>|</presence>")
    return client


def _message(client: RawClient, ident: str) -> bytes:
    pattern = rf"<message[^>]*id=[\"']{ident}[\"'].*?</message\s*>".encode()
    return re.search(pattern, client.read_until(pattern), re.S).group(0)


def _client_parses(data: bytes) -> str:
    """``data`` parsed as a client does (only jabber:client and stream: bound); its XML again."""
    names: list = []
    p = expat.ParserCreate("UTF-8", " ")
    p.StartElementHandler = lambda name, attrs: names.append(name)
    p.Parse(b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
            + data + b"</stream:stream>", True)
    assert names[1] == "jabber:client message", names
    return " ".join(names)


def test_an_unchanged_message_reaches_the_client_as_received(fed):
    f, peer = fed
    alice = _alice(f, "plain")
    try:
        peer.send(_fancy("raw1"))
        assert _message(alice, "raw1") == _fancy("raw1").encode()
    finally:
        alice.close()


def test_carbons_private_is_removed(fed):
    f, peer = fed
    alice = _alice(f, "cb", carbons=True)
    try:
        peer.send(_fancy("priv1", "<body>x</body><private xmlns='urn:xmpp:carbons:2'/>"))
        got = _message(alice, "priv1")
        assert b"private" not in got and got.startswith(_serialised("priv1"))
        peer.send(_fancy("cb2"))  # carbons on, nothing to remove: read, so serialised
        assert _message(alice, "cb2").startswith(_serialised("cb2"))
    finally:
        alice.close()


def test_offline_storage_adds_delay(fed):
    f, peer = fed
    peer.send(_fancy("off1", to="alice@a.test/gone"))  # stored long before alice has logged in
    alice = RawClient(f.a.port, host="a.test")
    try:
        alice.login("alice", PASSWORD, "back")
        alice.send("<presence/>")
        got = _message(alice, "off1")
        assert b"<delay" in got and b"Offline storage" in got and got.startswith(b"<message from='bob@b.test/x'")
        _client_parses(got)
    finally:
        alice.close()


def test_csi_holds_then_delivers_and_stream_management_counts(fed):
    """CSI classifies the bytes it is given (received or serialised) the same way."""
    f, peer = fed
    alice = _alice(f, "csi")
    try:
        alice.send("<enable xmlns='urn:xmpp:sm:3'/>")
        alice.read_until("<enabled[^>]*/>")
        alice.send("<inactive xmlns='urn:xmpp:csi:0'/>")
        alice.iq("<iq type='get' id='c1'><ping xmlns='urn:xmpp:ping'/></iq>", "c1")
        peer.send(_fancy("cs1", "<composing xmlns='http://jabber.org/protocol/chatstates'/>"))
        alice.iq("<iq type='get' id='c2'><ping xmlns='urn:xmpp:ping'/></iq>", "c2")
        assert b"cs1" not in alice.buffer  # a chat state alone waits
        peer.send(_fancy("cs2"))  # a body: what waits first, then the message, as received
        assert b"composing" in _message(alice, "cs1")
        assert _message(alice, "cs2") == _fancy("cs2").encode()
        # c1's and c2's results, cs1 and cs2: four stanzas counted (an ack of
        # more than the server sent would end the stream: RFC-style h check)
        alice.send("<active xmlns='urn:xmpp:csi:0'/><a xmlns='urn:xmpp:sm:3' h='4'/>")
        assert "type='result'" in alice.iq("<iq type='get' id='c3'><ping xmlns='urn:xmpp:ping'/></iq>", "c3")
    finally:
        alice.close()


@pytest.mark.parametrize("ident,message", [
    ("ns1", "<message xmlns='jabber:server' from='bob@b.test/x' to='alice@a.test' id='ns1'>"
            "<body>x</body></message>"),
    ("ns2", "<message from='bob@b.test/x' to='alice@a.test' id='ns2'><body>x</body>"
            "<db:result>k</db:result></message>"),
    ("ns3", "<message from='bob@b.test/x' to='alice@a.test' id='ns3'><body db:x='1'>x</body></message>"),
    ("ns4", "<message from='bob@b.test/x' to='alice@a.test' id='ns4'><body>x</body>"
            "<q xmlns='jabber:server'><r/></q></message>"),
])
def test_namespace_tricks_reach_the_client_serialised_and_well_formed(fed, ident, message):
    f, peer = fed
    alice = _alice(f, ident)
    try:
        peer.send(message)
        got = _message(alice, ident)
        assert got.startswith(f"<message from='bob@b.test/x' to='alice@a.test' id='{ident}'>".encode())
        assert b"jabber:server'" not in got and b"<db:" not in got
        names = _client_parses(got)
        assert "jabber:server " not in names  # only ever jabber:client, or the dialback namespace declared
    finally:
        alice.close()


def test_stanza_ids_are_stamped_and_forged_ones_removed(tmp_path):
    f = _start(tmp_path, BASE + ["urn:xmpp:sid:0"])
    peer = _peer(f)
    alice = _alice(f, "sid")
    try:
        forged = ("<body>x</body><stanza-id xmlns='urn:xmpp:sid:0' by='alice@a.test' id='forged'/>"
                  "<stanza-id xmlns='urn:xmpp:sid:0' by='b.test' id='theirs'/>")
        peer.send(_fancy("sid1", forged))
        got = _message(alice, "sid1")
        assert got.startswith(_serialised("sid1"))
        assert b"id='forged'" not in got and b"id='theirs'" in got
        assert re.search(rb"<stanza-id xmlns='urn:xmpp:sid:0' by='alice@a.test' id='[^']+'/>", got)
    finally:
        alice.close()
        peer.close()
        f.stop()

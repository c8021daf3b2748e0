"""Issue 13, with federation: remote users reach public components; private ones stay local.

``a.test`` (tests/federation.py) serves three component domains:

* ``echo.a.test``: in process (examples/echo.py plus unmodified wokkel ping
  and disco handlers), public; its own certificate in ``[tls] certs_dir``
  (``echo.a.test.crt`` + ``.key``), so both directions authenticate with
  SASL EXTERNAL;
* ``gw.a.test``: an external component (XEP-0114, played by a raw socket),
  public; no certificate names it, so its outgoing stream to b.test falls
  back to dialback (b.test asks a.test, the authoritative server);
* ``priv.a.test``: external, ``public = false``: unknown to other servers
  (``host-unknown``), and what it sends to them bounces with
  ``service-unavailable``.

``bob@b.test`` on the other daemon is a raw client, so every assertion is
about what crosses the wire.  The in-process tests at the end show the
filter chain sees component traffic both ways (no filter of a.test applies
to a remote user and a component by itself: blocking and the domain filter
are per local account).
"""
from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.words.xish import domish

from tests.daemon import free_port
from tests.federation import Federation, S2SPeer, wait_for_log
from tests.rawclient import RawComponent
from tests.test_s2s_units import _config
from xmppd import jid as jidlib
from xmppd.core import Server
from xmppd.router import DROP
from xmppd.s2s.outbound import OutboundLink
from xmppd.stanzas import NS_CLIENT
from xmppd.storage import MemoryStore

ECHO_HANDLERS = '["examples.echo:EchoBot", "wokkel.ping:PingHandler", "wokkel.disco:DiscoHandler"]'


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    cport = free_port()
    tmp = tmp_path_factory.mktemp("s2scomp")
    extra = f"""
[tls]
certs_dir = "{tmp / 'compcerts'}"

[components]
listen = ["tcp:{cport}:interface=127.0.0.1"]

[components."echo.a.test"]
name = "Echo bot"
handlers = {ECHO_HANDLERS}

[components."gw.a.test"]
secret = "gw-secret"

[components."priv.a.test"]
secret = "priv-secret"
public = false
"""
    f = Federation(tmp, a_extra=extra, a_domains=("echo.a.test", "gw.a.test", "priv.a.test"),
                   start=False)
    f.ca.issue_server("echo.a.test", tmp / "compcerts")
    f.start()
    f.cport = cport
    yield f
    f.stop()


def _stanza(client, name: str, ident: str, timeout: float = 10.0) -> str:
    return client.read_until(rf"<{name}[^>]*id='{ident}'[^>]*(/>|>.*?</{name}>)", timeout).decode()


def _component(fed, domain: str, secret: str) -> RawComponent:
    c = RawComponent(fed.cport, host=domain, timeout=10)
    assert b"<handshake/>" in c.handshake(domain, secret)
    return c


def test_remote_user_reaches_in_process_component(fed):
    bob = fed.login(fed.b, "bob")
    try:
        bob.send("<message to='echo.a.test' type='chat' id='e1'><body>echo me</body></message>")
        # The echo bot answers without copying the id.
        got = bob.read_until(r"<message[^>]*from='echo\.a\.test'.*?</message>", 10).decode()
        assert "type='chat'" in got and "<body>echo me</body>" in got, got
        got = bob.iq("<iq type='get' to='echo.a.test' id='d1'>"
                     "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>", "d1")
        assert "type='result'" in got and "Echo bot" in got and "urn:xmpp:ping" in got, got
        got = bob.iq("<iq type='get' to='echo.a.test' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>", "p1")
        assert "type='result'" in got and "from='echo.a.test'" in got, got
    finally:
        bob.close()
    # The component's own link: echo.a.test is the local side, authenticated by
    # its own certificate (certs_dir); b.test's stream to it likewise.
    wait_for_log(fed.a, r"s2s out echo\.a\.test -> b\.test: authenticated with EXTERNAL")
    wait_for_log(fed.a, r"s2s in \S+: b\.test authenticated for echo\.a\.test with EXTERNAL")


def test_external_component_federates_with_dialback(fed):
    gw = _component(fed, "gw.a.test", "gw-secret")
    bob = fed.login(fed.b, "bob")
    try:
        gw.send("<message from='gw.a.test' to='bob@b.test/raw' id='g1'><body>from the gateway</body></message>")
        got = _stanza(bob, "message", "g1", timeout=20)
        assert "from='gw.a.test'" in got and "<body>from the gateway</body>" in got, got
        bob.send("<message to='user@gw.a.test' id='g2'><body>to the gateway</body></message>")
        got = _stanza(gw, "message", "g2")
        assert "from='bob@b.test/raw'" in got and "to the gateway" in got, got
    finally:
        bob.close()
        gw.close()
    # No certificate names gw.a.test: b.test checked the key with a.test.
    wait_for_log(fed.b, r"s2s in \S+: gw\.a\.test authenticated for b\.test with dialback")
    wait_for_log(fed.a, r"dialback verify for gw\.a\.test -> b\.test: valid")


def test_private_component_is_unknown_to_remote_servers(fed):
    priv = _component(fed, "priv.a.test", "priv-secret")
    bob = fed.login(fed.b, "bob")
    try:
        bob.send("<message to='priv.a.test' type='chat' id='x1'><body>let me in</body></message>")
        got = _stanza(bob, "message", "x1", timeout=20)
        assert "type='error'" in got and "remote-server-not-found" in got, got
        # It never reached the component.
        priv.send("<iq type='get' from='priv.a.test' to='a.test' id='alive'><ping xmlns='urn:xmpp:ping'/></iq>")
        assert "x1" not in _stanza(priv, "iq", "alive")
        # What it sends to a remote JID is bounced back to it, not federated.
        priv.send("<message from='priv.a.test' to='bob@b.test/raw' type='chat' id='x2'><body>out</body></message>")
        got = _stanza(priv, "message", "x2")
        assert "type='error'" in got and "service-unavailable" in got, got
    finally:
        bob.close()
        priv.close()
    wait_for_log(fed.b, r"s2s out b\.test -> priv\.a\.test: .*host-unknown")
    assert "priv.a.test -> b.test" not in fed.a.logtext()


def test_stanza_to_private_component_on_an_authenticated_stream(fed):
    """A peer already authenticated for b.test -> a.test cannot address priv.a.test."""
    cert, key = fed.ca.issue_server("b.test", fed.tmp / "peer", name="peer-b")
    peer = S2SPeer(fed.a.s2s_port, "b.test", "a.test", cert, key)
    try:
        peer.authenticate()
        peer.send("<message from='bob@b.test/x' to='priv.a.test' id='sneak'><body>hi</body></message>")
        error = peer.read_until("</stream:stream>")
        assert "<host-unknown" in error, error
    finally:
        peer.close()
    # ... and a private domain is refused in a stream header like any unknown name.
    peer = S2SPeer(fed.a.s2s_port, "b.test", "priv.a.test", cert, key)
    try:
        peer.send("<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                  "xmlns:stream='http://etherx.jabber.org/streams' "
                  "from='b.test' to='priv.a.test' version='1.0'>")
        assert "<host-unknown" in peer.read_until("</stream:stream>")
    finally:
        peer.close()


# -- in process: the filter chain, both ways -----------------------------------------


class FakeRoute:
    """A component route (router.ComponentRoute) that keeps what it is sent."""

    online = True

    def __init__(self, public: bool) -> None:
        self.public = public
        self.got: list[domish.Element] = []

    def send(self, stanza: domish.Element) -> None:
        self.got.append(stanza)


class Recorder:
    """A filter that records what it sees and drops what carries ``id='drop'``."""

    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    def check(self, stanza, sender, to):
        self.seen.append((stanza.getAttribute("id"), sender.full, to.full))
        return DROP if stanza.getAttribute("id") == "drop" else None


def _message(ident: str, sender: str, to: str) -> domish.Element:
    el = domish.Element((NS_CLIENT, "message"))
    el["id"], el["from"], el["to"], el["type"] = ident, sender, to, "chat"
    el.addElement("body", content="hi")
    return el


@pytest.fixture
def local(tmp_path, monkeypatch):
    cfg = _config({})
    object.__setattr__(cfg, "data_dir", str(tmp_path))
    srv = Server(cfg, store=MemoryStore(), clock=Clock(), certs=object())
    started = []
    monkeypatch.setattr(OutboundLink, "start", lambda self: started.append(self))  # no network
    comp, priv = FakeRoute(public=True), FakeRoute(public=False)
    srv.router.components.update({"comp.a.test": comp, "priv.a.test": priv})
    recorder = Recorder()
    srv.router.filters.insert(0, recorder)
    return srv, comp, priv, recorder, started


def test_component_traffic_passes_the_filter_chain_both_ways(local):
    srv, comp, priv, recorder, started = local
    bob = jidlib.parse("bob@b.test/r")
    # out: the component's stanza is filtered, then leaves from the component domain
    out = _message("out", "comp.a.test", "bob@b.test/r")
    srv.router.deliver(out, jidlib.parse("comp.a.test"), bob, comp)
    assert ("out", "comp.a.test", "bob@b.test/r") in recorder.seen
    assert [(link.local, link.remote) for link in started] == [("comp.a.test", "b.test")]
    srv.router.deliver(_message("drop", "comp.a.test", "bob@b.test/r"), jidlib.parse("comp.a.test"), bob, comp)
    assert len(srv.s2s.links[("comp.a.test", "b.test")].queue) == 1  # the dropped one never queued
    # in: a peer's stanza for the component is filtered before the component sees it
    srv.s2s.inbound(_message("in", "bob@b.test/r", "comp.a.test"), bob, jidlib.parse("comp.a.test"))
    srv.s2s.inbound(_message("drop", "bob@b.test/r", "comp.a.test"), bob, jidlib.parse("comp.a.test"))
    assert ("in", "bob@b.test/r", "comp.a.test") in recorder.seen
    assert [el["id"] for el in comp.got] == ["in"]


def test_private_component_stanza_to_remote_bounces_after_the_filters(local):
    srv, comp, priv, recorder, started = local
    srv.router.deliver(_message("p1", "priv.a.test", "bob@b.test/r"), jidlib.parse("priv.a.test"),
                       jidlib.parse("bob@b.test/r"), priv)
    assert ("p1", "priv.a.test", "bob@b.test/r") in recorder.seen
    assert not started and not srv.s2s.links
    assert [(el["id"], el["type"]) for el in priv.got] == [("p1", "error")]
    assert "service-unavailable" in priv.got[0].toXml()
    assert srv.s2s.federates("comp.a.test") and srv.s2s.federates("a.test")
    assert not srv.s2s.federates("priv.a.test") and not srv.s2s.federates("b.test")
    assert srv.s2s.refuse_domain("priv.a.test") and srv.s2s.refuse_domain("comp.a.test")

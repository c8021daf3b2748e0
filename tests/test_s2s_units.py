"""In-process tests of the s2s parts: config, the waiting queue, bounces, the router hand-off.

No daemon and no network: a :class:`xmppd.core.Server` on a
:class:`~twisted.internet.task.Clock`, streams on ``StringTransport``.
"""
from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.internet.error import ConnectionLost
from twisted.words.xish import domish

from xmppd import config as configlib
from xmppd import jid as jidlib
from xmppd.config import ConfigError
from xmppd.core import Server
from xmppd.s2s.outbound import OutboundLink, OutboundStream
from xmppd.s2s.queue import PendingQueue
from xmppd.stanzas import NS_CLIENT
from xmppd.storage import MemoryStore
from xmppd.stream import AUTHENTICATED


def _config(s2s: dict, **extra) -> configlib.Config:
    return configlib.from_dict({"server": {"hosts": ["a.test"]}, "s2s": s2s, **extra}, "test.toml")


@pytest.mark.parametrize("s2s, key, words", [
    ({"routes": {"b.test": "udp:1.2.3.4:5269"}}, "s2s.routes.b.test", "tcp:HOST:PORT"),
    ({"routes": {"b.test": "tcp:host:99999"}}, "s2s.routes.b.test", "port 1-65535"),
    ({"nameservers": ["dns.example"]}, "s2s.nameservers", "IP address"),
    ({"secure_domains": ["user@b.test"]}, "s2s.secure_domains", "bare domain"),
    ({"enabled": False, "listen": ["tcp:5269"]}, "s2s.enabled", "disabled"),
    ({"listen": ["tcp:5222"]}, "s2s.listen", "already used by a listener in c2s.listen"),
    ({"dialbak": True}, "s2s.dialbak", "unknown key"),
    ({"queue_max_stanzas": 0}, "s2s.queue_max_stanzas", ">= 1"),
])
def test_config_errors_name_the_key(s2s, key, words):
    with pytest.raises(ConfigError) as e:
        _config(s2s, c2s={"listen": ["tcp:5222"]})
    assert e.value.key == key and words in str(e.value)


def test_config_defaults_and_routes():
    cfg = _config({"routes": {"B.Test": "tls:[::1]:5270"}, "secure_domains": ["c.test"]}).s2s
    assert cfg.listen == () and cfg.enabled and cfg.dialback and cfg.require_encryption
    route = cfg.routes["b.test"]  # domains are prepared like JIDs
    assert (route.direct_tls, route.host, route.port) == (True, "::1", 5270)
    assert cfg.needs_certificate("c.test") and not cfg.dialback_allowed("c.test")
    assert cfg.dialback_allowed("b.test")


def _message(i: int) -> domish.Element:
    el = domish.Element((NS_CLIENT, "message"))
    el["id"] = f"m{i}"
    return el


def test_queue_is_bounded_in_length_and_time():
    clock = Clock()
    expired = []
    q = PendingQueue(clock, max_stanzas=2, timeout=10, expired=expired.extend)
    assert q.add(_message(0))
    clock.advance(6)
    assert q.add(_message(1))
    assert not q.add(_message(2))  # full: the caller bounces it
    clock.advance(4)  # m0 has waited 10 s
    assert [e["id"] for e in expired] == ["m0"] and len(q) == 1
    clock.advance(6)
    assert [e["id"] for e in expired] == ["m0", "m1"] and len(q) == 0
    assert q.add(_message(3))
    assert [e["id"] for e in q.take_all()] == ["m3"]
    clock.advance(60)  # taken: never expires as well
    assert [e["id"] for e in expired] == ["m0", "m1"]


class FakeSession:
    def __init__(self, jid: str) -> None:
        self.jid = jidlib.parse(jid)
        self.available, self.priority, self.state = True, 0, {}
        self.got: list[domish.Element] = []

    def send(self, element):
        self.got.append(element)

    def send_bytes(self, data):
        raise AssertionError("bounces are sent one by one")


@pytest.fixture
def server(tmp_path):
    clock = Clock()
    cfg = _config({"queue_timeout": 30, "max_outbound_bytes": 65536})
    object.__setattr__(cfg, "data_dir", str(tmp_path))
    srv = Server(cfg, store=MemoryStore(), clock=clock, certs=object())
    alice = FakeSession("alice@a.test/r")
    srv.router.bind(alice)
    return srv, clock, alice


def _from_alice(i: int, name: str = "message", kind: str = "chat") -> domish.Element:
    el = domish.Element((NS_CLIENT, name))
    el["from"], el["to"], el["id"], el["type"] = "alice@a.test/r", "bob@b.test", f"s{i}", kind
    if name == "message":
        el.addElement("body", content="x" * 30000)
    return el


def test_router_hands_remote_destinations_to_s2s_and_queue_timeout_bounces(server, monkeypatch):
    srv, clock, alice = server
    started = []
    monkeypatch.setattr(OutboundLink, "start", lambda self: started.append(self))  # no network
    srv.router.deliver(_from_alice(1), alice.jid, jidlib.parse("bob@b.test"), alice)
    srv.router.deliver(_from_alice(2, "presence", "subscribe"), alice.jid, jidlib.parse("bob@b.test"))
    link = srv.s2s.links[("a.test", "b.test")]
    assert started == [link, link] and len(link.queue) == 2
    clock.advance(30)
    # queue_timeout: the message bounces once with remote-server-timeout, presence never.
    assert [(e["id"], e["type"]) for e in alice.got] == [("s1", "error")]
    assert alice.got[0].firstChildElement() is not None
    assert "remote-server-timeout" in alice.got[0].toXml()


def _established(srv) -> tuple[OutboundLink, OutboundStream, StringTransport]:
    """A link with an authenticated stream on a StringTransport."""
    link = srv.s2s.links[("a.test", "b.test")] = OutboundLink(srv.s2s, "a.test", "b.test")
    stream = OutboundStream(link, direct_tls=False)
    stream.factory = None
    transport = StringTransport()
    stream.makeConnection(transport)
    stream.phase = AUTHENTICATED
    stream.cancel_auth_timeout()
    stream.start_producing()
    link.stream_ready(stream)
    return link, stream, transport


def test_idle_link_is_closed_and_the_next_stanza_opens_a_new_one(server, monkeypatch):
    srv, clock, alice = server
    link, stream, transport = _established(srv)
    srv.s2s.start()  # the idle check (and the dialback secret, in the data dir)
    link.send(_from_alice(1))
    clock.advance(599)
    assert not transport.disconnecting
    clock.advance(200)  # idle_timeout 600 s, checked every 60 s
    assert transport.disconnecting and transport.value().endswith(b"</stream:stream>")
    started = []
    monkeypatch.setattr(OutboundLink, "start", lambda self: started.append(self))
    link.send(_from_alice(2))  # the closing stream does not swallow it
    assert started == [link] and len(link.queue) == 1 and b"id='s2'" not in transport.value()
    srv.s2s.stop()


def test_established_stream_lost_with_held_output_bounces_each_stanza_once(server):
    srv, clock, alice = server
    link, stream, transport = _established(srv)
    link.send(_from_alice(1))  # written
    stream.pauseProducing()  # the peer stopped reading
    link.send(_from_alice(2))
    link.send(_from_alice(3, "iq", "get"))
    link.send(_from_alice(4, "presence", "probe"))
    assert b"id='s1'" in transport.value() and b"id='s2'" not in transport.value()
    stream.connectionLost(Failure(ConnectionLost()))
    bounced = [(e.name, e["id"]) for e in alice.got]
    assert bounced == [("message", "s2"), ("iq", "s3")]
    assert all("remote-server-not-found" in e.toXml() for e in alice.got)
    assert link.stream is None and ("a.test", "b.test") not in srv.s2s.links
    clock.advance(120)
    assert len(alice.got) == 2  # once each


# -- the receiving side, in process ---------------------------------------------------


@pytest.fixture
def inbound(tmp_path, monkeypatch):
    """An inbound stream of a server hosting a.test and c.test, TLS not required."""
    from twisted.internet import defer

    from xmppd.s2s.inbound import InboundFactory

    cfg = configlib.from_dict({"server": {"hosts": ["a.test", "c.test"]},
                               "s2s": {"require_encryption": False}}, "test.toml")
    object.__setattr__(cfg, "data_dir", str(tmp_path))
    srv = Server(cfg, store=MemoryStore(), clock=Clock(), certs=object())
    keys = {}  # (local, remote) -> verdict of the authoritative server
    monkeypatch.setattr(srv.s2s, "verify_dialback",
                        lambda local, remote, sid, key: defer.succeed(keys.get((local, remote), "invalid")))
    delivered = []
    monkeypatch.setattr(srv.s2s, "inbound", lambda el, sender, to: delivered.append((el, sender, to)))
    stream = InboundFactory(srv.s2s).buildProtocol(None)
    transport = StringTransport()
    stream.makeConnection(transport)
    stream.dataReceived(b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'"
                        b" xmlns:db='jabber:server:dialback' from='b.test' to='a.test' version='1.0'>")
    return stream, transport, keys, delivered


def test_dialback_pairs_piggyback_and_addressing(inbound):
    stream, transport, keys, delivered = inbound
    assert b"urn:xmpp:features:dialback" in transport.value()
    keys[("a.test", "b.test")] = keys[("c.test", "b.test")] = "valid"
    transport.clear()
    stream.dataReceived(b"<db:result from='b.test' to='a.test'>k1</db:result>")
    assert b"<db:result from='a.test' to='b.test' type='valid'/>" in transport.value()
    stream.dataReceived(b"<message from='bob@b.test/x' to='alice@a.test' id='1'><body>hi</body></message>")
    el, sender, to = delivered[-1]
    assert (el.uri, el.name, sender.full, to.full) == (NS_CLIENT, "message", "bob@b.test/x", "alice@a.test")
    assert next(el.elements()).uri == NS_CLIENT  # jabber:server renamed while parsing
    # A second pair on the same stream (XEP-0220 piggybacking): c.test.
    stream.dataReceived(b"<db:result from='b.test' to='c.test'>k2</db:result>")
    assert b"<db:result from='c.test' to='b.test' type='valid'/>" in transport.value()
    stream.dataReceived(b"<message from='bob@b.test/x' to='carol@c.test' id='2'/>")
    assert delivered[-1][2].full == "carol@c.test"
    # A domain the stream never authenticated as: invalid-from, and nothing delivered.
    stream.dataReceived(b"<message from='eve@d.test/x' to='alice@a.test' id='3'/>")
    assert b"<invalid-from" in transport.value() and len(delivered) == 2


def test_invalid_dialback_key_is_refused(inbound):
    stream, transport, keys, delivered = inbound
    stream.dataReceived(b"<db:result from='b.test' to='a.test'>forged</db:result>")
    out = transport.value()
    assert b"type='invalid'" in out and b"<not-authorized" in out
    assert not stream.pairs


def test_unauthenticated_pair_is_improper_addressing(inbound):
    stream, transport, keys, delivered = inbound
    keys[("a.test", "b.test")] = "valid"
    stream.dataReceived(b"<db:result from='b.test' to='a.test'>k1</db:result>")
    stream.dataReceived(b"<message from='bob@b.test/x' to='carol@c.test' id='4'/>")
    assert b"<improper-addressing" in transport.value() and not delivered


def test_unreadable_trust_anchors_stop_the_start_naming_the_key(tmp_path):
    """What start-up and ``xmppctl check`` (both build the Server) report."""
    (tmp_path / "empty.pem").write_text("not a certificate\n")
    for key, value, words in (("ca_file", str(tmp_path / "missing.pem"), "No such file"),
                              ("ca_file", str(tmp_path / "empty.pem"), "no PEM certificate"),
                              ("ca_dir", str(tmp_path / "empty.pem"), "not a directory")):
        cfg = _config({key: value})
        with pytest.raises(ConfigError) as e:
            Server(cfg, store=MemoryStore(), clock=Clock(), certs=object())
        assert e.value.key == f"s2s.{key}" and words in str(e.value), str(e.value)


def test_a_failed_domain_is_not_retried_for_retry_delay(server, monkeypatch):
    from xmppd.s2s.outbound import LinkFailed

    srv, clock, alice = server
    attempts = []

    def fail_at_once(link):
        attempts.append(link)
        link.bounce_queue(LinkFailed("connection refused"))
        srv.s2s.link_idle(link)

    monkeypatch.setattr(OutboundLink, "start", fail_at_once)
    bob = jidlib.parse("bob@b.test")
    srv.router.deliver(_from_alice(1), alice.jid, bob, alice)
    clock.advance(4)
    srv.router.deliver(_from_alice(2), alice.jid, bob, alice)  # within retry_delay (5 s)
    assert len(attempts) == 1 and [e["id"] for e in alice.got] == ["s1", "s2"]
    assert "not retried" in alice.got[1].toXml() and "connection refused" in alice.got[1].toXml()
    clock.advance(2)
    srv.router.deliver(_from_alice(3), alice.jid, bob, alice)
    assert len(attempts) == 2 and len(alice.got) == 3
    assert not srv.s2s.links


PEER_HEADER = (b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'"
               b" xmlns:db='jabber:server:dialback' from='b.test' id='%s' version='1.0'>")


def test_no_dialback_verify_between_sasl_auth_and_the_restart(server, monkeypatch):
    """The peer reads what follows <auth/> with a new parser after <success/>: nothing may
    come in between (it once broke dialback for the other direction, now and then)."""
    from xmppd.s2s.tls import PeerCertificate

    srv, clock, alice = server
    monkeypatch.setattr(srv.s2s.trust, "check", lambda conn, domain: PeerCertificate(True, True, "DNS-ID"))
    link = srv.s2s.links[("a.test", "b.test")] = OutboundLink(srv.s2s, "a.test", "b.test")
    stream = OutboundStream(link, direct_tls=True)  # TLS underneath: no STARTTLS step
    transport = StringTransport()
    stream.makeConnection(transport)
    link.connecting = stream
    stream.dataReceived(PEER_HEADER % b"s1" + b"<stream:features><mechanisms xmlns='urn:ietf:params:xml:"
                        b"ns:xmpp-sasl'><mechanism>EXTERNAL</mechanism></mechanisms></stream:features>")
    assert transport.value().endswith(b"mechanism='EXTERNAL'>=</auth>")
    verdict = srv.s2s.verify_dialback("a.test", "b.test", "their-stream", "k3y")
    assert b"db:verify" not in transport.value()  # not while the exchange runs
    stream.dataReceived(b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
    assert b"db:verify" not in transport.value()
    stream.dataReceived(PEER_HEADER % b"s2" + b"<stream:features/>")
    out = transport.value()
    assert out.rindex(b"<stream:stream") < out.index(b"<db:verify")  # after our restart
    assert link.stream is stream and stream.how == "EXTERNAL"
    stream.dataReceived(b"<db:verify from='b.test' to='a.test' id='their-stream' type='valid'/>")
    assert verdict.result == "valid"


def test_links_are_pinged_and_dropped_when_the_peer_stops_answering(server):
    """XEP-0199 on s2s: a ping every ping_interval (120 s); an answer (any) keeps the
    link, none within ping_timeout (30 s) drops it and bounces what it held."""
    srv, clock, alice = server
    link, stream, transport = _established(srv)
    srv.s2s.start()
    pongs = 0
    for _ in range(3):  # the peer answers: the link lives on
        link.send(_from_alice(0, "presence", "probe"))  # traffic, so never idle
        clock.advance(60)
        link.send(_from_alice(0, "presence", "probe"))
        clock.advance(61)
        ping = transport.value().decode().rsplit("<iq", 1)
        assert len(ping) == 2 and "urn:xmpp:ping" in ping[1] and "from='a.test' to='b.test'" in ping[1]
        ident = ping[1].split("id='", 1)[1].split("'", 1)[0]
        pong = domish.Element((NS_CLIENT, "iq"))
        pong["type"], pong["id"], pong["from"], pong["to"] = "result", ident, "b.test", "a.test"
        srv.s2s.inbound(pong, jidlib.parse("b.test"), jidlib.parse("a.test"))
        pongs += 1
        assert link.ping_id is None and not transport.disconnecting
    # Now the peer is silent: its next ping goes unanswered.
    link.send(_from_alice(0, "presence", "probe"))
    clock.advance(121)
    assert link.ping_id is not None
    stream.pauseProducing()  # and it stopped reading
    link.send(_from_alice(7))
    clock.advance(31)
    assert transport.disconnecting or transport.disconnected or link.stream is None
    stream.connectionLost(Failure(ConnectionLost()))
    assert [e["id"] for e in alice.got] == ["s7"] and "remote-server-not-found" in alice.got[0].toXml()
    assert not srv.s2s._pings
    srv.s2s.stop()


def test_per_domain_limits(tmp_path, monkeypatch):
    """[s2s.domains."b.test"]: its own stanza size and connection count."""
    from twisted.internet import defer

    from xmppd.s2s.inbound import InboundFactory

    cfg = configlib.from_dict({"server": {"hosts": ["a.test"]}, "s2s": {
        "require_encryption": False, "max_connections_per_domain": 3,
        "domains": {"b.test": {"max_stanza_size": 8192, "max_connections": 1}}}}, "test.toml")
    assert cfg.s2s.connections_for("b.test") == 1 and cfg.s2s.connections_for("c.test") == 3
    object.__setattr__(cfg, "data_dir", str(tmp_path))
    srv = Server(cfg, store=MemoryStore(), clock=Clock(), certs=object())
    monkeypatch.setattr(srv.s2s, "verify_dialback", lambda *a: defer.succeed("valid"))
    monkeypatch.setattr(srv.s2s, "inbound", lambda *a: None)

    def connect(domain: str):
        stream = InboundFactory(srv.s2s).buildProtocol(None)
        transport = StringTransport()
        stream.makeConnection(transport)
        stream.dataReceived(f"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/"
                            f"streams' xmlns:db='jabber:server:dialback' from='{domain}' to='a.test'"
                            f" version='1.0'>".encode())
        stream.dataReceived(f"<db:result from='{domain}' to='a.test'>k</db:result>".encode())
        return stream, transport

    big = "<message from='u@{d}/r' to='alice@a.test'><body>" + "x" * 12000 + "</body></message>"
    b1, t1 = connect("b.test")
    b2, t2 = connect("b.test")
    assert b"too many connections" in t2.value()
    b1.dataReceived(big.replace("{d}", "b.test").encode())
    assert b"<policy-violation" in t1.value() and b"larger than 8192 bytes" in t1.value()
    c1, tc = connect("c.test")
    c1.dataReceived(big.replace("{d}", "c.test").encode())
    assert b"<stream:error" not in tc.value()
    with pytest.raises(ConfigError) as e:
        configlib.from_dict({"s2s": {"domains": {"b.test": {"max_stanza_sise": 1}}}}, "test.toml")
    assert e.value.key == 's2s.domains.b.test.max_stanza_sise'


def test_links_beyond_max_connecting_domains_wait_their_turn(server):
    """[s2s] max_connecting_domains: one link at a time here; the others start as each
    gives up, also when one that is started fails at once."""
    from dataclasses import replace

    from twisted.internet import defer

    from xmppd.s2s.outbound import LinkFailed

    srv, clock, alice = server
    service = srv.s2s
    service.config = replace(service.config, max_connecting_domains=1)
    asked, pending = [], {}

    class Resolver:
        def targets(self, domain):
            asked.append(domain)
            if domain == "e.test":
                return defer.fail(LinkFailed("e.test: no such domain"))
            d = pending[domain] = defer.Deferred()
            return d

    service._resolver = Resolver()
    for i, domain in enumerate(("c.test", "d.test", "e.test", "f.test")):
        stanza = _from_alice(i)
        stanza["to"] = f"x@{domain}"
        service.send(stanza, jidlib.parse(f"x@{domain}"))
    assert asked == ["c.test"] and len(service.connecting_links) == 1
    pending["c.test"].errback(LinkFailed("c.test: refused"))
    assert asked == ["c.test", "d.test"]
    pending["d.test"].errback(LinkFailed("d.test: refused"))  # e fails at once, f starts
    assert asked == ["c.test", "d.test", "e.test", "f.test"] and len(service.connecting_links) == 1
    assert sorted(e["id"] for e in alice.got) == ["s0", "s1", "s2"]  # each once
    pending["f.test"].errback(LinkFailed("f.test: refused"))
    assert not service.connecting_links and not service.links
    assert sorted(e["id"] for e in alice.got) == ["s0", "s1", "s2", "s3"]

"""Issue: server core.  The real daemon, driven by slixmpp and a raw client."""
from __future__ import annotations

import asyncio
import re

import pytest

from tests.rawclient import RawClient
from tests.xmpp import connect, login_fails, run


@pytest.mark.parametrize("mech", ["SCRAM-SHA-1", "SCRAM-SHA-256", "PLAIN"])
def test_login_with_each_mechanism(daemon, mech):
    async def go():
        c = await connect("alice@localhost/m", "alice-secret", daemon.port, mech=mech)
        assert str(c.boundjid) == "alice@localhost/m"
        c.disconnect()

    run(go())
    # One info line per login: who, from where, how authenticated.
    assert f"alice@localhost/m from 127.0.0.1: session bound, authenticated with {mech}" in daemon.logtext()


@pytest.mark.parametrize("mech", ["SCRAM-SHA-1", "PLAIN"])
def test_wrong_password_is_not_authorized(daemon, mech):
    failures = run(login_fails("alice@localhost", "wrong", daemon.port, mech=mech))
    assert failures and failures[0]["condition"] == "not-authorized"


def test_unknown_user_looks_like_wrong_password(daemon):
    failures = run(login_fails("nobody@localhost", "x", daemon.port, mech="SCRAM-SHA-256"))
    assert failures[0]["condition"] == "not-authorized"


def test_messages_to_bare_and_full_jid(daemon):
    async def go():
        a = await connect("alice@localhost/a", "alice-secret", daemon.port)
        b = await connect("bob@localhost/b", "bob-secret", daemon.port)
        a.send_message(mto="bob@localhost", mbody="to bare", mtype="chat")
        m = await b.next_message()
        assert m["body"] == "to bare" and str(m["from"]) == "alice@localhost/a"
        b.send_message(mto="alice@localhost/a", mbody="to full", mtype="chat")
        m = await a.next_message()
        assert m["body"] == "to full" and str(m["from"]) == "bob@localhost/b"
        a.disconnect()
        b.disconnect()

    run(go())


def test_message_to_highest_priority_resource(daemon):
    async def go():
        low = await connect("bob@localhost/low", "bob-secret", daemon.port, presence=False)
        high = await connect("bob@localhost/high", "bob-secret", daemon.port, presence=False)
        low.send_presence(ppriority=1)
        high.send_presence(ppriority=5)
        a = await connect("alice@localhost/p", "alice-secret", daemon.port)
        await asyncio.sleep(0.2)
        a.send_message(mto="bob@localhost", mbody="prio", mtype="chat")
        m = await high.next_message()
        assert m["body"] == "prio"
        with pytest.raises(asyncio.TimeoutError):
            await low.next_message(timeout=0.5)
        for c in (low, high, a):
            c.disconnect()

    run(go())


def test_ping_server(daemon):
    async def go():
        a = await connect("alice@localhost/ping", "alice-secret", daemon.port, plugins=["xep_0199"])
        rtt = await a.plugin["xep_0199"].ping("localhost", timeout=5)
        assert rtt >= 0
        a.disconnect()

    run(go())


def test_resource_conflict_replaces_old_session(daemon):
    async def go():
        first = await connect("alice@localhost/same", "alice-secret", daemon.port)
        closed = asyncio.get_event_loop().create_future()
        first.add_event_handler("disconnected", lambda _e: closed.done() or closed.set_result(True))
        second = await connect("alice@localhost/same", "alice-secret", daemon.port)
        await asyncio.wait_for(closed, 5)
        assert any(e["condition"] == "conflict" for e in first.stream_errors)
        assert str(second.boundjid) == "alice@localhost/same"
        b = await connect("bob@localhost/x", "bob-secret", daemon.port)
        b.send_message(mto="alice@localhost/same", mbody="still here", mtype="chat")
        assert (await second.next_message())["body"] == "still here"
        second.disconnect()
        b.disconnect()

    run(go())


def _stream_error(data: bytes) -> str:
    m = re.search(rb"<stream:error><([a-z-]+) xmlns='urn:ietf:params:xml:ns:xmpp-streams'", data)
    assert m, data
    assert data.rstrip().endswith(b"</stream:stream>"), data
    return m.group(1).decode()


def _logged_in_raw(daemon, user="alice", password="alice-secret") -> RawClient:
    c = RawClient(daemon.port)
    c.login(user, password)
    return c


def test_malformed_xml_gets_not_well_formed(daemon):
    c = _logged_in_raw(daemon)
    c.send("<message><body>x</message>")
    assert _stream_error(c.read_all()) == "not-well-formed"


def test_restricted_xml(daemon):
    c = RawClient(daemon.port)
    c.open_stream()
    c.send("<!-- hello -->")
    assert _stream_error(c.read_all()) == "restricted-xml"


def test_doctype_entity_bomb_rejected_before_expansion(daemon):
    c = RawClient(daemon.port)
    c.send("<?xml version='1.0'?><!DOCTYPE s [<!ENTITY a 'aaaaaaaaaa'><!ENTITY b '&a;&a;&a;&a;'>]>"
           "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
           "to='localhost' version='1.0'>")
    assert _stream_error(c.read_all()) == "restricted-xml"


def test_oversized_stanza_gets_policy_violation(daemon):
    c = _logged_in_raw(daemon)
    # One write, far over the 256 KiB default limit.
    c.send("<message to='bob@localhost'><body>" + "x" * 400_000 + "</body></message>")
    assert _stream_error(c.read_all()) == "policy-violation"


def test_unknown_host(daemon):
    c = RawClient(daemon.port)
    c.send("<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
           "to='example.net' version='1.0'>")
    assert _stream_error(c.read_all()) == "host-unknown"


def test_malformed_host(daemon):
    c = RawClient(daemon.port)
    c.send("<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
           "to='exa mple.com' version='1.0'>")
    assert _stream_error(c.read_all()) == "host-unknown"


def test_invalid_namespace(daemon):
    c = RawClient(daemon.port)
    c.send("<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' "
           "to='localhost' version='1.0'>")
    assert _stream_error(c.read_all()) == "invalid-namespace"


def test_unsupported_version(daemon):
    c = RawClient(daemon.port)
    c.send("<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
           "to='localhost' version='2.0'>")
    assert _stream_error(c.read_all()) == "unsupported-version"


def test_tls_is_required_and_plain_not_offered_before_tls(daemon):
    c = RawClient(daemon.port)
    features = c.open_stream()
    assert b"<required/>" in features and b"PLAIN" not in features
    c.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGFsaWNlAGFsaWNlLXNlY3JldA==</auth>")
    assert _stream_error(c.read_all()) == "policy-violation"


def test_starttls_injection_is_discarded(daemon):
    c = RawClient(daemon.port)
    c.open_stream()
    # Plaintext pipelined behind <starttls/> must not survive the handshake.
    c.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
           "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGFsaWNlAGFsaWNlLXNlY3JldA==</auth>")
    c.read_until(b"<proceed[^>]*/>")
    import ssl
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
    c.buffer = b""
    features = c.open_stream()
    assert b"<mechanisms" in features
    assert b"<success" not in features and b"<failure" not in features


def test_too_many_auth_failures_close_the_connection(daemon):
    c = RawClient(daemon.port)
    c.open_stream()
    c.starttls()
    c.open_stream()
    for _ in range(2):
        assert b"not-authorized" in c.auth_plain("alice", "bad")
    c.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGFsaWNlAGJhZA==</auth>")
    data = c.read_all()
    assert b"not-authorized" in data
    assert _stream_error(data[data.index(b"<stream:error"):]) == "policy-violation"


def test_forged_from_is_rejected(daemon):
    c = _logged_in_raw(daemon)
    c.send("<message from='bob@localhost/x' to='alice@localhost'><body>forged</body></message>")
    assert _stream_error(c.read_all()) == "invalid-from"


def test_unknown_iq_namespace_and_unknown_user(daemon):
    c = _logged_in_raw(daemon)
    c.send("<iq type='get' id='u1' to='localhost'><query xmlns='urn:example:nothing'/></iq>")
    assert b"service-unavailable" in c.read_until(b"</iq>")
    c.send("<message to='nobody@localhost' id='m1'><body>hi</body></message>")
    reply = c.read_until(b"</message>")
    assert b"type='error'" in reply and b"service-unavailable" in reply
    c.send("<message to='bad@@localhost' id='m2'><body>hi</body></message>")
    assert b"jid-malformed" in c.read_until(b"</message>")
    c.send("<message to='someone@remote.example' id='m3'><body>hi</body></message>")
    assert b"remote-server-not-found" in c.read_until(b"</message>")


def test_session_iq_for_old_clients(daemon):
    c = _logged_in_raw(daemon)
    c.send("<iq type='set' id='s1'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>")
    assert b"type='result'" in c.read_until(b"/>|</iq>")


def test_server_generated_resource(daemon):
    c = RawClient(daemon.port)
    c.open_stream()
    c.starttls()
    c.open_stream()
    c.auth_plain("bob", "bob-secret")
    c.open_stream()
    c.send("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
    reply = c.read_until(b"</iq>").decode()
    assert re.search(r"<jid>bob@localhost/[0-9a-f]{16}</jid>", reply)

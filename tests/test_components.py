"""Issue 13: wokkel handlers in process, handlers on a served host, external components (XEP-0114).

One daemon serves every kind of component over real TCP; slixmpp users reach
them, raw sockets play external components where exact wire data matters, and
the example external component (examples/external.py, wokkel's unmodified
``Component``) connects as a separate process.
"""
from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from tests.daemon import REPO, Daemon, free_port
from tests.rawclient import RawClient, RawComponent
from tests.xmpp import connect, run

PW = "pw-secret"
USERS = ("alice@localhost", "bob@localhost", "carol@localhost", "dave@localhost")
# "version" is left out: the served host's version answer comes from a wokkel handler.
PLUGINS = ("roster", "presence", "disco", "ping", "offline", "vcard", "urn:xmpp:blocking")


def components_config(cport: int) -> str:
    return f"""
        [components]
        listen = ["tcp:{cport}:interface=127.0.0.1"]

        [components."echo.localhost"]
        name = "Echo bot"
        handlers = [
            "tests.component_handlers:Crashy",
            "examples.echo:EchoBot",
            "wokkel.ping:PingHandler",
            "wokkel.disco:DiscoHandler",
            {{factory = "wokkel.generic:VersionHandler", args = ["Echo bot", "1.0"]}},
            "wokkel.generic:FallbackHandler",
        ]

        [components."pubsub.localhost"]
        name = "Tiny pubsub"
        handlers = ["examples.pubsub:service", "wokkel.disco:DiscoHandler"]

        [components."localhost"]
        handlers = [{{factory = "wokkel.generic:VersionHandler", args = ["xmppd-ext", "9.9"]}}]

        [components."gw.localhost"]
        name = "Raw gateway"
        secret = "gw-secret"

        [components."wecho.localhost"]
        secret_file = "wecho.secret"

        [components."private.localhost"]
        secret = "private-secret"
        public = false
        """


@pytest.fixture(scope="module")
def cd(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("components")
    cport = free_port()
    secret = tmp / "wecho.secret"
    secret.write_text("wecho-secret\n")
    secret.chmod(0o600)
    d = Daemon(tmp, plugins=PLUGINS, extra=components_config(cport))
    d.cport = cport
    d.start()
    for u in USERS:
        d.adduser(u, PW)
    yield d
    d.stop()


def raw(d, user: str, resource: str = "raw") -> RawClient:
    c = RawClient(d.port)
    c.login(user.split("@")[0], PW, resource)
    return c


def component(d, domain: str = "gw.localhost", secret: str = "gw-secret") -> RawComponent:
    c = RawComponent(d.cport, timeout=5)
    answer = c.handshake(domain, secret)
    assert answer.endswith(b"<handshake/>"), answer
    return c


# -- in process ----------------------------------------------------------------


def test_users_reach_echo_and_unmodified_wokkel_handlers(cd):
    async def go():
        alice = await connect("alice@localhost", PW, cd.port,
                              plugins=("xep_0030", "xep_0092", "xep_0199"))
        try:
            alice.send_message(mto="echo.localhost", mbody="hello echo", mtype="chat")
            reply = await alice.next_message()
            assert reply["from"] == "echo.localhost" and reply["body"] == "hello echo"
            await alice.plugin["xep_0199"].send_ping("echo.localhost", timeout=5)
            version = await alice.plugin["xep_0092"].get_version("echo.localhost", timeout=5)
            assert version["software_version"]["name"] == "Echo bot"
            assert version["software_version"]["version"] == "1.0"
            info = await alice.plugin["xep_0030"].get_info("echo.localhost", timeout=5)
            features = info["disco_info"]["features"]
            assert "urn:xmpp:ping" in features and "jabber:iq:version" in features
            assert ("component", "generic", None, "Echo bot") in info["disco_info"]["identities"]
            # FallbackHandler: an IQ nobody serves is answered, once.
            iq = alice.make_iq_get(queryxmlns="urn:test:nothing", ito="echo.localhost")
            with pytest.raises(Exception) as e:
                await iq.send(timeout=5)
            assert e.value.condition == "service-unavailable"
        finally:
            alice.disconnect()

    run(go())


def test_pubsub_service_publish_subscribe_notify(cd):
    async def go():
        alice = await connect("alice@localhost", PW, cd.port, plugins=("xep_0060",))
        bob = await connect("bob@localhost", PW, cd.port, plugins=("xep_0060",))
        events: asyncio.Queue = asyncio.Queue()
        alice.add_event_handler("pubsub_publish", events.put_nowait)
        try:
            item = ET.fromstring("<entry xmlns='urn:test:news'>first</entry>")
            await bob.plugin["xep_0060"].publish("pubsub.localhost", "news", id="1",
                                                 payload=item, timeout=5)
            await alice.plugin["xep_0060"].subscribe("pubsub.localhost", "news", bare=False,
                                                     timeout=5)
            item = ET.fromstring("<entry xmlns='urn:test:news'>second</entry>")
            await bob.plugin["xep_0060"].publish("pubsub.localhost", "news", id="2",
                                                 payload=item, timeout=5)
            msg = await asyncio.wait_for(events.get(), 5)
            assert msg["from"] == "pubsub.localhost"
            published = msg["pubsub_event"]["items"]["item"]
            assert published["id"] == "2"
            assert "second" in ET.tostring(published.xml, encoding="unicode")
        finally:
            alice.disconnect()
            bob.disconnect()

    run(go())


def test_server_disco_and_handlers_on_the_served_host(cd):
    c = raw(cd, "dave@localhost")
    try:
        items = c.iq("<iq type='get' id='it' to='localhost'>"
                     "<query xmlns='http://jabber.org/protocol/disco#items'/></iq>", "it")
        assert "<item jid='echo.localhost' name='Echo bot'/>" in items
        assert "<item jid='pubsub.localhost' name='Tiny pubsub'/>" in items
        assert "<item jid='gw.localhost' name='Raw gateway'/>" in items
        assert "jid='private.localhost'" in items  # local users see private ones too
        info = c.iq("<iq type='get' id='in' to='localhost'>"
                    "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>", "in")
        assert "<feature var='jabber:iq:version'/>" in info  # from the wokkel handler
        version = c.iq("<iq type='get' id='v' to='localhost'>"
                       "<query xmlns='jabber:iq:version'/></iq>", "v")
        assert "type='result'" in version and "<name>xmppd-ext</name>" in version
        # An IQ neither a plugin nor a handler serves: service-unavailable, once.
        none = c.iq("<iq type='get' id='n' to='localhost'><q xmlns='urn:test:none'/></iq>", "n")
        assert "<service-unavailable" in none
        c.send("<iq type='get' id='p' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
        assert "id='n'" not in c.read_until("id='p'[^>]*/>").decode()
    finally:
        c.close()


def test_failing_handler_gets_internal_server_error_and_server_goes_on(cd):
    c = raw(cd, "dave@localhost", "crash")
    try:
        reply = c.iq("<iq type='get' id='c1' to='echo.localhost'>"
                     "<crash xmlns='urn:test:crash'/></iq>", "c1")
        assert "type='error'" in reply and "<internal-server-error" in reply
        c.send("<message to='echo.localhost' id='m1' type='chat'><body>crash</body></message>")
        error = c.read_until("<message[^>]*type='error'.*?</message>").decode()
        assert "<internal-server-error" in error and "id='m1'" in error
        # The same handlers keep serving.
        ping = c.iq("<iq type='get' id='c2' to='echo.localhost'>"
                    "<ping xmlns='urn:xmpp:ping'/></iq>", "c2")
        assert "type='result'" in ping
    finally:
        c.close()
    log = cd.logtext()
    assert "components.\"echo.localhost\": handler Crashy.onCrash failed" in log


def test_in_process_handler_cannot_forge_from(cd):
    c = raw(cd, "dave@localhost", "forge")
    try:
        c.send("<message to='echo.localhost' id='f1' type='chat'><body>forge</body></message>")
        c.send("<message to='echo.localhost' id='f2' type='chat'><body>after</body></message>")
        got = c.read_until("<body>after</body></message>").decode()
        assert "forged" not in got
    finally:
        c.close()
    assert "a handler sent a stanza from 'alice@localhost', not from echo.localhost" in cd.logtext()


# -- external (XEP-0114) --------------------------------------------------------


def test_wokkel_component_connects_with_right_secret_and_is_refused_with_wrong(cd):
    env = cd.env()
    script = [sys.executable, "-m", "examples.external", "--domain", "wecho.localhost",
              "--port", str(cd.cport)]
    wrong = subprocess.run(script + ["--secret", "not-the-secret"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=20)
    assert wrong.returncode == 1 and "not-authorized" in wrong.stdout, wrong.stdout + wrong.stderr
    proc = subprocess.Popen(script + ["--secret-file", str(cd.dir / "wecho.secret")], env=env,
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout.readline().strip() == "connected"

        async def go():
            alice = await connect("alice@localhost", PW, cd.port,
                                  plugins=("xep_0092", "xep_0199"))
            try:
                alice.send_message(mto="wecho.localhost", mbody="over 0114", mtype="chat")
                reply = await alice.next_message()
                assert reply["from"] == "wecho.localhost" and reply["body"] == "over 0114"
                await alice.plugin["xep_0199"].send_ping("wecho.localhost", timeout=5)
                version = await alice.plugin["xep_0092"].get_version("wecho.localhost", timeout=5)
                assert version["software_version"]["name"] == "Echo bot"
            finally:
                alice.disconnect()

        run(go())
    finally:
        proc.terminate()
        proc.wait(10)
    assert "component wecho.localhost from 127.0.0.1: wrong secret" in cd.logtext()


def test_external_component_stream_errors(cd):
    c = RawComponent(cd.cport, timeout=5)
    c.open_component_stream("unknown.localhost")
    assert b"<host-unknown" in c.read_all()
    c = RawComponent(cd.cport, timeout=5)
    assert b"<not-authorized" in c.handshake("gw.localhost", "wrong")
    c = RawComponent(cd.cport, timeout=5)
    c.open_component_stream("gw.localhost")
    c.send("<message to='alice@localhost'><body>before handshake</body></message>")
    assert b"<not-authorized" in c.read_all()
    first = component(cd)
    try:
        second = RawComponent(cd.cport, timeout=5)
        assert b"<conflict" in second.handshake("gw.localhost", "gw-secret")
        # The first one stays connected.
        first.send("<iq type='get' id='p1' from='gw.localhost' to='localhost'>"
                   "<ping xmlns='urn:xmpp:ping'/></iq>")
        assert b"type='result'" in first.read_until(b"id='p1'[^>]*/>")
        # Forging another domain ends the stream.
        first.send("<message from='alice@localhost' to='bob@localhost'><body>x</body></message>")
        assert b"<invalid-from" in first.read_all()
    finally:
        first.close()
    c = RawComponent(cd.cport, timeout=5)
    c.handshake("gw.localhost", "gw-secret")
    big = "x" * (300 * 1024)
    c.send(f"<message to='alice@localhost'><body>{big}</body></message>")
    assert b"<policy-violation" in c.read_all()


def test_external_component_traffic_and_down_component_bounces(cd):
    alice = raw(cd, "alice@localhost", "gwtest")
    try:
        # Nobody connected: service-unavailable, nothing queued.
        reply = alice.iq("<iq type='get' id='d1' to='gw.localhost'>"
                         "<ping xmlns='urn:xmpp:ping'/></iq>", "d1")
        assert "<service-unavailable" in reply
        gw = component(cd)
        try:
            alice.send("<message to='user@gw.localhost' id='u1' type='chat'><body>hi gw</body></message>")
            got = gw.read_until(b"</message>").decode()
            assert "from='alice@localhost/gwtest'" in got and "<body>hi gw</body>" in got
            gw.send("<message from='user@gw.localhost' to='alice@localhost/gwtest' type='chat'>"
                    "<body>hi alice</body></message>")
            back = alice.read_until("</message>").decode()
            assert "from='user@gw.localhost'" in back and "<body>hi alice</body>" in back
        finally:
            closed = cd.logtext().count("component gw.localhost from 127.0.0.1: disconnected")
            gw.close()
        # Once the server has seen the close (a stanza already on its way to
        # the old stream is lost with it, as with any TCP peer):
        deadline = time.monotonic() + 10
        while cd.logtext().count("component gw.localhost from 127.0.0.1: disconnected") == closed:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        reply = alice.iq("<iq type='get' id='d2' to='gw.localhost'>"
                         "<ping xmlns='urn:xmpp:ping'/></iq>", "d2")
        assert "<service-unavailable" in reply
    finally:
        alice.close()


def test_user_blocks_component_domain_both_ways(cd):
    carol = raw(cd, "carol@localhost", "block")
    gw = component(cd)
    try:
        r = carol.iq("<iq type='set' id='b1'><block xmlns='urn:xmpp:blocking'>"
                     "<item jid='gw.localhost'/><item jid='echo.localhost'/></block></iq>", "b1")
        assert "type='result'" in r
        # carol -> components: refused by her own blocklist.
        carol.send("<message to='echo.localhost' id='e1' type='chat'><body>hi</body></message>")
        error = carol.read_until("<message[^>]*id='e1'.*?</message>").decode()
        assert "type='error'" in error and "urn:xmpp:blocking:errors" in error
        carol.send("<message to='x@gw.localhost' id='g1' type='chat'><body>hi</body></message>")
        error = carol.read_until("<message[^>]*id='g1'.*?</message>").decode()
        assert "type='error'" in error and "urn:xmpp:blocking:errors" in error
        # component -> carol: not delivered; the component gets the error.
        gw.send("<message from='x@gw.localhost' to='carol@localhost/block' id='g2' type='chat'>"
                "<body>spam</body></message>")
        bounce = gw.read_until(b"</message>").decode()
        assert "id='g2'" in bounce and "type='error'" in bounce
        gw.send("<iq type='get' id='g3' from='gw.localhost' to='localhost'>"
                "<ping xmlns='urn:xmpp:ping'/></iq>")
        gw.read_until(b"id='g3'")
        r = carol.iq("<iq type='set' id='b2'><unblock xmlns='urn:xmpp:blocking'/></iq>", "b2")
        assert "spam" not in r
        # Unblocked: traffic flows again.
        gw.send("<message from='x@gw.localhost' to='carol@localhost/block' id='g4' type='chat'>"
                "<body>welcome back</body></message>")
        assert "welcome back" in carol.read_until("welcome back</body></message>").decode()
    finally:
        carol.close()
        gw.close()


# -- start-up --------------------------------------------------------------------


@pytest.mark.parametrize("extra, expected", [
    ('[components."x.localhost"]\nhandlers = ["nope.missing:Factory"]\n',
     "components.\"x.localhost\".handlers = 'nope.missing:Factory': cannot import it "
     "(ModuleNotFoundError: No module named 'nope')"),
    ('[components."x.localhost"]\nhandlers = ["tests.component_handlers:BadInit"]\n',
     "components.\"x.localhost\".handlers = 'tests.component_handlers:BadInit': "
     "connectionInitialized failed (RuntimeError: no backend (test))"),
    ('[components."x.localhost"]\nhandlers = ["tests.component_handlers:not_a_handler"]\n',
     "returned object, not a wokkel XMPPHandler"),
    ('[components."x.localhost"]\nname = "no way in"\n',
     "components.\"x.localhost\" = '[...]': needs handlers (in process) or secret / "
     "secret_file (external, XEP-0114)"),
    ('[components."x.localhost"]\nsecret_file = "missing.secret"\n',
     "components.\"x.localhost\".secret_file = 'missing.secret': cannot read it: "
     "No such file or directory"),
])
def test_broken_component_config_stops_startup_with_one_line(tmp_path, extra, expected):
    d = Daemon(tmp_path, extra=extra).start(wait=False)
    try:
        assert d.proc.wait(30) == 1
    finally:
        d.stop()
    lines = [l for l in d.logtext().splitlines() if l.startswith("xmppd: ")]
    assert len(lines) == 1 and expected in lines[0], d.logtext()[-1500:]


def test_unknown_plugin_is_named_at_startup(tmp_path):
    d = Daemon(tmp_path, plugins=("roster", "no-such-plugin")).start(wait=False)
    try:
        assert d.proc.wait(30) == 1
    finally:
        d.stop()
    assert re.search(r"xmppd: .*: sm\.plugins = 'no-such-plugin': unknown plugin; known: .*roster",
                     d.logtext())


def test_presence_subscription_and_probe_reach_an_external_component(cd):
    gw = component(cd)
    bob = raw(cd, "bob@localhost", "pres")
    try:
        bob.send("<presence/>")
        bob.send("<presence to='contact@gw.localhost' type='subscribe'/>")
        got = gw.read_until(b"<presence[^>]*type='subscribe'[^>]*/>").decode()
        assert "from='bob@localhost'" in got
        gw.send("<presence from='contact@gw.localhost' to='bob@localhost' type='subscribed'/>")
        got = bob.read_until("<presence[^>]*type='subscribed'[^>]*/>").decode()
        assert "from='contact@gw.localhost'" in got
        # Subscribed to the contact: bob's next login probes it (the gateway answers for it).
        again = raw(cd, "bob@localhost", "pres2")
        try:
            again.send("<presence/>")
            probe = gw.read_until(b"<presence[^>]*type='probe'[^>]*/>").decode()
            assert "to='contact@gw.localhost'" in probe
        finally:
            again.close()
    finally:
        bob.close()
        gw.close()

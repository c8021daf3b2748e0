"""Issue: domain-based packet filtering (plugin ``domain-filter``).

Two parts: in-process tests of the filter in the router chain (every policy,
both directions, including a sender on a remote domain, which cannot reach
the daemon without s2s), then the real daemon with two vhosts and slixmpp
clients, where an administrator sets the policy by ad-hoc command on a live
session and every policy is checked both ways against a user of the same
vhost, a user of the other vhost and a remote-looking domain.
"""
from __future__ import annotations

import asyncio
import textwrap
import time
import tomllib

import pytest
from twisted.internet import task
from twisted.words.xish import domish

from tests.daemon import Daemon
from tests.test_adhoc import ADMIN_NS, XMPPD_NS, command, error_of, set_filter
from tests.xmpp import connect, run
from xmppd import config as configlib
from xmppd import filtering
from xmppd import jid as jidlib
from xmppd.handlers.domainfilter import DomainFilterPlugin
from xmppd.router import DROP, Router
from xmppd.stanzas import NS_CLIENT, StanzaError
from xmppd.storage import MemoryStore

HOSTS = ("a.test", "b.test")
J = jidlib.parse


# -- in-process: the filter in the chain --------------------------------------------


class FakeServer:
    def __init__(self, toml: str = "", hosts=HOSTS) -> None:
        data = tomllib.loads(f"[server]\nhosts = {list(hosts)!r}\n" + textwrap.dedent(toml))
        self.config = configlib.from_dict(data, "test.toml")
        self.router = Router(self.config.hosts)
        self.store = CountingStore()
        self.clock = task.Clock()
        self.plugins = []

    def plugin(self, name):
        return next((p for p in self.plugins if p.name == name), None)


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def get(self, *a, **kw):
        self.reads += 1
        return super().get(*a, **kw)


class FakeSession:
    def __init__(self, jid: str) -> None:
        self.jid = J(jid)
        self.available, self.priority, self.state = True, 0, {}
        self.sent = []

    def send(self, el):
        self.sent.append(el)

    def send_bytes(self, data):
        self.sent.append(data)


def make_plugin(toml: str = "") -> tuple[FakeServer, DomainFilterPlugin]:
    server = FakeServer(toml)
    plugin = DomainFilterPlugin()
    plugin.attach(server)
    server.plugins.append(plugin)
    return server, plugin


def stanza(name: str, kind: str | None = None) -> domish.Element:
    el = domish.Element((NS_CLIENT, name))
    if kind:
        el["type"] = kind
    return el


def verdict(plugin, sender: str, to: str, name="message", kind=None):
    return plugin.router.filters[0].check(stanza(name, kind), J(sender), J(to))


# (policy, domains, rules) -> which of the peers the user a1@a.test may talk to
PEERS = ("a2@a.test", "b1@b.test", "x@remote.example", "y@sub.remote.example")
MATRIX = [
    ("ALL", (), (), (True, True, True, True)),
    ("LOCAL", (), (), (True, True, False, False)),
    ("OWN", (), (), (True, False, False, False)),
    ("BLOCK", (), (), (False, False, False, False)),
    ("LIST", ("b.test", "*.remote.example"), (), (False, True, False, True)),
    ("BLACKLIST", ("b.test", "remote.example"), (), (True, False, False, True)),
    ("CUSTOM", (), ("deny jid:b1@b.test", "allow remote.example", "allow local", "deny *"),
     (True, False, True, False)),
    ("CUSTOM", (), ("allow *.remote.example", "deny own"), (False, True, True, True)),
]


@pytest.mark.parametrize("policy,domains,rules,allowed", MATRIX)
def test_every_policy_both_directions_in_the_chain(policy, domains, rules, allowed):
    server, plugin = make_plugin()
    plugin.set_filter(J("a1@a.test"), filtering.Policy(policy, domains, rules, HOSTS))
    for peer, ok in zip(PEERS, allowed):
        out = verdict(plugin, "a1@a.test/r", peer)
        inbound = verdict(plugin, peer + "/r", "a1@a.test")
        if ok:
            assert out is None and inbound is None, (policy, peer)
            continue
        # outbound: policy-violation naming the domain filter
        assert isinstance(out, StanzaError) and out.condition == "policy-violation", (policy, peer)
        assert out.type == "modify" and "domain filter" in out.text and J(peer).host in out.text
        # inbound: service-unavailable, revealing nothing
        assert isinstance(inbound, StanzaError) and inbound.condition == "service-unavailable"
        assert inbound.text is None
        # IQ get/set bounce the same way; presence, results and errors are dropped
        assert verdict(plugin, "a1@a.test/r", peer, "iq", "get").condition == "policy-violation"
        assert verdict(plugin, peer + "/r", "a1@a.test/r", "iq", "set").condition == "service-unavailable"
        for name, kind in (("presence", None), ("presence", "subscribe"), ("presence", "probe"),
                           ("iq", "result"), ("iq", "error"), ("message", "error")):
            assert verdict(plugin, "a1@a.test/r", peer, name, kind) is DROP, (name, kind)
            assert verdict(plugin, peer + "/r", "a1@a.test", name, kind) is DROP, (name, kind)


def test_own_server_and_own_account_always_reachable():
    server, plugin = make_plugin()
    plugin.set_filter(J("a1@a.test"), filtering.Policy("BLOCK"))
    assert verdict(plugin, "a1@a.test/r", "a.test", "iq", "get") is None
    assert verdict(plugin, "a1@a.test/r", "a1@a.test/other") is None
    assert verdict(plugin, "a1@a.test/r", "a1@a.test") is None
    assert verdict(plugin, "a.test", "a1@a.test/r") is None
    # Another vhost's server and a resource of the own domain are not "own server".
    assert verdict(plugin, "a1@a.test/r", "b.test", "iq", "get").condition == "policy-violation"
    assert verdict(plugin, "a1@a.test/r", "a.test/res", "iq", "get").condition == "policy-violation"


def test_users_with_own_filters_meet():
    server, plugin = make_plugin()
    plugin.set_filter(J("b1@b.test"), filtering.Policy("OWN"))
    # a1 (ALL) may send, but b1's filter refuses inbound, and b1's outbound too.
    assert verdict(plugin, "a1@a.test/r", "b1@b.test").condition == "service-unavailable"
    assert verdict(plugin, "b1@b.test/r", "a1@a.test").condition == "policy-violation"


def test_server_and_vhost_defaults_from_config():
    server, plugin = make_plugin("""
        [domain-filter]
        default = "BLACKLIST"
        domains = ["spam.example"]

        [hosts."b.test".domain-filter]
        default = "LOCAL"
    """)
    assert plugin.default_for("a.test").describe() == "BLACKLIST spam.example"
    assert plugin.default_for("b.test").describe() == "LOCAL"
    assert verdict(plugin, "a1@a.test/r", "x@spam.example").condition == "policy-violation"
    assert verdict(plugin, "a1@a.test/r", "x@remote.example") is None
    assert verdict(plugin, "b1@b.test/r", "x@remote.example").condition == "policy-violation"
    assert verdict(plugin, "x@remote.example/r", "b1@b.test").condition == "service-unavailable"
    # A user setting overrides both; DEFAULT (None) goes back to the vhost's.
    plugin.set_filter(J("b1@b.test"), filtering.Policy("ALL"))
    assert verdict(plugin, "b1@b.test/r", "x@remote.example") is None
    plugin.set_filter(J("b1@b.test"), None)
    assert verdict(plugin, "b1@b.test/r", "x@remote.example").condition == "policy-violation"


def test_vhost_table_inherits_unset_keys():
    server, plugin = make_plugin("""
        [domain-filter]
        default = "LIST"
        domains = ["a.test"]
        [hosts."b.test".domain-filter]
        domains = ["b.test"]
    """)
    assert plugin.default_for("b.test").describe() == "LIST b.test"


@pytest.mark.parametrize("toml,key", [
    ('[domain-filter]\ndefault = "SOME"\n', "domain-filter.default"),
    ('[domain-filter]\ndefault = "LIST"\ndomains = ["bad domain"]\n', "domain-filter.domains"),
    ('[domain-filter]\ndefault = "CUSTOM"\nrules = ["permit x.org"]\n', "domain-filter.rules"),
    ('[domain-filter]\ndefault = "OWN"\ndomains = ["x.org"]\n', "domain-filter.default"),
    ('[domain-filter]\ndefualt = "ALL"\n', "domain-filter.defualt"),
    ('[hosts."a.test".domain-filter]\ndefault = 3\n', 'hosts."a.test".domain-filter.default'),
])
def test_config_errors_name_file_and_key(toml, key):
    with pytest.raises(configlib.ConfigError) as e:
        make_plugin(toml)
    assert str(e.value).startswith(f"test.toml: {key} = ")


def test_rule_syntax():
    assert filtering.parse_rule("allow example.org") == (True, "domain", "example.org")
    assert filtering.parse_rule("DENY *.Spam.Example") == (False, "suffix", "spam.example")
    assert filtering.parse_rule("allow jid:Boss@X.org") == (True, "bare", "boss@x.org")
    assert filtering.parse_rule("allow jid:bot@x.org/r1") == (True, "full", "bot@x.org/r1")
    assert filtering.parse_rule("deny all") == (False, "any", "*")
    assert filtering.parse_rule("allow local") == (True, "local", "local")
    for bad in ("allow", "maybe x.org", "allow a b", "allow jid:@x", "deny bad..domain"):
        with pytest.raises(filtering.FilterError):
            filtering.parse_rule(bad)
    # first match wins, whatever the kind of target
    rules = filtering.RuleList(map(filtering.parse_rule, [
        "allow jid:vip@spam.example", "deny *.spam.example", "deny spam.example", "allow *"]))
    hosts = frozenset(HOSTS)
    assert rules.allows("a.test", J("vip@spam.example/x"), hosts)
    assert not rules.allows("a.test", J("other@spam.example"), hosts)
    assert not rules.allows("a.test", J("u@deep.sub.spam.example"), hosts)
    assert rules.allows("a.test", J("u@fine.example"), hosts)
    # no rule matches: allowed
    assert filtering.RuleList([filtering.parse_rule("deny x.org")]).allows("a.test", J("u@y.org"), hosts)


def test_online_users_cost_no_store_reads_and_offline_users_are_cached():
    server, plugin = make_plugin()
    plugin.set_filter(J("a1@a.test"), filtering.Policy("OWN"))
    a1, b1 = FakeSession("a1@a.test/r"), FakeSession("b1@b.test/r")
    server.router.bind(a1)
    server.router.bind(b1)
    before = server.store.reads
    for _ in range(1000):
        assert verdict(plugin, "a1@a.test/r", "b1@b.test/r").condition == "policy-violation"
        assert verdict(plugin, "b1@b.test/r", "a1@a.test/r").condition == "service-unavailable"
    assert server.store.reads == before
    # an offline local recipient: one store read, then the cache
    server.router.unbind(a1)
    assert "a1@a.test" not in plugin.online
    plugin._offline.clear()
    before = server.store.reads
    for _ in range(100):
        assert verdict(plugin, "b1@b.test/r", "a1@a.test").condition == "service-unavailable"
    assert server.store.reads == before + 1
    # a change invalidates the cache at once
    plugin.set_filter(J("a1@a.test"), None)
    assert verdict(plugin, "b1@b.test/r", "a1@a.test") is None


def test_live_session_sees_changes_and_ctl_changes_are_polled():
    server, plugin = make_plugin("[domain-filter]\npoll_interval = 1.0\n")
    a1 = FakeSession("a1@a.test/r")
    server.router.bind(a1)
    assert verdict(plugin, "a1@a.test/r", "b1@b.test") is None
    plugin.set_filter(J("a1@a.test"), filtering.Policy("OWN"))
    assert verdict(plugin, "a1@a.test/r", "b1@b.test").condition == "policy-violation"
    # what xmppctl does (another process): store + change record; the poll applies it
    filtering.save_setting(server.store, "a1@a.test", filtering.Policy("ALL"), notify=True)
    assert verdict(plugin, "a1@a.test/r", "b1@b.test").condition == "policy-violation"
    server.clock.advance(1.0)
    assert verdict(plugin, "a1@a.test/r", "b1@b.test") is None


def test_unusable_stored_setting_falls_back_to_default():
    server, plugin = make_plugin('[domain-filter]\ndefault = "LOCAL"\n')
    server.store.put(filtering.STORE, "a1@a.test", filtering.KEY, {"policy": "NOPE"})
    # (load returns a Deferred; the embedded store has fired it)
    assert plugin.policy_of(J("a1@a.test")).name == "LOCAL"


# -- the real daemon -----------------------------------------------------------------

PW = "secret-pw"
USERS = ("a1@a.test", "a2@a.test", "admin@a.test", "b1@b.test", "b2@b.test")


@pytest.fixture(scope="module")
def fd(tmp_path_factory):
    yield from filter_daemon(tmp_path_factory.mktemp("dfilter"))


def filter_daemon(tmp, store: str = "sqlite"):
    """The module's daemon and accounts (also on PostgreSQL: tests/test_store_async.py)."""
    d = Daemon(tmp, hosts=HOSTS, store=store,
               plugins=["roster", "presence", "disco", "ping", "offline",
                        "urn:xmpp:blocking", "domain-filter", "adhoc"],
               extra="""
                   [domain-filter]
                   default = "BLACKLIST"
                   domains = ["blocked.example"]
                   poll_interval = 0.2

                   [hosts."b.test".domain-filter]
                   domains = ["spam.example"]
               """)
    text = d.config_path.read_text()
    d.config_path.write_text(text.replace("[server]\n", '[server]\nadmins = ["admin@a.test"]\n', 1))
    d.start()
    for u in USERS:
        d.adduser(u, PW)
    yield d
    d.stop()


async def login(fd, jid: str):
    c = await connect(jid, PW, fd.port, plugins=["xep_0199", "xep_0030", "xep_0004", "xep_0050"])
    c.errors = asyncio.Queue()
    c.add_event_handler("message_error", lambda m: c.errors.put_nowait(m))
    return c


async def sync(*clients):
    """Round trips to the own server: everything sent before has been routed and read."""
    for c in clients:
        await c.plugin["xep_0199"].ping(c.boundjid.domain, timeout=5)


async def next_error(client, timeout=5.0):
    while True:
        m = await asyncio.wait_for(client.messages.get(), timeout)
        if m["type"] == "error":
            return m


async def next_normal(client, timeout=5.0):
    while True:
        m = await asyncio.wait_for(client.messages.get(), timeout)
        if m["type"] != "error":
            return m


def drain(q: asyncio.Queue) -> list:
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


async def ping_error(client, to: str):
    from slixmpp.exceptions import IqError

    try:
        await client.plugin["xep_0199"].send_ping(to, timeout=5)
    except IqError as e:
        return error_of(e.iq)
    return None


DAEMON_MATRIX = [
    # policy, values, (a2@a.test, b1@b.test, x@remote.example) allowed?
    ("ALL", [], (True, True, True)),
    ("LOCAL", [], (True, True, False)),
    ("OWN", [], (True, False, False)),
    ("BLOCK", [], (False, False, False)),
    ("LIST", ["b.test"], (False, True, False)),
    ("BLACKLIST", ["b.test"], (True, False, True)),
    ("CUSTOM", ["deny jid:b1@b.test", "allow remote.example", "allow local", "deny *"],
     (True, False, True)),
]


@pytest.mark.parametrize("policy,values,allowed", DAEMON_MATRIX, ids=[m[0] for m in DAEMON_MATRIX])
def test_policy_enforced_both_ways_on_a_live_session(fd, policy, values, allowed):
    async def go():
        res = policy.lower()
        a1 = await login(fd, f"a1@a.test/{res}")
        a2 = await login(fd, f"a2@a.test/{res}")
        b1 = await login(fd, f"b1@b.test/{res}")
        admin = await login(fd, f"admin@a.test/{res}")
        # The administrator sets the filter while a1 is online.
        done = await set_filter(admin, "a1@a.test", policy, values)
        assert done["status"] == "completed"
        assert policy in done["notes"][0][1]

        locals_ = ((a2, allowed[0]), (b1, allowed[1]))
        for peer, ok in locals_:
            pj = peer.boundjid.full
            # message, a1 -> peer
            a1.send_message(mto=pj, mbody=f"out {pj}", mtype="chat")
            if ok:
                assert (await next_normal(peer))["body"] == f"out {pj}"
            else:
                cond, etype, text = error_of(await next_error(a1))
                assert (cond, etype) == ("policy-violation", "modify"), (policy, pj)
                assert "domain filter" in text and peer.boundjid.domain in text
            # message, peer -> a1
            peer.send_message(mto=a1.boundjid.full, mbody=f"in {pj}", mtype="chat")
            if ok:
                assert (await next_normal(a1))["body"] == f"in {pj}"
            else:
                assert error_of(await next_error(peer))[0] == "service-unavailable"
            # IQ both ways
            out = await ping_error(a1, pj)
            inbound = await ping_error(peer, a1.boundjid.full)
            if ok:
                assert out is None and inbound is None
            else:
                assert out[:2] == ("policy-violation", "modify") and "domain filter" in out[2]
                assert inbound[0] == "service-unavailable"
            # directed presence both ways: delivered, or silently dropped
            drain(a1.presences), drain(peer.presences)
            a1.send_presence(pto=pj, pstatus="out")
            peer.send_presence(pto=a1.boundjid.full, pstatus="in")
            await sync(a1, peer)
            await sync(a1, peer)
            got_peer = [p for p in drain(peer.presences) if p["status"] == "out"]
            got_a1 = [p for p in drain(a1.presences) if p["status"] == "in"]
            assert bool(got_peer) == ok and bool(got_a1) == ok, (policy, pj)
            assert all(p["type"] != "error" for p in got_peer + got_a1)

        # the remote-looking domain (no s2s): refused by the filter, or unreachable
        ok = allowed[2]
        a1.send_message(mto="x@remote.example", mbody="remote", mtype="chat")
        cond = error_of(await next_error(a1))
        out = await ping_error(a1, "x@remote.example/r")
        if ok:
            assert cond[0] == out[0] == "remote-server-not-found"
        else:
            assert cond[:2] == out[:2] == ("policy-violation", "modify")
            assert "remote.example" in cond[2]
        drain(a1.presences)
        a1.send_presence(pto="x@remote.example", pstatus="remote")
        await sync(a1)
        bounced = [p for p in drain(a1.presences) if p["type"] == "error"]
        assert bool(bounced) == ok  # allowed: the router bounces; refused: dropped silently
        # own server and own account stay reachable whatever the policy
        assert await ping_error(a1, "a.test") is None
        a1.send_message(mto="a1@a.test", mbody="self", mtype="chat")
        assert (await next_normal(a1))["body"] == "self"
        # back to the default for the next test
        await set_filter(admin, "a1@a.test", "DEFAULT")
        for c in (a1, a2, b1, admin):
            c.disconnect()

    run(go())


def test_multi_stage_command_prefills_and_applies_immediately_and_offline(fd):
    async def go():
        a1 = await login(fd, "a1@a.test/ms")
        b1 = await login(fd, "b1@b.test/ms")
        admin = await login(fd, "admin@a.test/ms")
        node = XMPPD_NS + "#set-domain-filter"
        first = await command(admin, "a.test", node)
        assert first["status"] == "executing" and first["actions"] == ["next"]
        sid = first["sessionid"]
        second = await command(admin, "a.test", node, {"accountjid": "a1@a.test"}, sessionid=sid)
        assert second["status"] == "executing" and second["sessionid"] == sid
        fields = second["form"]["fields"]
        assert fields["policy"]["value"] == "DEFAULT"
        assert "BLACKLIST blocked.example" in second["form"]["instructions"]
        a1.send_message(mto="b1@b.test", mbody="before", mtype="chat")
        assert (await next_normal(b1))["body"] == "before"
        done = await command(admin, "a.test", node, {"policy": "OWN"}, action="complete",
                             sessionid=sid)
        assert done["status"] == "completed"
        # the live session is filtered from the next stanza on
        a1.send_message(mto="b1@b.test", mbody="after", mtype="chat")
        assert error_of(await next_error(a1))[0] == "policy-violation"
        # the form shows the stored value next time
        first = await command(admin, "a.test", node, {"accountjid": "a1@a.test"})
        assert first["form"]["fields"]["policy"]["value"] == "OWN"
        await command(admin, "a.test", node, action="cancel", sessionid=first["sessionid"])
        # offline recipient: read from the store
        a1.disconnect()
        await asyncio.sleep(0.3)
        b1.send_message(mto="a1@a.test", mbody="offline", mtype="chat")
        assert error_of(await next_error(b1))[0] == "service-unavailable"
        await set_filter(admin, "a1@a.test", "DEFAULT")
        b1.send_message(mto="a1@a.test", mbody="offline ok", mtype="chat")
        await sync(b1)
        assert not [m for m in drain(b1.messages) if m["type"] == "error"]
        # bad values are refused with not-acceptable and leave the setting alone
        bad = await command(admin, "a.test", node, {"accountjid": "a1@a.test", "policy": "LIST",
                                                   "rules": "allow x.org"}, expect_error=True)
        assert bad[0] == "not-acceptable"
        ghost = await command(admin, "a.test", node, {"accountjid": "ghost@a.test", "policy": "ALL"},
                              expect_error=True)
        assert ghost[0] == "item-not-found"
        for c in (b1, admin):
            c.disconnect()

    run(go())


def test_server_and_vhost_defaults_on_the_daemon(fd):
    async def go():
        a2 = await login(fd, "a2@a.test/def")
        b2 = await login(fd, "b2@b.test/def")
        # server-wide default: BLACKLIST blocked.example
        a2.send_message(mto="x@blocked.example", mbody="1", mtype="chat")
        assert error_of(await next_error(a2))[0] == "policy-violation"
        a2.send_message(mto="x@spam.example", mbody="2", mtype="chat")
        assert error_of(await next_error(a2))[0] == "remote-server-not-found"
        # b.test's own default replaces the list: BLACKLIST spam.example
        b2.send_message(mto="x@spam.example", mbody="3", mtype="chat")
        assert error_of(await next_error(b2))[0] == "policy-violation"
        b2.send_message(mto="x@blocked.example", mbody="4", mtype="chat")
        assert error_of(await next_error(b2))[0] == "remote-server-not-found"
        a2.disconnect()
        b2.disconnect()

    run(go())


def test_xmppctl_filter_sets_shows_and_reaches_live_sessions(fd):
    out = fd.ctl("filter", "b2@b.test").stdout
    assert out.strip() == "b2@b.test: BLACKLIST spam.example (the default)"

    async def go():
        b2 = await login(fd, "b2@b.test/ctl")
        a2 = await login(fd, "a2@a.test/ctl")
        b2.send_message(mto="a2@a.test", mbody="ok", mtype="chat")
        assert (await next_normal(a2))["body"] == "ok"
        await asyncio.to_thread(fd.ctl, "filter", "b2@b.test", "LIST", "b.test")
        deadline = time.monotonic() + 5
        while True:  # the server polls the change every 0.2 s
            b2.send_message(mto="a2@a.test", mbody="try", mtype="chat")
            await sync(b2, a2)
            errors = [m for m in drain(b2.messages) if m["type"] == "error"]
            if errors:
                assert error_of(errors[0])[0] == "policy-violation"
                break
            assert time.monotonic() < deadline, "xmppctl change not applied"
            await asyncio.sleep(0.1)
        drain(a2.messages)
        a2.send_message(mto="b2@b.test", mbody="in", mtype="chat")
        assert error_of(await next_error(a2))[0] == "service-unavailable"
        for c in (a2, b2):
            c.disconnect()

    run(go())
    assert fd.ctl("filter", "b2@b.test").stdout.strip() == "b2@b.test: LIST b.test"
    bad = fd.ctl("filter", "b2@b.test", "CUSTOM", "permit x", check=False)
    assert bad.returncode == 1
    assert bad.stderr == "xmppctl: rule 'permit x': expected 'allow TARGET' or 'deny TARGET'\n"
    bad = fd.ctl("filter", "b2@b.test", "OWN", "b.test", check=False)
    assert bad.stderr == "xmppctl: policy OWN takes neither domains nor rules\n"
    bad = fd.ctl("filter", "nobody@b.test", "ALL", check=False)
    assert bad.returncode == 1 and bad.stderr == "xmppctl: no such account nobody@b.test\n"
    out = fd.ctl("filter", "b2@b.test", "default").stdout
    assert out.strip() == "b2@b.test: BLACKLIST spam.example (the default)"
    assert "domain filter of b2@b.test changed by xmppctl" in fd.logtext()

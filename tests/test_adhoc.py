"""Issue: ad-hoc commands (XEP-0050), service administration (XEP-0133), ACLs.

The real daemon on two vhosts, driven by slixmpp's ``xep_0050`` plugin:
command discovery per requester (hidden when the ACL denies), each role of
the ACLs allowing and denying the right requesters, every command doing its
job, multi-stage sessions with cancel and the XEP-0050 error conditions.
The ACL evaluation itself is also tested in-process, including requesters
from remote domains.
"""
from __future__ import annotations

import asyncio
import tomllib

import pytest
from slixmpp.exceptions import IqError

from tests.daemon import Daemon
from tests.xmpp import connect, login_fails, run
from xmppd import acl as acllib
from xmppd import config as configlib
from xmppd import jid as jidlib

ADMIN_NS = "http://jabber.org/protocol/admin"
XMPPD_NS = "urn:xmppd:admin"
NS_COMMANDS = "http://jabber.org/protocol/commands"
NS_DATA = "jabber:x:data"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
J = jidlib.parse


def _teach_slixmpp_policy_violation() -> None:
    """slixmpp 1.17 lacks RFC 6120's <policy-violation/> in its condition table: an IQ
    error carrying it crashes its IqError (ValueError) and the request times out."""
    import slixmpp.exceptions
    import slixmpp.stanza.error

    slixmpp.exceptions._DEFAULT_ERROR_TYPES.setdefault("policy-violation", "modify")
    slixmpp.stanza.error.Error.conditions.add("policy-violation")


_teach_slixmpp_policy_violation()


# -- helpers shared with test_domainfilter ----------------------------------------------


def error_of(stanza) -> tuple[str, str, str]:
    """(condition, type, text) of an error stanza, from the raw XML."""
    err = stanza.xml.find("{jabber:client}error")
    assert err is not None, stanza
    cond, text = None, ""
    for child in err:
        ns, _, name = child.tag[1:].partition("}")
        if ns == NS_STANZAS and name == "text":
            text = child.text or ""
        elif ns == NS_STANZAS:
            cond = name
    return cond, err.get("type"), text


def _specific(stanza) -> str | None:
    err = stanza.xml.find("{jabber:client}error")
    for child in err:
        if child.tag.startswith("{%s}" % NS_COMMANDS):
            return child.tag.split("}")[1]
    return None


def _parse_form(x) -> dict:
    out = {"type": x.get("type"), "fields": {}, "instructions": "", "items": []}
    for child in x:
        name = child.tag.split("}")[1]
        if name == "instructions":
            out["instructions"] += child.text or ""
        elif name == "field":
            values = [v.text or "" for v in child.findall("{%s}value" % NS_DATA)]
            out["fields"][child.get("var")] = {
                "type": child.get("type"), "values": values,
                "value": values[0] if values else None,
                "options": [o.findtext("{%s}value" % NS_DATA) for o in child.findall("{%s}option" % NS_DATA)],
                "required": child.find("{%s}required" % NS_DATA) is not None,
            }
        elif name == "item":
            out["items"].append({f.get("var"): f.findtext("{%s}value" % NS_DATA)
                                 for f in child.findall("{%s}field" % NS_DATA)})
    return out


async def command(client, to: str, node: str, fields: dict | None = None, action: str = "execute",
                  sessionid: str | None = None, expect_error: bool = False):
    """Run one step of a command; returns the parsed <command/> (or the error triple)."""
    payload = None
    if fields is not None:
        payload = client.plugin["xep_0004"].make_form(ftype="submit")
        for var, value in fields.items():
            if isinstance(value, (list, tuple)):
                payload.add_field(var=var, ftype="text-multi", value="\n".join(value))
            else:
                payload.add_field(var=var, value=value)
    try:
        iq = await client.plugin["xep_0050"].send_command(
            to, node, action=action, payload=payload, sessionid=sessionid, timeout=10)
    except IqError as e:
        if not expect_error:
            raise AssertionError(f"{node} {action}: {error_of(e.iq)}") from None
        return error_of(e.iq) + (_specific(e.iq),)
    assert not expect_error, f"{node}: expected an error, got {iq}"
    cmd = iq.xml.find("{%s}command" % NS_COMMANDS)
    out = {"status": cmd.get("status"), "sessionid": cmd.get("sessionid"), "node": cmd.get("node"),
           "actions": [], "notes": [], "form": None}
    for child in cmd:
        name = child.tag.split("}")[1]
        if name == "actions":
            out["actions"] = [a.tag.split("}")[1] for a in child]
        elif name == "note":
            out["notes"].append((child.get("type"), child.text or ""))
        elif name == "x":
            out["form"] = _parse_form(child)
    return out


async def set_filter(admin, account: str, policy: str, values=()):
    """The administrator's one-step set-domain-filter."""
    fields = {"accountjid": account, "policy": policy}
    if policy == "CUSTOM":
        fields["rules"] = list(values)
    elif values:
        fields["domains"] = list(values)
    return await command(admin, J(account).host, XMPPD_NS + "#set-domain-filter", fields)


# -- in-process: the ACL class ----------------------------------------------------------


def acl_context():
    return acllib.AccessControl(("a.test", "b.test"), admins=("root@a.test",),
                                domain_admins={"b.test": ("boss@b.test",)})


@pytest.mark.parametrize("entries,requester,target,allowed", [
    (["ALL"], "x@remote.example/r", "a.test", True),
    (["LOCAL"], "u@b.test/r", "a.test", True),
    (["LOCAL"], "x@remote.example/r", "a.test", False),
    (["LOCAL"], "a.test", "a.test", False),  # the server itself is not a user
    (["ADMIN"], "root@a.test/r", "b.test", True),
    (["ADMIN"], "boss@b.test/r", "b.test", False),
    (["DOMAIN_ADMIN"], "boss@b.test/r", "b.test", True),
    (["DOMAIN_ADMIN"], "boss@b.test/r", "a.test", False),
    (["DOMAIN_ADMIN"], "root@a.test/r", "b.test", False),  # roles do not imply each other
    (["DOMAIN_ADMIN"], "boss@b.test/r", None, False),
    (["NONE"], "root@a.test/r", "a.test", False),
    (["none", "ADMIN"], "root@a.test/r", "a.test", True),  # case-insensitive; NONE adds nothing
    (["ops@remote.example"], "ops@remote.example/any", "a.test", True),
    (["ops@remote.example"], "dev@remote.example/any", "a.test", False),
    (["ops@remote.example/desk"], "ops@remote.example/phone", "a.test", False),
    (["ops@remote.example/desk"], "ops@remote.example/desk", "a.test", True),
    (["remote.example"], "dev@remote.example/x", "a.test", True),
    (["remote.example"], "dev@sub.remote.example/x", "a.test", False),
    ([], "root@a.test/r", "a.test", False),
])
def test_acl_roles(entries, requester, target, allowed):
    ctx = acl_context()
    ctx.configured["op"] = acllib.ACL(entries)
    assert ctx.allowed("op", J(requester), target) is allowed


def test_acl_defaults_registration_and_logging():
    ctx = acl_context()
    ctx.register("cmd", ("ADMIN",))
    assert ctx.allowed("cmd", J("root@a.test/x"))
    assert not ctx.allowed("cmd", J("u@a.test/x"))
    ctx.configured["x#cmd2"] = acllib.ACL(["LOCAL"])
    ctx.configured["x#typo"] = acllib.ACL(["LOCAL"])
    ctx.register("x#cmd2")
    assert ctx.allowed("x#cmd2", J("u@a.test/x"))
    assert ctx.unknown(("x#",)) == ["x#typo"]
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert not ctx.check("cmd", J("u@a.test/x"), "a.test")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert any(e.get("requester") == "u@a.test/x" and e.get("operation") == "cmd" for e in events)


def test_acl_from_config_and_errors():
    def cfg(text):
        return configlib.from_dict(tomllib.loads('[server]\nhosts = ["a.test", "b.test"]\n'
                                                 'admins = ["root@a.test"]\n' + text), "t.toml")

    ctx = acllib.AccessControl.from_config(cfg("""
        [hosts."b.test"]
        admins = ["Boss@b.test"]
        [acl]
        "op1" = "LOCAL"
        "op2" = ["DOMAIN_ADMIN", "ops@x.org"]
    """))
    assert ctx.allowed("op1", J("u@a.test/r"))
    assert ctx.allowed("op2", J("boss@b.test/r"), "b.test")
    assert ctx.allowed("op2", J("ops@x.org/r"), "a.test")
    assert not ctx.allowed("op2", J("root@a.test/r"), "a.test")
    with pytest.raises(configlib.ConfigError, match=r"^t.toml: acl.op = \['AD MIN'\]: .*neither a role"):
        acllib.AccessControl.from_config(cfg('[acl]\n"op" = ["AD MIN"]\n'))
    with pytest.raises(configlib.ConfigError, match=r'^t.toml: hosts."b.test".admins = .*account JID'):
        acllib.AccessControl.from_config(cfg('[hosts."b.test"]\nadmins = ["b.test"]\n'))
    with pytest.raises(configlib.ConfigError, match=r"^t.toml: acl.op = 3: must be a list of strings"):
        acllib.AccessControl.from_config(cfg('[acl]\n"op" = 3\n'))


# -- the real daemon -------------------------------------------------------------------

PW = "secret-pw"
USERS = ("admin@a.test", "u1@a.test", "dadmin@b.test", "u2@b.test")
PLUGINS = ["roster", "presence", "disco", "ping", "domain-filter", "adhoc"]
ACL_TOML = """
    [hosts."b.test"]
    admins = ["dadmin@b.test"]

    [acl]
    "http://jabber.org/protocol/admin#get-online-users-num" = ["LOCAL"]
    "http://jabber.org/protocol/admin#get-registered-users-num" = "ALL"
    "http://jabber.org/protocol/admin#add-user" = ["ADMIN", "DOMAIN_ADMIN"]
    "http://jabber.org/protocol/admin#delete-user" = ["DOMAIN_ADMIN"]
    "http://jabber.org/protocol/admin#announce" = ["ADMIN", "u1@a.test"]
    "urn:xmppd:admin#certificate-status" = ["ADMIN", "b.test"]
"""
ALL_COMMANDS = {
    ADMIN_NS + "#add-user", ADMIN_NS + "#delete-user", ADMIN_NS + "#change-user-password",
    ADMIN_NS + "#end-user-session", ADMIN_NS + "#get-online-users-list",
    ADMIN_NS + "#get-online-users-num", ADMIN_NS + "#get-registered-users-num",
    ADMIN_NS + "#announce", XMPPD_NS + "#set-domain-filter",
    XMPPD_NS + "#reload-certificates", XMPPD_NS + "#certificate-status",
}


def make_daemon(tmp, extra: str, admins=("admin@a.test",), store: str = "sqlite") -> Daemon:
    d = Daemon(tmp, hosts=("a.test", "b.test"), plugins=PLUGINS, extra=extra, store=store)
    text = d.config_path.read_text()
    admin_line = "admins = [" + ", ".join(f'"{a}"' for a in admins) + "]\n"
    d.config_path.write_text(text.replace("[server]\n", "[server]\n" + admin_line, 1))
    return d


@pytest.fixture(scope="module")
def ad(tmp_path_factory):
    yield from adhoc_daemon(tmp_path_factory.mktemp("adhoc"))


def adhoc_daemon(tmp, store: str = "sqlite"):
    """The module's daemon and accounts (also on PostgreSQL: tests/test_store_async.py)."""
    d = make_daemon(tmp, ACL_TOML, store=store).start()
    for u in USERS:
        d.adduser(u, PW)
    yield d
    d.stop()


async def login(d, jid: str, password: str = PW, presence: bool = True):
    return await connect(jid, password, d.port, presence=presence,
                         plugins=["xep_0030", "xep_0004", "xep_0050", "xep_0133", "xep_0199"])


async def listed(client, domain: str) -> set[str]:
    items = await client.plugin["xep_0050"].get_commands(domain, timeout=5)
    found = set()
    for jid, node, _name in items["disco_items"]["items"]:
        assert str(jid) == domain
        found.add(node)
    return found


def test_disco_lists_exactly_the_permitted_commands(ad):
    expected = {
        ("admin@a.test", "a.test"): ALL_COMMANDS - {ADMIN_NS + "#delete-user"},
        ("dadmin@b.test", "b.test"): {ADMIN_NS + "#add-user", ADMIN_NS + "#delete-user",
                                      ADMIN_NS + "#get-online-users-num",
                                      ADMIN_NS + "#get-registered-users-num",
                                      XMPPD_NS + "#certificate-status"},
        ("dadmin@b.test", "a.test"): {ADMIN_NS + "#get-online-users-num",
                                      ADMIN_NS + "#get-registered-users-num",
                                      XMPPD_NS + "#certificate-status"},
        ("u1@a.test", "a.test"): {ADMIN_NS + "#get-online-users-num",
                                  ADMIN_NS + "#get-registered-users-num", ADMIN_NS + "#announce"},
        ("u2@b.test", "b.test"): {ADMIN_NS + "#get-online-users-num",
                                  ADMIN_NS + "#get-registered-users-num",
                                  XMPPD_NS + "#certificate-status"},
    }

    async def go():
        clients = {}
        for (user, domain), nodes in expected.items():
            if user not in clients:
                clients[user] = await login(ad, f"{user}/disco")
            assert await listed(clients[user], domain) == nodes, (user, domain)
        # the server advertises the feature; node info only for visible commands
        admin, u1 = clients["admin@a.test"], clients["u1@a.test"]
        info = await admin.plugin["xep_0030"].get_info("a.test", timeout=5)
        assert NS_COMMANDS in info["disco_info"]["features"]
        info = await admin.plugin["xep_0030"].get_info("a.test", node=ADMIN_NS + "#add-user", timeout=5)
        assert ("automation", "command-node") in {i[:2] for i in info["disco_info"]["identities"]}
        with pytest.raises(IqError) as e:
            await u1.plugin["xep_0030"].get_info("a.test", node=ADMIN_NS + "#add-user", timeout=5)
        assert error_of(e.value.iq)[0] == "item-not-found"
        for c in clients.values():
            c.disconnect()

    run(go())


def test_denied_commands_are_forbidden_and_logged(ad):
    async def go():
        u1 = await login(ad, "u1@a.test/deny")
        dadmin = await login(ad, "dadmin@b.test/deny")
        admin = await login(ad, "admin@a.test/deny")
        # LOCAL user, ADMIN command
        assert (await command(u1, "a.test", ADMIN_NS + "#add-user", expect_error=True))[:2] == \
            ("forbidden", "auth")
        # global admin, DOMAIN_ADMIN-only command
        err = await command(admin, "a.test", ADMIN_NS + "#delete-user", expect_error=True)
        assert err[0] == "forbidden"
        # domain admin: allowed on b.test, but not for an account of a.test (checked at submit)
        err = await command(dadmin, "b.test", ADMIN_NS + "#add-user",
                            {"accountjid": "intruder@a.test", "password": "x", "password-verify": "x"},
                            expect_error=True)
        assert err[0] == "forbidden"
        # ... nor on a.test itself
        err = await command(dadmin, "a.test", ADMIN_NS + "#add-user", expect_error=True)
        assert err[0] == "forbidden"
        # u2@b.test is not in the announce ACL of a.test
        for c in (u1, dadmin, admin):
            c.disconnect()

    run(go())
    log = ad.logtext()
    assert "acl: u1@a.test/deny denied http://jabber.org/protocol/admin#add-user (target a.test)" in log
    assert ("acl: dadmin@b.test/deny denied http://jabber.org/protocol/admin#add-user "
            "(target a.test)") in log
    assert "acl: admin@a.test/deny denied http://jabber.org/protocol/admin#delete-user" in log


def test_add_change_password_and_delete_user(ad):
    add = ADMIN_NS + "#add-user"

    async def go():
        admin = await login(ad, "admin@a.test/users")
        # two stages: the form, then the submission
        first = await command(admin, "a.test", add)
        assert first["status"] == "executing" and first["actions"] == ["complete"]
        form = first["form"]
        assert form["type"] == "form" and form["fields"]["FORM_TYPE"]["value"] == ADMIN_NS
        assert form["fields"]["accountjid"]["type"] == "jid-single"
        assert form["fields"]["accountjid"]["required"]
        assert form["fields"]["password"]["type"] == "text-private"
        done = await command(admin, "a.test", add, {"accountjid": "newbie@a.test", "password": "pw1",
                                                    "password-verify": "pw1"},
                             action="complete", sessionid=first["sessionid"])
        assert done["status"] == "completed" and done["sessionid"] == first["sessionid"]
        assert done["notes"] == [("info", "Account newbie@a.test created.")]
        newbie = await login(ad, "newbie@a.test/n", "pw1")
        newbie.disconnect()
        # an existing account, differing passwords, a host we do not serve
        err = await command(admin, "a.test", add, {"accountjid": "newbie@a.test", "password": "x",
                                                   "password-verify": "x"}, expect_error=True)
        assert err[0] == "conflict"
        err = await command(admin, "a.test", add, {"accountjid": "n2@a.test", "password": "x",
                                                   "password-verify": "y"}, expect_error=True)
        assert err[0] == "not-acceptable"
        err = await command(admin, "a.test", add, {"accountjid": "n2@elsewhere.example",
                                                   "password": "x"}, expect_error=True)
        assert err[0] == "bad-request" and "not a virtual host" in err[2]
        err = await command(admin, "a.test", add, {"accountjid": "not a jid@@", "password": "x"},
                            expect_error=True)
        assert err[0] == "jid-malformed"
        # change the password
        done = await command(admin, "a.test", ADMIN_NS + "#change-user-password",
                             {"accountjid": "newbie@a.test", "password": "pw2"})
        assert done["status"] == "completed"
        assert await login_fails("newbie@a.test", "pw1", ad.port)
        err = await command(admin, "a.test", ADMIN_NS + "#change-user-password",
                            {"accountjid": "ghost@a.test", "password": "pw2"}, expect_error=True)
        assert err[0] == "item-not-found"
        admin.disconnect()

        # the domain admin of b.test creates and deletes an account there
        dadmin = await login(ad, "dadmin@b.test/users")
        await command(dadmin, "b.test", add, {"accountjid": "temp@b.test", "password": "tpw",
                                              "password-verify": "tpw"})
        temp = await login(ad, "temp@b.test/t", "tpw")
        closed = asyncio.get_running_loop().create_future()
        temp.add_event_handler("disconnected", lambda _e: closed.done() or closed.set_result(True))
        err = await command(dadmin, "b.test", ADMIN_NS + "#delete-user",
                            {"accountjids": ["temp@b.test", "ghost@b.test"]}, expect_error=True)
        assert err[0] == "item-not-found" and "ghost@b.test" in err[2]  # nothing deleted
        done = await command(dadmin, "b.test", ADMIN_NS + "#delete-user", {"accountjids": ["temp@b.test"]})
        assert done["notes"] == [("info", "Deleted temp@b.test.")]
        await asyncio.wait_for(closed, 5)
        assert any(e["condition"] == "not-authorized" for e in temp.stream_errors)
        assert await login_fails("temp@b.test", "tpw", ad.port)
        dadmin.disconnect()

    run(go())
    assert "adhoc: admin@a.test/users created newbie@a.test" in ad.logtext()


def test_overlong_passwords_are_not_acceptable(ad):
    """add-user and change-user-password share the one password check (1024 bytes)."""
    long_pw = "p" * 1025

    async def go():
        admin = await login(ad, "admin@a.test/users")
        try:
            err = await command(admin, "a.test", ADMIN_NS + "#add-user",
                                {"accountjid": "longpw@a.test", "password": long_pw,
                                 "password-verify": long_pw}, expect_error=True)
            assert err[0] == "not-acceptable" and "longer than 1024 bytes" in err[2]
            assert await login_fails("longpw@a.test", long_pw, ad.port)
            await command(admin, "a.test", ADMIN_NS + "#add-user",
                          {"accountjid": "longpw@a.test", "password": "short-pw",
                           "password-verify": "short-pw"})
            err = await command(admin, "a.test", ADMIN_NS + "#change-user-password",
                                {"accountjid": "longpw@a.test", "password": long_pw},
                                expect_error=True)
            assert err[0] == "not-acceptable" and "longer than 1024 bytes" in err[2]
            user = await login(ad, "longpw@a.test/x", "short-pw")  # unchanged
            user.disconnect()
        finally:
            admin.disconnect()

    try:
        run(go())
    finally:  # later tests count the accounts of a.test
        ad.ctl("deluser", "longpw@a.test", check=False)


def test_online_users_counts_and_list(ad):
    async def go():
        u1 = await login(ad, "u1@a.test/count")
        u1b = await login(ad, "u1@a.test/count2")
        admin = await login(ad, "admin@a.test/count")
        u2 = await login(ad, "u2@b.test/count")
        # LOCAL role: a user of either vhost may count a.test's online users
        for who in (u1, u2):
            done = await command(who, "a.test", ADMIN_NS + "#get-online-users-num")
            assert done["status"] == "completed" and done["form"]["type"] == "result"
            assert done["form"]["fields"]["onlineusersnum"]["value"] == "2"  # u1 and admin
        # ALL role; counted by the vhost's connector
        done = await command(u2, "b.test", ADMIN_NS + "#get-registered-users-num")
        assert int(done["form"]["fields"]["registeredusersnum"]["value"]) == 2
        # the list: a form with max_items first
        first = await command(admin, "a.test", ADMIN_NS + "#get-online-users-list")
        assert first["form"]["fields"]["max_items"]["options"][-1] == "none"
        done = await command(admin, "a.test", ADMIN_NS + "#get-online-users-list",
                             {"max_items": "none"}, action="complete", sessionid=first["sessionid"])
        assert done["form"]["fields"]["onlineuserjids"]["values"] == ["admin@a.test", "u1@a.test"]
        done = await command(admin, "a.test", ADMIN_NS + "#get-online-users-list", {"max_items": "25"})
        assert len(done["form"]["fields"]["onlineuserjids"]["values"]) == 2
        for c in (u1, u1b, admin, u2):
            c.disconnect()

    run(go())


def test_end_user_session_and_announce(ad):
    async def go():
        admin = await login(ad, "admin@a.test/kick")
        u1a = await login(ad, "u1@a.test/one")
        u1b = await login(ad, "u1@a.test/two")
        u2 = await login(ad, "u2@b.test/kick")
        await asyncio.sleep(0.1)
        # announce: explicit-JID ACL entry; reaches a.test's sessions only
        done = await command(u1a, "a.test", ADMIN_NS + "#announce",
                             {"subject": "Maintenance", "announcement": ["at noon", "brb"]})
        assert done["notes"] == [("info", "Announcement sent to 3 session(s).")]
        for c in (admin, u1a, u1b):
            m = await c.next_message()
            assert (m["type"], m["subject"], m["body"], str(m["from"])) == \
                ("headline", "Maintenance", "at noon\nbrb", "a.test")
        with pytest.raises(asyncio.TimeoutError):
            await u2.next_message(timeout=0.3)
        err = await command(u2, "a.test", ADMIN_NS + "#announce", expect_error=True)
        assert err[0] == "forbidden"
        # end one resource: the other stays
        closed = asyncio.get_running_loop().create_future()
        u1a.add_event_handler("disconnected", lambda _e: closed.done() or closed.set_result(True))
        done = await command(admin, "a.test", ADMIN_NS + "#end-user-session",
                             {"accountjids": ["u1@a.test/one"]})
        assert done["notes"] == [("info", "Ended 1 session(s).")]
        await asyncio.wait_for(closed, 5)
        assert any(e["condition"] == "policy-violation" for e in u1a.stream_errors)
        await u1b.plugin["xep_0199"].ping("a.test", timeout=5)
        done = await command(admin, "a.test", ADMIN_NS + "#end-user-session",
                             {"accountjids": ["u1@a.test"]})
        assert done["notes"] == [("info", "Ended 1 session(s).")]
        for c in (admin, u2):
            c.disconnect()

    run(go())


def test_sessions_cancel_and_xep0050_errors(ad):
    add = ADMIN_NS + "#add-user"

    async def go():
        admin = await login(ad, "admin@a.test/sess")
        other = await login(ad, "admin@a.test/other")
        first = await command(admin, "a.test", add)
        sid = first["sessionid"]
        # another resource may not use this session
        err = await command(other, "a.test", add, {"accountjid": "x@a.test", "password": "p"},
                            sessionid=sid, expect_error=True)
        assert (err[0], err[3]) == ("bad-request", "bad-sessionid")
        err = await command(admin, "a.test", add, action="prev", sessionid=sid, expect_error=True)
        assert (err[0], err[3]) == ("bad-request", "bad-action")
        err = await command(admin, "a.test", add, action="complete", sessionid=sid, expect_error=True)
        assert (err[0], err[3]) == ("bad-request", "bad-payload")
        err = await command(admin, "a.test", add, action="fly", sessionid=sid, expect_error=True)
        assert (err[0], err[3]) == ("bad-request", "malformed-action")
        done = await command(admin, "a.test", add, action="cancel", sessionid=sid)
        assert (done["status"], done["sessionid"]) == ("canceled", sid)
        err = await command(admin, "a.test", add, {"accountjid": "x@a.test", "password": "p"},
                            action="complete", sessionid=sid, expect_error=True)
        assert (err[0], err[3]) == ("bad-request", "bad-sessionid")
        err = await command(admin, "a.test", ADMIN_NS + "#no-such-command", expect_error=True)
        assert err[0] == "item-not-found"
        err = await command(admin, "u1@a.test", add, expect_error=True)
        assert err[0] == "service-unavailable"
        # slixmpp's XEP-0133 workflow API drives the same commands
        result = asyncio.get_running_loop().create_future()
        admin.plugin["xep_0133"].get_registered_users_num(
            jid="a.test", session={"next": lambda iq, s: result.set_result(iq),
                                   "error": lambda iq, s: result.set_exception(AssertionError(iq))})
        iq = await asyncio.wait_for(result, 5)
        assert iq["command"]["form"]["values"]["registeredusersnum"] in ("2", "3")
        for c in (admin, other):
            c.disconnect()

    run(go())


def test_certificate_commands(ad):
    async def go():
        admin = await login(ad, "admin@a.test/certs")
        u2 = await login(ad, "u2@b.test/certs")
        done = await command(admin, "a.test", XMPPD_NS + "#reload-certificates")
        assert done["status"] == "completed" and done["notes"]
        # explicit-domain ACL entry: any account of b.test
        done = await command(u2, "b.test", XMPPD_NS + "#certificate-status")
        rows = {row["host"]: row for row in done["form"]["items"]}
        assert set(rows) == {"a.test", "b.test"}
        assert rows["a.test"]["status"] == "self-signed"
        assert "a.test" in rows["a.test"]["sans"] and rows["a.test"]["sources"].endswith("a.test.pem")
        assert rows["b.test"]["not_after"][:2] == "20"
        err = await command(u2, "b.test", XMPPD_NS + "#reload-certificates", expect_error=True)
        assert err[0] == "forbidden"
        for c in (admin, u2):
            c.disconnect()

    run(go())
    assert "adhoc: admin@a.test/certs reloaded the certificates" in ad.logtext()


def test_none_role_and_acl_typo_at_startup(tmp_path):
    d = make_daemon(tmp_path / "none", '[acl]\n"http://jabber.org/protocol/admin#announce" = ["NONE"]\n')
    d.start()
    try:
        d.adduser("admin@a.test", PW)

        async def go():
            admin = await login(d, "admin@a.test/none")
            assert ADMIN_NS + "#announce" not in await listed(admin, "a.test")
            assert ADMIN_NS + "#add-user" in await listed(admin, "a.test")
            err = await command(admin, "a.test", ADMIN_NS + "#announce", expect_error=True)
            assert err[0] == "forbidden"
            admin.disconnect()

        run(go())
    finally:
        d.stop()
    bad = make_daemon(tmp_path / "typo", '[acl]\n"http://jabber.org/protocol/admin#add-usr" = ["ALL"]\n')
    with pytest.raises(RuntimeError, match="daemon exited"):
        bad.start()
    assert 'acl."http://jabber.org/protocol/admin#add-usr"' in bad.logtext()
    assert "no such command" in bad.logtext()

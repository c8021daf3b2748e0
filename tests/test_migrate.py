"""xmppctl export / import (XEP-0227): round trip through the running daemon,
refusals, limits, and the hardened reader.  Real Prosody and ejabberd exports:
tests/test_migrate_peers.py."""
from __future__ import annotations

import os
import re
import stat
import textwrap

import pytest

from tests.daemon import Daemon
from tests.rawclient import RawClient
from tests.tlsclient import TLSClient

PW = {"alice": "alice-secret", "bob": "bob-secret", "carol": "carol-secret"}
STORES = ("accounts", "roster", "vcard", "offline", "blocklist", "pending")


def raw(d, user, host="localhost", password=None):
    c = RawClient(d.port, host=host)
    c.login(user, password or PW[user])
    return c


def ping(c, ident):
    """A round trip: what this stream sent before has been handled."""
    c.iq(f"<iq type='get' id='{ident}'><ping xmlns='urn:xmpp:ping'/></iq>", ident)


def scram_login(d, user, password, mechanism, host="localhost") -> str:
    c = TLSClient(d.port, host=host)
    try:
        c.open_stream()
        c.starttls()
        c.open_stream()
        return c.scram(user, password, mechanism)
    finally:
        c.close()


def store_dump(d, users):
    """What the stores hold for ``users`` (read-only, the daemon may run)."""
    from xmppd.storage import SQLiteStore

    store = SQLiteStore(str(d.data_dir), read_only=True)
    try:
        return {(s, u): dict(store.items(s, u)) for s in STORES for u in users}
    finally:
        store.close()


def write_pie(path, body, ns="urn:xmpp:pie:0", host="localhost"):
    path.write_text(f"<?xml version='1.0' encoding='UTF-8'?>\n<server-data xmlns='{ns}'>"
                    f"<host jid='{host}'>{textwrap.dedent(body)}</host></server-data>\n")
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An xmppd whose users made their data through the protocol."""
    d = Daemon(tmp_path_factory.mktemp("source")).start()
    for user, pw in PW.items():
        d.adduser(f"{user}@localhost", pw)
    alice, bob = raw(d, "alice"), raw(d, "bob")
    alice.iq("<iq type='set' id='r1'><query xmlns='jabber:iq:roster'><item jid='bob@localhost' "
             "name='Bob &amp; co'><group>Friends</group><group>Work</group></item></query></iq>", "r1")
    for a, b, who in ((alice, bob, "bob"), (bob, alice, "alice")):
        me = "alice" if who == "bob" else "bob"
        a.send(f"<presence to='{who}@localhost' type='subscribe'/>")
        ping(a, "s1")
        b.send(f"<presence to='{me}@localhost' type='subscribed'/>")
        ping(b, "s2")
    alice.iq("<iq type='set' id='v1'><vCard xmlns='vcard-temp'><FN>Alice Liddell</FN>"
             "<NICKNAME>al</NICKNAME></vCard></iq>", "v1")
    alice.iq("<iq type='set' id='b1'><block xmlns='urn:xmpp:blocking'><item jid='mallory@evil.example'/>"
             "<item jid='spam.example'/></block></iq>", "b1")
    bob.send("<message to='carol@localhost' type='chat' id='m1'><body>while you were out</body></message>")
    bob.send("<presence to='carol@localhost' type='subscribe'><nick xmlns='http://jabber.org/protocol/nick'>"
             "Bobby</nick></presence>")
    ping(bob, "p1")
    alice.close()
    bob.close()
    yield d
    d.stop()


def test_round_trip_same_data_and_logins(source, tmp_path):
    export = tmp_path / "out" / "export.xml"
    export.parent.mkdir()
    export.write_text("old content")
    result = source.ctl("export", str(export))  # while the source runs: read-only
    assert "exported 3 account(s)" in result.stdout
    assert stat.S_IMODE(os.stat(export).st_mode) == 0o600
    assert os.listdir(export.parent) == ["export.xml"]  # no temp file left
    text = export.read_text()
    assert "urn:xmpp:pie:0#scram" in text and "alice-secret" not in text

    target = Daemon(tmp_path / "target")
    result = target.ctl("import", str(export))
    assert "imported 3 account(s) (0 replaced), 3 roster item(s), 1 subscription request(s), " \
           "1 vCard(s), 1 offline message(s), 2 blocklist item(s)" in result.stdout, result.stdout
    users = [f"{u}@localhost" for u in PW]
    before, after = store_dump(source, users), store_dump(target, users)
    assert before == after  # credentials (salt, keys, iterations), roster, vCard, messages, lists
    target.start()
    try:
        for user in PW:  # SCRAM-only accounts: every mechanism works with the old password
            for mech in ("SCRAM-SHA-1", "SCRAM-SHA-256"):
                assert "<success" in scram_login(target, user, PW[user], mech)
        alice = raw(target, "alice")
        roster = alice.iq("<iq type='get' id='g'><query xmlns='jabber:iq:roster'/></iq>", "g")
        assert re.search(r"<item jid='bob@localhost' subscription='both' name='Bob &amp; co'>"
                         r"<group>Friends</group><group>Work</group></item>", roster), roster
        blocked = alice.iq("<iq type='get' id='b'><blocklist xmlns='urn:xmpp:blocking'/></iq>", "b")
        assert "mallory@evil.example" in blocked and "spam.example" in blocked
        vcard = alice.iq("<iq type='get' id='v'><vCard xmlns='vcard-temp'/></iq>", "v")
        assert "<FN>Alice Liddell</FN>" in vcard
        carol = raw(target, "carol")
        carol.send("<presence/>")
        got = carol.read_until(r"</message>.*?</presence>|</presence>.*?</message>").decode()
        assert "while you were out" in got and "urn:xmpp:delay" in got and "Bobby" in got
        stamp = re.search(r"stamp='([^']+)'", got).group(1)
        assert stamp in after[("offline", "carol@localhost")]["000000000001"]  # the original stamp
    finally:
        target.stop()


def test_existing_account_needs_replace(source, tmp_path):
    export = tmp_path / "export.xml"
    source.ctl("export", str(export))
    target = Daemon(tmp_path / "target")
    target.adduser("alice@localhost", "a-different-pw")
    from xmppd.storage import SQLiteStore

    store = SQLiteStore(str(target.data_dir))
    store.put("roster", "alice@localhost", "old@example.net", {"subscription": "none", "ask": None,
              "name": None, "groups": [], "approved": False})
    store.put("settings", "alice@localhost", "roster_ver", 7)
    store.close()
    result = target.ctl("import", str(export))
    assert re.search(r"alice@localhost: not imported: account exists \(use --replace", result.stdout)
    assert "imported 2 account(s)" in result.stdout and "not imported: 1 account(s)" in result.stdout
    dump = store_dump(target, ["alice@localhost"])
    assert list(dump[("roster", "alice@localhost")]) == ["old@example.net"]  # untouched
    result = target.ctl("import", "--replace", str(export))
    assert "imported 3 account(s) (3 replaced)" in result.stdout
    dump = store_dump(target, ["alice@localhost"])
    assert list(dump[("roster", "alice@localhost")]) == ["bob@localhost"]
    assert dump == {k: v for k, v in store_dump(source, ["alice@localhost"]).items()}
    store = SQLiteStore(str(target.data_dir), read_only=True)
    try:  # moved on, so a client that cached version 7 fetches the new roster
        assert store.get("settings", "alice@localhost", "roster_ver") == 8
    finally:
        store.close()
    target.start()
    try:
        assert "<success" in scram_login(target, "alice", PW["alice"], "SCRAM-SHA-256")
    finally:
        target.stop()


def test_hosts_refused_or_mapped_and_running_server_refused(tmp_path):
    f = write_pie(tmp_path / "in.xml", """
        <user name='dora' password='dora-secret'>
          <query xmlns='jabber:iq:roster'><item jid='eve@old.example' subscription='both'/></query>
          <blocklist xmlns='urn:xmpp:blocking'><item jid='troll@old.example'/></blocklist>
        </user>""", host="old.example")
    d = Daemon(tmp_path / "d", hosts=("new.example",))
    result = d.ctl("import", str(f))
    assert "dora@old.example: not imported: host old.example is not served" in result.stdout
    assert "--host-map old.example=NEW" in result.stdout
    bad = d.ctl("import", "--host-map", "old.example=elsewhere.example", str(f), check=False)
    assert bad.returncode == 1 and "elsewhere.example is not a host of this server" in bad.stderr
    result = d.ctl("import", "--host-map", "old.example=new.example", str(f))
    assert "imported 1 account(s)" in result.stdout
    dump = store_dump(d, ["dora@new.example"])
    assert list(dump[("roster", "dora@new.example")]) == ["eve@new.example"]  # contacts follow
    assert list(dump[("blocklist", "dora@new.example")]) == ["troll@new.example"]
    d.start()
    try:
        c = raw(d, "dora", host="new.example", password="dora-secret")
        c.close()
        again = d.ctl("import", "--replace", "--host-map", "old.example=new.example", str(f),
                      check=False)
        assert again.returncode == 1 and "xmppd is running: stop it" in again.stderr
    finally:
        d.stop()


def test_limits_of_the_server_bound_what_is_imported(tmp_path):
    items = "<item jid='g@example.net' subscription='both'><group>" + "g" * 40 + \
        "</group><group>ok</group></item>" + \
        "".join(f"<item jid='c{i}@example.net' subscription='to'/>" for i in range(5))
    blocked = "".join(f"<item jid='b{i}@example.net'/>" for i in range(5))
    messages = "".join(f"<message xmlns='jabber:client' from='x@example.net' type='chat'>"
                       f"<body>m{i}</body></message>" for i in range(4))
    big_vcard = "<vCard xmlns='vcard-temp'><DESC>" + "x" * 3000 + "</DESC></vCard>"
    f = write_pie(tmp_path / "in.xml", f"""
        <user name='fred' password='fred-secret'>
          <query xmlns='jabber:iq:roster'>{items}</query>
          {big_vcard}
          <offline-messages>{messages}</offline-messages>
          <blocklist xmlns='urn:xmpp:blocking'>{blocked}</blocklist>
          <query xmlns='jabber:iq:private'><x xmlns='some:private'/></query>
        </user>
        <user name='gina' password='gina-secret'>
          <scram-credentials xmlns='urn:xmpp:pie:0#scram' mechanism='SCRAM-SHA-512'>
            <iter-count>4096</iter-count><salt>AAAA</salt><server-key>AAAA</server-key><stored-key>AAAA</stored-key>
          </scram-credentials>
        </user>
        <user name='hal'/>""")
    d = Daemon(tmp_path / "d", extra="""
        [roster]
        max_items = 3
        max_group_length = 16
        [vcard]
        max_size = 1024
        [offline]
        max_messages = 2
        [blocking]
        max_items = 4
        [auth]
        scram_iterations = 5000
        """)
    out = d.ctl("import", str(f)).stdout
    assert "imported 2 account(s)" in out and "not imported: 1 account(s)" in out, out
    assert "hal@localhost: not imported: no password and no SCRAM" in out
    assert "3 roster items over the limit of 3: not imported" in out
    assert "group longer than 16 bytes dropped" in out
    assert "a vCard element larger than" in out or "vCard larger than 1024 bytes" in out
    assert "2 offline messages over the limit of 2" in out
    assert "1 blocklist items over the limit of 4" in out
    assert "<query xmlns='jabber:iq:private'/>: not supported" in out
    assert "SCRAM credentials 'SCRAM-SHA-512': mechanism not supported" in out
    dump = store_dump(d, ["fred@localhost", "gina@localhost"])
    assert len(dump[("roster", "fred@localhost")]) == 3
    assert len(dump[("offline", "fred@localhost")]) == 2
    assert len(dump[("blocklist", "fred@localhost")]) == 4
    assert dump[("vcard", "fred@localhost")] == {}
    creds = dump[("accounts", "fred@localhost")]["scram"]
    assert {c["iterations"] for c in creds.values()} == {5000}  # hashed with [auth] scram_iterations
    d.start()
    try:
        raw(d, "gina", password="gina-secret").close()  # from the password attribute
    finally:
        d.stop()


def test_privacy_list_deny_items_become_blocklist_entries(tmp_path):
    f = write_pie(tmp_path / "in.xml", """
        <user name='ivan' password='ivan-secret'>
          <query xmlns='jabber:iq:privacy'>
            <list name='other'><item type='jid' value='x@example.net' action='deny' order='1'/></list>
            <default name='main'/>
            <list name='main'>
              <item type='jid' value='troll@example.net' action='deny' order='1'/>
              <item type='jid' value='spam.example' action='deny' order='2'/>
              <item type='jid' value='friend@example.net' action='allow' order='3'/>
              <item type='jid' value='quiet@example.net' action='deny' order='4'><message/></item>
              <item type='group' value='Foes' action='deny' order='5'/>
            </list>
          </query>
        </user>""", ns="http://www.xmpp.org/extensions/xep-0227.html#ns")
    d = Daemon(tmp_path / "d")
    out = d.ctl("import", str(f)).stdout
    dump = store_dump(d, ["ivan@localhost"])
    assert sorted(dump[("blocklist", "ivan@localhost")]) == ["spam.example", "troll@example.net"]
    assert "privacy lists other than the default (other)" in out
    assert "1 allow items not imported" in out and "1 items blocking only some stanza kinds" in out
    assert "1 deny items of type group not imported" in out


@pytest.mark.parametrize("body,message", [
    ("<!DOCTYPE x [<!ENTITY a 'b'>]><server-data xmlns='urn:xmpp:pie:0'/>", "DOCTYPE not allowed"),
    ("<?xml-stylesheet href='x'?><server-data xmlns='urn:xmpp:pie:0'/>", "processing instruction"),
    ("<server-data xmlns='urn:xmpp:pie:0'><host jid='localhost'><user name='a'>&ent;</user>"
     "</host></server-data>", "undefined entity"),
    ("<other xmlns='urn:example'/>", "not an XEP-0227 file"),
    ("<server-data xmlns='urn:xmpp:pie:0'><host jid='localhost'><user name='a' password='"
     + "p" * (1 << 21) + "'/></host></server-data>", "larger than 1048576 bytes"),
    ("<server-data xmlns='urn:xmpp:pie:0' xmlns:xi='http://www.w3.org/2001/XInclude'>"
     "<xi:include href='../secret.xml'/></server-data>", "leaves the export's directory"),
    ("<server-data xmlns='urn:xmpp:pie:0' xmlns:xi='http://www.w3.org/2001/XInclude'>"
     "<xi:include href='/etc/passwd'/></server-data>", "not a relative file name"),
    ("<server-data xmlns='urn:xmpp:pie:0'><host jid='localhost'>", "not well-formed XML"),
])
def test_hostile_or_broken_files_are_refused(tmp_path, body, message):
    (tmp_path / "in").mkdir()
    f = tmp_path / "in" / "in.xml"
    f.write_text(body)
    d = Daemon(tmp_path / "d")
    result = d.ctl("import", str(f), check=False)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert str(f) in result.stderr and "Traceback" not in result.stderr


def test_xinclude_per_host_files_and_sha1_only_credentials(tmp_path):
    """ejabberd's layout (main file including host files), Prosody-style SHA-1-only credentials."""
    import base64
    from scramp import ScramMechanism

    salt, stored, server, _ = ScramMechanism("SCRAM-SHA-1").make_auth_info(
        "jane-secret", iteration_count=4096, salt=b"0123456789abcdef")
    creds = (f"<scram-credentials xmlns='urn:xmpp:pie:0#scram' mechanism='SCRAM-SHA-1'>"
             f"<iter-count>4096</iter-count><salt>{base64.b64encode(salt).decode()}</salt>"
             f"<server-key>{base64.b64encode(server).decode()}</server-key>"
             f"<stored-key>{base64.b64encode(stored).decode()}</stored-key></scram-credentials>")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "main.xml").write_text(
        "<server-data xmlns='http://www.xmpp.org/extensions/xep-0227.html#ns' "
        "xmlns:xi='http://www.w3.org/2001/XInclude'><xi:include href='main_localhost.xml'/>"
        "</server-data>")
    (tmp_path / "x" / "main_localhost.xml").write_text(
        "<?xml version='1.0' encoding='UTF-8'?><host xmlns='http://www.xmpp.org/extensions/"
        f"xep-0227.html#ns' jid='localhost'><user name='jane'>{creds}</user>"
        "<user name='kim' password='kim-secret'/></host>")
    d = Daemon(tmp_path / "d")
    assert "imported 2 account(s)" in d.ctl("import", str(tmp_path / "x" / "main.xml")).stdout
    d.start()
    try:
        assert "<success" in scram_login(d, "jane", "jane-secret", "SCRAM-SHA-1")
        # No SHA-256 credentials yet: refused as a wrong password would be ...
        assert "<failure" in scram_login(d, "jane", "jane-secret", "SCRAM-SHA-256")
        raw(d, "jane", password="jane-secret").close()  # ... until a PLAIN login completes them
        assert "<success" in scram_login(d, "jane", "jane-secret", "SCRAM-SHA-256")
        assert "<failure" in scram_login(d, "jane", "wrong-secret", "SCRAM-SHA-256")
    finally:
        d.stop()


def test_failed_export_leaves_the_old_file_and_no_temp_file(source, tmp_path):
    target = tmp_path / "export.xml"
    target.mkdir()  # the rename over it fails once the new file is complete
    (target / "keep").write_text("x")
    result = source.ctl("export", str(target), check=False)
    assert result.returncode == 1 and f"cannot write {target}" in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.xml"]
    assert (target / "keep").read_text() == "x"


def test_large_unknown_data_is_streamed_not_built(tmp_path):
    """2 million elements of data xmppd does not import: parsed, never built as a tree
    (a domish tree of them would take about a gigabyte)."""
    import subprocess
    import sys

    from tests.daemon import REPO

    f = tmp_path / "in.xml"
    with open(f, "w") as out:
        out.write("<server-data xmlns='urn:xmpp:pie:0'><host jid='localhost'>"
                  "<user name='lena' password='lena-secret'><query xmlns='jabber:iq:private'>")
        for _ in range(200):
            out.write("<x/>" * 10000)
        out.write("</query></user></host></server-data>")
    d = Daemon(tmp_path / "d")
    script = ("import resource, subprocess, sys\n"
              "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
              "print(r.stdout + r.stderr)\n"
              "print('maxrss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    result = subprocess.run([sys.executable, "-c", script, sys.executable, "-m", "xmppd.ctl",
                             "--config", str(d.config_path), "import", str(f)],
                            env=d.env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "imported 1 account(s)" in result.stdout, result.stdout + result.stderr
    assert "<query xmlns='jabber:iq:private'/>: not supported" in result.stdout
    maxrss_mb = int(result.stdout.split("maxrss_kb")[1].split()[0]) / 1024
    assert maxrss_mb < 150, f"import peaked at {maxrss_mb:.0f} MB"


def test_internal_connector_completes_sha1_only_accounts_at_a_plain_login():
    """What Prosody and ejabberd exports give: SCRAM-SHA-1 credentials only."""
    from xmppd.auth.internal import InternalConnector
    from xmppd.auth.passwords import make_scram
    from xmppd.storage import MemoryStore

    store = MemoryStore()
    connector = InternalConnector(store, iterations=4096)
    store.put("accounts", "u@h", "scram", {"SCRAM-SHA-1": make_scram("pw-secret", 4096)["SCRAM-SHA-1"]})

    def result(d):
        out = []
        d.addBoth(out.append)
        return out[0]

    assert result(connector.get_scram_credentials("u", "h", "SCRAM-SHA-256")) is None
    assert result(connector.check_password("u", "h", "wrong-secret")) is False
    assert set(store.get("accounts", "u@h", "scram")) == {"SCRAM-SHA-1"}
    assert result(connector.check_password("u", "h", "pw-secret")) is True
    assert set(store.get("accounts", "u@h", "scram")) == {"SCRAM-SHA-1", "SCRAM-SHA-256"}
    assert result(connector.get_scram_credentials("u", "h", "SCRAM-SHA-256")).iterations == 4096
    assert result(connector.check_password("u", "h", "pw-secret")) is True

"""The admin socket through the running daemon: owner-only access (file mode
and SO_PEERCRED), `xmppctl status`, `sessions` (list, kick), `certs` (what is
served now, stale after a refused reload), `reload` (ACLs and limits without a
restart; an invalid file changes nothing), `users`, a stopped daemon, and
`--version`."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

import xmppd
from tests.daemon import Daemon
from tests.rawclient import RawClient
from tests.test_certs import PKI, install, write_pem
from tests.test_certs_daemon import starttls_serial

PLUGINS = ["roster", "presence", "disco", "ping", "adhoc"]
USERS_NUM = "http://jabber.org/protocol/admin#get-online-users-num"
NOBODY = 65534
# A client that runs as nobody: the stdlib alone (the venv is not needed).
NOBODY_CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("connect:", type(e).__name__); sys.exit(0)
try:
    s.sendall(b'{"v": 1, "cmd": "status"}\\n')
except OSError:
    pass  # a refusal may come (and the server close) before the request is sent
print("answer:", s.makefile().readline().strip())
"""


@pytest.fixture(scope="module")
def pki():
    return PKI()


@pytest.fixture(scope="module")
def ad(pki):
    # World-traversable directories, so that nobody meets the socket's own mode.
    base = Path(tempfile.mkdtemp(prefix="xmppd-admin-", dir="/tmp"))
    base.chmod(0o755)
    certs = base / "certs"
    certs.mkdir()
    install(pki, certs, "a.test.pem", "a.test", serial=1001)
    d = Daemon(base, hosts=("localhost", "a.test"), plugins=PLUGINS, extra=f"""
        [tls]
        certs_dir = "{certs}"
        poll_interval = 0
    """)
    d.data_dir.mkdir(mode=0o755)
    d.data_dir.chmod(0o755)
    d.certs_dir = certs
    d.base_config = d.config_path.read_text()
    d.start()
    for jid, pw in (("alice@localhost", "alice-secret"), ("bob@localhost", "bob-secret"),
                    ("carol@a.test", "carol-secret")):
        d.adduser(jid, pw)
    yield d
    d.stop()
    shutil.rmtree(base, ignore_errors=True)


def sock_path(d) -> Path:
    return d.data_dir / "xmppd.ctl"


def login(d, user, password, host="localhost", resource="raw") -> RawClient:
    c = RawClient(d.port, host=host)
    c.login(user, password, resource)
    c.send("<presence><priority>5</priority></presence>")
    return c


def as_nobody(path: Path) -> str:
    r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        "/usr/bin/python3", "-I", "-c", NOBODY_CLIENT, str(path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def raw_request(d, line: bytes) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock_path(d)))
        try:
            s.sendall(line)
        except OSError:
            pass  # refused before all of it was sent: the answer is waiting
        return json.loads(s.makefile("rb").readline())


def ping(c: RawClient, ident: str) -> str:
    return c.iq(f"<iq type='get' id='{ident}'><ping xmlns='urn:xmpp:ping'/></iq>", ident)


def run_command(c: RawClient, node: str, ident: str) -> str:
    return c.iq(f"<iq type='set' to='localhost' id='{ident}'><command xmlns="
                f"'http://jabber.org/protocol/commands' node='{node}' action='execute'/></iq>",
                ident)


def reconfigure(d, extra: str, c2s: str = "") -> None:
    """The daemon's config file with ``extra`` tables and ``[c2s]`` lines added."""
    text = d.base_config
    if c2s:
        text = text.replace("max_connections_per_ip = 0\n", c2s + "\n")
    d.config_path.write_text(text + textwrap.dedent(extra))


# -- access --------------------------------------------------------------------------


def test_socket_is_owner_only_and_checks_peer_credentials(ad):
    path = sock_path(ad)
    mode = path.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert path.stat().st_uid == os.getuid()
    # Another user cannot even connect ...
    assert as_nobody(path) == "connect: PermissionError"
    # ... and if the mode were widened, the server's SO_PEERCRED check refuses.
    path.chmod(0o666)
    try:
        answer = as_nobody(path)
    finally:
        path.chmod(0o600)
    assert answer.startswith("answer: ")
    reply = json.loads(answer[len("answer: "):])
    assert reply["ok"] is False and "not the server's user" in reply["error"]
    assert f"refused a connection from uid {NOBODY}" in ad.logtext()


def test_protocol_is_versioned_and_bounded(ad):
    assert raw_request(ad, b'{"v": 1, "cmd": "status"}\n')["ok"] is True
    assert "version" in raw_request(ad, b'{"v": 2, "cmd": "status"}\n')["error"]
    assert "unknown command" in raw_request(ad, b'{"v": 1, "cmd": "shutdown"}\n')["error"]
    assert "JSON" in raw_request(ad, b"status\n")["error"]
    too_long = raw_request(ad, b'{"v": 1, "cmd": "' + b"x" * 20000 + b'"}\n')
    assert too_long["ok"] is False and "longer than" in too_long["error"]


# -- status, sessions, kick ------------------------------------------------------------


def test_status_counts_live_sessions_per_host(ad):
    a = login(ad, "alice", "alice-secret", resource="status")
    c = login(ad, "carol", "carol-secret", host="a.test", resource="status")
    try:
        out = ad.ctl("status").stdout
        assert f"xmppd {xmppd.__version__}, pid {ad.proc.pid}, up " in out
        assert "sessions: 2" in out
        assert re.search(r"^  localhost\s+1$", out, re.M) and re.search(r"^  a\.test\s+1$", out, re.M)
        rss = int(re.search(r"^VmRSS:\s+(\d+)", Path(f"/proc/{ad.proc.pid}/status").read_text(),
                            re.M).group(1))
        shown = float(re.search(r"memory:\s+([\d.]+) MiB \(VmRSS\)", out).group(1))
        assert abs(shown * 1024 - rss) < 20 * 1024  # the daemon's own VmRSS
        assert "s2s:      off ([s2s] enabled = false)" in out
    finally:
        a.close()
        c.close()


def test_sessions_lists_them_and_kick_closes_one(ad):
    one = login(ad, "alice", "alice-secret", resource="one")
    two = login(ad, "bob", "bob-secret", resource="two")
    try:
        out = ad.ctl("sessions").stdout
        for client, jid in ((one, "alice@localhost/one"), (two, "bob@localhost/two")):
            port = client.sock.getsockname()[1]
            row = next(line for line in out.splitlines() if line.startswith(jid))
            assert f"127.0.0.1:{port}" in row and "TLSv1." in row
            assert "available, priority 5" in row
        r = ad.ctl("sessions", "kick", "alice@localhost/one", "--text", "go away")
        assert r.stdout.strip() == "kicked alice@localhost/one"
        data = one.read_all(timeout=10)
        assert b"<policy-violation" in data and b"go away" in data, data
        # The other session stays, and is the only one listed now.
        assert "type='result'" in ping(two, "p1")
        out = ad.ctl("sessions").stdout
        assert "bob@localhost/two" in out and "alice@localhost/one" not in out
        assert "kicking alice@localhost/one from 127.0.0.1" in ad.logtext()
        r = ad.ctl("sessions", "kick", "alice@localhost/one", check=False)
        assert r.returncode == 1 and "no session of alice@localhost/one" in r.stderr
    finally:
        one.close()
        two.close()


# -- reload ----------------------------------------------------------------------------


def test_reload_applies_acl_and_limit_without_restart(ad):
    alice = login(ad, "alice", "alice-secret", resource="acl")
    try:
        assert "<forbidden" in run_command(alice, USERS_NUM, "c1")  # default ACL: ADMIN
        reconfigure(ad, f"""
            [acl]
            "{USERS_NUM}" = ["LOCAL"]

            [roster]
            max_items = 10
        """, c2s="max_connections_per_ip = 1")
        out = ad.ctl("reload").stdout
        assert f"xmppd (pid {ad.proc.pid}) reloaded" in out
        assert re.search(r"now in force: .*c2s\.max_connections_per_ip", out)
        assert re.search(r"now in force: .*\bacl\b", out)
        assert "need a restart (running values kept): roster" in out
        # The same session may now run the command ...
        assert re.search(r"status=.completed", run_command(alice, USERS_NUM, "c2"))
        # ... and a second connection from this address is one too many.
        extra = RawClient(ad.port)
        extra.send("<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream="
                   "'http://etherx.jabber.org/streams' to='localhost' version='1.0'>")
        assert b"<policy-violation" in extra.read_all(timeout=10)
        extra.close()
    finally:
        alice.close()
        ad.config_path.write_text(ad.base_config)
        ad.ctl("reload")


def wait_for_log(d, text: str, since: int, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while text not in d.logtext()[since:]:
        assert time.monotonic() < deadline, d.logtext()[since:][-3000:]
        time.sleep(0.05)
    return d.logtext()[since:]


def test_reload_changes_the_log_level(ad):
    line = f'data_dir = "{ad.data_dir}"\n'
    assert line in ad.base_config
    ad.config_path.write_text(ad.base_config.replace(line, line + 'log_level = "warn"\n'))
    try:
        out = ad.ctl("reload").stdout
        assert re.search(r"now in force: .*server\.log_level", out)
        # At "warn", a login and a logout leave no info lines of xmppd's.
        since = len(ad.logtext())
        login(ad, "bob", "bob-secret", resource="quiet").close()
        time.sleep(1)
        quiet = ad.logtext()[since:]
        assert "session bound" not in quiet and "authenticated with" not in quiet, quiet
        ad.config_path.write_text(ad.base_config)
        assert re.search(r"now in force: .*server\.log_level", ad.ctl("reload").stdout)
        since = len(ad.logtext())
        login(ad, "bob", "bob-secret", resource="loud").close()
        wait_for_log(ad, "bob@localhost/loud from 127.0.0.1: session bound", since)
    finally:
        ad.config_path.write_text(ad.base_config)
        ad.ctl("reload")


def test_invalid_config_reload_changes_nothing(ad):
    alice = login(ad, "alice", "alice-secret", resource="bad")
    try:
        reconfigure(ad, f"""
            [acl]
            "{USERS_NUM}" = ["LOCAL"]

            [limits]
            auth_failures_per_ip = "many"
        """)
        r = ad.ctl("reload", check=False)
        assert r.returncode == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert "limits.auth_failures_per_ip = 'many'" in lines[0] and "nothing changed" in lines[0]
        assert "<forbidden" in run_command(alice, USERS_NUM, "c3")  # the ACL did not change
        assert "reload refused, nothing changed" in ad.logtext()
    finally:
        alice.close()
        ad.config_path.write_text(ad.base_config)


# -- users ------------------------------------------------------------------------------


def test_users_lists_accounts_per_host(ad):
    out = ad.ctl("users").stdout
    assert "localhost: 2 account(s) (internal connector)" in out
    assert "  alice@localhost\n  bob@localhost\n" in out
    assert "a.test: 1 account(s) (internal connector)\n  carol@a.test" in out
    only = ad.ctl("users", "a.test").stdout
    assert "carol@a.test" in only and "localhost" not in only
    r = ad.ctl("users", "nowhere.test", check=False)
    assert r.returncode == 1 and "not a host of this server" in r.stderr


# -- certificates (last: it leaves a.test's file broken) ---------------------------------


def test_certs_shows_stale_certificate_after_refused_reload(ad, pki):
    assert starttls_serial(ad, "a.test") == 1001
    out = ad.ctl("certs").stdout
    assert out.startswith("what the running server serves now")
    assert re.search(r"^a\.test\s+ok\s", out, re.M), out
    other_cert, _ = pki.issue("a.test", serial=1999)
    _, wrong_key = pki.issue("a.test")
    write_pem(ad.certs_dir / "a.test.pem", pki.chain(other_cert), wrong_key)  # key mismatch
    r = ad.ctl("reload")
    assert "a.test.pem" in r.stdout and "still serving serial 0x3e9" in r.stdout
    out = ad.ctl("certs").stdout
    row = next(line for line in out.splitlines() if line.startswith("a.test"))
    assert row.split()[1] == "stale" and " 3e9 " in row, out
    assert "private key does not match the certificate" in out
    assert starttls_serial(ad, "a.test") == 1001  # the old certificate is still served


# -- a stopped daemon, a stale socket, --version ---------------------------------------------


def test_stopped_daemon_and_stale_socket(tmp_path):
    d = Daemon(tmp_path).start()
    try:
        assert "sessions: 0" in d.ctl("status").stdout
        d.kill9()  # a crash leaves the socket file behind
        assert sock_path(d).exists()
        for command in ("status", "sessions", "reload"):
            r = d.ctl(command, check=False)
            assert r.returncode == 1, command
            assert r.stderr.count("\n") == 1 and "xmppd is not running" in r.stderr, r.stderr
        r = d.ctl("certs")
        assert "not running" in r.stdout and "PREVIEW" in r.stdout and "localhost" in r.stdout
        # The next server replaces the dead one's socket.
        d.start()
        assert "sessions: 0" in d.ctl("status").stdout
    finally:
        d.stop()
    assert not sock_path(d).exists()


def test_version():
    r = subprocess.run([sys.executable, "-m", "xmppd.ctl", "--version"], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert r.returncode == 0 and r.stdout.strip() == f"xmppctl {xmppd.__version__}"


# -- which keys a reload applies (no daemon) --------------------------------------------


def test_reload_applies_only_the_safe_keys():
    from xmppd.config import from_dict
    from xmppd.reconfig import _applied_keys, _restart_keys, merge

    old = from_dict({"server": {"hosts": ["a.test"]}, "c2s": {"max_connections_per_ip": 5},
                     "domain-filter": {"default": "ALL", "poll_interval": 5.0}})
    new = from_dict({
        "server": {"hosts": ["a.test", "b.test"], "admins": ["root@a.test"]},
        "c2s": {"max_connections_per_ip": 2, "max_stanza_size": 100000,
                "listen": ["tcp:5999:interface=127.0.0.1"]},
        "domain-filter": {"default": "LOCAL", "poll_interval": 1.0},
        "acl": {"op": ["LOCAL"]}, "roster": {"max_items": 10},
    })
    merged = merge(old, new)
    assert _applied_keys(old, merged) == ["server.admins", "c2s.max_connections_per_ip", "acl",
                                          "domain-filter"]
    assert _restart_keys(old, new) == ["server.hosts", "c2s.listen", "c2s.max_stanza_size",
                                       "domain-filter.poll_interval", "roster"]
    # What needs a restart keeps its running value; the rest is the new file's.
    assert merged.hosts == ("a.test",) and merged.c2s.listen == old.c2s.listen
    assert merged.c2s.max_stanza_size == old.c2s.max_stanza_size
    assert merged.section("domain-filter").table == {"default": "LOCAL", "poll_interval": 5.0}
    assert "roster" not in merged.sections
    assert merged.c2s.max_connections_per_ip == 2 and merged.admins == ("root@a.test",)

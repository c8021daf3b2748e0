"""Start-up, config errors, persistence across restarts and crashes, packaging."""
from __future__ import annotations

import os
import subprocess
import time
import sys
from pathlib import Path

import pytest

from tests.daemon import REPO, TWISTD, Daemon, free_port, wait_for_port
from tests.xmpp import connect, run


def _twistd(args, cwd, env=None, timeout=20):
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([str(TWISTD), "--nodaemon", "--pidfile=", "xmppd", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("toml,key", [
    ("[server]\nhosts = 'localhost'\n", "server.hosts"),
    ("[server]\nlog_level = 'loud'\n", "server.log_level"),
    ("[c2s]\nlisten = ['nonsense:1']\n", "c2s.listen"),
    ("[c2s]\nlisten = ['tcp:99999']\n", "c2s.listen"),
    ("[c2s]\nlisten_tls = ['tcp:0']\n", "c2s.listen_tls"),
    ("[c2s]\nlisten = []\nlisten_tls = []\n", "c2s.listen"),
    ("[c2s]\nlisten = ['systemd:domain=INET:index=0']\n", "c2s.listen"),
    ("[c2s]\ntls = 'maybe'\n", "c2s.tls"),
    ("[c2s]\nmax_stanza_size = 10\n", "c2s.max_stanza_size"),
    ("[sm]\nplugins = ['roster', 'no-such-plugin']\n", "sm.plugins"),
    ("[server]\nhostz = ['x']\n", "server.hostz"),
    ("[server\n", "-"),
    ("[auth]\nconnector = 'kerberos'\n", "auth.connector"),
    ("[blockin]\nbounce = false\n", "blockin"),
    ("[server]\nhosts = ['a.test']\n[hosts.\"a.test\"]\nadmin = ['x@a.test']\n", 'hosts."a.test".admin'),
    ("[blocking]\nbounce = 'no'\n", "blocking.bounce"),
    ("[tls]\ngroups = ['X25519', 'X999']\n", "tls.groups"),
    ("[limits]\nauth_ipv6_prefix = 129\n", "limits.auth_ipv6_prefix"),
    ("[limits]\nauth_failures_per_ip_account = -1\n", "limits.auth_failures_per_ip_account"),
])
def test_config_error_is_one_line_naming_file_and_key(tmp_path, toml, key):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    result = _twistd(["--config", str(cfg)], tmp_path)
    assert result.returncode != 0
    lines = [l for l in result.stderr.splitlines() if l.startswith("xmppd:")]
    assert len(lines) == 1, result.stderr
    assert str(cfg) in lines[0] and key in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_config_file(tmp_path):
    result = _twistd(["--config", str(tmp_path / "nope.toml")], tmp_path)
    assert result.returncode != 0 and "file not found" in result.stderr


def test_accounts_survive_restart_and_kill_9(tmp_path):
    d = Daemon(tmp_path).start()
    try:
        d.adduser("carol@localhost", "carol-pw")
        d.stop()
        d.start()

        async def login():
            c = await connect("carol@localhost/x", "carol-pw", d.port, mech="SCRAM-SHA-256")
            c.disconnect()

        run(login())
        d.ctl("passwd", "carol@localhost", "new-carol-pw")
        d.kill9()
        d.start()

        async def login_new():
            c = await connect("carol@localhost/x", "new-carol-pw", d.port, mech="SCRAM-SHA-1")
            c.disconnect()

        run(login_new())
    finally:
        d.stop()


def test_passwords_are_stored_as_scram_only(tmp_path):
    d = Daemon(tmp_path)
    d.adduser("dave@localhost", "very-secret-pw")
    raw = (d.data_dir / "xmppd.sqlite3").read_bytes()
    for suffix in ("-wal",):
        wal = d.data_dir / ("xmppd.sqlite3" + suffix)
        if wal.exists():
            raw += wal.read_bytes()
    assert b"very-secret-pw" not in raw
    from xmppd.storage import SQLiteStore

    creds = SQLiteStore(str(d.data_dir)).get("accounts", "dave@localhost", "scram")
    assert set(creds) == {"SCRAM-SHA-1", "SCRAM-SHA-256"}
    assert set(creds["SCRAM-SHA-1"]) == {"salt", "stored_key", "server_key", "iterations"}


def test_ctl_errors_are_clear(tmp_path):
    d = Daemon(tmp_path)
    d.adduser("erin@localhost", "erin-pw-1")
    r = d.ctl("adduser", "erin@localhost", "erin-pw-1", check=False)
    assert r.returncode == 1 and "already exists" in r.stderr
    r = d.ctl("adduser", "erin@elsewhere.example", "erin-pw-1", check=False)
    assert r.returncode == 1 and "not a host of this server" in r.stderr
    r = d.ctl("deluser", "nobody@localhost", check=False)
    assert r.returncode == 1 and "no such account" in r.stderr
    r = d.ctl("adduser", "frank@localhost", input="from-stdin\n")
    assert "created frank@localhost" in r.stdout


def test_no_config_serves_localhost_with_generated_certificate(tmp_path):
    """`twistd -n xmppd` alone: vhost localhost, ./var, self-signed certificate.

    The default ports are fixed (5222/5223): the test waits for this
    process's own "serving" line, not for whatever answers on 5222.
    """
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log = tmp_path / "out.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(TWISTD), "--nodaemon", "--pidfile=", "xmppd"], cwd=tmp_path,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while "xmppd serving localhost" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.05)
        wait_for_port(5222, proc=proc)
        assert (tmp_path / "var" / "xmppd.sqlite3").exists()
        certs = list((tmp_path / "var" / "certs").glob("localhost*"))
        assert certs
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert "SELF-SIGNED" in log.read_text(errors="replace")


def test_plugin_is_found_after_plain_install(tmp_path):
    """A normal (non-editable) install ships twisted/plugins/xmppd_plugin.py."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(target), str(REPO)],
                   check=True, capture_output=True, cwd=tmp_path)
    assert (target / "twisted" / "plugins" / "xmppd_plugin.py").exists()
    assert (target / "xmppd" / "tap.py").exists()
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([str(TWISTD), "--help"], env=env, cwd=tmp_path,
                         capture_output=True, text=True).stdout
    assert "xmppd" in out


def test_brute_force_throttle_per_account_and_per_ip(tmp_path):
    from tests.xmpp import login_fails

    d = Daemon(tmp_path, extra="""
        [limits]
        auth_failures_per_account = 3
        auth_failures_per_ip = 6
        auth_failure_window = 60
    """).start()
    try:
        d.adduser("zed@localhost", "zed-secret")
        d.adduser("amy@localhost", "amy-secret")
        for _ in range(3):
            assert run(login_fails("zed@localhost", "guess", d.port, mech="PLAIN"))[0]["condition"] == "not-authorized"
        # The right password no longer helps while the account is throttled...
        failures = run(login_fails("zed@localhost", "zed-secret", d.port, mech="SCRAM-SHA-1"))
        assert failures[0]["condition"] == "temporary-auth-failure"
        # ...but other accounts are not affected until the address is throttled.

        async def amy():
            c = await connect("amy@localhost/x", "amy-secret", d.port)
            c.disconnect()

        run(amy())
        for _ in range(3):
            run(login_fails("amy@localhost", "guess", d.port, mech="PLAIN"))
        failures = run(login_fails("amy@localhost", "amy-secret", d.port, mech="PLAIN"))
        assert failures[0]["condition"] == "temporary-auth-failure"
        assert "throttl" in d.logtext().lower()
        # A per-account limit that engages before the per-address+account one is flagged.
        assert "limits.auth_failures_per_account = 3 is not above" in d.logtext()
    finally:
        d.stop()


def test_example_config_is_valid(tmp_path):
    """etc/xmppd.toml, with its paths pointed into a temp dir, passes xmppctl check."""
    text = (REPO / "etc" / "xmppd.toml").read_text()
    for path in ("/var/lib/xmppd", "/etc/xmppd/certs", "/etc/letsencrypt/live"):
        (tmp_path / path.strip("/")).mkdir(parents=True, exist_ok=True)
        text = text.replace(f'"{path}"', f'"{tmp_path / path.strip("/")}"')
    cfg = tmp_path / "xmppd.toml"
    cfg.write_text(text)
    result = subprocess.run([sys.executable, "-m", "xmppd.ctl", "--config", str(cfg), "check"],
                            env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_connection_limit_per_ip_and_auth_timeout(tmp_path):
    from tests.rawclient import RawClient

    d = Daemon(tmp_path)
    d.write_config(extra="")
    text = d.config_path.read_text().replace("max_connections_per_ip = 0",
                                              "max_connections_per_ip = 2\nauth_timeout = 1")
    d.config_path.write_text(text)
    d.start()
    import time
    time.sleep(0.5)  # let the start-up port probe's connection be released
    try:
        first, second = RawClient(d.port), RawClient(d.port)
        first.open_stream()
        second.open_stream()
        third = RawClient(d.port)
        third.send("<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
                   "to='localhost' version='1.0'>")
        assert b"<policy-violation" in third.read_all(3)
        # the two admitted streams never authenticate: closed after auth_timeout
        assert b"<connection-timeout" in first.read_all(4)
        assert b"<connection-timeout" in second.read_all(4)
        assert "too many connections" in d.logtext()
    finally:
        d.stop()


def test_ctl_check_and_startup_name_a_broken_connector(tmp_path):
    port = free_port()  # nothing listens here
    d = Daemon(tmp_path, extra=f"""
        [auth]
        connector = "sql"
        [auth.sql]
        uri = "postgresql://x:y@127.0.0.1:{port}/nope"
        timeout = 2
    """)
    r = d.ctl("check", check=False)
    assert r.returncode == 1 and "auth.sql.uri" in r.stdout
    d.start()
    try:
        import time
        deadline = time.monotonic() + 10
        while "auth.sql.uri" not in d.logtext():
            assert time.monotonic() < deadline, d.logtext()
            time.sleep(0.2)
    finally:
        d.stop()

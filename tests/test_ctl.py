"""xmppctl: the same validation as start-up, read-only commands that write
nothing, no key material left behind, no store guessed, clear refusals."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.daemon import REPO, Daemon, free_port
from tests.test_startup import _twistd


def _ctl(args, cwd, env=None, script=None):
    """``python -m xmppd.ctl ARGS`` in ``cwd``; ``script`` runs before main() (patches)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    if script is None:
        argv = [sys.executable, "-m", "xmppd.ctl", *args]
    else:
        argv = [sys.executable, "-c", f"import sys, xmppd.ctl as ctl\n{script}\nctl.main(sys.argv[1:])",
                *args]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def _config(tmp_path, toml: str, c2s: str | None = None):
    if c2s is None:
        c2s = f"[c2s]\nlisten = ['tcp:{free_port()}:interface=127.0.0.1']\nlisten_tls = []\n"
    cfg = tmp_path / "xmppd.toml"
    cfg.write_text(f"[server]\ndata_dir = '{tmp_path / 'var'}'\n{c2s}{textwrap.dedent(toml)}")
    return cfg


@pytest.mark.parametrize("toml,c2s,key", [
    ("[ping]\nintervall = 3\n", None, "ping.intervall"),
    ("[blocking]\nbounce = 'yes'\n", None, "blocking.bounce"),
    ("[offline]\nmax_messages = 'lots'\n", None, "offline.max_messages"),
    ("[sm]\nplugins = ['presence', 'roster']\n", None, "sm.plugins"),
    ("[sasl]\nscram_iterations = 10000\n", None, "sasl.scram_iterations"),
    ("", "[c2s]\nlisten = ['tcp:99999']\n", "c2s.listen"),
    ("", "[c2s]\nlisten = ['tcp:5222:interface=999.1.1.1']\n", "c2s.listen"),
    ("", "[c2s]\nlisten = ['unix:/nonexistent/dir/c2s.sock']\n", "c2s.listen"),
    ("", "[c2s]\nlisten = []\nlisten_tls = ['ssl:5223']\n", "c2s.listen_tls"),
    ("", "[c2s]\nlisten = ['tcp:5223:interface=127.0.0.1']\n", "c2s.listen_tls"),
])
def test_check_refuses_what_startup_refuses(tmp_path, toml, c2s, key):
    cfg = _config(tmp_path, toml, c2s)
    check = _ctl(["--config", str(cfg), "check"], tmp_path)
    assert check.returncode == 1, check.stdout + check.stderr
    assert key in check.stdout + check.stderr and "Traceback" not in check.stderr
    assert not (tmp_path / "var").exists()  # check wrote nothing
    start = _twistd(["--config", str(cfg)], tmp_path)
    assert start.returncode != 0 and key in start.stderr and "Traceback" not in start.stderr


def test_sasl_scram_iterations_names_the_effective_key(tmp_path):
    cfg = _config(tmp_path, "[sasl]\nscram_iterations = 10000\n")
    err = _ctl(["--config", str(cfg), "check"], tmp_path).stderr
    assert "sasl.scram_iterations = 10000" in err and "[auth] scram_iterations" in err
    cfg = _config(tmp_path, "[auth]\nscram_iterations = 10000\n")
    assert _ctl(["--config", str(cfg), "check"], tmp_path).returncode == 0


def test_check_and_certs_write_nothing_and_leave_no_key(tmp_path):
    cfg = _config(tmp_path, "")
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    env = {"TMPDIR": str(private_tmp)}
    check = _ctl(["--config", str(cfg), "check"], tmp_path, env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "no store at" in check.stdout  # a wrong data_dir shows up here
    certs = _ctl(["--config", str(cfg), "certs"], tmp_path, env)
    assert certs.returncode == 0, certs.stderr
    # the preview is shown where the server would put it...
    assert f"generated: {tmp_path / 'var' / 'certs' / 'localhost.pem'}" in certs.stdout
    # ...but nothing was written there, and no private key is left anywhere
    assert not (tmp_path / "var").exists()
    assert list(private_tmp.iterdir()) == []


def test_read_only_commands_and_unknown_accounts(tmp_path):
    d = Daemon(tmp_path)
    d.adduser("amy@localhost", "amy-secret")
    from xmppd.storage import SQLiteStore

    store = SQLiteStore(str(d.data_dir))
    store.put("blocklist", "amy@localhost", "spam.example", True)
    store.close()
    before = sorted(p.name for p in d.data_dir.iterdir())
    assert d.ctl("blocklist", "amy@localhost").stdout == "spam.example\n"
    d.ctl("reports")
    d.ctl("check")
    # read-only: not even SQLite's -wal/-shm files appear (a root-run tool
    # would leave them owned by root)
    assert sorted(p.name for p in d.data_dir.iterdir()) == before
    r = d.ctl("blocklist", "nobody@localhost", check=False)
    assert r.returncode == 1 and r.stderr == "xmppctl: no such account nobody@localhost\n"
    d.start()
    try:  # and while the server runs (WAL in use), read-only still reads
        assert d.ctl("blocklist", "amy@localhost").stdout == "spam.example\n"
    finally:
        d.stop()


def test_no_store_is_created_where_a_wrong_config_points(tmp_path):
    cfg = _config(tmp_path, "")
    store = tmp_path / "var" / "xmppd.sqlite3"
    for args in (["passwd", "amy@localhost", "amy-secret"], ["blocklist", "amy@localhost"],
                 ["filter", "amy@localhost"]):
        r = _ctl(["--config", str(cfg), *args], tmp_path)
        assert r.returncode == 1, args
        assert r.stderr == f"xmppctl: no store at {store}: is --config right?\n"
    assert not (tmp_path / "var").exists()
    # adduser makes the first store of a fresh install, and says so
    r = _ctl(["--config", str(cfg), "adduser", "amy@localhost", "amy-secret"], tmp_path)
    assert r.returncode == 0 and f"created a new store at {store}" in r.stderr
    assert _ctl(["--config", str(cfg), "passwd", "amy@localhost", "amy-secret-2"],
                tmp_path).returncode == 0


def test_without_config_uses_the_documented_default_or_refuses(tmp_path):
    missing = tmp_path / "etc" / "xmppd.toml"
    patch = f"ctl.DEFAULT_CONFIG = {str(missing)!r}"
    r = _ctl(["adduser", "amy@localhost", "amy-secret"], tmp_path, script=patch)
    assert r.returncode == 1 and f"no --config given and no {missing}" in r.stderr
    assert not (tmp_path / "var").exists()
    # the documented default, when it exists, is what is used
    missing.parent.mkdir()
    missing.write_text(f"[server]\ndata_dir = '{tmp_path / 'srv'}'\n")
    r = _ctl(["adduser", "amy@localhost", "amy-secret"], tmp_path, script=patch)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "srv" / "xmppd.sqlite3").exists() and not (tmp_path / "var").exists()
    # the built-in configuration only when asked for
    r = _ctl(["--defaults", "adduser", "amy@localhost", "amy-secret"], tmp_path, script=patch)
    assert r.returncode == 0 and (tmp_path / "var" / "xmppd.sqlite3").exists()


def test_password_minimum(tmp_path):
    d = Daemon(tmp_path)
    for args in (["adduser", "amy@localhost", "short"], ["addusers", "u", "2", "1234567"]):
        r = d.ctl(*args, check=False)
        assert r.returncode == 1 and "shorter than 8 characters" in r.stderr, args
    r = d.ctl("adduser", "amy@localhost", input="tiny\n", check=False)
    assert r.returncode == 1 and "shorter than 8 characters" in r.stderr
    d.adduser("amy@localhost", "12345678")
    r = d.ctl("passwd", "amy@localhost", "x", check=False)
    assert r.returncode == 1 and "shorter than 8 characters" in r.stderr


def test_file_level_config_errors_read_plainly(tmp_path):
    missing = tmp_path / "nope.toml"
    r = _ctl(["--config", str(missing), "check"], tmp_path)
    assert r.returncode == 1 and r.stderr == f"xmppctl: {missing}: file not found\n"
    start = _twistd(["--config", str(missing)], tmp_path)
    assert f"xmppd: {missing}: file not found\n" in start.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\n")
    r = _ctl(["--config", str(broken), "check"], tmp_path)
    assert r.stderr.startswith(f"xmppctl: {broken}: not valid TOML: ") and "None" not in r.stderr
    r = _ctl(["--config", str(tmp_path), "check"], tmp_path)
    assert r.stderr == f"xmppctl: {tmp_path}: is a directory, not a config file\n"


def test_certificate_errors_name_the_key_and_promise_nothing(tmp_path):
    missing = tmp_path / "missing.pem"
    cfg = _config(tmp_path, f"[hosts.\"localhost\".tls]\ncert = '{missing}'\n")
    check = _ctl(["--config", str(cfg), "check"], tmp_path)
    assert check.returncode == 1
    assert f'error: localhost: hosts."localhost".tls.cert: {missing}: ' in check.stdout
    assert "will be generated" not in check.stdout
    certs = _ctl(["--config", str(cfg), "certs"], tmp_path)
    assert certs.returncode == 1 and 'hosts."localhost".tls.cert' in certs.stderr
    assert "Traceback" not in certs.stderr and "CertificateError" not in certs.stderr
    start = _twistd(["--config", str(cfg)], tmp_path)
    assert start.returncode != 0 and 'hosts."localhost".tls.cert' in start.stderr

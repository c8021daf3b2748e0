"""Operating the daemon: start-up that tells the truth, pid file, systemd.

A listener that cannot bind stops start-up with one line; one data directory
serves one process; the service manager hears READY/RELOADING/STOPPING at
the right moments; the shipped unit's restrictions do not break the daemon;
``make install`` gives a venv whose twistd runs xmppd.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.daemon import REPO, Daemon, stop_process, wait_for_port
from tests.xmpp import connect, run

UNIT = REPO / "etc" / "xmppd.service"


def xmppd_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("xmppd:")]


def wait_for_text(d: Daemon, text: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while text not in d.logtext():
        assert time.monotonic() < deadline, d.logtext()[-3000:]
        time.sleep(0.1)


class NotifySocket:
    """The service manager's end of sd_notify: an AF_UNIX datagram socket."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)

    def next(self, timeout: float = 20) -> list[str]:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode().splitlines()

    def pending(self) -> list[list[str]]:
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096).decode().splitlines())
        except BlockingIOError:
            return out

    def close(self) -> None:
        self.sock.close()


# -- listeners -----------------------------------------------------------------------

@pytest.mark.parametrize("key", ["c2s.listen", "c2s.listen_tls"])
def test_listener_that_cannot_bind_stops_start_up(tmp_path, key):
    d = Daemon(tmp_path, direct_tls=True)
    port = d.port if key == "c2s.listen" else d.tls_port
    notify = NotifySocket(tmp_path / "notify")
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    try:
        d.extra_env["NOTIFY_SOCKET"] = notify.path
        d.start(wait=False)
        returncode = d.proc.wait(timeout=30)
        log = d.logtext()
        assert returncode != 0, log
        lines = xmppd_lines(log)
        assert lines == [f"xmppd: {d.config_path}: {key} = 'tcp:{port}:interface=127.0.0.1': "
                         "cannot listen: address already in use"], log
        assert "xmppd serving" not in log and "Traceback" not in log
        assert not any("READY=1" in m for m in notify.pending())
        assert not (d.data_dir / "xmppd.pid").exists()
    finally:
        blocker.close()
        notify.close()
        d.stop()


def test_invalid_port_is_a_config_error(tmp_path):
    d = Daemon(tmp_path)
    d.config_path.write_text(d.config_path.read_text().replace(
        f'listen = ["tcp:{d.port}:interface=127.0.0.1"]', 'listen = ["tcp:99999"]'))
    d.start(wait=False)
    assert d.proc.wait(timeout=30) != 0
    lines = xmppd_lines(d.logtext())
    assert len(lines) == 1, d.logtext()
    assert "c2s.listen = 'tcp:99999'" in lines[0] and "out of range" in lines[0]
    r = d.ctl("check", check=False)
    assert r.returncode == 1 and "c2s.listen = 'tcp:99999'" in r.stderr


# -- the pid file --------------------------------------------------------------------

def test_second_instance_on_the_same_data_dir_refuses_to_start(tmp_path):
    first = Daemon(tmp_path / "first").start()
    second = Daemon(tmp_path / "second")
    pidfile = first.data_dir / "xmppd.pid"
    try:
        assert pidfile.read_text().strip() == str(first.proc.pid)
        second.data_dir = first.data_dir
        second.write_config()
        second.start(wait=False)
        assert second.proc.wait(timeout=30) != 0
        lines = xmppd_lines(second.logtext())
        assert len(lines) == 1, second.logtext()
        assert "server.data_dir" in lines[0] and f"pid {first.proc.pid}" in lines[0]
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", second.port), timeout=1).close()
        # The first server still owns its pid file and still reloads.
        assert pidfile.read_text().strip() == str(first.proc.pid)
        r = first.ctl("reload")
        assert f"pid {first.proc.pid}" in r.stdout
        wait_for_text(first, "xmppctl reload: reloading")
    finally:
        second.stop()
        first.stop()
    assert not pidfile.exists()  # its owner removed it on exit


def test_stale_pid_file_is_taken_over(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    d = Daemon(tmp_path)
    d.data_dir.mkdir()
    pidfile = d.data_dir / "xmppd.pid"
    pidfile.write_text(f"{dead.pid}\n")
    # No server holds the file: reload must not signal whatever has that pid now.
    r = d.ctl("reload", check=False)
    assert r.returncode == 1 and "not running" in r.stderr
    d.start()
    try:
        assert pidfile.read_text().strip() == str(d.proc.pid)
        wait_for_text(d, f"names pid {dead.pid}")
        assert "taking it over" in d.logtext()
    finally:
        d.stop()


# -- sd_notify -----------------------------------------------------------------------

def test_sd_notify_ready_reloading_stopping(tmp_path):
    notify = NotifySocket(tmp_path / "notify")
    d = Daemon(tmp_path, direct_tls=True)
    d.extra_env["NOTIFY_SOCKET"] = notify.path
    try:
        d.start(wait=False)
        first = notify.next()
        # READY=1 is sent only once every listener accepts.
        for port in (d.port, d.tls_port):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        assert "READY=1" in first and any(f.startswith("STATUS=serving localhost") for f in first)
        assert "xmppd serving" in d.logtext()

        d.proc.send_signal(signal.SIGHUP)
        reloading = notify.next()
        assert "RELOADING=1" in reloading
        assert any(f.startswith("MONOTONIC_USEC=") for f in reloading)
        assert "READY=1" in notify.next()
        wait_for_text(d, "SIGHUP: reloading")

        d.proc.send_signal(signal.SIGTERM)
        assert notify.next() == ["STOPPING=1"]
        # twistd re-raises SIGTERM on exit; systemd counts that as clean.
        assert d.proc.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        notify.close()
        d.stop()


def test_notifier_abstract_socket_and_no_op():
    from xmppd.sdnotify import Notifier

    name = f"xmppd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(5)
        assert Notifier("@" + name).stopping()
        assert s.recv(100) == b"STOPPING=1"
    assert Notifier(None).ready() is False
    # A socket that went away is reported, never raised.
    assert Notifier(f"/nonexistent/{name}").ready() is False


# -- the systemd unit ----------------------------------------------------------------

def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """``Key=value`` lines of the unit (comments and sections dropped)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


# Applies what the unit asks of the process that setpriv cannot: UMask= and,
# if the unit sets it, MemoryDenyWriteExecute= (prctl PR_SET_MDWE, kept
# across execve), then execs twistd.
_RESTRICT = """\
import ctypes, os, sys
os.umask(int(sys.argv[1], 8))
if sys.argv[2] == "yes":
    PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
    assert ctypes.CDLL(None, use_errno=True).prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) == 0
os.execv(sys.argv[3], sys.argv[3:])
"""


def test_daemon_runs_under_the_units_restrictions(tmp_path):
    """No new privileges, no capabilities, the unit's umask and W^X setting:
    STARTTLS and direct TLS (SNI and ALPN callbacks) logins and a reload work."""
    unit = unit_settings()
    assert unit["NoNewPrivileges"] == ["yes"] and unit["CapabilityBoundingSet"] == [""]
    umask = unit["UMask"][-1]
    mdwe = unit.get("MemoryDenyWriteExecute", ["no"])[-1]
    d = Daemon(tmp_path, direct_tls=True)
    d.prefix = ["setpriv", "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all",
                sys.executable, "-c", _RESTRICT, umask, mdwe]
    d.start()
    try:
        status = Path(f"/proc/{d.proc.pid}/status").read_text()
        assert "NoNewPrivs:\t1" in status and "CapEff:\t0000000000000000" in status
        assert (d.data_dir / "xmppd.pid").stat().st_mode & 0o777 & int(umask, 8) == 0
        d.adduser("uma@localhost", "uma-secret")

        async def login():
            c = await connect("uma@localhost/x", "uma-secret", d.port, mech="SCRAM-SHA-256")
            c.disconnect()

        run(login())
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.set_alpn_protocols(["xmpp-client"])
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", d.tls_port), timeout=10),
                             server_hostname="localhost") as tls:
            assert tls.selected_alpn_protocol() == "xmpp-client"
            tls.sendall(b"<stream:stream xmlns='jabber:client' xmlns:stream="
                        b"'http://etherx.jabber.org/streams' to='localhost' version='1.0'>")
            data = b""
            while b"</stream:features>" not in data:
                chunk = tls.recv(4096)
                assert chunk, data
                data += chunk
            assert b"SCRAM-SHA-256" in data
        d.ctl("reload")
        wait_for_text(d, "xmppctl reload: reloading")
    finally:
        d.stop()


def test_unit_security_exposure():
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=14", str(UNIT)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr
    assert "Overall exposure level" in r.stdout


def test_make_install_gives_a_venv_that_runs_xmppd(tmp_path):
    """`make install PREFIX=...`: non-editable venv, plugin found, unit points at it."""
    prefix = tmp_path / "opt" / "xmppd"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run(["make", "--no-print-directory", "install", f"PREFIX={prefix}"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]

    # The package and plugin live in the venv, not in the checkout.
    r = subprocess.run([str(prefix / "bin" / "python"), "-c",
                        "import xmppd, twisted.plugins.xmppd_plugin as p; print(xmppd.__file__, p.__file__)"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert all(path.startswith(str(prefix)) for path in r.stdout.split()), r.stdout
    site = Path(r.stdout.split()[1]).parent
    assert (site / "dropin.cache").exists()  # prebuilt: the venv is read-only under systemd

    unit = prefix / "share" / "xmppd" / "xmppd.service"
    exec_start = unit_settings(unit)["ExecStart"][0].split()
    assert exec_start[0] == str(prefix / "bin" / "twistd")
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr

    # Run the unit's command line (its own config file) from the venv alone.
    d = Daemon(tmp_path / "run")
    argv = [str(prefix / "bin" / "twistd") if a == exec_start[0] else a for a in exec_start]
    argv[argv.index("--config") + 1] = str(d.config_path)
    ctl = [str(prefix / "bin" / "xmppctl"), "--config", str(d.config_path)]
    with open(d.dir / "xmppd.log", "wb") as log:
        proc = subprocess.Popen(argv, cwd=d.dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(d.port, proc=proc, logfile=d.dir / "xmppd.log")
        subprocess.run([*ctl, "adduser", "ivy@localhost", "ivy-secret"], env=env, check=True,
                       capture_output=True)

        async def login():
            c = await connect("ivy@localhost/x", "ivy-secret", d.port)
            c.disconnect()

        run(login())
        r = subprocess.run([*ctl, "reload"], env=env, capture_output=True, text=True)
        assert f"pid {proc.pid}" in r.stdout, r.stderr
        wait_for_text(d, "xmppctl reload: reloading")
        assert str(REPO) not in d.logtext()
    finally:
        stop_process(proc)
    shutil.rmtree(prefix, ignore_errors=True)

"""Start the real daemon (``twistd -n xmppd`` through its plugin) for tests.

Each :class:`Daemon` gets its own data dir, config file and free loopback
ports, and is stopped with SIGTERM (or killed with SIGKILL where a test
wants a crash).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TWISTD = Path(sys.executable).parent / "twistd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None,
                  logfile: Path | None = None) -> None:
    """Wait until something listens on ``port``; fail early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            log = logfile.read_text(errors="replace")[-2000:] if logfile and logfile.exists() else ""
            raise RuntimeError(f"daemon exited with {proc.returncode}\n{log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} not listening")


def stop_process(proc: subprocess.Popen | None, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Daemon:
    """One xmppd process with a generated config."""

    def __init__(self, tmp: Path, hosts=("localhost",), extra: str = "", plugins=None,
                 tls: str = "required", direct_tls: bool = False, c2s: str = "",
                 s2s: str | None = None, s2s_direct_tls: bool = False,
                 store: str = "sqlite", pg=None, pg_dsn: str | None = None,
                 storage_dir: str | None = None) -> None:
        """``s2s``: lines for an ``[s2s]`` table with a loopback listener on
        ``self.s2s_port`` (and ``self.s2s_tls_port`` with ``s2s_direct_tls``);
        None switches federation off (``enabled = false``), so that no test
        daemon looks up other domains in DNS.  ``store="postgresql"``: the
        store in a fresh database of the tests' private PostgreSQL server
        (tests/backends.py), its schema made by ``xmppctl create-schema``
        at the first start (or first ``adduser``); ``self.pg`` is that server,
        ``self.pg_dsn`` the DSN.  ``pg_dsn``: that database instead of a
        fresh one (the nodes of a cluster share one; its schema is made by
        whichever node needs it first, ``create-schema`` is idempotent).
        ``storage_dir``: ``[storage] dir`` with PostgreSQL (files the nodes
        share, e.g. the dialback secret).  Such a daemon runs with the reactor
        guard of :mod:`xmppd.storage_pg` (a statement on the reactor thread is
        refused and logged), and :meth:`stop` fails the test if the log shows one."""
        self.dir = Path(tmp)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hosts = tuple(hosts)
        self.port = free_port()
        self.tls_port = free_port() if direct_tls else None
        self.data_dir = self.dir / "var"
        self.config_path = self.dir / "xmppd.toml"
        self.proc: subprocess.Popen | None = None
        self.extra_env: dict[str, str] = {}  # e.g. NOTIFY_SOCKET
        self.prefix: list[str] = []  # argv before twistd, e.g. setpriv
        self.c2s = c2s  # extra lines for the [c2s] table, e.g. "auth_timeout = 2"
        self.s2s = s2s
        self.s2s_port = free_port() if s2s is not None else None
        self.s2s_tls_port = free_port() if s2s is not None and s2s_direct_tls else None
        self.store = store
        self.storage_dir = storage_dir
        self.pg = self.pg_dsn = None
        if store == "postgresql":
            from tests.backends import postgres_server

            self.pg = pg if pg is not None else postgres_server()
            self.pg_dsn = pg_dsn or self.pg.create_database(f"xmppd_{self.port}")
        self._schema_made = False
        self.write_config(extra, plugins, tls)

    def write_config(self, extra: str = "", plugins=None, tls: str = "required") -> None:
        plugin_line = ""
        if plugins is not None:
            plugin_line = "plugins = [" + ", ".join(f'"{p}"' for p in plugins) + "]"
        listen_tls = f'["tcp:{self.tls_port}:interface=127.0.0.1"]' if self.tls_port else "[]"
        text = textwrap.dedent(f"""\
            [server]
            hosts = [{", ".join(f'"{h}"' for h in self.hosts)}]
            data_dir = "{self.data_dir}"

            [c2s]
            listen = ["tcp:{self.port}:interface=127.0.0.1"]
            listen_tls = {listen_tls}
            tls = "{tls}"
            max_connections_per_ip = 0
            {{c2s_lines}}
            [sm]
            {plugin_line}
            """)
        text = text.replace("{c2s_lines}", textwrap.dedent(self.c2s).strip() + "\n")
        if self.s2s is None:
            # No test reaches beyond this machine: without an [s2s] of its
            # own, a daemon does not federate (other domains bounce at once).
            text += "\n[s2s]\nenabled = false\n"
        else:
            listen_tls = f'["tcp:{self.s2s_tls_port}:interface=127.0.0.1"]' if self.s2s_tls_port else "[]"
            text += (f'\n[s2s]\nlisten = ["tcp:{self.s2s_port}:interface=127.0.0.1"]\n'
                     f"listen_tls = {listen_tls}\n" + textwrap.dedent(self.s2s).strip() + "\n")
        if self.pg_dsn is not None:
            text += (f'\n[storage]\nbackend = "postgresql"\ndsn = "{self.pg_dsn}"\n'
                     "connect_timeout = 2\n")
            if self.storage_dir is not None:
                text += f'dir = "{self.storage_dir}"\n'
        self.config_path.write_text(text + textwrap.dedent(extra))

    def env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env.update(self.extra_env)
        return env

    def prepare_store(self) -> "Daemon":
        """On PostgreSQL, the schema (``xmppctl create-schema``), once: before the first
        start, or before accounts are added to a daemon not started yet."""
        if self.pg_dsn is not None and not self._schema_made:
            self.ctl("create-schema")
            self._schema_made = True
        return self

    def start(self, wait: bool = True) -> "Daemon":
        self.prepare_store()
        self.log = open(self.dir / "xmppd.log", "ab")
        self.proc = subprocess.Popen(
            [*self.prefix, str(TWISTD), "--nodaemon", "--pidfile=", "xmppd", "--config", str(self.config_path)],
            cwd=self.dir, env=self.daemon_env(), stdout=self.log, stderr=subprocess.STDOUT,
        )
        if wait:
            wait_for_port(self.port, proc=self.proc)
            if self.tls_port:
                wait_for_port(self.tls_port, proc=self.proc)
            if self.s2s_port:
                wait_for_port(self.s2s_port, proc=self.proc)
            self.wait_started()
        return self

    def wait_started(self, timeout: float = 20.0) -> None:
        """Wait until the service runs: its pid file names it.

        Listeners are bound before the reactor starts (start-up fails on a
        port that is taken), so an accepting port alone does not mean that
        ``startService`` (pid file, timers, the "serving" line) has run.
        """
        pidfile = self.data_dir / "xmppd.pid"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}\n{self.logtext()[-2000:]}")
            try:
                if pidfile.read_text().strip() == str(self.proc.pid):
                    return
            except OSError:
                pass
            time.sleep(0.02)
        raise TimeoutError(f"{pidfile} never named pid {self.proc.pid}")

    def daemon_env(self) -> dict:
        """The daemon's environment: :meth:`env`, plus the reactor guard on PostgreSQL
        (not for xmppctl, which may wait for the database on its own reactor)."""
        env = self.env()
        if self.pg_dsn is not None:
            from xmppd.storage_pg import GUARD_ENV

            env[GUARD_ENV] = "1"
        return env

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None
        if self.pg_dsn is not None:
            self.assert_no_reactor_statements()

    def assert_no_reactor_statements(self) -> None:
        """No PostgreSQL statement ran on the reactor thread (it would block it)."""
        from xmppd.storage_pg import GUARD_TEXT

        lines = [line for line in self.logtext().splitlines() if GUARD_TEXT in line]
        assert not lines, "blocking store calls on the reactor:\n" + "\n".join(lines[:10])

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def logtext(self) -> str:
        return (self.dir / "xmppd.log").read_text(errors="replace")

    def ctl(self, *args: str, input: str | None = None, check: bool = True,
            env: dict | None = None) -> subprocess.CompletedProcess:
        """``xmppctl --config <this daemon's config> ARGS``; ``env`` adds variables."""
        result = subprocess.run(
            [sys.executable, "-m", "xmppd.ctl", "--config", str(self.config_path), *args],
            env={**self.env(), **(env or {})}, input=input, capture_output=True, text=True,
            cwd=self.dir,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"xmppctl {args} failed: {result.stderr}")
        return result

    def adduser(self, jid: str, password: str) -> None:
        self.prepare_store()
        self.ctl("adduser", jid, password)

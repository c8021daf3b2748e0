"""The servers under test: each writes its own config into a private temp
directory, starts on loopback on its own port, and is stopped by the runner.

Every target gets the same things: one virtual host (``bench.local``), one
self-signed RSA-2048 certificate, STARTTLS required, SCRAM-SHA-1 with 4096
iterations for stored credentials, roster + presence + disco + ping +
blocking (XEP-0191), no rate limiting / traffic shaping, no s2s (but in the
s2s phase, bench/s2s.py: :class:`S2S`), no HTTP, no
offline storage where it can be switched off, a listen backlog of 1024
(the defaults, 5 for ejabberd and 50 for Twisted, drop connections when 100
logins are in flight), logging at the packages' default level ("info") into
the temp directory.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _dpkg_version(pkg: str) -> str | None:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Status}|${Version}", pkg],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or "install ok installed" not in out.stdout:
        return None
    return out.stdout.split("|", 1)[1]


def _chown_tree(path: Path, user: str):
    pw = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, pw.pw_uid, pw.pw_gid)
        for n in files:
            os.chown(os.path.join(root, n), pw.pw_uid, pw.pw_gid)


@dataclass
class S2S:
    """Federation settings of a target in the s2s phase: its s2s listener,
    its certificate (from the bench CA, which is the only one it trusts) and
    where the other server's s2s listener is, by domain."""

    port: int
    ca_file: Path
    cert: Path
    key: Path
    routes: dict[str, int]   # remote domain -> its s2s port on 127.0.0.1


@dataclass
class Cluster:
    """An xmppd node's part in the cluster phase: one store directory shared by
    every node (and the stand-alone baseline), and, for a node, the Redis it
    shares with the others and its node name (None: stand-alone on the store)."""

    store: Path
    redis_url: str | None = None
    node: str | None = None


# Prosody 0.12 cannot be told to send s2s for a domain to a fixed address:
# mod_s2s always resolves it with net.resolvers.service (DNS SRV, then A/AAAA,
# against /etc/resolv.conf's servers).  This plugin, written for xmppd's
# benchmarks and tests, replaces that constructor by a fixed loopback target
# for the domains in ``test_s2s_routes``; the connection itself (TLS,
# certificate checks, EXTERNAL or dialback) is Prosody's own.
PROSODY_ROUTES_PLUGIN = """\
-- mod_test_s2s_routes: from xmppd's bench/targets.py, not for production.
module:set_global();
local service = require "net.resolvers.service";
local manual = require "net.resolvers.manual";
local routes = module:get_option("test_s2s_routes", {});
local by_dns = service.new;
service.new = function (hostname, service_name, proto, extra)
    local port = routes[hostname];
    if port == nil then
        return by_dns(hostname, service_name, proto, extra);
    end
    if service_name ~= "xmpp-server" then
        return manual.new({}, proto, extra);  -- no direct TLS route: STARTTLS only
    end
    module:log("info", "test route for %s: 127.0.0.1:%d", hostname, port);
    return manual.new({ { proto .. "4", "127.0.0.1", port, extra } }, proto, extra);
end
function module.unload()
    service.new = by_dns;
end
"""


class Target:
    name = "?"
    # "offline": accounts are created by an admin tool before the server starts;
    # "ibr": by XEP-0077 in-band registration once it runs.
    provisioning = "ibr"
    run_as: str | None = None
    s2s: S2S | None = None   # set by the s2s phase (bench/s2s.py) before prepare()
    cluster: "Cluster | None" = None  # set by the cluster phase (bench/cluster.py), xmppd only
    # SCHED_BATCH: no wake-up preemption (the cluster phase, where several
    # server processes share the pinned core: bench/cluster.py says why)
    sched_batch = False

    def __init__(self, workdir: Path, port: int, domain: str, cert: dict,
                 password: str, cpu: set[int] | None):
        self.dir = workdir
        self.port = port
        self.domain = domain
        self.cert = cert          # {"cert": path, "key": path, "combined": path}
        self.password = password
        self.cpu = cpu            # CPU affinity for the server process tree
        self.proc: subprocess.Popen | None = None
        self.logf = None

    # -- to implement ---------------------------------------------------------
    @classmethod
    def available(cls) -> tuple[bool, str]:
        raise NotImplementedError

    @classmethod
    def version(cls) -> str:
        raise NotImplementedError

    def write_config(self):
        raise NotImplementedError

    def command(self) -> tuple[list[str], dict, str]:
        """argv, extra environment, cwd"""
        raise NotImplementedError

    def provision_offline(self, prefix: str, count: int):
        raise NotImplementedError

    # -- common ---------------------------------------------------------------
    def prepare(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        self.write_config()
        if self.run_as:
            _chown_tree(self.dir, self.run_as)

    def start(self):
        argv, env, cwd = self.command()
        full_env = dict(os.environ)
        full_env.update(env)
        self.logf = open(self.dir / "server.out", "ab")
        cpu = self.cpu
        batch = self.sched_batch

        def pre():
            if cpu:
                os.sched_setaffinity(0, cpu)
            if batch:
                os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))

        kw = {}
        if self.run_as:
            pw = pwd.getpwnam(self.run_as)
            kw.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
            full_env["HOME"] = str(self.dir)
            full_env["USER"] = full_env["LOGNAME"] = self.run_as
        self.proc = subprocess.Popen(argv, env=full_env, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=self.logf, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=pre, **kw)
        return self.proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        # stragglers of our own process group (e.g. erl_child_setup)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc = None
        if self.logf:
            self.logf.close()
            self.logf = None

    def cleanup(self):
        """Release what the target keeps between starts (ejabberd: its DNS server)."""

    def log_tail(self, n: int = 30) -> str:
        p = self.dir / "server.out"
        try:
            lines = p.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


# ---------------------------------------------------------------------------
class Xmppd(Target):
    name = "xmppd"
    provisioning = "offline"
    # --xmppd-metrics: serve the [metrics] page on port + 1 (free_port_pair
    # keeps it free), to measure what metrics cost per message.
    metrics = False
    # XEP-0198 plugin listed: run.py's phase 6 enables SM on every connection
    # (sessions that do not enable it pay nothing, so phases 1-5 are unchanged)
    stream_management = True

    @property
    def metrics_port(self) -> int | None:
        return self.port + 1 if self.metrics else None

    @staticmethod
    def _twistd() -> list[str]:
        for t in (REPO / ".venv" / "bin" / "twistd", Path(sys.executable).parent / "twistd"):
            if t.exists():
                return [str(t)]
        # "python -m twisted" is twist, not twistd (no -n, no --pidfile)
        return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]

    @staticmethod
    def _python() -> str:
        p = REPO / ".venv" / "bin" / "python"
        return str(p) if p.exists() else sys.executable

    @classmethod
    def available(cls):
        if not (REPO / "xmppd").is_dir():
            return False, f"xmppd source tree not found at {REPO}"
        return True, ""

    @classmethod
    def version(cls):
        try:
            out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                                 capture_output=True, text=True, timeout=10)
            v = out.stdout.strip()
        except OSError:
            v = ""
        return v or "working tree (no commit)"

    def write_config(self):
        (self.dir / "var").mkdir(parents=True, exist_ok=True)
        certs = self.dir / "certs"
        certs.mkdir(exist_ok=True)
        if self.s2s:
            (certs / f"{self.domain}.pem").write_bytes(self.s2s.cert.read_bytes() + self.s2s.key.read_bytes())
        else:
            shutil.copy(self.cert["combined"], certs / f"{self.domain}.pem")
        (self.dir / "xmppd.toml").write_text(f"""\
[server]
hosts = ["{self.domain}"]
data_dir = "{self.dir / 'var'}"

[c2s]
listen = ["tcp:{self.port}:interface=127.0.0.1:backlog=1024"]
listen_tls = []                 # no direct-TLS listener (its default port is 5223)
tls = "required"
max_connections_per_ip = 0      # 0 = unlimited

[tls]
certs_dir = "{certs}"

[auth]
scram_iterations = 4096

[sm]
plugins = ["roster", "presence", "disco", "ping", "urn:xmpp:blocking", "urn:xmpp:sm:3"{self._mam_plugins()}]
""" + (f"""
[metrics]
listen = "tcp:{self.metrics_port}:interface=127.0.0.1"
""" if self.metrics else "") + self._s2s_config() + self._cluster_config())

    # --xmppd-mam: the message archive on (XEP-0359 ids + XEP-0313, issue 16)
    mam = False

    def _mam_plugins(self) -> str:
        return ', "urn:xmpp:sid:0", "urn:xmpp:mam:2"' if self.mam else ""

    def _s2s_config(self) -> str:
        if not self.s2s:
            return ""
        routes = "".join(f'"{d}" = "tcp:127.0.0.1:{p}"\n' for d, p in self.s2s.routes.items())
        return f"""
[s2s]
listen = ["tcp:{self.s2s.port}:interface=127.0.0.1:backlog=1024"]
listen_tls = []
ca_file = "{self.s2s.ca_file}"
ca_system = false

[s2s.routes]
{routes}"""

    def _cluster_config(self) -> str:
        c = self.cluster
        if c is None:
            return ""
        out = f'\n[storage]\ndir = "{c.store}"\n'
        if c.redis_url:
            out += f'\n[cluster]\nredis = "{c.redis_url}"\nnode = "{c.node}"\n'
        return out

    def _env(self):
        pp = os.environ.get("PYTHONPATH")
        return {"PYTHONPATH": str(REPO) + (os.pathsep + pp if pp else "")}

    # --xmppd-profile DIR: run under cProfile (twistd --profile), stats saved
    # at shutdown as DIR/<domain>-<pid>.prof
    profile_dir: Path | None = None

    def command(self):
        profile = []
        if self.profile_dir:
            self.profile_dir.mkdir(parents=True, exist_ok=True)
            profile = ["--profiler", "cprofile", "--savestats",
                       "--profile", str(self.profile_dir / f"{self.domain}-{os.getpid()}-{self.port}.prof")]
        argv = self._twistd() + ["-n", "--pidfile", str(self.dir / "twistd.pid"), *profile,
                                 "xmppd", "--config", str(self.dir / "xmppd.toml")]
        return argv, self._env(), str(REPO)

    def provision_offline(self, prefix: str, count: int):
        ctl = REPO / ".venv" / "bin" / "xmppctl"
        base = [str(ctl)] if ctl.exists() else [self._python(), "-m", "xmppd.ctl"]
        argv = base + ["--config", str(self.dir / "xmppd.toml"),
                       "addusers", prefix, str(count), self.password]
        env = dict(os.environ)
        env.update(self._env())
        r = subprocess.run(argv, env=env, cwd=str(REPO), capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError("xmppctl addusers failed (%d): %s\n%s\ncommand: %s"
                               % (r.returncode, r.stdout[-2000:], r.stderr[-2000:],
                                  " ".join(argv)))


# ---------------------------------------------------------------------------
class Prosody(Target):
    name = "prosody"
    run_as = "prosody"

    @classmethod
    def available(cls):
        if _dpkg_version("prosody") and shutil.which("prosody"):
            return True, ""
        return False, "Prosody is not installed: apt-get update && apt-get install -y prosody " \
                      "(then stop the system service it starts: service prosody stop)"

    @classmethod
    def version(cls):
        return "prosody " + (_dpkg_version("prosody") or "?")

    def write_config(self):
        data = self.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        s2s = self.s2s
        shutil.copy(s2s.cert if s2s else self.cert["cert"], self.dir / "cert.pem")
        shutil.copy(s2s.key if s2s else self.cert["key"], self.dir / "key.pem")
        os.chmod(self.dir / "key.pem", 0o600)
        if s2s:
            shutil.copy(s2s.ca_file, self.dir / "ca.pem")
            (self.dir / "plugins").mkdir(exist_ok=True)
            (self.dir / "plugins" / "mod_test_s2s_routes.lua").write_text(PROSODY_ROUTES_PLUGIN)
            routes = "; ".join(f'["{d}"] = {p}' for d, p in s2s.routes.items())
            federation = f"""
s2s_ports = {{ {s2s.port} }}
s2s_interfaces = {{ "127.0.0.1" }}
s2s_direct_tls_ports = {{ }}
s2s_secure_auth = true
plugin_paths = {{ "{self.dir}/plugins" }}
test_s2s_routes = {{ {routes} }}
"""
            s2s_modules, disabled = ' "dialback"; "test_s2s_routes";', '"offline";'
        else:
            federation, s2s_modules, disabled = "s2s_ports = { }\n", "", '"s2s"; "offline";'
        cafile = f' cafile = "{self.dir}/ca.pem";' if s2s else ""
        (self.dir / "prosody.cfg.lua").write_text(f"""\
-- generated by bench/run.py
pidfile = "{self.dir}/prosody.pid"
data_path = "{data}"
log = {{ info = "{self.dir}/prosody.log" }}
daemonize = false
network_backend = "epoll"
network_settings = {{ tcp_backlog = 1024 }}

c2s_ports = {{ {self.port} }}
c2s_interfaces = {{ "127.0.0.1" }}
c2s_direct_tls_ports = {{ }}
legacy_ssl_ports = {{ }}
http_ports = {{ }}
https_ports = {{ }}
component_ports = {{ }}
{federation}
c2s_require_encryption = true
s2s_require_encryption = true
allow_unencrypted_plain_auth = false
authentication = "internal_hashed"
default_iteration_count = 4096
storage = "internal"

-- in-band registration is only used to provision the benchmark accounts
allow_registration = true
min_seconds_between_registrations = nil

modules_enabled = {{
    "roster"; "saslauth"; "tls"; "disco"; "ping"; "blocklist"; "register";{s2s_modules}
}}
modules_disabled = {{ {disabled} }}

ssl = {{ certificate = "{self.dir}/cert.pem"; key = "{self.dir}/key.pem";{cafile} }}

VirtualHost "{self.domain}"
""")

    def command(self):
        return (["prosody", "--config", str(self.dir / "prosody.cfg.lua"), "-F"],
                {}, str(self.dir))


# ---------------------------------------------------------------------------
class Ejabberd(Target):
    name = "ejabberd"
    run_as = "ejabberd"
    dns = None   # the SRV server of the s2s phase

    def cleanup(self):
        if self.dns is not None:
            self.dns.stop()
            self.dns = None

    @classmethod
    def available(cls):
        if _dpkg_version("ejabberd") and shutil.which("ejabberdctl"):
            return True, ""
        return False, "ejabberd is not installed: apt-get update && apt-get install -y ejabberd " \
                      "(then stop the system service it starts: service ejabberd stop)"

    @classmethod
    def version(cls):
        return "ejabberd " + (_dpkg_version("ejabberd") or "?")

    def write_config(self):
        for d in ("spool", "log"):
            (self.dir / d).mkdir(parents=True, exist_ok=True)
        s2s = self.s2s
        if s2s:
            (self.dir / "ejabberd.pem").write_bytes(s2s.cert.read_bytes() + s2s.key.read_bytes())
        else:
            shutil.copy(self.cert["combined"], self.dir / "ejabberd.pem")
        os.chmod(self.dir / "ejabberd.pem", 0o600)
        federation = s2s_listener = s2s_modules = ""
        if s2s:
            # ejabberd 23.01 has no per-domain route: it asks DNS for the remote
            # domain's _xmpp-server._tcp SRV record (Erlang's resolver, whose
            # servers come from the inetrc of the config dir), then resolves the
            # target with getaddrinfo.  A loopback DNS server answers with
            # "localhost" and the other server's s2s port (bench/srvdns.py).
            try:
                from bench.srvdns import SRVServer   # imported by the tests
            except ImportError:
                from srvdns import SRVServer         # run from bench/

            if self.dns is None:
                self.dns = SRVServer({f"_xmpp-server._tcp.{d}": ("localhost", p)
                                      for d, p in s2s.routes.items()})
            (self.dir / "inetrc").write_text(self.dns.inetrc())
            shutil.copy(s2s.ca_file, self.dir / "ca.pem")
            federation = f"""s2s_use_starttls: required
s2s_cafile: "{self.dir}/ca.pem"
s2s_dns_timeout: 2
"""
            s2s_listener = f"""  -
    port: {s2s.port}
    ip: "127.0.0.1"
    backlog: 1024
    module: ejabberd_s2s_in
    max_stanza_size: 262144
    shaper: s2s_shaper
"""
            s2s_modules = "  mod_s2s_dialback: {}\n"
        elif Path("/etc/ejabberd/inetrc").exists():
            shutil.copy("/etc/ejabberd/inetrc", self.dir / "inetrc")
        else:
            (self.dir / "inetrc").write_text("{lookup,[file,native]}.\n{host,{127,0,0,1}, [\"localhost\",\"hostalias\"]}.\n{file, resolv, \"/etc/resolv.conf\"}.\n")
        (self.dir / "ejabberd.yml").write_text(f"""\
# generated by bench/run.py
loglevel: info
log_rotate_count: 0
hosts:
  - "{self.domain}"
certfiles:
  - "{self.dir}/ejabberd.pem"
{federation}c2s_protocol_options:
  - "no_sslv3"
  - "no_tlsv1"
  - "no_tlsv1_1"
  - "cipher_server_preference"
  - "no_compression"
listen:
  -
    port: {self.port}
    ip: "127.0.0.1"
    backlog: 1024
    module: ejabberd_c2s
    max_stanza_size: 262144
    shaper: c2s_shaper
    access: c2s
    starttls_required: true
{s2s_listener}auth_method: internal
auth_password_format: scram
auth_scram_hash: sha
disable_sasl_mechanisms:
  - "digest-md5"
  - "x-oauth2"
  - "scram-sha-256"
  - "scram-sha-512"
registration_timeout: infinity
acl:
  local:
    user_regexp: ""
access_rules:
  local:
    allow: local
  c2s:
    allow: all
  register:
    allow: all
shaper_rules:
  max_user_sessions: 10
  c2s_shaper: none
  s2s_shaper: none
modules:
  mod_disco: {{}}
  mod_ping: {{}}
  mod_roster:
    versioning: false
  mod_privacy: {{}}
  mod_blocking: {{}}
{s2s_modules}  mod_register:
    ip_access: all
    access: register
    password_strength: 0
    welcome_message:
      subject: ""
      body: ""
""")
        # ejabberdctl config: own node name, Erlang distribution on a private
        # loopback port without epmd, scheduler busy-waiting off (otherwise idle
        # schedulers spin and bill CPU that no XMPP work needed).
        (self.dir / "ejabberdctl.cfg").write_text(f"""\
ERLANG_NODE=bench{self.port}@localhost
ERL_DIST_PORT={self.port + 1}
INET_DIST_INTERFACE=127.0.0.1
ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0 +sbwt none +sbwtdcpu none +sbwtdio none"
EJABBERD_BYPASS_WARNINGS=true
""")

    def command(self):
        argv = ["ejabberdctl", "--config-dir", str(self.dir),
                "--config", str(self.dir / "ejabberd.yml"),
                "--ctl-config", str(self.dir / "ejabberdctl.cfg"),
                "--logs", str(self.dir / "log"),
                "--spool", str(self.dir / "spool"),
                "foreground"]
        return argv, {}, str(self.dir)


TARGETS = {"xmppd": Xmppd, "prosody": Prosody, "ejabberd": Ejabberd}

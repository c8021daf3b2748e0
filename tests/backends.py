"""Real authentication backends for tests: PostgreSQL, OpenLDAP, Drupal-shaped databases.

Everything here is synchronous and reactor-free, so it serves both the
connector tests (which run Twisted's reactor through pytest-twisted) and
daemon-level tests (slixmpp against ``twistd -n xmppd``):

* :func:`postgres_server` / fixture ``postgres``: a private PostgreSQL
  cluster (``initdb`` + ``pg_ctl`` from /usr/lib/postgresql/*/bin) in a temp
  dir on a free loopback port; as root it runs as the ``postgres`` user.
* :func:`slapd_server` / fixture ``slapd``: OpenLDAP's ``slapd`` with its own
  slapd.conf, an mdb database loaded from a generated LDIF, and TLS
  (StartTLS on the ldap:// port, and an ldaps:// port) from a CA generated
  for the run.
* :class:`RedisServer` / fixture ``redis``: a private ``redis-server``
  (no persistence) for the cluster tests.
* builders for account databases: :func:`make_sql_db` (the sql connector's
  default schema), :func:`make_drupal_db` (Drupal 7 ``users`` / Drupal 8+
  ``users_field_data``).
* config tables: :func:`sql_auth_table`, :func:`drupal_auth_table`,
  :func:`ldap_auth_table` return the dict ``build_connector`` takes;
  :func:`auth_toml` renders one as TOML for a daemon's config file.

The servers are started once per test process (shared by every module that
asks for them) and stopped at exit.  Nothing is ever skipped: a missing
binary fails with the command that installs it.
"""
from __future__ import annotations

import atexit
import base64
import datetime
import glob
import hashlib
import os
import pwd
import shutil
import sqlite3
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.daemon import free_port, stop_process, wait_for_port

INSTALL_HINT = "run scripts/install-test-deps.sh (as root) to install postgresql, slapd, ldap-utils"




def _private_tmpdir(prefix: str, owner: str | None = None) -> Path:
    # Under /tmp itself (not pytest's 0700 tree) so another user can own it.
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    if owner is not None:
        pw = pwd.getpwnam(owner)
        os.chown(path, pw.pw_uid, pw.pw_gid)
    return path


# -- PostgreSQL ---------------------------------------------------------------------


def _pg_bindir() -> Path:
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0,
    )
    if not candidates:
        found = shutil.which("initdb")
        if found:
            return Path(found).parent
        pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) not found: " + INSTALL_HINT)
    return Path(candidates[-1]).parent


class PostgresServer:
    """A throw-away PostgreSQL cluster on 127.0.0.1:<free port>."""

    USER = "xmppd"
    PASSWORD = "pg-test-secret"

    def __init__(self) -> None:
        self.bindir = _pg_bindir()
        self.run_as = "postgres" if os.geteuid() == 0 else None
        if self.run_as is not None:
            try:
                pwd.getpwnam(self.run_as)
            except KeyError:
                pytest.fail("running as root but there is no 'postgres' user: " + INSTALL_HINT)
        self.dir = _private_tmpdir("xmppd-pg-", self.run_as)
        self.data = self.dir / "data"
        self.logfile = self.dir / "postgres.log"
        self.port = free_port()
        self.running = False
        self._initdb()

    def _cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        argv = list(args)
        if self.run_as is not None:
            argv = ["runuser", "-u", self.run_as, "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, cwd=self.dir)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def _initdb(self) -> None:
        pwfile = self.dir / "pwfile"
        pwfile.write_text(self.PASSWORD + "\n")
        if self.run_as is not None:
            pw = pwd.getpwnam(self.run_as)
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        self._cmd(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.USER,
            f"--pwfile={pwfile}", "--auth-host=scram-sha-256", "--auth-local=trust",
            "-E", "UTF8", "--locale=C.UTF-8", "--no-sync",
        )
        pwfile.unlink()

    def start(self) -> "PostgresServer":
        opts = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.logfile),
                  "-w", "-t", "30", "-o", opts, "start")
        wait_for_port(self.port)
        self.running = True
        return self

    def stop(self) -> None:
        if self.running:
            self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop",
                      check=False)
            self.running = False

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def uri(self, database: str = "postgres") -> str:
        return f"postgresql://{self.USER}:{self.PASSWORD}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres", autocommit: bool = True):
        import psycopg

        return psycopg.connect(self.uri(database), autocommit=autocommit)

    def create_database(self, name: str) -> str:
        """A fresh (dropped and re-created) database; returns its URI."""
        import psycopg.sql as psql

        with self.connect() as conn:
            conn.execute(psql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psql.Identifier(name)))
            conn.execute(psql.SQL("CREATE DATABASE {}").format(psql.Identifier(name)))
        return self.uri(name)


_POSTGRES: PostgresServer | None = None


def postgres_server() -> PostgresServer:
    """The process-wide PostgreSQL server (started on first use, running)."""
    global _POSTGRES
    if _POSTGRES is None:
        _POSTGRES = PostgresServer()
        atexit.register(_POSTGRES.destroy)
    if not _POSTGRES.running:
        _POSTGRES.start()
    return _POSTGRES


@pytest.fixture(scope="session")
def postgres() -> PostgresServer:
    return postgres_server()


# -- TLS material -------------------------------------------------------------------


@dataclass
class TLSFiles:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path  # a CA that did not sign the server certificate


def make_tls(directory: Path, names=("localhost",), ips=("127.0.0.1",)) -> TLSFiles:
    """A CA, a server certificate for ``names``/``ips`` signed by it, and an unrelated CA."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def ca(cn):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    ca_key, ca_cert = ca("xmppd test CA")
    _, other_cert = ca("xmppd unrelated CA")
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    files = TLSFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key",
                     directory / "other-ca.pem")
    files.ca.write_bytes(ca_cert.public_bytes(pem))
    files.other_ca.write_bytes(other_cert.public_bytes(pem))
    files.cert.write_bytes(cert.public_bytes(pem))
    files.key.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    os.chmod(files.key, 0o600)
    return files


# -- OpenLDAP -------------------------------------------------------------------------

LDAP_SUFFIX = "dc=example,dc=org"
LDAP_PEOPLE = f"ou=people,{LDAP_SUFFIX}"
LDAP_SERVICE_DN = f"cn=xmppd,ou=services,{LDAP_SUFFIX}"
LDAP_SERVICE_PASSWORD = "service-secret"

# uid -> password.  The odd ones have characters that are special in DNs
# (RFC 4514) or filters (RFC 4515), and one is non-ASCII.
LDAP_USERS = {
    "alice": "alice-secret",
    "bob": "bob-secret",
    "comma,user": "comma-secret",
    "plus+user": "plus-secret",
    "back\\slash": "backslash-secret",
    "star*": "star-secret",
    "élodie": "elodie-secret",
}


def ssha(password: str) -> str:
    """An OpenLDAP {SSHA} userPassword value."""
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def _ldif_line(attr: str, value: str) -> str:
    safe = value.isascii() and value == value.strip() and not value.startswith((":", "<")) \
        and all(0x20 <= ord(c) < 0x7F for c in value)
    if safe:
        return f"{attr}: {value}"
    return f"{attr}:: {base64.b64encode(value.encode()).decode()}"


def _dn_escape(value: str) -> str:
    from xmppd.auth.ldap import escape_dn_value

    return escape_dn_value(value)


def ldap_ldif(users: dict[str, str] = LDAP_USERS) -> str:
    entries = [
        {"dn": LDAP_SUFFIX, "objectClass": ["top", "dcObject", "organization"],
         "o": ["Example"], "dc": ["example"]},
        {"dn": LDAP_PEOPLE, "objectClass": ["organizationalUnit"], "ou": ["people"]},
        {"dn": f"ou=services,{LDAP_SUFFIX}", "objectClass": ["organizationalUnit"], "ou": ["services"]},
        {"dn": LDAP_SERVICE_DN, "objectClass": ["organizationalRole", "simpleSecurityObject"],
         "cn": ["xmppd"], "userPassword": [ssha(LDAP_SERVICE_PASSWORD)]},
    ]
    for uid, password in users.items():
        entries.append({
            "dn": f"uid={_dn_escape(uid)},{LDAP_PEOPLE}",
            "objectClass": ["inetOrgPerson"], "uid": [uid], "cn": [uid], "sn": ["Tester"],
            "userPassword": [ssha(password)],
        })
    out = []
    for e in entries:
        lines = [_ldif_line("dn", e.pop("dn"))]
        for attr, values in e.items():
            lines.extend(_ldif_line(attr, v) for v in values)
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


class _ChildServer:
    """A server process of the tests' own (``self.proc``) in a private ``self.dir``."""

    proc: "subprocess.Popen | None" = None
    dir: Path

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class SlapdServer(_ChildServer):
    """A private slapd with StartTLS (ldap:// port) and an ldaps:// port."""

    def __init__(self, users: dict[str, str] = LDAP_USERS) -> None:
        self.slapd = shutil.which("slapd") or "/usr/sbin/slapd"
        self.slapadd = shutil.which("slapadd") or "/usr/sbin/slapadd"
        if not os.path.exists(self.slapd) or not os.path.exists(self.slapadd):
            pytest.fail("OpenLDAP slapd/slapadd not found: " + INSTALL_HINT)
        self.users = dict(users)
        self.dir = _private_tmpdir("xmppd-slapd-")
        self.port = free_port()
        self.ldaps_port = free_port()
        self.tls = make_tls(self.dir)
        self.logfile = self.dir / "slapd.log"
        self.proc: subprocess.Popen | None = None
        (self.dir / "db").mkdir()
        self.conf = self.dir / "slapd.conf"
        self.conf.write_text(self._conf())
        ldif = self.dir / "data.ldif"
        ldif.write_text(ldap_ldif(self.users), encoding="utf-8")
        result = subprocess.run([self.slapadd, "-f", str(self.conf), "-l", str(ldif)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"slapadd failed:\n{result.stderr}")

    def _conf(self) -> str:
        schema = "/etc/ldap/schema"
        modules = "/usr/lib/ldap"
        d = self.dir
        return f"""\
include {schema}/core.schema
include {schema}/cosine.schema
include {schema}/nis.schema
include {schema}/inetorgperson.schema
modulepath {modules}
moduleload back_mdb
pidfile {d}/slapd.pid
argsfile {d}/slapd.args
TLSCACertificateFile {self.tls.ca}
TLSCertificateFile {self.tls.cert}
TLSCertificateKeyFile {self.tls.key}
sizelimit 500

database mdb
maxsize 16777216
suffix "{LDAP_SUFFIX}"
rootdn "cn=admin,{LDAP_SUFFIX}"
rootpw admin-secret
directory {d}/db
access to attrs=userPassword
    by anonymous auth
    by self read
    by * none
access to *
    by * read
"""

    @property
    def uri(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_uri(self) -> str:
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    def start(self) -> "SlapdServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.log = open(self.logfile, "ab")
        urls = f"ldap://127.0.0.1:{self.port}/ ldaps://127.0.0.1:{self.ldaps_port}/"
        self.proc = subprocess.Popen(
            [self.slapd, "-f", str(self.conf), "-h", urls, "-d", "0"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir,
        )
        wait_for_port(self.port, proc=self.proc, logfile=self.logfile)
        wait_for_port(self.ldaps_port, proc=self.proc, logfile=self.logfile)
        return self


_SLAPD: SlapdServer | None = None


def slapd_server() -> SlapdServer:
    """The process-wide slapd (started on first use, running)."""
    global _SLAPD
    if _SLAPD is None:
        _SLAPD = SlapdServer()
        atexit.register(_SLAPD.destroy)
    return _SLAPD.start()


@pytest.fixture(scope="session")
def slapd() -> SlapdServer:
    return slapd_server()


# -- Redis (the cluster's registry and bus) -----------------------------------------


class RedisServer(_ChildServer):
    """A private ``redis-server`` on a free loopback port, no persistence.

    ``stop()`` and ``start()`` again on the same port (tests of an outage):
    like a real restart without persistence, it comes back empty.
    """

    def __init__(self) -> None:
        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(self.binary):
            pytest.fail("redis-server not found: run scripts/install-test-deps.sh (as root)")
        self.dir = _private_tmpdir("xmppd-redis-")
        self.port = free_port()
        self.logfile = self.dir / "redis.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.log = open(self.logfile, "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no",
             "--protected-mode", "yes"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir,
        )
        wait_for_port(self.port, proc=self.proc, logfile=self.logfile)
        return self


@pytest.fixture(scope="module")
def redis():
    """A Redis of the module's own (its tests may stop and restart it)."""
    server = RedisServer().start()
    yield server
    server.destroy()


# -- account databases -------------------------------------------------------------------


def _connect_db(target: str | Path):
    """(connection, paramstyle marker) for a sqlite path or a postgresql URI."""
    if isinstance(target, Path) or not str(target).startswith("postgres"):
        return sqlite3.connect(str(target)), "?"
    import psycopg

    return psycopg.connect(str(target)), "%s"


def make_sql_db(target: str | Path, accounts: list[tuple[str, str, str]],
                encoding: str = "scram", scram_iterations: int = 4096, bcrypt_rounds: int = 4) -> str:
    """The sql connector's default schema with ``(user, domain, password)`` accounts.

    ``target`` is a SQLite file path or a PostgreSQL URI; returns the URI the
    connector takes.
    """
    from xmppd.auth import passwords
    from xmppd.auth.sql import TABLE, default_schema

    conn, mark = _connect_db(target)
    dialect = "postgresql" if mark == "%s" else "sqlite"
    try:
        cur = conn.cursor()
        cur.execute(f"DROP TABLE IF EXISTS {TABLE}")
        for stmt in default_schema(dialect):
            cur.execute(stmt)
        for user, domain, password in accounts:
            stored = passwords.encode(encoding, password, scram_iterations=scram_iterations,
                                      bcrypt_rounds=bcrypt_rounds)
            cur.execute(f"INSERT INTO {TABLE} (username, domain, password) VALUES ({mark}, {mark}, {mark})",
                        (user, domain, stored))
        conn.commit()
    finally:
        conn.close()
    return f"sqlite://{Path(target).resolve()}" if dialect == "sqlite" else str(target)


@dataclass
class DrupalUser:
    name: str
    password: str | None  # the clear password when known (None: only the hash)
    pass_hash: str
    status: int = 1
    uid: int | None = None
    translations: list[str] = field(default_factory=list)  # extra langcodes (Drupal 8+)


def make_drupal_db(target: str | Path, version: int, users: list[DrupalUser], prefix: str = "") -> str:
    """A Drupal-shaped user table (7: ``users``; 8+: ``users`` + ``users_field_data``).

    Columns follow Drupal core's schema (trimmed to what matters here);
    uid 0 is the anonymous row with an empty name, as on a real site.
    Returns the connector URI.
    """
    conn, mark = _connect_db(target)
    dialect = "postgresql" if mark == "%s" else "sqlite"
    try:
        cur = conn.cursor()
        users_t, data_t = prefix + "users", prefix + "users_field_data"
        cur.execute(f"DROP TABLE IF EXISTS {data_t}")
        cur.execute(f"DROP TABLE IF EXISTS {users_t}")
        if version == 7:
            cur.execute(f"""CREATE TABLE {users_t} (
                uid INTEGER NOT NULL PRIMARY KEY,
                name VARCHAR(60) NOT NULL DEFAULT '',
                pass VARCHAR(128) NOT NULL DEFAULT '',
                mail VARCHAR(254) DEFAULT '',
                created INTEGER NOT NULL DEFAULT 0,
                access INTEGER NOT NULL DEFAULT 0,
                login INTEGER NOT NULL DEFAULT 0,
                status SMALLINT NOT NULL DEFAULT 0,
                timezone VARCHAR(32),
                language VARCHAR(12) NOT NULL DEFAULT '',
                init VARCHAR(254) DEFAULT '',
                data TEXT,
                UNIQUE (name))""")
            cur.execute(f"INSERT INTO {users_t} (uid, name, pass, status) VALUES (0, '', '', 0)")
        else:
            cur.execute(f"""CREATE TABLE {users_t} (
                uid INTEGER NOT NULL PRIMARY KEY,
                uuid VARCHAR(128) NOT NULL,
                langcode VARCHAR(12) NOT NULL)""")
            cur.execute(f"""CREATE TABLE {data_t} (
                uid INTEGER NOT NULL,
                langcode VARCHAR(12) NOT NULL,
                preferred_langcode VARCHAR(12),
                preferred_admin_langcode VARCHAR(12),
                name VARCHAR(60) NOT NULL,
                pass VARCHAR(255),
                mail VARCHAR(254),
                timezone VARCHAR(32),
                status SMALLINT,
                created INTEGER,
                changed INTEGER,
                access INTEGER NOT NULL DEFAULT 0,
                login INTEGER,
                init VARCHAR(254),
                default_langcode SMALLINT NOT NULL,
                PRIMARY KEY (uid, langcode))""")
            cur.execute(f"INSERT INTO {users_t} (uid, uuid, langcode) VALUES (0, 'anon', 'en')")
            cur.execute(f"INSERT INTO {data_t} (uid, langcode, name, pass, status, default_langcode) "
                        "VALUES (0, 'en', '', NULL, 0, 1)")
        next_uid = 1
        for u in users:
            uid = u.uid if u.uid is not None else next_uid
            next_uid = max(next_uid, uid) + 1
            if version == 7:
                cur.execute(f"INSERT INTO {users_t} (uid, name, pass, mail, status) "
                            f"VALUES ({mark}, {mark}, {mark}, {mark}, {mark})",
                            (uid, u.name, u.pass_hash, f"{uid}@example.org", u.status))
            else:
                cur.execute(f"INSERT INTO {users_t} (uid, uuid, langcode) VALUES ({mark}, {mark}, 'en')",
                            (uid, f"uuid-{uid}"))
                for lang, default in [("en", 1)] + [(t, 0) for t in u.translations]:
                    cur.execute(
                        f"INSERT INTO {data_t} (uid, langcode, name, pass, mail, status, default_langcode) "
                        f"VALUES ({mark}, {mark}, {mark}, {mark}, {mark}, {mark}, {mark})",
                        (uid, lang, u.name, u.pass_hash, f"{uid}@example.org", u.status, default),
                    )
        conn.commit()
    finally:
        conn.close()
    return f"sqlite://{Path(target).resolve()}" if dialect == "sqlite" else str(target)


# -- config tables --------------------------------------------------------------------


def sql_auth_table(uri: str, encoding: str = "scram", queries: dict | None = None, **extra) -> dict:
    """An ``[auth]`` table selecting the sql connector."""
    sql = {"uri": uri, "password_encoding": encoding, "timeout": 5, **extra}
    if queries:
        sql["queries"] = dict(queries)
    return {"connector": "sql", "sql": sql}


def drupal_auth_table(uri: str, version: int, **extra) -> dict:
    return {"connector": "drupal", "drupal": {"uri": uri, "version": version, "timeout": 5, **extra}}


def ldap_auth_table(server: SlapdServer, mode: str = "search", tls: str = "starttls", **extra) -> dict:
    """An ``[auth]`` table for ``server``.

    ``mode``: "search" (service account + filter) or "template" (bind DN
    template); ``tls``: "starttls", "ldaps" or "none" (allow_plaintext).
    """
    ldap: dict = {"uri": server.ldaps_uri if tls == "ldaps" else server.uri, "timeout": 5}
    if tls == "starttls":
        ldap["starttls"] = True
    if tls in ("starttls", "ldaps"):
        ldap["ca_file"] = str(server.tls.ca)
    if tls == "none":
        ldap["allow_plaintext"] = True
    if mode == "search":
        ldap.update(search_base=LDAP_PEOPLE,
                    search_filter="(&(objectClass=inetOrgPerson)(uid={user}))",
                    service_dn=LDAP_SERVICE_DN, service_password=LDAP_SERVICE_PASSWORD)
    elif mode == "template":
        ldap["bind_dn_template"] = f"uid={{user}},{LDAP_PEOPLE}"
    else:
        raise ValueError(mode)
    ldap.update(extra)
    return {"connector": "ldap", "ldap": ldap}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + "".join(
            {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t"}.get(c, c) for c in v
        ) + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot render {type(v).__name__} as TOML")


def auth_toml(table: dict, prefix: str = "auth") -> str:
    """Render a config table as TOML under ``[prefix]`` (e.g. 'hosts."example.org".auth')."""
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in table.items() if isinstance(v, dict)}
    lines = [f"[{prefix}]"] + [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
    out = "\n".join(lines) + "\n"
    for k, v in tables.items():
        out += "\n" + auth_toml(v, f"{prefix}.{k}")
    return out


# -- log capture ----------------------------------------------------------------------


class LogCapture:
    """Collects twisted.logger events (as dicts) while installed."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, event: dict) -> None:
        self.events.append(event)

    def with_key(self, key: str, value=None) -> list[dict]:
        return [e for e in self.events
                if key in e and (value is None or e[key] == value)]

    def text(self) -> str:
        from twisted.logger import formatEvent

        return "\n".join(formatEvent(e) for e in self.events)


@pytest.fixture
def captured_log():
    from twisted.logger import globalLogPublisher

    cap = LogCapture()
    globalLogPublisher.addObserver(cap)
    yield cap
    globalLogPublisher.removeObserver(cap)


# -- the PostgreSQL store backend (xmppd.storage_pg) -----------------------------------


def pg_storage(postgres: PostgresServer, database: str):
    """A fresh database with the xmppd schema; returns its StorageConfig."""
    from xmppd.storage_pg import create_schema
    from xmppd.storeconfig import StorageConfig

    dsn = postgres.create_database(database)
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        create_schema(conn)
    return StorageConfig(backend="postgresql", dsn=dsn, pool_size=2, connect_timeout=2.0,
                         statement_timeout=5.0)


def pg_truncate(conf) -> None:
    """Empty the store's tables between tests (cheaper than a new database)."""
    import psycopg

    with psycopg.connect(conf.dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE kv, archive")


@pytest.fixture(scope="session")
def pg_store_conf(postgres):
    """One database for the shared store suites, emptied before each use."""
    return pg_storage(postgres, "xmppd_suite")

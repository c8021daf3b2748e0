"""Configuration: one TOML file -> frozen dataclasses.

No other module reads the file.  Every error raises ``ConfigError`` whose
one-line message names the file, the key, the bad value and what is allowed,
so that ``twistd`` and ``xmppctl check`` can print it and stop.

Plugins and connectors receive their own sections as :class:`Section`
objects, whose typed getters raise the same kind of error; they read them
once at start-up, never per stanza.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from xmppd import jid as jidlib
from xmppd.xmlparser import (
    DEFAULT_MAX_DEPTH, DEFAULT_MAX_PREAUTH_SIZE, DEFAULT_MAX_NODES, DEFAULT_MAX_PREAUTH_NODES,
)


class ConfigError(Exception):
    """A config problem, rendered as one line: file: key = value: what is allowed.

    A problem of the file itself (missing, unreadable, not TOML) has no key:
    pass ``key=None`` and it reads ``file: what is wrong``.
    """

    def __init__(self, path: str, key: str | None, value: object, allowed: str) -> None:
        self.path, self.key, self.value, self.allowed = path, key, value, allowed
        if key is None:
            super().__init__(f"{path}: {allowed}")
        else:
            super().__init__(f"{path}: {key} = {value!r}: {allowed}")


_MISSING = object()


class Section:
    """A table of the config file with typed, error-naming getters."""

    def __init__(self, path: str, prefix: str, table: dict) -> None:
        self.path, self.prefix, self.table = path, prefix, table
        self._read: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, value: object, allowed: str) -> ConfigError:
        return ConfigError(self.path, self.key(name), value, allowed)

    def _get(self, name: str, default: Any) -> Any:
        self._read.add(name)
        value = self.table.get(name, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise self.error(name, None, "required key is missing")
            return default
        return value

    def str(self, name: str, default: Any = _MISSING) -> Any:
        value = self._get(name, default)
        if value is not default and not isinstance(value, str):
            raise self.error(name, value, "must be a string")
        return value

    def int(self, name: str, default: Any = _MISSING, minimum: int | None = None) -> Any:
        value = self._get(name, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, value, "must be an integer")
        if minimum is not None and value < minimum:
            raise self.error(name, value, f"must be an integer >= {minimum}")
        return value

    def number(self, name: str, default: Any = _MISSING, minimum: float = 0) -> Any:
        value = self._get(name, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
            raise self.error(name, value, f"must be a number >= {minimum}")
        return float(value)

    def bool(self, name: str, default: Any = _MISSING) -> Any:
        value = self._get(name, default)
        if value is not default and not isinstance(value, bool):
            raise self.error(name, value, "must be true or false")
        return value

    def choice(self, name: str, allowed: tuple, default: Any = _MISSING) -> Any:
        value = self._get(name, default)
        if value is not default and value not in allowed:
            raise self.error(name, value, "must be one of " + ", ".join(map(repr, allowed)))
        return value

    def strings(self, name: str, default: Any = _MISSING) -> Any:
        value = self._get(name, default)
        if value is default:
            return tuple(value) if isinstance(value, (list, tuple)) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(name, value, "must be a list of strings")
        return tuple(value)

    def table_of(self, name: str) -> "Section":
        value = self._get(name, {})
        if not isinstance(value, dict):
            raise self.error(name, value, "must be a table")
        return Section(self.path, self.key(name), value)

    def reject_unknown(self, extra_allowed: tuple = ()) -> None:
        """Typos must not pass silently: every key must have been read."""
        for name in self.table:
            if name not in self._read and name not in extra_allowed:
                raise self.error(name, self.table[name], "unknown key")


LOG_LEVELS = ("debug", "info", "warn", "error", "critical")

DEFAULT_PLUGINS = (
    "roster", "presence", "disco", "ping", "version", "offline", "vcard",
    "urn:xmpp:blocking",
)


@dataclass(frozen=True)
class C2SConfig:
    listen: tuple[str, ...]
    listen_tls: tuple[str, ...]
    tls: str
    max_stanza_size: int
    max_stanza_nodes: int
    max_depth: int
    max_preauth_stanza_size: int
    max_preauth_stanza_nodes: int
    auth_timeout: float
    max_connections_per_ip: int
    max_auth_failures: int
    max_outbound_bytes: int
    close_timeout: float
    # SO_REUSEPORT on the c2s listeners: several nodes on one host share a
    # port (xmppd.reuseport, docs/cluster.rst)
    reuse_port: bool = False


@dataclass(frozen=True)
class TLSConfig:
    certs_dir: str | None
    letsencrypt_dir: str | None
    default_cert: str | None
    default_key: str | None
    min_version: str
    ciphers: str | None
    poll_interval: float
    groups: tuple[str, ...]


CLIENT_CERT_MODES = ("optional", "required", "off")
CLIENT_CERT_IDENTITIES = ("xmppaddr", "email", "cn")


@dataclass(frozen=True)
class ClientCertConfig:
    """Client certificates of one vhost: ``[tls] client_*``, overridable per host.

    ``mode`` is "off" unless ``client_cert`` says otherwise or a CA is
    configured (then "optional").  See docs/external.rst.
    """

    mode: str = "off"
    ca: tuple[str, ...] = ()
    ca_system: bool = False
    crl: tuple[str, ...] = ()
    identity: tuple[str, ...] = ("xmppaddr",)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


@dataclass(frozen=True)
class SASLConfig:
    """SASL settings of one vhost: ``[sasl]``, overridable in ``[hosts."x".sasl]``."""

    password_mechanisms: bool = True  # false: certificate-only (EXTERNAL) vhost
    external_auto_provision: bool = False


@dataclass(frozen=True)
class Config:
    path: str
    hosts: tuple[str, ...]
    data_dir: str
    admins: tuple[str, ...]
    c2s: C2SConfig
    tls: TLSConfig
    plugins: tuple[str, ...]
    auth: Section
    host_sections: dict = field(default_factory=dict)  # host -> Section
    sections: dict = field(default_factory=dict)  # other top-level tables, by name
    client_certs: dict = field(default_factory=dict)  # host -> ClientCertConfig
    host_sasl: dict = field(default_factory=dict)  # host -> SASLConfig
    log_level: str = "info"  # [server] log_level: xmppd's own messages (xmppd.logfilter)
    s2s: Any = None  # xmppd.s2s.settings.S2SConfig (federation, docs/s2s.rst)

    def client_cert(self, host: str) -> ClientCertConfig:
        """The client-certificate settings of ``host`` (off when not configured)."""
        return self.client_certs.get(host) or ClientCertConfig()

    def sasl_for(self, host: str) -> SASLConfig:
        """The SASL settings of ``host``."""
        return self.host_sasl.get(host) or SASLConfig()

    def section(self, name: str) -> Section:
        """A plugin's own table (``[name]``), empty when absent."""
        return self.sections.get(name) or Section(self.path, name, {})

    @property
    def default_host(self) -> str:
        return self.hosts[0]


def _host_list(sec: Section) -> tuple[str, ...]:
    hosts = sec.strings("hosts", ("localhost",))
    if not hosts:
        raise sec.error("hosts", [], "must name at least one virtual host")
    prepared = []
    for h in hosts:
        try:
            j = jidlib.parse(h)
        except jidlib.InvalidJID as e:
            raise sec.error("hosts", h, f"not a valid domain ({e})") from None
        if j.user is not None or j.resource is not None:
            raise sec.error("hosts", h, "must be a bare domain name")
        prepared.append(j.host)
    return tuple(prepared)


def _admins(sec: Section) -> tuple[str, ...]:
    out = []
    for a in sec.strings("admins", ()):
        try:
            out.append(jidlib.parse(a).bare)
        except jidlib.InvalidJID as e:
            raise sec.error("admins", a, f"not a valid JID ({e})") from None
    return tuple(out)


def _endpoints(sec: Section, name: str, default: tuple) -> tuple[str, ...]:
    values = sec.strings(name, default)
    for v in values:
        problem = _endpoint_problem(v)
        if problem is not None:
            raise sec.error(name, v, problem)
    return values


def endpoint(sec: Section, name: str, default: Any) -> Any:
    """One listener endpoint string (``[metrics] listen``), checked as c2s listeners are."""
    value = sec.str(name, default)
    if value is not default:
        problem = _endpoint_problem(value)
        if problem is not None:
            raise sec.error(name, value, problem)
    return value


def _endpoint_problem(description: str) -> str | None:
    """
    What would stop the daemon from listening on ``description``, as far as
    can be known without binding: a string Twisted cannot parse (its parsers
    raise anything from ValueError to OSError for an ``ssl:`` key file), a TCP
    port out of range, an interface that is not an IP address (a name would be
    resolved by a blocking look-up, and fail at start-up if it does not
    resolve), a UNIX socket in a directory that does not exist.  A port in use
    or reserved is found only by binding it.
    """
    import ipaddress

    from twisted.internet import endpoints, reactor

    try:
        endpoint = endpoints.serverFromString(reactor, description)
    except Exception as e:  # noqa: BLE001 -- every parser failure is a config error
        return f"not a usable Twisted server endpoint string ({type(e).__name__}: {e})"
    # Twisted keeps the parsed parts in private attributes; read them defensively.
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 1 <= port <= 65535:
        # 0 would bind a random port no client can be told about.
        return f"port {port} is out of range (1-65535)"
    interface = getattr(endpoint, "_interface", None)
    if interface:
        try:
            ipaddress.ip_address(interface)
        except ValueError:
            return f"interface {interface!r} is not an IP address (write IPv6 colons as \\:)"
    address = getattr(endpoint, "_address", None)
    if isinstance(endpoint, endpoints.UNIXServerEndpoint) and isinstance(address, str):
        directory = os.path.dirname(os.path.abspath(address))
        if not os.path.isdir(directory):
            return f"directory {directory} does not exist"
    return None


def _tcp_overlap(sec: Section, lists: dict[str, tuple[str, ...]]) -> None:
    """Two listeners on one TCP port: the second bind fails at start-up."""
    from twisted.internet import endpoints, reactor

    seen: dict[int, list[tuple[str, str]]] = {}
    wildcard = ("", "0.0.0.0", "::")
    for name, values in lists.items():
        for v in values:
            ep = endpoints.serverFromString(reactor, v)
            port = getattr(ep, "_port", None)
            if not isinstance(port, int) or port == 0:
                continue
            interface = getattr(ep, "_interface", "") or ""
            for other_name, other_interface in seen.get(port, ()):
                if interface == other_interface or interface in wildcard or other_interface in wildcard:
                    raise sec.error(name, v, f"port {port} is already used by a listener in "
                                             f"{sec.key(other_name)}")
            seen.setdefault(port, []).append((name, interface))


def _cross_overlap(c2s_sec: Section, c2s: C2SConfig, s2s_sec: Section, name: str,
                   values: tuple[str, ...]) -> None:
    """An s2s listener on a port a c2s listener already has."""
    try:
        _tcp_overlap(s2s_sec, {"c2s.listen": c2s.listen, "c2s.listen_tls": c2s.listen_tls,
                               name: values})
    except ConfigError as e:
        raise ConfigError(e.path, e.key, e.value, e.allowed.replace("s2s.c2s.", "c2s.")) from None


def _paths(sec: Section, name: str, default: tuple) -> tuple[str, ...]:
    values = sec.strings(name, default)
    for v in values:
        if not v.strip():
            raise sec.error(name, v, "paths must not be empty")
    return values


def _client_cert(sec: Section, base: ClientCertConfig | None = None,
                 base_mode: tuple[str | None, Section | None] = (None, None),
                 validate: bool = True) -> tuple[ClientCertConfig, tuple[str | None, Section | None]]:
    """
    ``client_ca``, ``client_ca_system``, ``client_crl``, ``client_cert`` and
    ``client_cert_identity`` of ``sec``; keys it leaves out come from ``base``
    (the ``[tls]`` settings when ``sec`` is a host's table).  Returns the
    settings and (explicit mode, section that set it) for the hosts to inherit.
    ``validate`` is False for ``[tls]`` itself: a global ``client_cert`` may
    rely on CAs that every host names in its own table.
    """
    base = base or ClientCertConfig()
    ca = _paths(sec, "client_ca", base.ca)
    system = sec.bool("client_ca_system", base.ca_system)
    crl = _paths(sec, "client_crl", base.crl)
    identity = sec.strings("client_cert_identity", base.identity)
    if not identity:
        raise sec.error("client_cert_identity", [], "must name at least one of "
                        + ", ".join(map(repr, CLIENT_CERT_IDENTITIES)))
    for v in identity:
        if v not in CLIENT_CERT_IDENTITIES or identity.count(v) > 1:
            raise sec.error("client_cert_identity", v, "each must be one of "
                            + ", ".join(map(repr, CLIENT_CERT_IDENTITIES)) + ", once")
    explicit = sec.choice("client_cert", CLIENT_CERT_MODES, None)
    where = sec if explicit is not None else base_mode[1]
    if explicit is None:
        explicit = base_mode[0]
    mode = explicit or ("optional" if ca or system else "off")
    if validate and mode != "off" and not ca and not system:
        if where is not None and where.table.get("client_cert") is not None:
            raise where.error("client_cert", mode, "needs client_ca (CA files or directories) "
                              "or client_ca_system = true")
        raise sec.error("client_ca", list(ca), "must name a CA file or directory")
    return (ClientCertConfig(mode, tuple(ca), system, tuple(crl), tuple(identity)),
            (explicit, where))


def _tls_groups(sec: Section) -> tuple[str, ...]:
    """``[tls] groups``, each name checked against OpenSSL now, not at the first handshake."""
    from xmppd import tlsgroups

    groups = sec.strings("groups", tlsgroups.DEFAULT_GROUPS)
    try:
        return tlsgroups.validate(groups)
    except tlsgroups.GroupError as e:
        raise sec.error("groups", e.value, e.reason) from None


def _no_scram_iterations(sec: Section) -> None:
    """
    The iteration count of new SCRAM credentials belongs to the connector that
    makes them (``[auth]`` / ``[auth.sql]``).  It was once documented under
    ``[sasl]``, where it did nothing: say where it goes instead of ignoring it.
    """
    if "scram_iterations" in sec.table:
        auth = sec.prefix[: -len("sasl")] + "auth"
        raise sec.error("scram_iterations", sec.table["scram_iterations"],
                        f"not a SASL setting: the iteration count of new passwords is "
                        f"[{auth}] scram_iterations (internal connector) or "
                        f"[{auth}.sql] scram_iterations")


def _sasl_settings(sec: Section, base: SASLConfig) -> SASLConfig:
    return SASLConfig(
        password_mechanisms=sec.bool("password_mechanisms", base.password_mechanisms),
        external_auto_provision=sec.bool("external_auto_provision", base.external_auto_provision),
    )


KNOWN_TABLES = ("server", "c2s", "s2s", "tls", "auth", "sasl", "sm", "hosts")
# Tables read by plugins and other parts at start-up (their keys are checked
# there); any other top-level name is a typo.
SECTION_TABLES = (
    "limits", "acl", "adhoc", "blocking", "domain-filter", "metrics", "offline", "ping",
    "register", "roster", "vcard", "version", "components", "csi", "stream-management",
    "caps", "pep", "private", "mam",
    # [cluster] (xmppd.cluster.settings), [storage] (xmppd.storeconfig)
    "cluster", "storage",
)
# Keys of [hosts."<domain>"] tables.
HOST_KEYS = ("auth", "tls", "sasl", "domain-filter", "admins")


# The cap on [c2s] max_depth: every recursive walk of a tree (serialising,
# domish's toXml) must stay far below Python's recursion limit (1000).
MAX_DEPTH = 200


def _max_depth(sec: Section) -> int:
    value = sec.int("max_depth", DEFAULT_MAX_DEPTH, minimum=8)
    if value > MAX_DEPTH:
        raise sec.error("max_depth", value, f"must be an integer between 8 and {MAX_DEPTH}")
    return value


def from_dict(data: dict, path: str = "<defaults>") -> Config:
    """Validate a parsed TOML document."""
    server = Section(path, "server", data.get("server", {}))
    hosts = _host_list(server)
    data_dir = server.str("data_dir", "./var")
    admins = _admins(server)
    log_level = server.choice("log_level", LOG_LEVELS, "info")
    server.reject_unknown()

    c2s_sec = Section(path, "c2s", data.get("c2s", {}))
    c2s = C2SConfig(
        listen=_endpoints(c2s_sec, "listen", ("tcp:5222:interface=127.0.0.1",)),
        listen_tls=_endpoints(c2s_sec, "listen_tls", ("tcp:5223:interface=127.0.0.1",)),
        tls=c2s_sec.choice("tls", ("required", "optional"), "required"),
        max_stanza_size=c2s_sec.int("max_stanza_size", 262144, minimum=1024),
        # Why these defaults: xmppd/xmlparser.py and etc/xmppd.toml.
        max_stanza_nodes=c2s_sec.int("max_stanza_nodes", DEFAULT_MAX_NODES, minimum=64),
        max_depth=_max_depth(c2s_sec),
        max_preauth_stanza_size=c2s_sec.int(
            "max_preauth_stanza_size", DEFAULT_MAX_PREAUTH_SIZE, minimum=4096),
        max_preauth_stanza_nodes=c2s_sec.int(
            "max_preauth_stanza_nodes", DEFAULT_MAX_PREAUTH_NODES, minimum=32),
        auth_timeout=c2s_sec.number("auth_timeout", 60.0, minimum=1),
        max_connections_per_ip=c2s_sec.int("max_connections_per_ip", 100, minimum=0),
        max_auth_failures=c2s_sec.int("max_auth_failures", 3, minimum=1),
        # Output held for one session while its client does not read; past it
        # the session is closed and its held messages go to offline storage.
        max_outbound_bytes=c2s_sec.int("max_outbound_bytes", 2 * 1024 * 1024, minimum=65536),
        # Seconds a closing connection gets to flush its last bytes (stream
        # error, TLS close_notify) before it is aborted.
        close_timeout=c2s_sec.number("close_timeout", 10.0, minimum=1),
        reuse_port=c2s_sec.bool("reuse_port", False),
    )
    if c2s.reuse_port:
        from twisted.internet import reactor

        from xmppd import reuseport

        for name in ("listen", "listen_tls"):
            for v in getattr(c2s, name):
                problem = reuseport.check(reactor, v)
                if problem is not None:
                    raise c2s_sec.error(name, v, f"{problem} (c2s.reuse_port is on)")
    _tcp_overlap(c2s_sec, {"listen": c2s.listen, "listen_tls": c2s.listen_tls})
    c2s_sec.reject_unknown()
    if not c2s.listen and not c2s.listen_tls:
        raise c2s_sec.error("listen", [], "no listener: c2s.listen and c2s.listen_tls are both empty")

    from xmppd.s2s import settings as s2s_settings

    s2s = s2s_settings.parse(Section(path, "s2s", data.get("s2s", {})), _endpoints, _tcp_overlap,
                             _max_depth)
    for name, values in (("listen", s2s.listen), ("listen_tls", s2s.listen_tls)):
        _cross_overlap(c2s_sec, c2s, Section(path, "s2s", {}), name, values)

    tls_sec = Section(path, "tls", data.get("tls", {}))
    tls = TLSConfig(
        certs_dir=tls_sec.str("certs_dir", None),
        letsencrypt_dir=tls_sec.str("letsencrypt_dir", None),
        default_cert=tls_sec.str("default_cert", None),
        default_key=tls_sec.str("default_key", None),
        min_version=tls_sec.choice("min_version", ("TLSv1.2", "TLSv1.3"), "TLSv1.2"),
        ciphers=tls_sec.str("ciphers", None),
        poll_interval=tls_sec.number("poll_interval", 30.0),
        groups=_tls_groups(tls_sec),
    )
    client_default, client_mode = _client_cert(tls_sec, validate=False)
    tls_sec.reject_unknown()

    sasl = Section(path, "sasl", data.get("sasl", {}))
    _no_scram_iterations(sasl)
    sasl_default = _sasl_settings(sasl, SASLConfig())
    sasl.reject_unknown()

    sm = Section(path, "sm", data.get("sm", {}))
    plugins = sm.strings("plugins", DEFAULT_PLUGINS)
    # Whether each name exists is checked when the server is built
    # (xmppd.registry): plugins may come from other installed packages.
    for p in plugins:
        if not p.strip():
            raise sm.error("plugins", p, "plugin names must not be empty")
        if plugins.count(p) > 1:
            raise sm.error("plugins", p, "listed twice")
    sm.reject_unknown()

    auth = Section(path, "auth", data.get("auth", {}))
    host_tables = data.get("hosts", {})
    if not isinstance(host_tables, dict):
        raise ConfigError(path, "hosts", host_tables, "must be a table of per-host tables")
    host_sections = {}
    for name, table in host_tables.items():
        if name not in hosts:
            raise ConfigError(path, f'hosts."{name}"', table, "not listed in server.hosts")
        if not isinstance(table, dict):
            raise ConfigError(path, f'hosts."{name}"', table, "must be a table")
        host_sections[name] = Section(path, f'hosts."{name}"', table)
        for key in table:
            if key not in HOST_KEYS:
                raise ConfigError(path, f'hosts."{name}".{key}', table[key],
                                  "unknown key; allowed: " + ", ".join(HOST_KEYS))
    client_certs, host_sasl = {}, {}
    for host in hosts:
        section = host_sections.get(host) or Section(path, f'hosts."{host}"', {})
        client_certs[host], _ = _client_cert(section.table_of("tls"), client_default, client_mode)
        host_sasl_sec = section.table_of("sasl")
        _no_scram_iterations(host_sasl_sec)
        host_sasl[host] = _sasl_settings(host_sasl_sec, sasl_default)
        host_sasl_sec.reject_unknown()

    sections = {
        name: Section(path, name, table)
        for name, table in data.items()
        if name not in KNOWN_TABLES and isinstance(table, dict)
    }
    for name, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(path, name, table, "top-level keys must be tables")
        if name not in KNOWN_TABLES and name not in SECTION_TABLES:
            raise ConfigError(path, name, "[...]", "unknown table; known: "
                              + ", ".join(KNOWN_TABLES + SECTION_TABLES))
    return Config(
        path=path, hosts=hosts, data_dir=data_dir, admins=admins, c2s=c2s, tls=tls,
        log_level=log_level,
        plugins=plugins, auth=auth,
        host_sections=host_sections, sections=sections,
        client_certs=client_certs, host_sasl=host_sasl, s2s=s2s,
    )


def load(path: str | None) -> Config:
    """Read ``path`` (or the built-in defaults when None)."""
    if path is None:
        return from_dict({})
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, None, None, "file not found") from None
    except PermissionError:
        raise ConfigError(path, None, None, "file not readable by this user") from None
    except IsADirectoryError:
        raise ConfigError(path, None, None, "is a directory, not a config file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, None, None, f"not valid TOML: {e}") from None
    base = os.path.dirname(os.path.abspath(path))
    cfg = from_dict(data, path)
    if not os.path.isabs(cfg.data_dir):
        # Relative paths are relative to the config file, not the cwd.
        object.__setattr__(cfg, "data_dir", os.path.join(base, cfg.data_dir))
    return cfg

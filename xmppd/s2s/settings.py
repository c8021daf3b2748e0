"""``[s2s]`` and ``[s2s.routes]``: federation settings, read once at start-up.

Every key is validated here with the typed getters of
:class:`xmppd.config.Section`, so a bad value stops the start (and
``xmppctl check``) with a line naming the file and the key.  Nothing in the
s2s package reads the config file again; streams and the service keep a
reference to the frozen :class:`S2SConfig`.  The keys, their defaults and
why are documented in etc/xmppd.toml and docs/s2s.rst.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from xmppd import jid as jidlib
from xmppd.xmlparser import DEFAULT_MAX_DEPTH, DEFAULT_MAX_NODES

ROUTE_SCHEMES = ("tcp", "tls")


@dataclass(frozen=True)
class Route:
    """A configured endpoint of a remote domain: STARTTLS (``tcp``) or direct TLS (``tls``)."""

    direct_tls: bool
    host: str
    port: int

    def describe(self) -> str:
        return f"{'tls' if self.direct_tls else 'tcp'}:{self.host}:{self.port}"


@dataclass(frozen=True)
class DomainLimits:
    """``[s2s.domains."<domain>"]``: limits for one remote domain, overriding ``[s2s]``."""

    max_stanza_size: int
    max_connections: int


@dataclass(frozen=True)
class S2SConfig:
    enabled: bool = True
    listen: tuple[str, ...] = ()
    listen_tls: tuple[str, ...] = ()
    require_encryption: bool = True
    encryption_exceptions: frozenset[str] = frozenset()
    ca_file: str | None = None
    ca_dir: str | None = None
    ca_system: bool = True
    dialback: bool = True
    require_certificates: bool = False
    secure_domains: frozenset[str] = frozenset()
    blocked_domains: frozenset[str] = frozenset()
    routes: dict = field(default_factory=dict)  # domain -> Route
    domains: dict = field(default_factory=dict)  # domain -> DomainLimits
    nameservers: tuple[tuple[str, int], ...] = ()
    dns_timeout: float = 10.0
    connect_timeout: float = 10.0
    auth_timeout: float = 30.0
    close_timeout: float = 10.0
    idle_timeout: float = 600.0
    retry_delay: float = 5.0
    ping_interval: float = 120.0
    ping_timeout: float = 30.0
    queue_max_stanzas: int = 1000
    queue_timeout: float = 60.0
    max_connections_per_domain: int = 4
    max_connecting_domains: int = 100
    max_unauthenticated_inbound: int = 200
    max_stanza_size: int = 262144
    max_stanza_nodes: int = DEFAULT_MAX_NODES
    max_depth: int = DEFAULT_MAX_DEPTH
    max_outbound_bytes: int = 4 * 1024 * 1024

    def connections_for(self, domain: str) -> int:
        limits = self.domains.get(domain)
        return limits.max_connections if limits is not None else self.max_connections_per_domain

    def needs_certificate(self, domain: str) -> bool:
        """A valid certificate is required of ``domain`` (no dialback fallback)."""
        return self.require_certificates or domain in self.secure_domains

    def dialback_allowed(self, domain: str) -> bool:
        return self.dialback and not self.needs_certificate(domain)

    def needs_tls(self, domain: str) -> bool:
        return self.require_encryption and domain not in self.encryption_exceptions


def _domain(sec, name: str, value: str) -> str:
    try:
        j = jidlib.parse(value)
    except jidlib.InvalidJID as e:
        raise sec.error(name, value, f"not a valid domain ({e})") from None
    if j.user is not None or j.resource is not None:
        raise sec.error(name, value, "must be a bare domain name")
    return j.host


def _domains(sec, name: str) -> frozenset[str]:
    return frozenset(_domain(sec, name, v) for v in sec.strings(name, ()))


def _route(sec, domain: str, value) -> Route:
    if not isinstance(value, str):
        raise sec.error(domain, value, 'must be a string "tcp:HOST:PORT" or "tls:HOST:PORT"')
    scheme, _, rest = value.partition(":")
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    if scheme not in ROUTE_SCHEMES or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise sec.error(domain, value, 'must be "tcp:HOST:PORT" (STARTTLS) or "tls:HOST:PORT"'
                                       " (direct TLS), port 1-65535")
    return Route(scheme == "tls", host, int(port))


def _nameservers(sec) -> tuple[tuple[str, int], ...]:
    import ipaddress

    out = []
    for v in sec.strings("nameservers", ()):
        host, port = v, 53
        if v.count(":") == 1:
            host, _, p = v.partition(":")
            if not p.isdigit():
                raise sec.error("nameservers", v, "must be an IP address, optionally with :PORT")
            port = int(p)
        elif v.startswith("[") and "]:" in v:
            host, _, p = v[1:].partition("]:")
            port = int(p) if p.isdigit() else -1
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise sec.error("nameservers", v, "must be an IP address, optionally with :PORT") from None
        if not 1 <= port <= 65535:
            raise sec.error("nameservers", v, "port out of range (1-65535)")
        out.append((host, port))
    return tuple(out)


def parse(sec, endpoints, tcp_overlap, max_depth) -> S2SConfig:
    """Read ``[s2s]`` (a :class:`~xmppd.config.Section`); the helpers come from xmppd.config."""
    domains_sec = sec.table_of("domains")
    domain_tables = {}
    for name in domains_sec.table:
        domain_tables[_domain(domains_sec, name, name)] = domains_sec.table_of(name)
    routes_sec = sec.table_of("routes")
    routes = {_domain(routes_sec, d, d): _route(routes_sec, d, v) for d, v in routes_sec.table.items()}
    cfg = S2SConfig(
        enabled=sec.bool("enabled", True),
        listen=endpoints(sec, "listen", ()),
        listen_tls=endpoints(sec, "listen_tls", ()),
        require_encryption=sec.bool("require_encryption", True),
        encryption_exceptions=_domains(sec, "encryption_exceptions"),
        ca_file=sec.str("ca_file", None),
        ca_dir=sec.str("ca_dir", None),
        ca_system=sec.bool("ca_system", True),
        dialback=sec.bool("dialback", True),
        require_certificates=sec.bool("require_certificates", False),
        secure_domains=_domains(sec, "secure_domains"),
        blocked_domains=_domains(sec, "blocked_domains"),
        routes=routes,
        nameservers=_nameservers(sec),
        dns_timeout=sec.number("dns_timeout", 10.0, minimum=0.5),
        connect_timeout=sec.number("connect_timeout", 10.0, minimum=0.5),
        auth_timeout=sec.number("auth_timeout", 30.0, minimum=1),
        close_timeout=sec.number("close_timeout", 10.0, minimum=1),
        idle_timeout=sec.number("idle_timeout", 600.0, minimum=1),
        retry_delay=sec.number("retry_delay", 5.0, minimum=0),
        ping_interval=sec.number("ping_interval", 120.0, minimum=0),
        ping_timeout=sec.number("ping_timeout", 30.0, minimum=1),
        queue_max_stanzas=sec.int("queue_max_stanzas", 1000, minimum=1),
        queue_timeout=sec.number("queue_timeout", 60.0, minimum=1),
        max_connections_per_domain=sec.int("max_connections_per_domain", 4, minimum=1),
        max_connecting_domains=sec.int("max_connecting_domains", 100, minimum=1),
        max_unauthenticated_inbound=sec.int("max_unauthenticated_inbound", 200, minimum=1),
        max_stanza_size=sec.int("max_stanza_size", 262144, minimum=4096),
        max_stanza_nodes=sec.int("max_stanza_nodes", DEFAULT_MAX_NODES, minimum=64),
        max_depth=max_depth(sec),
        max_outbound_bytes=sec.int("max_outbound_bytes", 4 * 1024 * 1024, minimum=65536),
    )
    domains = {}
    for domain, dsec in domain_tables.items():
        domains[domain] = DomainLimits(
            max_stanza_size=dsec.int("max_stanza_size", cfg.max_stanza_size, minimum=4096),
            max_connections=dsec.int("max_connections", cfg.max_connections_per_domain, minimum=1),
        )
        dsec.reject_unknown()
    object.__setattr__(cfg, "domains", domains)
    tcp_overlap(sec, {"listen": cfg.listen, "listen_tls": cfg.listen_tls})
    sec.reject_unknown()
    if not cfg.enabled and (cfg.listen or cfg.listen_tls):
        raise sec.error("enabled", False, "s2s is disabled but s2s.listen / s2s.listen_tls "
                                          "name listeners; empty them or enable s2s")
    for path_key in ("ca_file", "ca_dir"):
        value = getattr(cfg, path_key)
        if value is not None and not value.strip():
            raise sec.error(path_key, value, "must not be empty (leave it out instead)")
    return cfg

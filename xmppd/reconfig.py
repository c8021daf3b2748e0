"""Configuration reload of the running server (``xmppctl reload``, SIGHUP).

A reload re-reads the config file and validates all of it exactly as
start-up does (a throw-away :class:`~xmppd.core.Server` is built on an empty
in-memory store, as ``xmppctl check`` does).  An invalid file changes
nothing: the one-line error is reported and the running configuration stays.

Only settings that can change under live sessions without surprising anyone
are applied (:data:`RELOADABLE`); a changed key of any other kind is named
as "needs a restart" and keeps its running value, so the configuration the
server runs with is always one consistent object (the old one with the
reloadable parts replaced).

Why these and not others: ACLs, admins, domain-filter defaults and limits
are looked up per request from in-memory objects that can be swapped whole;
listeners, hosts, the data directory, plugins, auth connectors and TLS
settings own sockets, files, connections or contexts that live sessions use.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from twisted.internet import task
from twisted.logger import Logger

from xmppd.config import Config, ConfigError, Section, load
from xmppd.logfilter import log_observer, set_level

log = Logger(observer=log_observer)

#: What a reload applies (README.rst, "Reload"), for the docs and the report.
RELOADABLE = (
    "server.log_level", "server.admins", 'hosts."<domain>".admins', "acl",
    "limits", "c2s.auth_timeout", "c2s.max_connections_per_ip", "c2s.max_auth_failures",
    "c2s.max_outbound_bytes", "c2s.close_timeout",
    "domain-filter (except poll_interval)", 'hosts."<domain>".domain-filter',
)

# [c2s] keys that own sockets, decide what a stream may do before TLS, or
# size the XML parsers (offline storage and vCards parse what was accepted
# under them, so they must not change under stored data).
_C2S_RESTART = ("listen", "listen_tls", "tls", "max_stanza_size", "max_stanza_nodes",
                "max_depth", "max_preauth_stanza_size", "max_preauth_stanza_nodes",
                "reuse_port")
# Top-level tables applied by a reload; every other changed table needs a restart.
_SECTIONS = ("acl", "limits", "domain-filter")
_HOST_KEYS = ("admins", "domain-filter")
_DF_RESTART = ("poll_interval",)
# Tables that need a restart, reported key by key: a node's Redis link, its
# name and timings, and the store directory are fixed for the process's life
# (docs/cluster.rst), and "cluster.redis" says more to an operator than "cluster".
_PER_KEY_RESTART = ("cluster", "storage")


@dataclass
class ReloadOutcome:
    """What a reload did, for the log and for ``xmppctl reload``."""

    error: str | None = None  # the config was refused: nothing changed
    applied: list[str] = field(default_factory=list)  # keys whose new value is in force
    restart: list[str] = field(default_factory=list)  # changed keys that wait for a restart
    certificates: list[str] = field(default_factory=list)  # messages of the cert reload

    def to_json(self) -> dict:
        return {"error": self.error, "applied": self.applied, "restart": self.restart,
                "certificates": self.certificates}


def validate(config: Config, server) -> None:
    """Everything start-up checks, on a throw-away server (raises ConfigError).

    The running connectors and certificate store are lent to it: changes to
    ``[auth]`` and ``[tls]`` need a restart anyway, and building new
    connectors could open connections to their backends.
    """
    from xmppd.core import Server
    from xmppd.storage import MemoryStore
    from xmppd.listen import listeners

    scratch = Server(config, store=MemoryStore(), clock=task.Clock(), certs=server.certs,
                     connectors=server.connectors)
    listeners(scratch)


def _table(section: Section | None) -> dict:
    return section.table if section is not None else {}


def _restart_keys(old: Config, new: Config) -> list[str]:
    out = []
    if old.hosts != new.hosts:
        out.append("server.hosts")
    if old.data_dir != new.data_dir:
        out.append("server.data_dir")
    out += [f"c2s.{k}" for k in _C2S_RESTART if getattr(old.c2s, k) != getattr(new.c2s, k)]
    out += [f"tls.{k}" for k in old.tls.__dataclass_fields__
            if getattr(old.tls, k) != getattr(new.tls, k)]
    # Per running host (a new host is already "server.hosts").
    if any(old.client_cert(h) != new.client_cert(h) for h in old.hosts):
        out.append("tls client certificates (client_*)")
    if any(old.sasl_for(h) != new.sasl_for(h) for h in old.hosts):
        out.append("sasl")
    if old.plugins != new.plugins:
        out.append("sm.plugins")
    if old.auth.table != new.auth.table:
        out.append("auth")
    for host in sorted(set(old.host_sections) | set(new.host_sections)):
        a, b = _table(old.host_sections.get(host)), _table(new.host_sections.get(host))
        out += [f'hosts."{host}".{k}' for k in sorted(set(a) | set(b))
                if k not in _HOST_KEYS and a.get(k) != b.get(k)]
    for name in sorted(set(old.sections) | set(new.sections)):
        a, b = _table(old.sections.get(name)), _table(new.sections.get(name))
        if name == "domain-filter":
            out += [f"{name}.{k}" for k in _DF_RESTART if a.get(k) != b.get(k)]
        elif name in _PER_KEY_RESTART:
            out += [f"{name}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif name not in _SECTIONS and a != b:
            out.append(name)
    return out


def merge(old: Config, new: Config) -> Config:
    """``old`` with the reloadable settings of ``new``."""
    path = old.path
    host_sections = {}
    for host in old.hosts:
        a, b = _table(old.host_sections.get(host)), _table(new.host_sections.get(host))
        table = {k: v for k, v in a.items() if k not in _HOST_KEYS}
        table.update({k: b[k] for k in _HOST_KEYS if k in b})
        if table:
            host_sections[host] = Section(path, f'hosts."{host}"', table)
    sections = {name: Section(path, name, sec.table) for name, sec in old.sections.items()
                if name not in _SECTIONS}
    for name in _SECTIONS:
        table = dict(_table(new.sections.get(name)))
        if name == "domain-filter":
            kept = _table(old.sections.get(name))
            for k in _DF_RESTART:
                table.pop(k, None)
                if k in kept:
                    table[k] = kept[k]
        if table:
            sections[name] = Section(path, name, table)
    c2s = replace(new.c2s, **{k: getattr(old.c2s, k) for k in _C2S_RESTART})
    return replace(old, admins=new.admins, c2s=c2s, host_sections=host_sections,
                   sections=sections, log_level=new.log_level)


def _applied_keys(old: Config, merged: Config) -> list[str]:
    out = []
    if old.log_level != merged.log_level:
        out.append("server.log_level")
    if old.admins != merged.admins:
        out.append("server.admins")
    out += [f"c2s.{k}" for k in old.c2s.__dataclass_fields__
            if getattr(old.c2s, k) != getattr(merged.c2s, k)]
    for name in _SECTIONS:
        if _table(old.sections.get(name)) != _table(merged.sections.get(name)):
            out.append(name)
    for host in old.hosts:
        a, b = _table(old.host_sections.get(host)), _table(merged.host_sections.get(host))
        out += [f'hosts."{host}".{k}' for k in _HOST_KEYS if a.get(k) != b.get(k)]
    return out


def _apply(server, merged: Config, applied: list[str]) -> None:
    """Swap the reloadable parts in; every look-up after this sees them.

    Everything that can raise is built first, then assigned: a reload is
    applied whole or not at all.
    """
    from xmppd import acl as acllib

    control = acllib.existing(server)
    fresh_acl = acllib.AccessControl.from_config(merged) if control is not None else None
    fresh_throttle = None
    if "limits" in applied and server.throttle is not None:
        fresh_throttle = server._build_throttle(merged)
    domain_filter = server.plugin("domain-filter")
    filter_defaults = domain_filter.read_defaults(merged) if domain_filter is not None else None
    server.config = merged
    set_level(merged.log_level)
    if fresh_throttle is not None:
        server.throttle.retune(fresh_throttle)
    if fresh_acl is not None:
        control.reconfigure(fresh_acl)
    if filter_defaults is not None:
        domain_filter.use_defaults(*filter_defaults)


def reload_config(server) -> ReloadOutcome:
    """Re-read ``server.config.path``; apply what may be applied (see module doc)."""
    old = server.config
    try:
        new = load(None if old.path == "<defaults>" else old.path)
        validate(new, server)
        merged = merge(old, new)
        applied = _applied_keys(old, merged)
        _apply(server, merged, applied)
    except ConfigError as e:
        log.error("reload refused, nothing changed: {error}", error=str(e))
        return ReloadOutcome(error=str(e))
    except Exception as e:  # a plugin that fails oddly on the new file: still nothing changes
        log.failure("reload refused, nothing changed")
        return ReloadOutcome(error=f"{type(e).__name__}: {e}")
    outcome = ReloadOutcome(applied=applied, restart=_restart_keys(old, new))
    if applied:
        log.info("config reloaded: {keys} now in force", keys=", ".join(applied))
    if outcome.restart:
        log.warn("config: {keys} changed but need a restart; the running values stay",
                 keys=", ".join(outcome.restart))
    return outcome

"""Access control lists: who may run which privileged operation.

Each privileged operation (an ad-hoc command node, or any other privileged
IQ a plugin wants to guard) has a name and an ACL: a list of entries, any of
which grants access.  Operators set them in ``[acl]``, keyed by name::

    [acl]
    "http://jabber.org/protocol/admin#add-user" = ["ADMIN", "DOMAIN_ADMIN"]
    "http://jabber.org/protocol/admin#get-online-users-num" = ["LOCAL"]
    "urn:xmppd:admin#certificate-status" = ["ops@example.org", "monitor.example.org"]

Entries (roles are case-insensitive):

``ALL``           anyone, local or remote;
``LOCAL``         accounts on any virtual host of this server;
``DOMAIN_ADMIN``  admins of the *target's* domain, ``[hosts."<domain>"] admins``
                  (the target is the account a command acts on, else the vhost
                  the request is addressed to);
``ADMIN``         global admins, ``[server] admins``;
``NONE``          nobody (an ACL of ``["NONE"]`` disables the operation);
``user@domain``   that account (any resource); ``user@domain/res`` that session;
``domain``        every account at that domain.

Roles do not imply each other: a global admin is not a ``DOMAIN_ADMIN``
unless listed there too, so each entry means exactly one thing.  When a
name is absent from ``[acl]`` the default given by whoever registers the
name applies (``ADMIN`` for the administration commands).

Evaluation is a few set look-ups; every denial of an actual request is
logged (requester, operation, target) by :meth:`AccessControl.check`.
"""
from __future__ import annotations

import weakref
from typing import Iterable

from twisted.logger import Logger

from xmppd import jid as jidlib
from xmppd.jid import JID
from xmppd.logfilter import log_observer

log = Logger(observer=log_observer)

ROLES = ("ALL", "LOCAL", "DOMAIN_ADMIN", "ADMIN", "NONE")


class ACLError(ValueError):
    """An entry that is neither a role nor a JID/domain."""


class ACL:
    """One compiled access list."""

    __slots__ = ("entries", "roles", "jids", "domains")

    def __init__(self, entries: Iterable[str]) -> None:
        self.entries = tuple(entries)
        roles, jids, domains = set(), set(), set()
        for entry in self.entries:
            if not isinstance(entry, str):
                raise ACLError(f"{entry!r} is not a string")
            upper = entry.strip().upper()
            if upper in ROLES:
                roles.add(upper)
                continue
            try:
                j = jidlib.parse(entry.strip())
            except jidlib.InvalidJID as e:
                raise ACLError(
                    f"{entry!r} is neither a role ({', '.join(ROLES)}) nor a JID/domain ({e})"
                ) from None
            if j.user is None and j.resource is None:
                domains.add(j.host)
            else:
                jids.add(j.full)
        self.roles = frozenset(roles)
        self.jids = frozenset(jids)
        self.domains = frozenset(domains)

    def allows(self, requester: JID, target_domain: str | None, ctx: "AccessControl") -> bool:
        roles = self.roles
        if "ALL" in roles:
            return True
        if requester.bare in self.jids or requester.full in self.jids:
            return True
        if requester.user is not None and requester.host in self.domains:
            return True
        if "LOCAL" in roles and requester.user is not None and requester.host in ctx.hosts:
            return True
        if "ADMIN" in roles and requester.bare in ctx.admins:
            return True
        if "DOMAIN_ADMIN" in roles and target_domain is not None:
            if requester.bare in ctx.domain_admins.get(target_domain, ()):
                return True
        return False

    def __repr__(self) -> str:
        return f"ACL({list(self.entries)!r})"


class AccessControl:
    """Every ACL of a server, built once from the config."""

    def __init__(self, hosts: Iterable[str], admins: Iterable[str] = (),
                 domain_admins: dict[str, Iterable[str]] | None = None,
                 configured: dict[str, ACL] | None = None) -> None:
        self.hosts = frozenset(hosts)
        self.admins = frozenset(admins)
        self.domain_admins = {h: frozenset(a) for h, a in (domain_admins or {}).items()}
        self.configured: dict[str, ACL] = dict(configured or {})
        self.acls: dict[str, ACL] = {}
        self.defaults: dict[str, tuple[str, ...]] = {}  # name -> default given to register()

    @classmethod
    def from_config(cls, config) -> "AccessControl":
        """From ``[server] admins``, ``[hosts."x"] admins`` and ``[acl]`` (ConfigError)."""
        domain_admins = {}
        for host, sec in config.host_sections.items():
            out = []
            for a in sec.strings("admins", ()):
                try:
                    j = jidlib.parse(a)
                except jidlib.InvalidJID as e:
                    raise sec.error("admins", a, f"not a valid JID ({e})") from None
                if j.user is None:
                    raise sec.error("admins", a, "must be an account JID (user@domain)")
                out.append(j.bare)
            domain_admins[host] = out
        sec = config.section("acl")
        configured = {}
        for name, value in sec.table.items():
            entries = (sec.str(name),) if isinstance(value, str) else sec.strings(name)
            try:
                configured[name] = ACL(entries)
            except ACLError as e:
                raise sec.error(name, value, str(e)) from None
        return cls(config.hosts, config.admins, domain_admins, configured)

    def register(self, name: str, default: Iterable[str] = ("ADMIN",)) -> ACL:
        """Declare an operation and its default ACL; returns the one in force."""
        self.defaults[name] = tuple(default)
        acl = self.configured.get(name)
        if acl is None:
            acl = ACL(default)
        self.acls[name] = acl
        return acl

    def reconfigure(self, fresh: "AccessControl") -> None:
        """A config reload: take ``fresh``'s admins and ``[acl]``, in place.

        Plugins hold this object, so it is updated rather than replaced; every
        registered operation gets its ACL again (configured, else its default).
        """
        self.admins, self.domain_admins = fresh.admins, fresh.domain_admins
        self.configured = dict(fresh.configured)
        for name, default in list(self.defaults.items()):
            self.register(name, default)

    def unknown(self, prefixes: Iterable[str]) -> list[str]:
        """Configured names under ``prefixes`` that nobody registered (typos)."""
        prefixes = tuple(prefixes)
        return [n for n in self.configured if n.startswith(prefixes) and n not in self.acls]

    def allowed(self, name: str, requester: JID, target_domain: str | None = None) -> bool:
        """Silent check (for listings)."""
        acl = self.acls.get(name)
        if acl is None:
            acl = self.register(name)
        return acl.allows(requester, target_domain, self)

    def check(self, name: str, requester: JID, target_domain: str | None = None) -> bool:
        """Check an actual request; denials are logged."""
        if self.allowed(name, requester, target_domain):
            return True
        log.warn("acl: {requester} denied {operation} (target {target})",
                 requester=requester.full, operation=name, target=target_domain or "-")
        return False

    def is_admin(self, requester: JID) -> bool:
        return requester.bare in self.admins

    def is_domain_admin(self, requester: JID, domain: str) -> bool:
        return requester.bare in self.domain_admins.get(domain, ())


_BY_SERVER: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def existing(server) -> AccessControl | None:
    """The server's AccessControl if a plugin has built it (for a reload)."""
    return _BY_SERVER.get(server)


def for_server(server) -> AccessControl:
    """The server's one :class:`AccessControl`, built from its config on first use.

    Plugins guarding privileged IQs call this and :meth:`AccessControl.register`
    their operation names at setup, then :meth:`AccessControl.check` per request.
    """
    acl = _BY_SERVER.get(server)
    if acl is None:
        acl = AccessControl.from_config(server.config)
        _BY_SERVER[server] = acl
    return acl

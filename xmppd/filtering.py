"""Domain-based packet filtering: the policies, their rules, their storage.

A *domain filter* says with whom an account may exchange stanzas.  The
policies follow the ones operators know from Tigase (the names are the
same; the code and the rule syntax are ours):

``ALL``
    no restriction (the default);
``LOCAL``
    only JIDs on the virtual hosts of this server;
``OWN``
    only JIDs on the user's own virtual host;
``BLOCK``
    nobody (but the user's own server and own account, see below);
``LIST``
    only the listed domains (a whitelist);
``BLACKLIST``
    everything except the listed domains;
``CUSTOM``
    an ordered list of ``allow``/``deny`` rules, first match wins.

Whatever the policy, the user's own account (own bare JID, all its
resources) and own server (the bare domain of the user's vhost) stay
reachable: a filter must never cut a client off its own server.

Domain entries (``domains`` of LIST/BLACKLIST, domain targets of rules) are
``example.org`` (that domain only) or ``*.example.org`` (any subdomain of
it, not the domain itself).

Rule syntax (CUSTOM), one rule per string, ``ACTION TARGET``::

    allow example.org        # a domain (every JID at it)
    deny  *.spam.example     # any subdomain of spam.example
    allow jid:boss@x.org     # a bare JID (all its resources) ...
    allow jid:bot@x.org/r1   # ... or one full JID
    allow local              # any vhost of this server
    allow own                # the user's own vhost
    deny  *                  # everything (also: "all")

The first rule matching the peer decides; when none matches, the stanza is
allowed, so a whitelist ends with ``deny *`` and a blacklist needs no final
rule.  Evaluation is a fixed number of dict/set look-ups (one per kind of
target and one per label of the peer's domain for ``*.`` targets), however
long the list: each look-up returns the position of the first rule of its
kind, and the smallest position wins.

Settings are stored per user in the key-value store as
``settings/<bare JID>/domain_filter`` ->
``{"policy": "LIST", "domains": [...], "rules": [...]}``; no entry means the
vhost's default (``[hosts."<vhost>".domain-filter]``), else the server-wide
default (``[domain-filter]``).  ``xmppctl filter`` also records the change in
``domain_filter_changes/ctl/<bare JID>`` so that the running server picks it
up for online sessions.
"""
from __future__ import annotations

import time
from typing import Iterable

from xmppd import jid as jidlib
from xmppd.jid import JID

POLICIES = ("ALL", "LOCAL", "OWN", "BLOCK", "LIST", "BLACKLIST", "CUSTOM")
DEFAULT = "DEFAULT"  # in commands: drop the user's own setting

STORE = "settings"
KEY = "domain_filter"
CHANGES = "domain_filter_changes"
CHANGES_USER = "ctl"


class FilterError(ValueError):
    """A policy, domain or rule that cannot be used; the message says why."""


# -- domains and rules -------------------------------------------------------


def parse_domain(text: str) -> str:
    """``example.org`` or ``*.example.org`` -> prepared form (raises FilterError)."""
    text = text.strip()
    wildcard = text.startswith("*.")
    name = text[2:] if wildcard else text
    try:
        j = jidlib.parse(name)
    except jidlib.InvalidJID as e:
        raise FilterError(f"{text!r} is not a domain ({e})") from None
    if j.user is not None or j.resource is not None:
        raise FilterError(f"{text!r} is not a domain (use jid: in a rule for a JID)")
    return ("*." if wildcard else "") + j.host


class DomainSet:
    """Exact domains and ``*.`` suffixes, matched with set look-ups."""

    __slots__ = ("exact", "suffixes")

    def __init__(self, domains: Iterable[str]) -> None:
        exact, suffixes = set(), set()
        for d in domains:
            if d.startswith("*."):
                suffixes.add(d[2:])
            else:
                exact.add(d)
        self.exact = frozenset(exact)
        self.suffixes = frozenset(suffixes)

    def __contains__(self, host: str) -> bool:
        if host in self.exact:
            return True
        if self.suffixes:
            dot = host.find(".")
            while dot >= 0:
                host = host[dot + 1:]
                if host in self.suffixes:
                    return True
                dot = host.find(".")
        return False


def parse_rule(text: str) -> tuple[bool, str, str]:
    """``"allow example.org"`` -> ``(True, "domain", "example.org")``.

    Kinds: ``any``, ``local``, ``own``, ``domain`` (exact), ``suffix``
    (``*.example.org`` stored as ``example.org``), ``bare``, ``full``.
    """
    parts = text.split()
    if len(parts) != 2 or parts[0].lower() not in ("allow", "deny"):
        raise FilterError(f"rule {text!r}: expected 'allow TARGET' or 'deny TARGET'")
    allow = parts[0].lower() == "allow"
    target = parts[1]
    lowered = target.lower()
    if lowered in ("*", "all"):
        return allow, "any", "*"
    if lowered in ("local", "own"):
        return allow, lowered, lowered
    if lowered.startswith("jid:"):
        try:
            j = jidlib.parse(target[4:])
        except jidlib.InvalidJID as e:
            raise FilterError(f"rule {text!r}: bad JID ({e})") from None
        if j.user is None and j.resource is None:
            return allow, "domain", j.host
        return allow, ("full" if j.resource is not None else "bare"), j.full
    try:
        domain = parse_domain(target)
    except FilterError as e:
        raise FilterError(f"rule {text!r}: {e}") from None
    if domain.startswith("*."):
        return allow, "suffix", domain[2:]
    return allow, "domain", domain


def format_rule(rule: tuple[bool, str, str]) -> str:
    allow, kind, value = rule
    action = "allow" if allow else "deny"
    if kind == "any":
        return f"{action} *"
    if kind in ("local", "own"):
        return f"{action} {kind}"
    if kind in ("bare", "full"):
        return f"{action} jid:{value}"
    if kind == "suffix":
        return f"{action} *.{value}"
    return f"{action} {value}"


class RuleList:
    """A compiled CUSTOM rule list: first match wins, no match allows."""

    __slots__ = ("full", "bare", "domain", "suffix", "local", "own", "any")

    _NEVER = (1 << 30, True)

    def __init__(self, rules: Iterable[tuple[bool, str, str]]) -> None:
        # kind -> value -> (position, allow); only the first rule per value counts.
        self.full: dict[str, tuple[int, bool]] = {}
        self.bare: dict[str, tuple[int, bool]] = {}
        self.domain: dict[str, tuple[int, bool]] = {}
        self.suffix: dict[str, tuple[int, bool]] = {}
        self.local = self.own = self.any = self._NEVER
        for pos, (allow, kind, value) in enumerate(rules):
            if kind in ("local", "own", "any"):
                if getattr(self, kind) is self._NEVER:
                    setattr(self, kind, (pos, allow))
            else:
                getattr(self, kind).setdefault(value, (pos, allow))

    def allows(self, owner_host: str, other: JID, local_hosts: frozenset) -> bool:
        best = self.any
        if self.full:
            hit = self.full.get(other.full)
            if hit is not None and hit < best:
                best = hit
        if self.bare:
            hit = self.bare.get(other.bare)
            if hit is not None and hit < best:
                best = hit
        host = other.host
        hit = self.domain.get(host)
        if hit is not None and hit < best:
            best = hit
        if self.suffix:
            dot = host.find(".")
            while dot >= 0:
                host = host[dot + 1:]
                hit = self.suffix.get(host)
                if hit is not None and hit < best:
                    best = hit
                dot = host.find(".")
        if self.local < best and other.host in local_hosts:
            best = self.local
        if self.own < best and other.host == owner_host:
            best = self.own
        return best[1]


# -- policies ----------------------------------------------------------------


class Policy:
    """One compiled filter setting; shared by every user it applies to.

    ``allows(owner_host, other)`` answers for a peer other than the user's
    own account and own server (the caller lets those through first).
    """

    __slots__ = ("name", "domains", "rules", "source", "_domains", "_rules", "_hosts")

    def __init__(self, name: str, domains: Iterable[str] = (), rules: Iterable[str] = (),
                 local_hosts: Iterable[str] = (), source: str = "") -> None:
        name = (name or "").upper()
        if name not in POLICIES:
            raise FilterError(f"unknown policy {name!r}; one of {', '.join(POLICIES)}")
        self.name = name
        self.domains = tuple(parse_domain(d) for d in domains)
        parsed = [parse_rule(r) for r in rules]
        self.rules = tuple(format_rule(r) for r in parsed)
        if name in ("LIST", "BLACKLIST") and self.rules:
            raise FilterError(f"policy {name} takes domains, not rules")
        if name == "CUSTOM" and self.domains:
            raise FilterError("policy CUSTOM takes rules, not domains")
        if name not in ("LIST", "BLACKLIST", "CUSTOM") and (self.domains or self.rules):
            raise FilterError(f"policy {name} takes neither domains nor rules")
        self.source = source  # "user", 'hosts."x"', "server": where it came from
        self._domains = DomainSet(self.domains)
        self._rules = RuleList(parsed)
        self._hosts = frozenset(local_hosts)

    @property
    def unrestricted(self) -> bool:
        return self.name == "ALL"

    def allows(self, owner_host: str, other: JID) -> bool:
        name = self.name
        if name == "ALL":
            return True
        if name == "LOCAL":
            return other.host in self._hosts
        if name == "OWN":
            return other.host == owner_host
        if name == "BLOCK":
            return False
        if name == "LIST":
            return other.host in self._domains
        if name == "BLACKLIST":
            return other.host not in self._domains
        return self._rules.allows(owner_host, other, self._hosts)

    def to_json(self) -> dict:
        return {"policy": self.name, "domains": list(self.domains), "rules": list(self.rules)}

    def describe(self) -> str:
        extra = ""
        if self.domains:
            extra = " " + " ".join(self.domains)
        elif self.rules:
            extra = " " + "; ".join(self.rules)
        return self.name + extra

    def __repr__(self) -> str:
        return f"Policy({self.describe()!r})"


def from_json(data: object, local_hosts: Iterable[str], source: str = "user") -> Policy:
    """A stored setting -> Policy (raises FilterError when it is not usable)."""
    if not isinstance(data, dict):
        raise FilterError(f"stored setting {data!r} is not a table")
    domains, rules = data.get("domains") or [], data.get("rules") or []
    if not isinstance(domains, list) or not isinstance(rules, list):
        raise FilterError(f"stored setting {data!r}: domains and rules must be lists")
    return Policy(str(data.get("policy", "")), domains, rules, local_hosts, source)


def from_section(sec, local_hosts: Iterable[str], fallback: "Policy | None" = None) -> Policy:
    """``[domain-filter]`` or ``[hosts."x".domain-filter]`` -> Policy (ConfigError)."""
    source = sec.prefix
    if fallback is not None and not sec.table:
        return fallback
    name = sec.str("default", fallback.name if fallback is not None else "ALL")
    if not isinstance(name, str) or name.upper() not in POLICIES:
        raise sec.error("default", name, "must be one of " + ", ".join(POLICIES))
    default_domains = fallback.domains if fallback is not None and "default" not in sec.table else ()
    default_rules = fallback.rules if fallback is not None and "default" not in sec.table else ()
    domains = sec.strings("domains", default_domains)
    rules = sec.strings("rules", default_rules)
    for d in domains:
        try:
            parse_domain(d)
        except FilterError as e:
            raise sec.error("domains", d, str(e)) from None
    for r in rules:
        try:
            parse_rule(r)
        except FilterError as e:
            raise sec.error("rules", r, str(e)) from None
    try:
        return Policy(name, domains, rules, local_hosts, source)
    except FilterError as e:
        raise sec.error("default", name, str(e)) from None


# -- storage (shared by the plugin and xmppctl) --------------------------------


def load_setting(store, bare: str) -> dict | None:
    return store.get(STORE, bare, KEY)


def save_setting(store, bare: str, policy: Policy | None, notify: bool = False) -> None:
    """Store ``policy`` for ``bare`` (None: back to the defaults)."""
    if policy is None:
        store.delete(STORE, bare, KEY)
    else:
        store.put(STORE, bare, KEY, policy.to_json())
    if notify:
        now = time.time()
        store.put(CHANGES, CHANGES_USER, bare, now)
        old = [k for k, stamp in store.items(CHANGES, CHANGES_USER)
               if not isinstance(stamp, (int, float)) or stamp < now - 86400]
        if old:
            store.delete_many(CHANGES, CHANGES_USER, old)  # one transaction, not one per key


def configured_default(config, host: str) -> Policy:
    """The default a vhost's users get from the config (vhost table, else server-wide)."""
    server_default = from_section(config.section("domain-filter"), config.hosts)
    host_sec = config.host_sections.get(host)
    if host_sec is None:
        return server_default
    return from_section(host_sec.table_of("domain-filter"), config.hosts, server_default)


def ctl_filter(config, store, connector, account: JID, policy: str | None, values: list[str]):
    """``xmppctl filter JID [POLICY [VALUES...]]``: show or set; returns a Deferred.

    Fails with :class:`FilterError` (bad policy/values) or ``NoSuchUser``.
    """
    from twisted.internet import defer

    from xmppd.auth.base import NoSuchUser

    @defer.inlineCallbacks
    def go():
        exists = yield connector.user_exists(account.user, account.host)
        if not exists:
            raise NoSuchUser(account.bare)
        if policy is None:
            stored = load_setting(store, account.bare)
            if stored is None:
                default = configured_default(config, account.host)
                print(f"{account.bare}: {default.describe()} (the default)")
            else:
                print(f"{account.bare}: {from_json(stored, config.hosts).describe()}")
            return
        name = policy.upper()
        if name == DEFAULT:
            if values:
                raise FilterError("DEFAULT takes no domains or rules")
            save_setting(store, account.bare, None, notify=True)
            default = configured_default(config, account.host)
            print(f"{account.bare}: {default.describe()} (the default)")
            return
        if name == "CUSTOM":
            new = Policy(name, (), values, config.hosts, "user")
        else:  # LIST/BLACKLIST take domains; the others refuse any value
            new = Policy(name, values, (), config.hosts, "user")
        save_setting(store, account.bare, new, notify=True)
        print(f"{account.bare}: {new.describe()}")

    return go()

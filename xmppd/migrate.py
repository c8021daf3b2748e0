"""``xmppctl import`` / ``xmppctl export``: accounts and their data as XEP-0227 files.

Reading the format is :mod:`xmppd.pie`, checking each user by the server's
rules is :mod:`xmppd.pieconvert`; this module runs the two commands against
the store and the connectors (docs/migration.rst has the operator's view):

* import: every user is written in one store transaction (all of it or
  nothing), the roster version moved on so that clients with a cached
  roster fetch it again; an existing account is left alone unless
  ``--replace``; hosts the server does not serve are refused unless mapped
  (``--host-map``); what was left out is listed, then a summary.  The
  server must be stopped: it keeps the rosters and blocklists of online
  users in memory.
* export: one file, created 0600 under a temporary name, synced, renamed.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, TextIO

from twisted.internet import defer

from xmppd import jid as jidlib
from xmppd import pie
from xmppd.auth.base import ScramCredentials
from xmppd.auth.internal import STORE as ACCOUNTS, InternalConnector
from xmppd.auth.passwords import SCRAM_MECHANISMS
from xmppd.handlers import blocking, offline, roster, vcard
from xmppd.handlers.presence import PendingRequests
from xmppd.pieconvert import Account, Limits, Skip, convert
from xmppd.stanzas import NS_CLIENT, escape_attr, serialize_fragment
from xmppd.xmlparser import XMLStreamError, parse_fragment

#: The stores an account's imported data lives in (``--replace`` clears these).
DATA_STORES = (roster.STORE, vcard.STORE, offline.STORE, blocking.STORE, PendingRequests.STORE)


class MigrationError(Exception):
    """The import or export cannot go on; one line for the operator."""


# -- writing one user to the store ----------------------------------------------


def _existing_keys(store, bare: str, include_account: bool) -> list:
    keys = [(s, bare, k) for s in DATA_STORES for k, _ in store.items(s, bare)]
    if include_account:
        keys += [(ACCOUNTS, bare, k) for k, _ in store.items(ACCOUNTS, bare)]
    return keys


def write_account(store, acc: Account, internal: bool, replace: bool) -> None:
    """One transaction: the account's data (and credentials on an internal host).

    With ``replace``, what the account had in the imported stores is removed
    in the same transaction; otherwise offline messages are appended and the
    rest is added to what is there.
    """
    bare = acc.bare
    puts = []
    if internal:
        puts.append((ACCOUNTS, bare, "scram", acc.scram))
    for contact, item in acc.roster.items():
        puts.append((roster.STORE, bare, contact, dict(item)))
    version = store.get(roster.SETTINGS, bare, roster.VERSION_KEY, 0) + 1
    puts.append((roster.SETTINGS, bare, roster.VERSION_KEY, version))
    for contact, value in acc.pending.items():
        puts.append((PendingRequests.STORE, bare, contact, value))
    if acc.vcard is not None:
        puts.append((vcard.STORE, bare, "vcard", acc.vcard))
    existing_offline = [] if replace else store.items(offline.STORE, bare)
    seq = int(existing_offline[-1][0]) if existing_offline else 0
    for xml in acc.offline:
        seq += 1
        puts.append((offline.STORE, bare, f"{seq:012d}", xml))
    for jid in acc.blocklist:
        puts.append((blocking.STORE, bare, jid, {}))
    deletes = []
    if replace:
        written = {(s, u, k) for s, u, k, _ in puts}
        deletes = [k for k in _existing_keys(store, bare, internal) if k not in written]
    store.batch(puts=puts, deletes=deletes)


# -- the import command ---------------------------------------------------------


@dataclass
class Summary:
    accounts: int = 0
    replaced: int = 0
    refused: int = 0
    roster_items: int = 0
    vcards: int = 0
    offline: int = 0
    blocked: int = 0
    pending: int = 0
    users_with_skips: int = 0
    notes: int = 0

    def lines(self) -> list[str]:
        return [
            f"imported {self.accounts} account(s) ({self.replaced} replaced), "
            f"{self.roster_items} roster item(s), {self.pending} subscription request(s), "
            f"{self.vcards} vCard(s), {self.offline} offline message(s), "
            f"{self.blocked} blocklist item(s)",
            f"not imported: {self.refused} account(s); {self.users_with_skips} imported "
            f"account(s) with data left out (listed above)",
        ]


def parse_host_map(pairs: list[str], hosts: tuple) -> dict[str, str]:
    out = {}
    for pair in pairs:
        old, eq, new = pair.partition("=")
        if not eq or not old or not new:
            raise MigrationError(f"--host-map {pair!r}: expected OLD=NEW")
        try:
            new = jidlib.parse(new).host
            old = jidlib.parse(old).host
        except jidlib.InvalidJID as e:
            raise MigrationError(f"--host-map {pair!r}: {e}") from None
        if new not in hosts:
            raise MigrationError(f"--host-map {pair!r}: {new} is not a host of this server "
                                 f"({', '.join(hosts)})")
        out[old] = new
    return out


@defer.inlineCallbacks
def import_files(paths: list[str], config, store, connectors: dict, replace: bool = False,
                 host_map: dict | None = None, out: TextIO = sys.stdout,
                 clock: Callable[[], float] = time.time):
    """Import every user of ``paths`` (files or directories of ``*.xml``); Deferred[Summary].

    Each user is converted, checked and written on its own; a user that
    cannot be imported is reported and the import goes on.  A file that is
    not readable XEP-0227 XML stops the import (:class:`MigrationError`)
    after the users before the fault.
    """
    limits = Limits.from_config(config)
    reading = limits.reading()
    host_map = host_map or {}
    summary = Summary()
    seen: set[str] = set()
    for path in _expand(paths):
        try:
            for found in pie.read(path, reading):
                if isinstance(found, pie.Note):
                    summary.notes += 1
                    out.write(f"{found.source}: {found.text}\n")
                    continue
                yield _import_one(found, config, store, connectors, replace, host_map, limits,
                                  summary, seen, out, clock)
        except pie.PIEError as e:
            raise MigrationError(f"{e} (accounts before this point were imported)") from None
    return summary


def _expand(paths: list[str]) -> list[str]:
    """Files as given; a directory stands for its ``*.xml`` files (Prosody writes one per user)."""
    out = []
    for path in paths:
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if n.endswith(".xml"))
            if not names:
                raise MigrationError(f"{path}: no .xml files in this directory")
            out.extend(os.path.join(path, n) for n in names)
        elif not os.path.exists(path):
            raise MigrationError(f"{path}: no such file")
        else:
            out.append(path)
    return out


def _map_host(raw_host: str, config, host_map: dict) -> str:
    try:
        host = jidlib.parse(raw_host).host
    except jidlib.InvalidJID:
        raise Skip(f"host {raw_host!r} is not a valid domain") from None
    host = host_map.get(host, host)
    if host not in config.hosts:
        raise Skip(f"host {host} is not served by this server ({', '.join(config.hosts)}); "
                   f"map it with --host-map {host}=NEW")
    return host


@defer.inlineCallbacks
def _import_one(raw: pie.RawUser, config, store, connectors, replace, host_map, limits,
                summary: Summary, seen: set, out: TextIO, clock):
    label = f"{raw.name}@{raw.host}"
    try:
        host = _map_host(raw.host, config, host_map)
        connector = connectors[host]
        internal = isinstance(connector, InternalConnector)
        acc = convert(raw, host, limits, getattr(connector, "iterations", 4096), host_map, clock)
        label = acc.bare
        if acc.bare in seen:
            raise Skip("appears twice in the import")
        seen.add(acc.bare)
        exists = yield defer.maybeDeferred(connector.user_exists, acc.user, host)
        if internal:
            taken = exists
        elif not exists:
            raise Skip(f"host {host} uses the {connector.name} connector, which has no such "
                       f"account: create it there first (credentials are not imported)")
        else:
            taken = any(store.items(s, acc.bare) for s in DATA_STORES)
        if taken and not replace:
            raise Skip("account exists (use --replace to overwrite it)" if internal else
                       "account has data here already (use --replace to overwrite it)")
    except Skip as e:
        summary.refused += 1
        out.write(f"{raw.source}: {label}: not imported: {e}\n")
        return
    if not internal:
        acc.skipped.insert(0, f"credentials not imported: host {host} uses the "
                              f"{connector.name} connector")
    write_account(store, acc, internal, replace=taken)
    summary.accounts += 1
    summary.replaced += bool(taken)
    summary.roster_items += len(acc.roster)
    summary.pending += len(acc.pending)
    summary.vcards += acc.vcard is not None
    summary.offline += len(acc.offline)
    summary.blocked += len(acc.blocklist)
    if acc.skipped:
        summary.users_with_skips += 1
        for line in acc.skipped:
            out.write(f"{raw.source}: {acc.bare}: {line}\n")


# -- the export command ---------------------------------------------------------


def users_of(store, host: str, internal: bool) -> list[str]:
    """Localparts with data at ``host``: accounts (internal), else whoever has data."""
    stores = (ACCOUNTS,) if internal else DATA_STORES + (roster.SETTINGS,)
    suffix = "@" + host
    found = set()
    for s in stores:
        found.update(u[: -len(suffix)] for u in store.users(s) if u.endswith(suffix))
    return sorted(u for u in found if u and "@" not in u)


def user_element(store, bare: str, limits: Limits) -> list[str]:
    """The children of one ``<user/>`` as XML text, from what the stores hold."""
    parts = []
    creds = store.get(ACCOUNTS, bare, "scram") or {}
    for mech in SCRAM_MECHANISMS:
        if mech in creds:
            c = ScramCredentials.from_json(creds[mech])
            parts.append(pie.scram_xml(mech, c.salt, c.iterations, c.stored_key, c.server_key))
    items = store.items(roster.STORE, bare)
    if items:
        ver = store.get(roster.SETTINGS, bare, roster.VERSION_KEY, 0)
        parts.append(f"<query xmlns='{pie.NS_ROSTER}' ver='{ver}'>"
                     + "".join(roster.item_xml(c, roster.Item(i)) for c, i in items) + "</query>")
    for contact, value in store.items(PendingRequests.STORE, bare):
        parts.append(_reparsed(value, limits, contact, bare, "subscribe request"))
    stored = store.get(vcard.STORE, bare, "vcard")
    if stored is not None:
        parts.append(_reparsed(stored, limits, None, bare, "vCard"))
    messages = [_reparsed(xml, limits, None, bare, "offline message")
                for _, xml in store.items(offline.STORE, bare)]
    messages = [m for m in messages if m]
    if messages:
        parts.append("<offline-messages>" + "".join(messages) + "</offline-messages>")
    blocked = [k for k, _ in store.items(blocking.STORE, bare)]
    if blocked:
        parts.append(f"<blocklist xmlns='{pie.NS_BLOCKING}'>"
                     + "".join(f"<item jid='{escape_attr(j)}'/>" for j in blocked) + "</blocklist>")
    return [p for p in parts if p]


def _reparsed(xml, limits: Limits, contact, bare: str, what: str) -> str:
    """Stored XML as a child of a PIE element (its namespace written out), or '' if unreadable."""
    if not isinstance(xml, str):  # older stores kept True for a pending request
        return f"<presence xmlns='{NS_CLIENT}' type='subscribe' from='{escape_attr(contact)}'/>"
    try:
        el = parse_fragment(xml, limits.stored_message)
    except XMLStreamError as e:
        sys.stderr.write(f"xmppctl: {bare}: stored {what} not exported: {e}\n")
        return ""
    return serialize_fragment(el, pie.NS_PIE)


def export_file(path: str, config, store, connectors: dict, out: TextIO = sys.stdout) -> tuple:
    """Write every host's users to ``path`` atomically (temp file, fsync, rename; mode 0600).

    Returns (users, hosts).  The file holds credentials: it is created
    0600 before anything is written, and an existing file is replaced only
    once the new one is complete.
    """
    limits = Limits.from_config(config)
    target = os.path.abspath(path)
    directory = os.path.dirname(target)
    tmp = os.path.join(directory, f".{os.path.basename(target)}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise MigrationError(f"cannot create {tmp}: {e.strerror}") from None
    users = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(pie.file_head())
            for host in config.hosts:
                internal = isinstance(connectors[host], InternalConnector)
                f.write(pie.host_head(host))
                for user in users_of(store, host, internal):
                    f.write(pie.user_xml(user, user_element(store, f"{user}@{host}", limits)))
                    users += 1
                f.write(pie.host_tail())
            f.write(pie.file_tail())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise MigrationError(f"cannot write {target}: {e.strerror}") from None
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return users, len(config.hosts)

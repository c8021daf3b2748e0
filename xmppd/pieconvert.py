"""XEP-0227 users -> what xmppd's stores hold, each piece checked by the server's own rule.

The reader (:mod:`xmppd.pie`) bounds what a user may cost; this module
decides what of it may be stored, by the rule the server applies when a
client sets the same data:

* credentials: SCRAM-SHA-1/-256 as they are (salt, iteration count,
  StoredKey, ServerKey), from ``<scram-credentials/>`` or ejabberd's
  ``password='scram:...'``; a clear-text password passes the new-password
  check (length, SASLprep) and is hashed with the host's
  ``[auth] scram_iterations``;
* roster items: JID preparation, subscription states, ``[roster]`` limits;
* subscription requests as :class:`~xmppd.handlers.presence.PendingRequests`
  keeps them; vCards under ``[vcard]``; offline messages re-read under the
  stream's limits, with a XEP-0203 stamp;
* blocklist items, also from the XEP-0016 default privacy list: its deny
  items of type ``jid`` (or ``domain``) that block every kind of stanza.

What does not pass is recorded in :attr:`Account.skipped` (one line each),
or the whole account is refused with :class:`Skip`.
"""
from __future__ import annotations

import base64
import binascii
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from twisted.words.xish import domish

from xmppd import jid as jidlib
from xmppd import pie
from xmppd.auth.base import ScramCredentials
from xmppd.auth.passwords import (
    SCRAM_MECHANISMS, UnacceptablePassword, check_new_password, make_scram,
)
from xmppd.handlers import blocking, offline, roster, vcard
from xmppd.handlers.presence import PendingRequests
from xmppd.stanzas import NS_CLIENT, serialize, serialize_fragment
from xmppd.xmlparser import Limits as ParseLimits, XMLStreamError, parse_fragment

NS_DELAY = "urn:xmpp:delay"
NS_LEGACY_DELAY = "jabber:x:delay"
_KEY_BYTES = {"SCRAM-SHA-1": 20, "SCRAM-SHA-256": 32}
#: Iteration counts accepted from a file: below, the credentials are as good
#: as clear text; above, every login would cost seconds of CPU.
MIN_ITERATIONS, MAX_ITERATIONS = 1, 1_000_000


class Skip(Exception):
    """This user is not imported; the message says why."""


@dataclass(frozen=True)
class Limits:
    """The server's limits on imported data, read from the config once."""

    roster: roster.Limits
    vcard_bytes: int
    vcard_elements: int
    offline_messages: int
    stored_message: ParseLimits
    blocklist_items: int

    @classmethod
    def from_config(cls, config) -> "Limits":
        c2s = config.c2s
        vcard_bytes, vcard_elements = vcard.size_limits(config.section("vcard"))
        return cls(
            roster=roster.Limits.from_section(config.section("roster")),
            vcard_bytes=vcard_bytes,
            vcard_elements=vcard_elements,
            offline_messages=offline.quota(config.section("offline")),
            stored_message=ParseLimits(c2s.max_stanza_size, c2s.max_depth, c2s.max_stanza_nodes
                                       ).for_stored(offline.STORED_EXTRA_BYTES),
            blocklist_items=blocking.max_items(config.section("blocking")),
        )

    def reading(self) -> pie.ReadLimits:
        """Bounds for the reader: each at least what the checks below let through."""
        r = self.roster
        msg = self.stored_message
        item_bytes = 3200 + r.max_name_length + r.max_groups * (r.max_group_length + 20)
        return pie.ReadLimits(
            roster_items=r.max_items,
            roster_item=pie.Budget(min(item_bytes, r.max_bytes) + 1024, 2 * r.max_groups + 24, 4),
            pending=r.max_items,
            pending_request=pie.Budget(PendingRequests.MAX_STORED, 64, 8),
            vcard=pie.Budget(self.vcard_bytes + 1024, 2 * self.vcard_elements + 8, msg.depth),
            offline_messages=self.offline_messages,
            offline_message=pie.Budget(msg.stanza_size, msg.nodes, msg.depth),
            blocklist_items=self.blocklist_items,
            blocklist_item=pie.Budget(8192, 8, 3),
            privacy_lists=16,
            privacy_list=pie.Budget(self.blocklist_items * 600 + 65536,
                                    self.blocklist_items * 12 + 64, 5),
        )


@dataclass
class Account:
    """One user, checked and converted to what the stores hold."""

    host: str
    user: str
    scram: dict | None = None                  # mechanism -> ScramCredentials JSON
    roster: dict = field(default_factory=dict)      # contact -> roster.Item
    pending: dict = field(default_factory=dict)     # contact -> stored request XML
    vcard: str | None = None
    offline: list = field(default_factory=list)     # stored message XML, oldest first
    blocklist: list = field(default_factory=list)   # blocked JIDs
    skipped: list = field(default_factory=list)

    @property
    def bare(self) -> str:
        return f"{self.user}@{self.host}"


# -- converting one user ---------------------------------------------------------


def convert(raw: pie.RawUser, host: str, limits: Limits, iterations: int,
            host_map: dict | None = None, clock: Callable[[], float] = time.time) -> Account:
    """Check ``raw`` as the server would check each piece; raise :class:`Skip` for the account.

    ``host_map`` (``--host-map``) applies to every address in the data too,
    so contacts on a renamed host stay local.
    """
    try:
        user = jidlib.prep_localpart(raw.name)
    except jidlib.InvalidJID as e:
        raise Skip(f"user name {raw.name!r} is not a valid localpart: {e}") from None
    acc = Account(host, user, skipped=list(raw.skipped))
    jid = _parser(host_map or {})
    acc.scram = _credentials(raw, acc, iterations)
    _roster(raw, acc, limits.roster, jid)
    _pending(raw, acc, jid)
    if raw.vcard is not None:
        _vcard(raw.vcard, acc, limits)
    for el in raw.offline:
        _offline(el, acc, limits, clock, jid)
    _blocklist(raw, acc, limits.blocklist_items, jid)
    return acc


def _parser(host_map: dict) -> Callable[[str], jidlib.JID]:
    """``jidlib.parse`` that also moves addresses of a mapped host to its new name."""
    def parse(text: str) -> jidlib.JID:
        j = jidlib.parse(text)
        new = host_map.get(j.host)
        return j if new is None else jidlib.make(j.user, new, j.resource)
    return parse


def _credentials(raw: pie.RawUser, acc: Account, iterations: int) -> dict:
    scram: dict = {}
    problems = []
    for el in raw.scram:
        mech = el.getAttribute("mechanism", "")
        try:
            scram[mech] = _scram_element(el, mech).to_json()
        except ValueError as e:
            problems.append(f"SCRAM credentials {mech!r}: {e}")
    password = raw.password
    if password and password.startswith("scram:") and not scram:
        try:
            scram.update(_ejabberd_scram(password))
        except ValueError as e:
            raise Skip(f"password attribute holds SCRAM credentials that cannot be read: {e}") \
                from None
        password = None
    if password:
        try:
            check_new_password(password, min_length=1)
        except UnacceptablePassword as e:
            problems.append(f"clear-text password: {e}")
        else:
            made = make_scram(password, iterations)
            for mech in SCRAM_MECHANISMS:
                scram.setdefault(mech, made[mech])
    if not scram:
        raise Skip("; ".join(problems) if problems else
                   "no password and no SCRAM-SHA-1/-256 credentials")
    acc.skipped.extend(f"{p}: not imported" for p in problems)
    return scram


def _unbase64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not base64") from None


def _b64(el: domish.Element, name: str) -> bytes:
    child = next(el.elements(el.uri, name), None)
    if child is None:
        raise ValueError(f"no <{name}/>")
    return _unbase64(str(child), f"<{name}/>")


def _scram_element(el: domish.Element, mech: str) -> ScramCredentials:
    if mech not in _KEY_BYTES:
        raise ValueError("mechanism not supported (SCRAM-SHA-1 and SCRAM-SHA-256 are)")
    count = next(el.elements(el.uri, "iter-count"), None)
    try:
        iterations = int(str(count).strip()) if count is not None else None
    except ValueError:
        iterations = None
    salt, stored, server = _b64(el, "salt"), _b64(el, "stored-key"), _b64(el, "server-key")
    size = _KEY_BYTES[mech]
    if len(stored) != size and len(server) != size:
        # ejabberd (23.01) keeps the values base64-encoded and encodes them
        # again on export: recognised by keys of the right size one level down.
        try:
            twice = [_unbase64(v.decode("ascii"), "value") for v in (salt, stored, server)]
        except (ValueError, UnicodeDecodeError):
            twice = None
        if twice and len(twice[1]) == size and len(twice[2]) == size:
            salt, stored, server = twice
    return _scram(mech, salt, iterations, stored, server)


def _scram(mech: str, salt: bytes, iterations: int | None, stored: bytes,
           server: bytes) -> ScramCredentials:
    if iterations is None or not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
        raise ValueError(f"iteration count not between {MIN_ITERATIONS} and {MAX_ITERATIONS}")
    size = _KEY_BYTES[mech]
    if len(stored) != size or len(server) != size:
        raise ValueError(f"keys are not {size} bytes")
    if not 1 <= len(salt) <= 1024:
        raise ValueError("salt empty or longer than 1024 bytes")
    return ScramCredentials(salt, stored, server, iterations)


def _ejabberd_scram(text: str) -> dict:
    """ejabberd's ``password='scram:StoredKey,ServerKey,Salt,Iterations'`` (SHA-1),
    or with the hash first (``scram:sha256:...``) in newer versions."""
    parts = text[len("scram:"):].split(",")
    mech = "SCRAM-SHA-1"
    if parts and ":" in parts[0]:
        hash_name, parts[0] = parts[0].split(":", 1)
        mech = {"sha": "SCRAM-SHA-1", "sha256": "SCRAM-SHA-256"}.get(hash_name.lower())
        if mech is None:
            raise ValueError(f"hash {hash_name!r} not supported")
    if len(parts) != 4:
        raise ValueError("not StoredKey,ServerKey,Salt,Iterations")
    try:
        stored, server, salt = (base64.b64decode(p, validate=True) for p in parts[:3])
        iterations = int(parts[3])
    except (binascii.Error, ValueError):
        raise ValueError("keys not base64 or iteration count not a number") from None
    return {mech: _scram(mech, salt, iterations, stored, server).to_json()}


def _roster(raw: pie.RawUser, acc: Account, limits: roster.Limits, parse) -> None:
    size = 0
    for el in raw.roster:
        if el.name != "item" or el.uri != pie.NS_ROSTER:
            continue
        try:
            contact = parse(el.getAttribute("jid", "")).full
        except jidlib.InvalidJID:
            acc.skipped.append(f"roster item {el.getAttribute('jid')!r}: not a valid JID")
            continue
        sub = el.getAttribute("subscription", "none")
        if sub not in ("none", "to", "from", "both"):
            acc.skipped.append(f"roster item {contact}: subscription {sub!r} not imported")
            continue
        item = roster.Item.new()
        item["subscription"] = sub
        item["ask"] = "subscribe" if el.getAttribute("ask") == "subscribe" else None
        item["approved"] = el.getAttribute("approved") in ("true", "1")
        name = el.getAttribute("name")
        if name and len(name.encode()) > limits.max_name_length:
            acc.skipped.append(f"roster item {contact}: name longer than "
                               f"{limits.max_name_length} bytes dropped")
            name = None
        item["name"] = name or None
        item["groups"] = _groups(el, contact, acc, limits)
        n = len(roster.item_xml(contact, item).encode("utf-8"))
        old = acc.roster.get(contact)
        if old is not None:
            size -= len(roster.item_xml(contact, old).encode("utf-8"))
        if size + n > limits.max_bytes:
            acc.skipped.append(f"roster item {contact}: over [roster] max_bytes = "
                               f"{limits.max_bytes}: not imported")
            continue
        size += n
        acc.roster[contact] = item


def _groups(el: domish.Element, contact: str, acc: Account, limits: roster.Limits) -> list:
    groups: list = []
    for g in el.elements(pie.NS_ROSTER, "group"):
        text = str(g)
        if not text or text in groups:
            continue
        if len(text.encode()) > limits.max_group_length:
            acc.skipped.append(f"roster item {contact}: group longer than "
                               f"{limits.max_group_length} bytes dropped")
        elif len(groups) >= limits.max_groups:
            acc.skipped.append(f"roster item {contact}: groups over [roster] max_groups = "
                               f"{limits.max_groups} dropped")
            break
        else:
            groups.append(text)
    return groups


def _pending(raw: pie.RawUser, acc: Account, parse) -> None:
    for el in raw.pending:
        if el.getAttribute("type") != "subscribe":
            continue
        try:
            contact = parse(el.getAttribute("from", "")).bare
        except jidlib.InvalidJID:
            acc.skipped.append(f"subscription request from {el.getAttribute('from')!r}: "
                               f"not a valid JID")
            continue
        if el.uri != NS_CLIENT:
            _in_client_namespace(el, el.uri)
        el["from"] = contact
        el["to"] = acc.bare
        acc.pending[contact] = PendingRequests.value(acc.bare, contact, el)


def _vcard(el: domish.Element, acc: Account, limits: Limits) -> None:
    try:
        vcard.check_size(el, limits.vcard_bytes, limits.vcard_elements)
        xml = serialize_fragment(el, NS_CLIENT)
        if len(xml.encode("utf-8")) > limits.vcard_bytes:
            raise vcard.TooLarge(f"vCard larger than {limits.vcard_bytes} bytes")
    except vcard.TooLarge as e:
        acc.skipped.append(f"{e} ([vcard] limits): not imported")
        return
    acc.vcard = xml


def _in_client_namespace(el: domish.Element, uri: str) -> None:
    """Elements that inherited the file's namespace are jabber:client ones."""
    stack = [el]
    while stack:
        e = stack.pop()
        if e.uri == uri:
            e.uri = NS_CLIENT
            if e.defaultUri == uri:
                e.defaultUri = NS_CLIENT
        stack.extend(c for c in e.children if isinstance(c, domish.Element))


def _offline(el: domish.Element, acc: Account, limits: Limits,
             clock: Callable[[], float], parse) -> None:
    if el.name != "message":
        acc.skipped.append(f"<{el.name}/> in offline messages: not a message, not imported")
        return
    if el.uri != NS_CLIENT:
        _in_client_namespace(el, el.uri)
    sender = el.getAttribute("from")
    try:
        el["from"] = parse(sender or "").full
    except jidlib.InvalidJID:
        acc.skipped.append(f"offline message without a valid sender ({sender!r}): not imported")
        return
    try:
        el["to"] = parse(el.getAttribute("to") or acc.bare).full
    except jidlib.InvalidJID:
        el["to"] = acc.bare
    children = [c for c in el.children if isinstance(c, domish.Element)]
    if not any(c.uri == NS_DELAY and c.name == "delay" for c in children):
        stamp = None
        legacy = next((c for c in children if c.uri == NS_LEGACY_DELAY and c.name == "x"), None)
        if legacy is not None:
            m = re.fullmatch(r"(\d{4})(\d\d)(\d\d)T(\d\d:\d\d:\d\d)", legacy.getAttribute("stamp", ""))
            if m:
                stamp = f"{m.group(1)}-{m.group(2)}-{m.group(3)}T{m.group(4)}Z"
        delay = el.addElement((NS_DELAY, "delay"))
        delay["from"] = acc.host
        delay["stamp"] = stamp or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock()))
        delay.addContent("Offline storage")
    xml = serialize(el).decode("utf-8")
    try:
        parse_fragment(xml, limits.stored_message)
    except XMLStreamError as e:
        acc.skipped.append(f"offline message from {sender}: {e.text or e.condition} "
                           f"([c2s] stanza limits): not imported")
        return
    acc.offline.append(xml)


def _blocklist(raw: pie.RawUser, acc: Account, max_items: int, parse) -> None:
    blocked: dict[str, None] = {}
    for el in raw.blocklist:
        if el.name != "item":
            continue
        try:
            blocked[parse(el.getAttribute("jid", "")).full] = None
        except jidlib.InvalidJID:
            acc.skipped.append(f"blocklist item {el.getAttribute('jid')!r}: not a valid JID")
    for jid in _privacy_blocks(raw.privacy, acc, parse):
        blocked[jid] = None
    items = list(blocked)
    if len(items) > max_items:
        acc.skipped.append(f"{len(items) - max_items} blocklist items over [blocking] "
                           f"max_items = {max_items}: not imported")
        items = items[:max_items]
    acc.blocklist = items


def _privacy_blocks(elements: list, acc: Account, parse) -> Iterable[str]:
    """XEP-0016: the default list's deny items that block everything, as XEP-0191 items."""
    lists = {el.getAttribute("name"): el for el in elements if el.name == "list"}
    default = next((el.getAttribute("name") for el in elements if el.name == "default"), None)
    if default is None and len(lists) == 1 and "Blocked contacts" in lists:
        default = "Blocked contacts"  # ejabberd's XEP-0191 list, when no default is named
    other = [n for n in lists if n != default]
    if other:
        acc.skipped.append(f"privacy lists other than the default ({', '.join(sorted(other))}): "
                           f"not imported")
    chosen = lists.get(default)
    if chosen is None:
        return
    left: dict[str, int] = {}
    for item in chosen.elements(pie.NS_PRIVACY, "item"):
        kind = item.getAttribute("type")
        partial = any(isinstance(c, domish.Element) for c in item.children)
        if item.getAttribute("action") != "deny" or kind not in ("jid", "domain") or partial:
            why = ("allow items" if item.getAttribute("action") == "allow"
                   else "items blocking only some stanza kinds" if partial
                   else f"deny items of type {kind or 'fall-through'}")
            left[why] = left.get(why, 0) + 1
            continue
        try:
            yield parse(item.getAttribute("value", "")).full
        except jidlib.InvalidJID:
            acc.skipped.append(f"privacy item {item.getAttribute('value')!r}: not a valid JID")
    for why, n in left.items():
        acc.skipped.append(f"privacy list {default!r}: {n} {why} not imported")

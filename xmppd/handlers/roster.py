"""RFC 6121 §2 roster management, with versioning (RFC 6121 §2.6).

Rosters live in the store (``roster/<bare JID>/<contact>``) and, while the
user has a session, in memory (:class:`Rosters`), so that presence broadcast
and the subscription state machine read dicts, not the disk.  Every change is
written through at once: the item and the roster version in one transaction,
and the in-memory copy is changed only after that transaction committed, so
a failed write (:class:`~xmppd.storage.StoreError`) leaves memory and disk
alike.

Every request costs time linear in its own size and in the limits below,
never in their product: a roster set is checked with a set (duplicate
groups) and counters that stop at the first excess, and a roster get sends
a listing kept as XML text per online user (rebuilt after a change from
per-item XML, so a change re-serialises one item, not the roster).

Limits (``[roster]``, read once at start-up; RFC 6121 §2.1.2.2 suggests the
1023-byte bounds):

* ``max_items``: items per user (a new contact beyond it is refused with
  ``resource-constraint``, from a roster set or an outbound subscription);
* ``max_bytes``: the roster as sent in a roster result (the XML of every
  item), bounding what each roster get and login costs;
* ``max_groups``: ``<group/>`` elements per item;
* ``max_group_length`` / ``max_name_length``: UTF-8 bytes of a group name
  and of an item name (``not-acceptable``, RFC 6121 §2.3.3).
"""
from __future__ import annotations

from dataclasses import dataclass

from twisted.internet import defer
from twisted.words.xish import domish

from xmppd import jid as jidlib
from xmppd.plugin import Plugin, Request
from xmppd.serial import Serial
from xmppd.storage import StoreError
from xmppd.storefail import report as store_report
from xmppd.stanzas import NS_CLIENT, StanzaError, escape_attr, escape_text

NS_ROSTER = "jabber:iq:roster"
STORE = "roster"
VERSION_KEY = "roster_ver"
SETTINGS = "settings"


@dataclass(frozen=True)
class Limits:
    """What one user's roster may hold (``[roster]``); defaults are documented in etc/xmppd.toml."""

    max_items: int = 2000
    max_bytes: int = 1048576
    max_groups: int = 32
    max_group_length: int = 1023
    max_name_length: int = 1023

    @classmethod
    def from_section(cls, sec) -> "Limits":
        d = cls()
        return cls(
            max_items=sec.int("max_items", d.max_items, minimum=1),
            max_bytes=sec.int("max_bytes", d.max_bytes, minimum=1024),
            max_groups=sec.int("max_groups", d.max_groups, minimum=1),
            max_group_length=sec.int("max_group_length", d.max_group_length, minimum=1),
            max_name_length=sec.int("max_name_length", d.max_name_length, minimum=1),
        )


class RosterFull(Exception):
    """Adding this contact would exceed ``max_items`` or ``max_bytes``; the message says which."""


class Item(dict):
    """A roster item as stored: subscription, ask, name, groups, approved."""

    @classmethod
    def new(cls) -> "Item":
        return cls(subscription="none", ask=None, name=None, groups=[], approved=False)

    @property
    def to(self) -> bool:
        return self["subscription"] in ("to", "both")

    @property
    def from_(self) -> bool:
        return self["subscription"] in ("from", "both")


def with_from(sub: str, value: bool) -> str:
    """The subscription state with the 'from' half set or cleared."""
    to = sub in ("to", "both")
    return ("both" if to else "from") if value else ("to" if to else "none")


def with_to(sub: str, value: bool) -> str:
    frm = sub in ("from", "both")
    return ("both" if frm else "to") if value else ("from" if frm else "none")


def item_xml(contact: str, item: Item) -> str:
    """The ``<item/>`` of a roster result as XML text (same output as :func:`item_element`)."""
    out = ["<item jid='", escape_attr(contact), "' subscription='", item["subscription"], "'"]
    if item.get("ask"):
        out.append(" ask='subscribe'")
    if item.get("approved"):
        out.append(" approved='true'")
    if item.get("name"):
        out += [" name='", escape_attr(item["name"]), "'"]
    groups = item.get("groups") or ()
    if not groups:
        out.append("/>")
        return "".join(out)
    out.append(">")
    for group in groups:
        out += ["<group>", escape_text(group), "</group>"]
    out.append("</item>")
    return "".join(out)


class Listing:
    """One roster with its XML, for users online (kept) or offline (built for one request).

    ``size`` is the UTF-8 length of all item XML, what ``max_bytes`` limits.
    The XML of an item is made when the item changes; the joined listing
    when it is asked for after a change.
    """

    __slots__ = ("items", "_xml", "size", "_joined")

    def __init__(self, items: dict[str, Item]) -> None:
        self.items = items
        self._xml: dict[str, tuple[str, int]] = {}
        self.size = 0
        for contact, item in items.items():
            self._add_xml(contact, item)
        self._joined: str | None = None

    def _add_xml(self, contact: str, item: Item) -> None:
        xml = item_xml(contact, item)
        n = len(xml.encode("utf-8"))
        self._xml[contact] = (xml, n)
        self.size += n

    def cost_of(self, contact: str, item: Item) -> tuple[int, int]:
        """(items, bytes) of the roster with ``item`` stored for ``contact``."""
        old = self._xml.get(contact)
        n = len(item_xml(contact, item).encode("utf-8"))
        if old is None:
            return len(self.items) + 1, self.size + n
        return len(self.items), self.size - old[1] + n

    def set(self, contact: str, item: Item) -> None:
        old = self._xml.pop(contact, None)
        if old is not None:
            self.size -= old[1]
        self.items[contact] = item
        self._add_xml(contact, item)
        self._joined = None

    def remove(self, contact: str) -> None:
        old = self._xml.pop(contact, None)
        if old is not None:
            self.size -= old[1]
        self.items.pop(contact, None)
        self._joined = None

    def xml(self) -> str:
        if self._joined is None:
            xml = self._xml
            self._joined = "".join(xml[c][0] for c in sorted(xml))
        return self._joined


class Rosters:
    """In-memory rosters of online users over the store, written through.

    Every method returns a Deferred (the store is asynchronous,
    xmppd.storage); for a pinned (online) user reads come from memory and
    fire at once.  A pin loads the roster in the background; a change
    stored meanwhile makes that load stale, and it is started again.
    """

    def __init__(self, store, limits: Limits | None = None) -> None:
        self.store = store
        self.limits = limits or Limits()
        self._cache: dict[str, Listing] = {}
        self._loading: dict[str, object] = {}  # bare -> token of the load under way
        self._versions: dict[str, int] = {}  # roster version of pinned users

    def _load(self, bare: str) -> defer.Deferred:
        return self.store.items(STORE, bare).addCallback(
            lambda rows: Listing({k: Item(v) for k, v in rows}))

    def listing(self, bare: str) -> defer.Deferred:
        cached = self._cache.get(bare)
        return defer.succeed(cached) if cached is not None else self._load(bare)

    def get(self, bare: str) -> defer.Deferred:
        cached = self._cache.get(bare)
        if cached is not None:
            return defer.succeed(cached.items)
        return self.store.items(STORE, bare).addCallback(
            lambda rows: {k: Item(v) for k, v in rows})

    def cached_items(self, bare: str) -> dict | None:
        """An online user's roster items when in memory (no Deferred), else None."""
        cached = self._cache.get(bare)
        return cached.items if cached is not None else None

    def pin(self, bare: str) -> None:
        if bare in self._cache or bare in self._loading:
            return
        token = self._loading[bare] = object()

        def loaded(both: tuple) -> None:
            if self._loading.get(bare) is token:
                del self._loading[bare]
                self._cache[bare], self._versions[bare] = both

        def failed(failure) -> None:
            if self._loading.get(bare) is token:
                del self._loading[bare]  # reads go to the store until the next pin
            failure.trap(StoreError)
            store_report(failure.value)

        self._load(bare).addCallback(
            lambda listing: self.version(bare).addCallback(lambda v: (listing, v))
        ).addCallbacks(loaded, failed)

    def reload(self, bare: str) -> None:
        """Another node changed ``bare``'s roster (xmppd.cluster): read it again.

        Only a pinned (online) user's copy is kept; until the new copy is in,
        reads go to the store.
        """
        if bare in self._cache or bare in self._loading:
            self.unpin(bare)
            self.pin(bare)

    def unpin(self, bare: str) -> None:
        self._cache.pop(bare, None)
        self._versions.pop(bare, None)
        self._loading.pop(bare, None)

    def item(self, bare: str, contact: str) -> defer.Deferred:
        cached = self._cache.get(bare)
        if cached is not None:
            return defer.succeed(cached.items.get(contact))
        # One row, not the whole roster, for users without a session.
        return self.store.get(STORE, bare, contact).addCallback(
            lambda value: None if value is None else Item(value))

    @defer.inlineCallbacks
    def check(self, bare: str, contact: str, item: Item):
        """Fail with :class:`RosterFull` if storing ``item`` would exceed the limits.

        Only growth is refused: a change that does not add an item or bytes
        (a subscription state moving on) always passes, even over a limit
        lowered since.
        """
        listing = yield self.listing(bare)
        count, size = listing.cost_of(contact, item)
        limits = self.limits
        if count > limits.max_items and count > len(listing.items):
            raise RosterFull(f"roster full: at most {limits.max_items} items")
        if size > limits.max_bytes and size > listing.size:
            raise RosterFull(f"roster full: at most {limits.max_bytes} bytes of items")

    @defer.inlineCallbacks
    def save(self, bare: str, contact: str, item: Item, also_delete: tuple = ()):
        """Store ``item``; a Deferred of the new roster version.

        ``also_delete`` are ``(store, user, key)`` entries removed in the
        same transaction (a pending request the item now answers).
        """
        version = (yield self.store.get(SETTINGS, bare, VERSION_KEY, 0)) + 1
        yield self.store.batch(puts=[(STORE, bare, contact, dict(item)),
                                     (SETTINGS, bare, VERSION_KEY, version)],
                               deletes=list(also_delete))
        cached = self._cache.get(bare)
        if cached is not None:
            cached.set(contact, item)
            self._versions[bare] = version
        self._reload_if_loading(bare)
        return version

    @defer.inlineCallbacks
    def remove(self, bare: str, contact: str):
        version = (yield self.store.get(SETTINGS, bare, VERSION_KEY, 0)) + 1
        yield self.store.batch(puts=[(SETTINGS, bare, VERSION_KEY, version)],
                               deletes=[(STORE, bare, contact)])
        cached = self._cache.get(bare)
        if cached is not None:
            cached.remove(contact)
            self._versions[bare] = version
        self._reload_if_loading(bare)
        return version

    def _reload_if_loading(self, bare: str) -> None:
        """A load that began before this change may miss it: begin again."""
        if self._loading.pop(bare, None) is not None:
            self.pin(bare)

    def version(self, bare: str) -> defer.Deferred:
        cached = self._versions.get(bare)
        if cached is not None:
            return defer.succeed(cached)
        return self.store.get(SETTINGS, bare, VERSION_KEY, 0)


def item_element(contact: str, item: Item | None) -> domish.Element:
    el = domish.Element((NS_ROSTER, "item"))
    el["jid"] = contact
    if item is None:
        el["subscription"] = "remove"
        return el
    el["subscription"] = item["subscription"]
    if item.get("ask"):
        el["ask"] = "subscribe"
    if item.get("approved"):
        el["approved"] = "true"
    if item.get("name"):
        el["name"] = item["name"]
    for group in item.get("groups", ()):
        el.addElement("group", content=group)
    return el


class RosterPlugin(Plugin):
    name = "roster"
    features = ("urn:xmpp:features:rosterver",)

    def setup(self) -> None:
        sec = self.server.config.section("roster")
        self.limits = Limits.from_section(sec)
        sec.reject_unknown()
        self.rosters = Rosters(self.store, self.limits)
        # Read-modify-write steps on one owner's roster, in arrival order
        # (shared with the presence plugin's subscription handling).
        self.serial = Serial()
        self.handle_iq("get", NS_ROSTER, "query", self.on_get)
        self.handle_iq("set", NS_ROSTER, "query", self.on_set)
        self.router.on_bound.append(lambda s: self.rosters.pin(s.jid.bare))
        self.router.on_released.append(self._closed)  # after presence's unavailable broadcast
        # Called with (owner bare, contact bare) when an item is removed.
        self.on_remove: list = []

    def _closed(self, session) -> None:
        if not self.router.resources_of(session.jid.bare):
            self.rosters.unpin(session.jid.bare)

    # -- IQ handlers ---------------------------------------------------------

    def on_get(self, request: Request):
        if request.to is not None:
            raise StanzaError("forbidden", text="rosters are private")
        bare = request.sender.bare
        if request.session is not None:
            request.session.state["roster_requested"] = True
        return self._answer_get(bare, request.payload.getAttribute("ver"))

    @defer.inlineCallbacks
    def _answer_get(self, bare: str, asked: str | None):
        version = yield self.rosters.version(bare)
        if asked is not None and asked == str(version):
            return None  # RFC 6121 §2.6.3: empty result, changes come as pushes
        query = domish.Element((NS_ROSTER, "query"))
        query["ver"] = str(version)
        listing = (yield self.rosters.listing(bare)).xml()
        if listing:
            query.addChild(domish.SerializedXML(listing))
        return query

    def on_set(self, request: Request):
        if request.to is not None:
            raise StanzaError("forbidden", text="rosters are private")
        el = None
        for child in request.payload.elements(NS_ROSTER, "item"):
            if el is not None:
                raise StanzaError("bad-request", text="exactly one item per roster set", echo=False)
            el = child
        if el is None:
            raise StanzaError("bad-request", text="exactly one item per roster set")
        try:
            contact = jidlib.parse(el.getAttribute("jid", "")).full
        except jidlib.InvalidJID:
            raise StanzaError("jid-malformed") from None
        owner = request.sender.bare
        if el.getAttribute("subscription") == "remove":
            return self.serial.run(owner, self.remove_item, owner, contact).addCallback(
                lambda _: None)
        limits = self.limits
        name = el.getAttribute("name")
        if name is not None and len(name.encode()) > limits.max_name_length:
            raise StanzaError("not-acceptable", text=f"name longer than {limits.max_name_length} bytes")
        groups = self._groups(el)
        return self.serial.run(owner, self._set_item, owner, contact, name, groups)

    @defer.inlineCallbacks
    def _set_item(self, owner: str, contact: str, name: str | None, groups: list[str]):
        roster = yield self.rosters.get(owner)
        item = roster.get(contact)
        item = Item.new() if item is None else Item(item)
        item["name"] = name
        item["groups"] = groups
        try:
            yield self.rosters.check(owner, contact, item)
        except RosterFull as e:
            raise StanzaError("resource-constraint", "cancel", text=str(e)) from None
        yield self.update(owner, contact, item)
        return None

    def _groups(self, item: domish.Element) -> list[str]:
        """The item's group names, checked in one pass that stops at the first excess."""
        limits = self.limits
        groups: list[str] = []
        seen: set[str] = set()
        for g in item.elements(NS_ROSTER, "group"):
            if len(groups) >= limits.max_groups:
                raise StanzaError("not-acceptable", text=f"more than {limits.max_groups} groups",
                                  echo=False)
            text = str(g)  # the parser keeps one text node per run
            if not text:
                raise StanzaError("not-acceptable", text="empty group name")
            if len(text.encode()) > limits.max_group_length:
                raise StanzaError("not-acceptable",
                                  text=f"group name longer than {limits.max_group_length} bytes")
            if text in seen:
                raise StanzaError("bad-request", text="duplicate group")
            seen.add(text)
            groups.append(text)
        return groups

    # -- API for the presence plugin ------------------------------------------

    # Callers run these inside ``self.serial.run(owner, ...)`` (xmppd.serial).

    def update(self, owner: str, contact: str, item: Item, also_delete: tuple = ()):
        """Store, then push (a Deferred): nothing is pushed that was not stored."""
        return self.rosters.save(owner, contact, item, also_delete).addCallback(
            lambda version: self.push(owner, contact, item, version))

    @defer.inlineCallbacks
    def remove_item(self, owner: str, contact: str):
        item = yield self.rosters.item(owner, contact)
        if item is None:
            raise StanzaError("item-not-found")
        # Stored first: if that fails, no unsubscription has gone out yet.
        version = yield self.rosters.remove(owner, contact)
        self.push(owner, contact, None, version)
        for hook in self.on_remove:
            yield hook(owner, contact, item)  # None or a Deferred

    def push(self, owner: str, contact: str, item: Item | None, version: int) -> None:
        """Roster push to every resource that asked for the roster."""
        for session in self.router.resources_of(owner).values():
            if not session.state.get("roster_requested"):
                continue
            iq = domish.Element((NS_CLIENT, "iq"))
            iq["type"] = "set"
            iq["id"] = f"push{version}"
            iq["to"] = session.jid.full
            query = iq.addElement((NS_ROSTER, "query"))
            query["ver"] = str(version)
            query.addChild(item_element(contact, item))
            session.send(iq)

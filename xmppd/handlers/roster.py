"""RFC 6121 §2 roster management, with versioning (RFC 6121 §2.6).

Rosters live in the store (``roster/<bare JID>/<contact>``) and, while the
user has a session, in memory (:class:`Rosters`), so that presence broadcast
and the subscription state machine read dicts, not the disk.  Every change is
written through at once: the item and the roster version in one transaction,
and the in-memory copy is changed only after that transaction committed, so
a failed write (:class:`~xmppd.storage.StoreError`) leaves memory and disk
alike.
"""
from __future__ import annotations

from twisted.words.xish import domish

from xmppd import jid as jidlib
from xmppd.plugin import Plugin, Request
from xmppd.stanzas import NS_CLIENT, StanzaError

NS_ROSTER = "jabber:iq:roster"
STORE = "roster"
VERSION_KEY = "roster_ver"
SETTINGS = "settings"
MAX_NAME = 1023
MAX_GROUP = 1023
MAX_ITEMS = 5000


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


class Rosters:
    """In-memory rosters of online users over the store, written through."""

    def __init__(self, store) -> None:
        self.store = store
        self._cache: dict[str, dict[str, Item]] = {}

    def get(self, bare: str) -> dict[str, Item]:
        roster = self._cache.get(bare)
        if roster is None:
            roster = {k: Item(v) for k, v in self.store.items(STORE, bare)}
        return roster

    def pin(self, bare: str) -> None:
        if bare not in self._cache:
            self._cache[bare] = self.get(bare)

    def unpin(self, bare: str) -> None:
        self._cache.pop(bare, None)

    def item(self, bare: str, contact: str) -> Item | None:
        return self.get(bare).get(contact)

    def save(self, bare: str, contact: str, item: Item, also_delete: tuple = ()) -> int:
        """Store ``item``; returns the new roster version.

        ``also_delete`` are ``(store, user, key)`` entries removed in the
        same transaction (a pending request the item now answers).
        """
        version = self.store.get(SETTINGS, bare, VERSION_KEY, 0) + 1
        self.store.batch(puts=[(STORE, bare, contact, dict(item)),
                               (SETTINGS, bare, VERSION_KEY, version)],
                         deletes=list(also_delete))
        if bare in self._cache:
            self._cache[bare][contact] = item
        return version

    def remove(self, bare: str, contact: str) -> int:
        version = self.store.get(SETTINGS, bare, VERSION_KEY, 0) + 1
        self.store.batch(puts=[(SETTINGS, bare, VERSION_KEY, version)],
                         deletes=[(STORE, bare, contact)])
        if bare in self._cache:
            self._cache[bare].pop(contact, None)
        return version

    def version(self, bare: str) -> int:
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
        self.rosters = Rosters(self.store)
        self.handle_iq("get", NS_ROSTER, "query", self.on_get)
        self.handle_iq("set", NS_ROSTER, "query", self.on_set)
        self.router.on_bound.append(lambda s: self.rosters.pin(s.jid.bare))
        self.router.on_closed.append(self._closed)
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
        version = self.rosters.version(bare)
        asked = request.payload.getAttribute("ver")
        if asked is not None and asked == str(version):
            return None  # RFC 6121 §2.6.3: empty result, changes come as pushes
        query = domish.Element((NS_ROSTER, "query"))
        query["ver"] = str(version)
        for contact, item in sorted(self.rosters.get(bare).items()):
            query.addChild(item_element(contact, item))
        return query

    def on_set(self, request: Request):
        if request.to is not None:
            raise StanzaError("forbidden", text="rosters are private")
        items = list(request.payload.elements(NS_ROSTER, "item"))
        if len(items) != 1:
            raise StanzaError("bad-request", text="exactly one item per roster set")
        el = items[0]
        try:
            contact = jidlib.parse(el.getAttribute("jid", "")).full
        except jidlib.InvalidJID:
            raise StanzaError("jid-malformed") from None
        owner = request.sender.bare
        if el.getAttribute("subscription") == "remove":
            self.remove_item(owner, contact)
            return None
        name = el.getAttribute("name")
        if name is not None and len(name.encode()) > MAX_NAME:
            raise StanzaError("not-acceptable", text="name too long")
        groups = []
        for g in el.elements(NS_ROSTER, "group"):
            text = str(g)
            if not text or len(text.encode()) > MAX_GROUP:
                raise StanzaError("not-acceptable", text="empty or too long group")
            if text in groups:
                raise StanzaError("bad-request", text="duplicate group")
            groups.append(text)
        roster = self.rosters.get(owner)
        item = roster.get(contact)
        if item is None:
            if len(roster) >= MAX_ITEMS:
                raise StanzaError("not-allowed", text="roster is full")
            item = Item.new()
        else:
            item = Item(item)
        item["name"] = name
        item["groups"] = groups
        self.update(owner, contact, item)
        return None

    # -- API for the presence plugin ------------------------------------------

    def update(self, owner: str, contact: str, item: Item, also_delete: tuple = ()) -> None:
        version = self.rosters.save(owner, contact, item, also_delete)
        self.push(owner, contact, item, version)

    def remove_item(self, owner: str, contact: str) -> None:
        item = self.rosters.item(owner, contact)
        if item is None:
            raise StanzaError("item-not-found")
        # Stored first: if that fails, no unsubscription has gone out yet.
        version = self.rosters.remove(owner, contact)
        self.push(owner, contact, None, version)
        for hook in self.on_remove:
            hook(owner, contact, item)

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

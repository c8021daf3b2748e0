"""PEP nodes and items in the key-value store, with their quotas.

Layout (all keyed by the owner's bare JID, so deleting an account's data
with ``delete_user(None, bare)`` removes its PEP data too):

* ``pep_nodes/<owner>/<node>``: ``{"config": {...}, "items": [[id, bytes], ...]}``,
  item ids in publish order (oldest first);
* ``pep_items/<owner>/<node>\\x1f<id>``: the payload as XML text (it declares
  its own namespace, so it is embedded as is in any reply or notification).

``\\x1f`` cannot occur in XML, so the item key never collides.  A publish
(item, node entry and evicted items) is one transaction.

Node entries of online owners are kept in memory (pinned at bind, loaded
in the background); others are read when needed and kept in a small LRU,
since only this module writes them.  Quotas (``[pep]``) are checked on the
in-memory entries before any write: bytes per item, items per node,
nodes/items/bytes per user.

The store is the server's asynchronous one (:mod:`xmppd.storage`): every
read of an item and every write returns a Deferred (already fired on
SQLite, so the order of effects is what it was when the calls were
synchronous).  Every change of one owner's nodes, and the load at pin,
runs in that owner's :attr:`PepStore.serial` queue (:mod:`xmppd.serial`):
a change reads the entries, checks the quotas, writes, and changes the
entries only once the write is stored, with no other change of the same
owner in between.  A failed write leaves memory as it was.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from twisted.internet import defer

from xmppd.serial import Serial
from xmppd.storage import StoreError
from xmppd.storefail import report as store_report

NODES = "pep_nodes"
ITEMS = "pep_items"
SEP = "\x1f"

ACCESS_MODELS = ("open", "presence", "roster", "whitelist")
SEND_LAST = ("never", "on_sub", "on_sub_and_presence")


@dataclass(frozen=True)
class Quotas:
    """``[pep]`` limits; defaults documented in etc/xmppd.toml."""

    item_bytes: int = 131072
    node_items: int = 256
    user_nodes: int = 100
    user_items: int = 2048
    user_bytes: int = 4194304
    default_max_items: int = 1

    @classmethod
    def from_section(cls, sec) -> "Quotas":
        d = cls()
        q = cls(
            item_bytes=sec.int("max_item_bytes", d.item_bytes, minimum=256),
            node_items=sec.int("max_items_per_node", d.node_items, minimum=1),
            user_nodes=sec.int("max_nodes_per_user", d.user_nodes, minimum=1),
            user_items=sec.int("max_items_per_user", d.user_items, minimum=1),
            user_bytes=sec.int("max_bytes_per_user", d.user_bytes, minimum=1024),
            default_max_items=sec.int("default_max_items", d.default_max_items, minimum=1),
        )
        if q.default_max_items > q.node_items:
            raise sec.error("default_max_items", q.default_max_items,
                            "an integer not above max_items_per_node")
        return q


class QuotaExceeded(Exception):
    """A write would exceed a quota: ``condition`` (RFC 6120), ``app`` (pubsub#errors), message."""

    def __init__(self, condition: str, app: str | None, text: str) -> None:
        super().__init__(text)
        self.condition = condition
        self.app = app


def default_config(quotas: Quotas) -> dict:
    return {"access_model": "presence", "max_items": quotas.default_max_items,
            "persist_items": True, "send_last_published_item": "on_sub_and_presence",
            "roster_groups_allowed": [], "notify_retract": False}


class Node:
    __slots__ = ("name", "config", "items", "transient")

    def __init__(self, name: str, config: dict, items: list | None = None) -> None:
        self.name = name
        self.config = config
        self.items: list[list] = items or []  # [[id, bytes], ...] oldest first
        # Last item of a node with persist_items false: (id, xml), memory only.
        self.transient: tuple[str, str] | None = None

    def to_value(self) -> dict:
        return {"config": self.config, "items": self.items}

    def ids(self) -> list[str]:
        return [i[0] for i in self.items]


class PepStore:
    LRU_OWNERS = 1024

    def __init__(self, store, quotas: Quotas) -> None:
        self.store = store  # IAsyncKeyValueStore
        self.quotas = quotas
        self._pinned: dict[str, dict[str, Node]] = {}
        self._lru: OrderedDict[str, dict[str, Node]] = OrderedDict()
        self._pinning: dict[str, object] = {}  # owner -> token of the pin under way
        # Changes (and pins) of one owner, one after another.
        self.serial = Serial()
        # Owners with at least one node: read once at start-up (load_owners),
        # kept current; lets a contact's login skip owners without nodes at
        # no I/O.  None until read: every owner may have nodes.
        self.owners: set[str] | None = None

    def load_owners(self) -> defer.Deferred:
        """Read the owners with nodes (at start-up; fires at once on an embedded store)."""
        def loaded(users) -> None:
            found = set(users)
            if self.owners is not None:  # nodes created meanwhile
                found |= self.owners
            self.owners = found

        def failed(failure) -> None:
            failure.trap(StoreError)
            store_report(failure.value)  # owners stay unknown: nodes are read when asked for

        return self.store.users(NODES).addCallbacks(loaded, failed)

    def may_have_nodes(self, owner: str) -> bool:
        owners = self.owners
        return owners is None or owner in owners

    # -- cache -------------------------------------------------------------

    def cached(self, owner: str) -> dict[str, Node] | None:
        """The owner's entries when memory has them (no I/O), else None."""
        found = self._pinned.get(owner)
        if found is not None:
            return found
        if not self.may_have_nodes(owner):
            return {}
        found = self._lru.get(owner)
        if found is not None:
            self._lru.move_to_end(owner)
        return found

    def nodes(self, owner: str) -> defer.Deferred:
        """A Deferred of the owner's entries (``{name: Node}``), from memory when there."""
        found = self.cached(owner)
        if found is not None:
            return defer.succeed(found)

        def loaded(nodes: dict[str, Node]) -> dict[str, Node]:
            current = self.cached(owner)  # loaded or changed meanwhile: that copy counts
            if current is not None:
                return current
            self._remember(owner, nodes)
            return nodes

        return self._load(owner).addCallback(loaded)

    def _remember(self, owner: str, nodes: dict[str, Node]) -> None:
        self._lru[owner] = nodes
        while len(self._lru) > self.LRU_OWNERS:
            self._lru.popitem(last=False)

    def _load(self, owner: str) -> defer.Deferred:
        return self.store.items(NODES, owner).addCallback(
            lambda rows: {k: Node(k, v["config"], v["items"]) for k, v in rows})

    def pin(self, owner: str) -> None:
        """The owner's first session: read from the store (also after the account was
        removed and made again behind this process's back, e.g. ``xmppctl deluser``).

        In the owner's queue, so no change runs while the entries are read
        and every change after it sees them."""
        if owner in self._pinned or owner in self._pinning:
            return
        token = self._pinning[owner] = object()

        def step():
            if self._pinning.get(owner) is not token:
                return None  # unpinned before it ran
            self._lru.pop(owner, None)
            if not self.may_have_nodes(owner):
                # Only this process creates nodes: an owner not in the set has none (no I/O).
                return _pinned({})
            return self._load(owner).addCallbacks(_pinned, failed)

        def _pinned(nodes: dict[str, Node]) -> None:
            if self._pinning.get(owner) is not token:
                return
            del self._pinning[owner]
            self._pinned[owner] = nodes
            if self.owners is not None:
                if nodes:
                    self.owners.add(owner)
                else:
                    self.owners.discard(owner)

        def failed(failure) -> None:
            if self._pinning.get(owner) is token:
                del self._pinning[owner]  # reads go to the store until the next pin
            failure.trap(StoreError)
            store_report(failure.value)

        self.serial.run(owner, step)

    def unpin(self, owner: str) -> None:
        """The owner's last session closed: drop the entries (also after account removal)."""
        self._pinned.pop(owner, None)
        self._pinning.pop(owner, None)
        self._lru.pop(owner, None)

    def _mine(self, owner: str) -> defer.Deferred:
        """A Deferred of the owner's entries, to be modified (kept in memory while
        the change runs: pinned, or in the LRU)."""
        def kept(nodes: dict[str, Node]) -> dict[str, Node]:
            if owner not in self._pinned and self._lru.get(owner) is not nodes:
                self._remember(owner, nodes)
            return nodes

        return self.nodes(owner).addCallback(kept)

    # -- reads ------------------------------------------------------------

    def item(self, owner: str, node: Node, item_id: str) -> defer.Deferred:
        """A Deferred of the item's XML, None when there is none."""
        if not node.config["persist_items"]:
            t = node.transient
            return defer.succeed(t[1] if t is not None and t[0] == item_id else None)
        return self.store.get(ITEMS, owner, node.name + SEP + item_id)

    def last(self, owner: str, node: Node) -> defer.Deferred:
        """A Deferred of the last ``(id, xml)``, None when the node holds none."""
        if not node.config["persist_items"]:
            return defer.succeed(node.transient)
        if not node.items:
            return defer.succeed(None)
        item_id = node.items[-1][0]
        return self.store.get(ITEMS, owner, node.name + SEP + item_id).addCallback(
            lambda xml: None if xml is None else (item_id, xml))

    def items(self, owner: str, node: Node, ids: list[str] | None,
              max_items: int | None) -> defer.Deferred:
        """A Deferred of ``[(id, xml)]`` oldest first: the given ids that exist, or the
        last ``max_items``."""
        if not node.config["persist_items"]:
            t = node.transient
            if t is None or (ids is not None and t[0] not in ids):
                return defer.succeed([])
            return defer.succeed([t])
        if ids is None:
            wanted = node.ids()
            if max_items is not None:
                wanted = wanted[-max_items:] if max_items > 0 else []
        else:
            present = set(node.ids())
            wanted = [i for i in ids if i in present]
        if not wanted:
            return defer.succeed([])
        # One read per item, side by side (a networked store answers them in parallel).
        reads = [self.store.get(ITEMS, owner, node.name + SEP + i) for i in wanted]
        return defer.gatherResults(reads, consumeErrors=True).addCallbacks(
            lambda found: [(i, xml) for i, xml in zip(wanted, found) if xml is not None],
            _first_error)

    # -- quotas -----------------------------------------------------------

    def effective_max(self, config: dict) -> int:
        m = config["max_items"]
        return self.quotas.node_items if m == "max" else min(int(m), self.quotas.node_items)

    def _usage(self, nodes: dict[str, Node]) -> tuple[int, int]:
        count = size = 0
        for n in nodes.values():
            count += len(n.items)
            size += sum(i[1] for i in n.items)
        return count, size

    # -- writes (each in the owner's serial queue) ---------------------------

    @defer.inlineCallbacks
    def create(self, owner: str, name: str, config: dict):
        """A Deferred of the new Node."""
        nodes = yield self._mine(owner)
        if len(nodes) >= self.quotas.user_nodes:
            raise QuotaExceeded("policy-violation", "max-nodes-exceeded",
                                f"at most {self.quotas.user_nodes} PEP nodes per account")
        node = Node(name, config)
        yield self.store.put(NODES, owner, name, node.to_value())
        nodes[name] = node
        if self.owners is not None:
            self.owners.add(owner)
        return node

    @defer.inlineCallbacks
    def publish(self, owner: str, node: Node, item_id: str, xml: str):
        """Store one item (replacing one of the same id); a Deferred of the evicted ids."""
        q = self.quotas
        size = len(xml.encode("utf-8"))
        if size > q.item_bytes:
            raise QuotaExceeded("not-acceptable", "payload-too-big",
                                f"item payload larger than {q.item_bytes} bytes")
        if not node.config["persist_items"]:
            node.transient = (item_id, xml)
            return []
        kept = [i for i in node.items if i[0] != item_id]
        keep = self.effective_max(node.config) - 1
        evicted = [i[0] for i in kept[:max(0, len(kept) - keep)]]
        kept = kept[len(evicted):]
        new_items = kept + [[item_id, size]]
        yield self._check_account_quota(owner, node, new_items)
        node_value = {"config": node.config, "items": new_items}
        yield self.store.batch(
            puts=[(ITEMS, owner, node.name + SEP + item_id, xml), (NODES, owner, node.name, node_value)],
            deletes=[(ITEMS, owner, node.name + SEP + i) for i in evicted],
        )
        node.items = new_items
        return evicted

    @defer.inlineCallbacks
    def _check_account_quota(self, owner: str, node: Node, new_items: list):
        """Fail with :class:`QuotaExceeded` if ``node`` holding ``new_items``
        would take the account over its item or byte quota.

        Only growth is refused: a replacement that does not grow passes even
        over a quota lowered since.
        """
        q = self.quotas
        nodes = yield self._mine(owner)
        old_count, old_used = self._usage(nodes)
        count = old_count - len(node.items) + len(new_items)
        used = old_used - sum(i[1] for i in node.items) + sum(i[1] for i in new_items)
        if count > q.user_items and count > old_count:
            raise QuotaExceeded("policy-violation", "max-items-exceeded",
                                f"at most {q.user_items} PEP items per account")
        if used > q.user_bytes and used > old_used:
            raise QuotaExceeded("policy-violation", "max-items-exceeded",
                                f"at most {q.user_bytes} bytes of PEP items per account")

    @defer.inlineCallbacks
    def replace(self, owner: str, node: Node, puts: list[tuple[str, str]], retracts: list[str]):
        """Publish ``puts`` and retract ``retracts`` in one transaction (a list replaced
        whole, e.g. XEP-0048 bookmarks): refused whole, evicting nothing, when the
        node would hold more than its ``max_items``, or on the user quotas' growth."""
        q = self.quotas
        if not node.config["persist_items"]:
            raise QuotaExceeded("not-acceptable", None, "the node keeps no items")
        sizes = {}
        for item_id, xml in puts:
            sizes[item_id] = len(xml.encode("utf-8"))
            if sizes[item_id] > q.item_bytes:
                raise QuotaExceeded("not-acceptable", "payload-too-big",
                                    f"item payload larger than {q.item_bytes} bytes")
        gone = set(retracts) | set(sizes)
        new_items = [i for i in node.items if i[0] not in gone] + [[k, v] for k, v in sizes.items()]
        if len(new_items) > self.effective_max(node.config):
            raise QuotaExceeded("policy-violation", "max-items-exceeded",
                                f"at most {self.effective_max(node.config)} items in {node.name}")
        yield self._check_account_quota(owner, node, new_items)
        present = set(node.ids())
        yield self.store.batch(
            puts=[(ITEMS, owner, node.name + SEP + k, xml) for k, xml in puts]
            + [(NODES, owner, node.name, {"config": node.config, "items": new_items})],
            deletes=[(ITEMS, owner, node.name + SEP + i) for i in retracts
                     if i in present and i not in sizes],
        )
        node.items = new_items

    def retract(self, owner: str, node: Node, item_id: str) -> defer.Deferred:
        """A Deferred of whether the item was there (and is gone now)."""
        if not node.config["persist_items"]:
            if node.transient is not None and node.transient[0] == item_id:
                node.transient = None
                return defer.succeed(True)
            return defer.succeed(False)
        if item_id not in node.ids():
            return defer.succeed(False)
        new_items = [i for i in node.items if i[0] != item_id]

        def stored(_) -> bool:
            node.items = new_items
            return True

        return self.store.batch(
            puts=[(NODES, owner, node.name, {"config": node.config, "items": new_items})],
            deletes=[(ITEMS, owner, node.name + SEP + item_id)]).addCallback(stored)

    def purge(self, owner: str, node: Node) -> defer.Deferred:
        def stored(_) -> None:
            node.items = []
            node.transient = None

        return self.store.batch(
            puts=[(NODES, owner, node.name, {"config": node.config, "items": []})],
            deletes=[(ITEMS, owner, node.name + SEP + i) for i in node.ids()]).addCallback(stored)

    @defer.inlineCallbacks
    def delete(self, owner: str, node: Node):
        nodes = yield self._mine(owner)
        yield self.store.batch(deletes=[(NODES, owner, node.name)]
                               + [(ITEMS, owner, node.name + SEP + i) for i in node.ids()])
        nodes.pop(node.name, None)
        if not nodes and self.owners is not None:
            self.owners.discard(owner)

    def configure(self, owner: str, node: Node, config: dict) -> defer.Deferred:
        """New config; items over a lowered max_items go (oldest first)."""
        keep = self.effective_max(config)
        evicted = node.ids()[:max(0, len(node.items) - keep)]
        items = node.items[len(evicted):]
        deletes = [(ITEMS, owner, node.name + SEP + i) for i in evicted]
        if not config["persist_items"] and node.config["persist_items"]:
            deletes = [(ITEMS, owner, node.name + SEP + i) for i in node.ids()]
            items = []

        def stored(_) -> None:
            node.config = config
            node.items = items

        return self.store.batch(puts=[(NODES, owner, node.name, {"config": config, "items": items})],
                                deletes=deletes).addCallback(stored)


def _first_error(failure):
    """gatherResults wraps the first failure in a FirstError: the store's error itself."""
    failure.trap(defer.FirstError)
    return failure.value.subFailure

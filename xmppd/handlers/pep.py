"""XEP-0163 Personal Eventing Protocol: a XEP-0060 service on every account.

Enabled as ``pep`` in ``[sm] plugins`` (after ``roster``, ``presence`` and
``caps``).  The account's bare JID is the service; only the owner publishes,
retracts, configures, purges and deletes; anyone the node's access model
allows (``open``, ``presence`` (default), ``roster`` groups, ``whitelist``:
the owner alone) reads items.  Nodes are created on first publish, with the
``publish-options`` as their configuration; on an existing node those
options are preconditions (``conflict`` + ``precondition-not-met``).

Subscriptions are implicit (XEP-0163 §4): an entity gets notifications of
node N when the access model allows it and its entity capabilities
(:mod:`xmppd.handlers.caps`) list ``N+notify``.  Recipients are computed at
each publish from the live roster and sessions, so roster, blocking and
access-model changes count at once; notifications cross the filter chain
with :meth:`Router.deliver_quietly` (a blocked contact or a filtered domain
gets nothing, and the publisher hears nothing of it).  Local contacts are
known from their sessions; remote contacts from the presence they send the
owner (bounded by ``[pep] max_remote_resources``), and reached over s2s.

A newly available resource (own or a contact's) with ``+notify`` gets the
last item of each node it may see (``send_last_published_item``).

Storage and quotas: :mod:`xmppd.pepstore`, on the server's asynchronous
store.  Every request about one account's nodes runs in that account's
queue (``PepStore.serial``), so a publish, its quota check against the
stored state, its write and its notifications end before the next request
about the same nodes begins; the IQ result goes out once the item is
stored.  Costs: a message costs nothing here; a presence costs a caps scan
(no I/O); a user without nodes costs a set look-up at a contact's login.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Callable

from twisted.internet import defer

from twisted.logger import Logger
from twisted.words.xish import domish

from xmppd import jid as jidlib
from xmppd.handlers.caps import caps_of
from xmppd.handlers.presence import copy_to
from xmppd.jid import JID
from xmppd.logfilter import log_observer
from xmppd.pepstore import ACCESS_MODELS, SEND_LAST, Node, PepStore, QuotaExceeded, Quotas, default_config
from xmppd.plugin import Plugin, Request
from xmppd.stanzas import NS_CLIENT, StanzaError, serialize_fragment
from xmppd.wokkel_compat import data_form, disco

log = Logger(observer=log_observer)

NS_PUBSUB = "http://jabber.org/protocol/pubsub"
NS_OWNER = NS_PUBSUB + "#owner"
NS_EVENT = NS_PUBSUB + "#event"
NS_ERRORS = NS_PUBSUB + "#errors"
NS_NODE_CONFIG = NS_PUBSUB + "#node_config"
NS_PUBLISH_OPTIONS = NS_PUBSUB + "#publish-options"
NS_DELAY = "urn:xmpp:delay"

MAX_ID = 256  # bytes of a node name or item id
_NO_NS = "\x00"  # a parent namespace no payload has: the payload declares its own

PUBSUB_FEATURES = (
    "access-open", "access-presence", "access-roster", "access-whitelist", "auto-create",
    "auto-subscribe", "config-node", "create-and-configure", "create-nodes", "delete-items",
    "delete-nodes", "filtered-notifications", "item-ids", "last-published", "persistent-items",
    "publish", "publish-options", "purge-nodes", "retract-items", "retrieve-items",
)


def pubsub_error(condition: str, app: str | None = None, text: str | None = None,
                 feature: str | None = None) -> StanzaError:
    extra = None
    if app is not None:
        extra = domish.Element((NS_ERRORS, app))
        if feature is not None:
            extra["feature"] = feature
    return StanzaError(condition, text=text, extra=extra)


def _truth(value: str) -> bool:
    if value in ("1", "true"):
        return True
    if value in ("0", "false"):
        return False
    raise ValueError(value)


def form_values(x: domish.Element) -> tuple[str | None, dict[str, list[str]]]:
    """(FORM_TYPE, var -> values) of a submitted XEP-0004 form."""
    form = data_form.Form.fromElement(x)
    values = {}
    for var, field in form.fields.items():
        if var == "FORM_TYPE":
            continue
        values[var] = [str(v) for v in field.values]
    return form.formNamespace, values


@dataclass
class VirtualNode:
    """A node whose items are another node's data in another form (XEP-0048 bookmarks
    over PEP, from the XEP-0402 node): nothing stored under its name; the owner
    publishes and reads, other writes are refused, and the serving plugin calls
    :meth:`PepPlugin.notify_virtual` when the data behind it changes.


    Each callable returns a Deferred; ``publish`` is called in the owner's
    queue (``PepStore.serial``) and must not queue behind it again.
    """

    config: dict
    exists: Callable[[str], defer.Deferred]  # owner -> Deferred[the node is there]
    items: Callable[[str], defer.Deferred]  # owner -> Deferred[[(id, xml)]]
    publish: Callable[[str, str, domish.Element], defer.Deferred]  # owner, item id, payload


class PepPlugin(Plugin):
    name = "pep"
    account_identities = (("pubsub", "pep", None),)
    account_features = (NS_PUBSUB,) + tuple(f"{NS_PUBSUB}#{f}" for f in PUBSUB_FEATURES)

    def setup(self) -> None:
        sec = self.server.config.section("pep")
        self.quotas = Quotas.from_section(sec)
        self.max_remote = sec.int("max_remote_resources", 100000, minimum=0)
        sec.reject_unknown()
        roster = self.server.plugin("roster")
        presence = self.server.plugin("presence")
        caps = self.server.plugin("caps")
        if roster is None or presence is None or caps is None:
            raise self.server.config.section("sm").error(
                "plugins", "pep", "the pep plugin needs roster, presence and caps before it")
        self.rosters = roster.rosters
        self.caps = caps
        self.pep = PepStore(self.store, self.quotas)
        self.pep.load_owners()
        # owner bare -> contact bare -> contact full -> caps key: remote
        # contacts' resources, from the presence they send the owner.
        self.remote: dict[str, dict[str, dict[str, tuple]]] = {}
        self.remote_count = 0
        for kind in ("get", "set"):
            self.handle_iq(kind, NS_PUBSUB, "pubsub", self.on_pubsub)
            self.handle_iq(kind, NS_OWNER, "pubsub", self.on_owner)
        self.router.on_bound.append(lambda s: self.pep.pin(s.jid.bare))
        self.router.on_closed.append(self._closed)
        caps.on_session_caps.append(self._session_caps)
        presence.on_inbound.append(self._inbound_presence)
        # Other plugins (bookmarks) hear of changes: (owner, node name); a hook
        # may return a Deferred (waited for, in the owner's queue, before the
        # IQ result).
        self.on_change: list[Callable[[str, str], defer.Deferred | None]] = []
        # node name -> VirtualNode (registered by other plugins at setup).
        self.virtual: dict[str, VirtualNode] = {}
        disco_plugin = self.server.plugin("disco")
        if disco_plugin is not None and hasattr(disco_plugin, "account_items"):
            disco_plugin.account_items.append(self._disco_items)

    def _closed(self, session) -> None:
        if not self.router.resources_of(session.jid.bare):
            self.pep.unpin(session.jid.bare)

    # -- IQ entry points ---------------------------------------------------

    def _owner_of(self, request: Request) -> str | None:
        """The service's account, or None for the server's own JID (handled elsewhere)."""
        if request.to is None:
            return request.sender.bare
        if request.to.user is None:
            return None
        return request.to.bare

    def _to_host(self, request: Request):
        """Pubsub to a served host: a component handler on that host, or nothing."""
        extension = self.router.components.get(request.to.host)
        if extension is not None:
            extension.send(request.stanza)
            return False
        raise StanzaError("service-unavailable")

    def on_pubsub(self, request: Request):
        owner = self._owner_of(request)
        if owner is None:
            return self._to_host(request)
        kind = request.stanza.getAttribute("type")
        action, options = None, None
        for child in request.payload.elements():
            if child.uri != NS_PUBSUB:
                continue
            if child.name in ("publish-options", "configure") and action is not None:
                options = child
            elif action is None:
                action = child
        if action is None:
            raise StanzaError("bad-request", text="no pubsub action")
        name = action.name
        if kind == "set" and name == "publish":
            return self.publish(request, owner, action, options)
        if kind == "set" and name == "retract":
            return self._queued(owner, self.retract, request, owner, action)
        if kind == "set" and name == "create":
            return self._queued(owner, self.create, request, owner, action, options)
        if kind == "get" and name == "items":
            return self._queued(owner, self.items, request, owner, action)
        raise pubsub_error("feature-not-implemented", "unsupported", feature=name)

    def _queued(self, owner: str, step: Callable, *args) -> defer.Deferred:
        """``step`` in ``owner``'s queue: after every earlier request about those nodes."""
        return self.pep.serial.run(owner, step, *args)

    def on_owner(self, request: Request):
        owner = self._owner_of(request)
        if owner is None:
            return self._to_host(request)
        kind = request.stanza.getAttribute("type")
        action = request.payload.firstChildElement()
        if action is None:
            raise StanzaError("bad-request")
        if owner != request.sender.bare:
            raise StanzaError("forbidden", text="only the account owns its PEP nodes")
        virtual = self.virtual.get(action.getAttribute("node") or "")
        if virtual is not None:
            return self._queued(owner, self._virtual_owner, owner, kind, action, virtual)
        if action.name == "configure":
            step = self.configure_get if kind == "get" else self.configure_set
            return self._queued(owner, step, owner, action)
        if kind == "get" and action.name == "default":
            return self._config_form(NS_OWNER, "default", None, default_config(self.quotas))
        if kind == "set" and action.name == "purge":
            return self._queued(owner, self.purge, owner, action)
        if kind == "set" and action.name == "delete":
            return self._queued(owner, self.delete, owner, action)
        raise pubsub_error("feature-not-implemented", "unsupported", feature=action.name)

    @defer.inlineCallbacks
    def _virtual_owner(self, owner: str, kind: str, action: domish.Element, virtual: VirtualNode):
        name = action.getAttribute("node")
        if not (yield virtual.exists(owner)):
            raise StanzaError("item-not-found")
        if kind == "get" and action.name == "configure":
            return self._config_form(NS_OWNER, "configure", name, virtual.config)
        raise StanzaError("not-allowed", text=f"{name} is a view of other data: publish to it instead")

    @defer.inlineCallbacks
    def _virtual_node(self, owner: str, name: str):
        """Deferred[(a Node carrying the name and config, the VirtualNode)] when ``name``
        is virtual, Deferred[None] when not."""
        virtual = self.virtual.get(name)
        if virtual is None:
            return None
        if not (yield virtual.exists(owner)):
            raise StanzaError("item-not-found")
        return Node(name, virtual.config), virtual

    @defer.inlineCallbacks
    def notify_virtual(self, owner: str, name: str):
        """The data behind virtual node ``name`` changed: its items to those who want them
        (computed only when someone does).  A Deferred."""
        virtual = self.virtual[name]
        recipients = yield self.recipients(owner, Node(name, virtual.config))
        if recipients:
            items = yield virtual.items(owner)
            self._send(owner, recipients, self._items_event(name, items))

    # -- helpers -------------------------------------------------------------

    @staticmethod
    def _node_name(el: domish.Element) -> str:
        node = el.getAttribute("node")
        if not node:
            raise pubsub_error("bad-request", "nodeid-required")
        if len(node.encode("utf-8")) > MAX_ID:
            raise StanzaError("not-acceptable", text=f"node name longer than {MAX_ID} bytes")
        return node

    def _node(self, owner: str, name: str) -> defer.Deferred:
        """Deferred[the Node]; item-not-found when there is none."""
        def found(nodes: dict) -> Node:
            node = nodes.get(name)
            if node is None:
                raise StanzaError("item-not-found")
            return node

        return self.pep.nodes(owner).addCallback(found)

    def parse_config(self, values: dict[str, list[str]], base: dict) -> dict:
        """A node configuration from form values over ``base``; not-acceptable on bad values."""
        config = dict(base)
        for var, vals in values.items():
            key = var[len("pubsub#"):] if var.startswith("pubsub#") else None
            value = vals[0] if vals else ""
            try:
                if key == "access_model":
                    if value not in ACCESS_MODELS:
                        raise ValueError(value)
                    config[key] = value
                elif key == "max_items":
                    if value != "max":
                        n = int(value)
                        if n < 1 or n > self.quotas.node_items:
                            raise ValueError(f"{value} (1 to {self.quotas.node_items}, or max)")
                        value = n
                    config[key] = value
                elif key in ("persist_items", "notify_retract"):
                    config[key] = _truth(value)
                elif key == "send_last_published_item":
                    if value not in SEND_LAST:
                        raise ValueError(value)
                    config[key] = value
                elif key == "roster_groups_allowed":
                    if len(vals) > 32 or any(len(v) > 1023 for v in vals):
                        raise ValueError("at most 32 groups")
                    config[key] = list(vals)
                # Other fields (title, deliver_payloads...) are not kept.
            except ValueError as e:
                raise StanzaError("not-acceptable", text=f"bad value for {var}: {e}") from None
        return config

    def _options(self, options: domish.Element | None, form_type: str) -> dict[str, list[str]] | None:
        if options is None:
            return None
        for x in options.elements("jabber:x:data", "x"):
            if x.getAttribute("type") == "cancel":
                return None
            ftype, values = form_values(x)
            if ftype not in (None, form_type):
                raise StanzaError("bad-request", text=f"form type {ftype}, expected {form_type}")
            return values
        return None

    def _preconditions(self, node: Node, values: dict[str, list[str]]) -> None:
        wanted = self.parse_config(values, node.config)
        for var in values:
            key = var[len("pubsub#"):] if var.startswith("pubsub#") else var
            if key not in node.config:
                continue
            have, want = node.config[key], wanted[key]
            if key == "max_items":
                have, want = self.pep.effective_max(node.config), self.pep.effective_max(wanted)
            if have != want:
                raise pubsub_error("conflict", "precondition-not-met",
                                   text=f"node {node.name}: {var} is {node.config[key]}")

    def may_read(self, owner: str, reader: str, config: dict) -> defer.Deferred:
        """Deferred[None] when ``reader`` (bare) may see the node's items, else of the error.

        The owner's roster item of the reader is memory for an online owner."""
        if reader == owner:
            return defer.succeed(None)
        model = config["access_model"]
        if model == "open":
            return defer.succeed(None)
        if model == "whitelist":
            return defer.succeed(pubsub_error("not-allowed", "closed-node"))
        return self.rosters.item(owner, reader).addCallback(self._roster_allows, model, config)

    @staticmethod
    def _roster_allows(item, model: str, config: dict) -> StanzaError | None:
        if model == "presence":
            if item is not None and item.from_:
                return None
            return pubsub_error("not-authorized", "presence-subscription-required")
        allowed = config.get("roster_groups_allowed") or ()
        if item is not None and set(item.get("groups") or ()) & set(allowed):
            return None
        return pubsub_error("not-authorized", "not-in-roster-group")

    def _quota(self, e: QuotaExceeded) -> StanzaError:
        return pubsub_error(e.condition, e.app, text=str(e))

    # -- actions ---------------------------------------------------------------

    def publish(self, request: Request, owner: str, action: domish.Element, options):
        if owner != request.sender.bare:
            raise StanzaError("forbidden", text="only the account owner publishes")
        name = self._node_name(action)
        items = list(action.elements(NS_PUBSUB, "item"))
        if not items:
            raise pubsub_error("bad-request", "item-required")
        if len(items) > 1:
            raise pubsub_error("bad-request", "invalid-payload", text="one item per publish")
        payloads = list(items[0].elements())
        if len(payloads) != 1:
            raise pubsub_error("bad-request", "invalid-payload" if payloads else "payload-required")
        item_id = items[0].getAttribute("id") or uuid.uuid4().hex
        if len(item_id.encode("utf-8")) > MAX_ID:
            raise StanzaError("not-acceptable", text=f"item id longer than {MAX_ID} bytes")
        values = self._options(options, NS_PUBLISH_OPTIONS)
        xml = serialize_fragment(payloads[0], _NO_NS)
        return self._queued(owner, self._publish, owner, name, item_id, xml, payloads[0], values)

    @defer.inlineCallbacks
    def _publish(self, owner: str, name: str, item_id: str, xml: str, payload: domish.Element,
                 values: dict | None):
        virtual = self.virtual.get(name)
        if virtual is None:
            yield self.publish_item_queued(owner, name, item_id, xml, values,
                                           options_are_preconditions=True)
        else:
            if len(xml.encode("utf-8")) > self.quotas.item_bytes:
                raise pubsub_error("not-acceptable", "payload-too-big",
                                   text=f"item payload larger than {self.quotas.item_bytes} bytes")
            if values:
                self._preconditions(Node(name, virtual.config), values)
            yield virtual.publish(owner, item_id, payload)
        reply = domish.Element((NS_PUBSUB, "pubsub"))
        pub = reply.addElement("publish")
        pub["node"] = name
        pub.addElement("item")["id"] = item_id
        return reply

    def publish_item(self, owner: str, name: str, item_id: str, xml: str,
                     values: dict | None, options_are_preconditions: bool = True) -> defer.Deferred:
        """Store and notify, in the owner's queue (for plugins converting data, e.g. the
        avatar conversion); a Deferred that fires once stored and notified."""
        return self._queued(owner, self.publish_item_queued, owner, name, item_id, xml, values,
                            options_are_preconditions)

    @defer.inlineCallbacks
    def publish_item_queued(self, owner: str, name: str, item_id: str, xml: str,
                            values: dict | None, options_are_preconditions: bool = True):
        """:meth:`publish_item` for a caller already in the owner's queue."""
        if len(xml.encode("utf-8")) > self.quotas.item_bytes:
            raise pubsub_error("not-acceptable", "payload-too-big",
                               text=f"item payload larger than {self.quotas.item_bytes} bytes")
        node = (yield self.pep.nodes(owner)).get(name)
        try:
            if node is None:
                config = self.parse_config(values or {}, default_config(self.quotas))
                node = yield self.pep.create(owner, name, config)
            elif values:
                if options_are_preconditions:
                    self._preconditions(node, values)
            yield self.pep.publish(owner, node, item_id, xml)
        except QuotaExceeded as e:
            raise self._quota(e) from None
        yield self.notify(owner, node, self._items_event(node.name, [(item_id, xml)]))
        yield self._changed(owner, name)

    @defer.inlineCallbacks
    def _changed(self, owner: str, name: str):
        for hook in self.on_change:
            yield hook(owner, name)  # None or a Deferred

    @defer.inlineCallbacks
    def create(self, request: Request, owner: str, action, options):
        if owner != request.sender.bare:
            raise StanzaError("forbidden")
        name = self._node_name(action)
        if name in (yield self.pep.nodes(owner)) or \
                (name in self.virtual and (yield self.virtual[name].exists(owner))):
            raise StanzaError("conflict", text="node exists")
        if name in self.virtual:
            return None  # made by its first publish
        values = self._options(options, NS_NODE_CONFIG)
        config = self.parse_config(values or {}, default_config(self.quotas))
        try:
            yield self.pep.create(owner, name, config)
        except QuotaExceeded as e:
            raise self._quota(e) from None
        return None

    @defer.inlineCallbacks
    def retract(self, request: Request, owner: str, action):
        if owner != request.sender.bare:
            raise StanzaError("forbidden")
        name = self._node_name(action)
        if name in self.virtual:
            raise StanzaError("not-allowed", text=f"{name} is a view of other data: publish to it instead")
        node = yield self._node(owner, name)
        ids = [i.getAttribute("id") for i in action.elements(NS_PUBSUB, "item")]
        if len(ids) != 1 or not ids[0]:
            raise pubsub_error("bad-request", "item-required")
        if not (yield self.pep.retract(owner, node, ids[0])):
            raise StanzaError("item-not-found")
        notify = action.getAttribute("notify") in ("1", "true") or node.config.get("notify_retract")
        if notify:
            yield self.notify(owner, node, self._event("items", name, retract=ids[0]))
        yield self._changed(owner, name)
        return None

    @defer.inlineCallbacks
    def items(self, request: Request, owner: str, action):
        name = self._node_name(action)
        virtual = yield self._virtual_node(owner, name)
        node = (yield self._node(owner, name)) if virtual is None else virtual[0]
        error = yield self.may_read(owner, request.sender.bare, node.config)
        if error is not None:
            raise error
        ids = [i.getAttribute("id") for i in action.elements(NS_PUBSUB, "item") if i.getAttribute("id")]
        max_items = action.getAttribute("max_items")
        try:
            limit = int(max_items) if max_items is not None else None
        except ValueError:
            raise StanzaError("bad-request", text="max_items is not an integer") from None
        if virtual is None:
            found = yield self.pep.items(owner, node, ids or None, limit)
        else:
            found = [i for i in (yield virtual[1].items(owner)) if not ids or i[0] in ids]
            if limit is not None:
                found = found[-limit:] if limit > 0 else []
        if ids and not found:
            raise StanzaError("item-not-found")
        reply = domish.Element((NS_PUBSUB, "pubsub"))
        el = reply.addElement("items")
        el["node"] = name
        for item_id, xml in found:
            item = el.addElement("item")
            item["id"] = item_id
            item.addRawXml(xml)
        return reply

    def _config_form(self, ns: str, element: str, name: str | None, config: dict):
        form = data_form.Form("form", formNamespace=NS_NODE_CONFIG)
        form.addField(data_form.Field(
            "list-single", "pubsub#access_model", config["access_model"],
            options=[data_form.Option(m) for m in ACCESS_MODELS]))
        form.addField(data_form.Field("text-single", "pubsub#max_items", str(config["max_items"])))
        form.addField(data_form.Field("boolean", "pubsub#persist_items", config["persist_items"]))
        form.addField(data_form.Field("boolean", "pubsub#notify_retract", config["notify_retract"]))
        form.addField(data_form.Field(
            "list-single", "pubsub#send_last_published_item", config["send_last_published_item"],
            options=[data_form.Option(m) for m in SEND_LAST]))
        form.addField(data_form.Field("list-multi", "pubsub#roster_groups_allowed",
                                      values=list(config.get("roster_groups_allowed") or ())))
        reply = domish.Element((ns, "pubsub"))
        el = reply.addElement(element)
        if name is not None:
            el["node"] = name
        el.addChild(form.toElement())
        return reply

    @defer.inlineCallbacks
    def configure_get(self, owner: str, action):
        name = self._node_name(action)
        node = yield self._node(owner, name)
        return self._config_form(NS_OWNER, "configure", name, node.config)

    @defer.inlineCallbacks
    def configure_set(self, owner: str, action):
        name = self._node_name(action)
        node = yield self._node(owner, name)
        values = self._options(action, NS_NODE_CONFIG)
        if values is None:
            return None
        yield self.pep.configure(owner, node, self.parse_config(values, node.config))
        return None

    @defer.inlineCallbacks
    def purge(self, owner: str, action):
        node = yield self._node(owner, self._node_name(action))
        yield self.pep.purge(owner, node)
        yield self.notify(owner, node, self._event("purge", node.name))
        yield self._changed(owner, node.name)
        return None

    @defer.inlineCallbacks
    def delete(self, owner: str, action):
        node = yield self._node(owner, self._node_name(action))
        recipients = yield self.recipients(owner, node)  # before it is gone
        yield self.pep.delete(owner, node)
        self._send(owner, recipients, self._event("delete", node.name))
        yield self._changed(owner, node.name)
        return None

    # -- notifications -------------------------------------------------------

    @staticmethod
    def _event(kind: str, name: str, retract: str | None = None) -> domish.Element:
        msg = domish.Element((NS_CLIENT, "message"))
        msg["type"] = "headline"
        el = msg.addElement((NS_EVENT, "event")).addElement(kind)
        el["node"] = name
        if retract is not None:
            el.addElement("retract")["id"] = retract
        return msg

    def _items_event(self, name: str, items: list[tuple[str, str]]) -> domish.Element:
        msg = self._event("items", name)
        el = msg.firstChildElement().firstChildElement()
        for item_id, xml in items:
            item = el.addElement("item")
            item["id"] = item_id
            item.addRawXml(xml)
        return msg

    def _wants(self, features: frozenset | None, feature: str) -> bool:
        return features is not None and feature in features

    def recipients(self, owner: str, node: Node) -> defer.Deferred:
        """Deferred[who gets a notification of ``node`` now]: live roster, sessions and
        caps (the roster is memory for an online owner)."""
        return self.rosters.get(owner).addCallback(self._recipients, owner, node)

    def _recipients(self, roster: dict, owner: str, node: Node) -> list[JID]:
        feature = node.name + "+notify"
        caps = self.caps
        out = []
        for s in self.router.resources_of(owner).values():
            if s.available and self._wants(caps.session_features(s), feature):
                out.append(s.jid)
        config = node.config
        model = config["access_model"]
        if model == "whitelist":
            return out
        groups = set(config.get("roster_groups_allowed") or ())
        hosts = self.router.hosts
        remote = self.remote.get(owner, {})
        for contact, item in roster.items():
            if model == "presence" and not item.from_:
                continue
            if model == "roster" and not (set(item.get("groups") or ()) & groups):
                continue
            host = contact.rpartition("@")[2]
            if host in hosts:
                for s in self.router.resources_of(contact).values():
                    if s.available and self._wants(caps.session_features(s), feature):
                        out.append(s.jid)
            else:
                for full, key in remote.get(contact, {}).items():
                    if self._wants(caps.lookup(key), feature):
                        try:
                            out.append(jidlib.parse(full))
                        except jidlib.InvalidJID:
                            pass
        return out

    def notify(self, owner: str, node: Node, event: domish.Element) -> defer.Deferred:
        return self.recipients(owner, node).addCallback(
            lambda recipients: self._send(owner, recipients, event))

    def _send(self, owner: str, recipients: list[JID], event: domish.Element) -> None:
        if not recipients:
            return
        event["from"] = owner
        sender = jidlib.parse(owner)
        for to in recipients:
            self.router.deliver_quietly(copy_to(event, to.full), sender, to)

    @defer.inlineCallbacks
    def send_last(self, owner: str, target: JID, features: frozenset, own: bool = False):
        """The last item of each of ``owner``'s nodes ``target`` may see and wants (a Deferred)."""
        nodes = yield self.pep.nodes(owner)
        if not nodes:
            return
        reader = target.bare
        sender = None
        for node in list(nodes.values()):
            if node.config["send_last_published_item"] == "never":
                continue
            if node.name + "+notify" not in features:
                continue
            if (yield self.may_read(owner, reader, node.config)) is not None:
                continue
            last = yield self.pep.last(owner, node)
            if last is None:
                continue
            event = self._items_event(node.name, [last])
            event["from"] = owner
            event["to"] = target.full
            if sender is None:
                sender = jidlib.parse(owner)
            self.router.deliver_quietly(event, sender, target)
        for name, virtual in self.virtual.items():
            if virtual.config["send_last_published_item"] == "never" or name + "+notify" not in features:
                continue
            if (yield self.may_read(owner, reader, virtual.config)) is not None \
                    or not (yield virtual.exists(owner)):
                continue
            items = yield virtual.items(owner)
            if items:
                event = self._items_event(name, items[-1:])
                event["from"] = owner
                event["to"] = target.full
                self.router.deliver_quietly(event, jidlib.parse(owner), target)

    def _session_caps(self, session, features: frozenset) -> None:
        """A local resource became available (or changed caps): its last items."""
        self._send_lasts(session, features).addErrback(
            lambda f: log.failure("sending last PEP items to {jid} failed", f, jid=session.jid.full))

    @defer.inlineCallbacks
    def _send_lasts(self, session, features: frozenset):
        me = session.jid.bare
        yield self.send_last(me, session.jid, features)
        may_have_nodes = self.pep.may_have_nodes
        for contact in list((yield self.rosters.get(me))):
            if contact != me and may_have_nodes(contact):
                yield self.send_last(contact, session.jid, features)

    def _inbound_presence(self, stanza: domish.Element, sender: JID, to: JID) -> None:
        """Presence from a remote contact to a local account: remember its caps."""
        if sender.host in self.router.hosts or sender.resource is None or sender.bare == to.bare:
            return
        owner = to.bare
        if stanza.getAttribute("type") == "unavailable":
            per_owner = self.remote.get(owner)
            resources = per_owner.get(sender.bare) if per_owner else None
            if resources and resources.pop(sender.full, None) is not None:
                self.remote_count -= 1
                if not resources:
                    del per_owner[sender.bare]
                    if not per_owner:
                        del self.remote[owner]
            return
        found = caps_of(stanza)
        resources = self.remote.setdefault(owner, {}).setdefault(sender.bare, {})
        key = found[0] if found else None
        if sender.full in resources:
            if resources[sender.full] == key:
                return
        elif self.remote_count >= self.max_remote:
            return
        else:
            self.remote_count += 1
        resources[sender.full] = key
        if key is None or not self.pep.may_have_nodes(owner):
            return

        def known(features: frozenset) -> None:
            if self.remote.get(owner, {}).get(sender.bare, {}).get(sender.full) == key:
                self.send_last(owner, sender, features).addErrback(
                    lambda f: log.failure("sending last PEP items to {jid} failed", f,
                                          jid=sender.full))

        self.caps.when_known(key, found[1], sender, known)

    # -- disco ------------------------------------------------------------

    @defer.inlineCallbacks
    def _disco_items(self, request: Request, owner: str):
        """Deferred[the nodes ``request``'s sender may see], in the owner's queue."""
        reader = request.sender.bare
        out = []
        nodes = yield self._queued(owner, self.pep.nodes, owner)
        for name, node in sorted(nodes.items()):
            if (yield self.may_read(owner, reader, node.config)) is None:
                out.append(disco.DiscoItem(_wokkel_jid(owner), name))
        for name, virtual in sorted(self.virtual.items()):
            if (yield self.may_read(owner, reader, virtual.config)) is None \
                    and (yield virtual.exists(owner)):
                out.append(disco.DiscoItem(_wokkel_jid(owner), name))
        return out


def _wokkel_jid(text: str):
    from twisted.words.protocols.jabber.jid import JID as WJID
    return WJID(text)

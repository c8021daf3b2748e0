"""A tiny publish-subscribe service: wokkel's PubSubService on an in-memory backend.

::

    [components."pubsub.example.org"]
    name = "Tiny pubsub"
    handlers = ["examples.pubsub:service", "wokkel.disco:DiscoHandler"]

Nodes are created by the first publish to them (auto-create); anyone may
publish and subscribe; every subscriber gets each published item as an
event notification (XEP-0060 §7.1.2.1).  Everything is lost at restart.
"""
from __future__ import annotations

from twisted.internet import defer

from xmppd.wokkel_compat import pubsub


class MemoryBackend(pubsub.PubSubResource):
    """Nodes in a dict: node id -> (items in order, subscriptions)."""

    features = ["auto-create", "publish", "subscribe", "retrieve-items", "retrieve-subscriptions"]
    # Bounds: this is an example, but no memory grows without one.
    max_nodes = 1000
    max_items = 50
    max_subscribers = 1000

    def __init__(self) -> None:
        self.service: pubsub.PubSubService | None = None  # set by service()
        self.nodes: dict[str, tuple[list, dict]] = {}

    def _node(self, identifier: str, create: bool = False):
        node = self.nodes.get(identifier)
        if node is None:
            if not create:
                raise _not_found()
            if len(self.nodes) >= self.max_nodes:
                raise _refused("too many nodes")
            node = self.nodes[identifier] = ([], {})
        return node

    def getNodes(self, requestor, service, nodeIdentifier):
        return defer.succeed(sorted(self.nodes) if not nodeIdentifier else [])

    def getInfo(self, requestor, service, nodeIdentifier):
        if nodeIdentifier in self.nodes:
            return defer.succeed({"type": "leaf", "meta-data": []})
        return defer.succeed(None)

    def publish(self, request):
        items, subscriptions = self._node(request.nodeIdentifier, create=True)
        items.extend(request.items)
        del items[: -self.max_items]
        notifications = [(subscriber, [subscription], request.items)
                         for subscriber, subscription in subscriptions.items()]
        if notifications:
            self.service.notifyPublish(request.recipient, request.nodeIdentifier, notifications)
        return defer.succeed(None)

    def subscribe(self, request):
        _, subscriptions = self._node(request.nodeIdentifier)
        if request.subscriber.userhostJID() != request.sender.userhostJID():
            return defer.fail(_forbidden())
        if len(subscriptions) >= self.max_subscribers:
            return defer.fail(_refused("too many subscribers"))
        subscription = pubsub.Subscription(request.nodeIdentifier, request.subscriber, "subscribed")
        subscriptions[request.subscriber] = subscription
        return defer.succeed(subscription)

    def unsubscribe(self, request):
        _, subscriptions = self._node(request.nodeIdentifier)
        subscriptions.pop(request.subscriber, None)
        return defer.succeed(None)

    def subscriptions(self, request):
        out = [s for _, subs in self.nodes.values() for who, s in subs.items()
               if who.userhostJID() == request.sender.userhostJID()]
        return defer.succeed(out)

    def items(self, request):
        items, _ = self._node(request.nodeIdentifier)
        return defer.succeed(list(items))


def _not_found():
    from twisted.words.protocols.jabber.error import StanzaError

    return StanzaError("item-not-found")


def _forbidden():
    from twisted.words.protocols.jabber.error import StanzaError

    return StanzaError("forbidden")


def _refused(text: str):
    from twisted.words.protocols.jabber.error import StanzaError

    return StanzaError("resource-constraint", text=text)


def service() -> pubsub.PubSubService:
    """The handler factory named in the config."""
    backend = MemoryBackend()
    backend.service = pubsub.PubSubService(backend)
    return backend.service

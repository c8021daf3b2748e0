"""In-process components: wokkel handlers served by the router.

This is wokkel's ``InternalComponent`` idea wired to xmppd's router instead
of wokkel's: a :class:`HandlerCollection` per component domain holds the
``XMPPHandler`` objects named in ``[components."<domain>"] handlers``, gives
them an "XML stream" (:class:`ComponentPipe`, an ``EventDispatcher``) on which
they add observers as on a real stream, dispatches the stanzas the router
delivers for the domain into it, and routes what they ``send()`` back through
the router's filter chain, after checking its ``from``.

What wokkel leaves to the stream and xmppd must do itself:

* an observer that raises is logged and the stanza's sender gets
  ``internal-server-error`` (wokkel's dispatcher would only log it, and the
  client would wait for an answer that never comes); the server goes on;
* an IQ get/set that no handler answers while it is dispatched (a reply
  with its id) or marks ``handled`` (wokkel's convention, which
  ``IQHandlerMixin`` and ``PingHandler`` follow) gets ``service-unavailable``,
  as RFC 6120 §8.2.3 requires an answer;
* a stanza whose ``from`` is not the component's domain (or a JID at it) is
  dropped with one log line: a handler cannot speak for anybody else.  On a
  served host (handlers added to ``example.org`` itself) only the bare domain
  is allowed, so a handler cannot speak for the host's users.
"""
from __future__ import annotations

import importlib
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.words.protocols.jabber import error as jabber_error
from twisted.words.protocols.jabber import jid as twisted_jid
from twisted.words.protocols.jabber import xmlstream
from twisted.words.xish import domish, utility

from xmppd import jid as jidlib
from xmppd.config import ConfigError
from xmppd.components.namespaces import to_client_namespace
from xmppd.stanzas import StanzaError, error_reply
from xmppd.logfilter import log_observer

log = Logger(observer=log_observer)

# Requests a handler sends with ``request()`` and nobody answers are
# forgotten after this long (wokkel's StreamManager has no default; an
# unanswered request must not be kept forever).
REQUEST_TIMEOUT = 60.0


class _Guarded:
    """An observer that reports its exceptions instead of letting the dispatcher swallow them.

    Hashes and compares like the observer it wraps, so ``removeObserver``
    with the original callable finds it.
    """

    __slots__ = ("fn", "collection")

    def __init__(self, fn, collection: "HandlerCollection") -> None:
        self.fn = fn
        self.collection = collection

    def __call__(self, *args, **kwargs):
        try:
            return self.fn(*args, **kwargs)
        except Exception:
            self.collection.observer_failed(args[0] if args else None, self.fn)

    def __eq__(self, other) -> bool:
        if isinstance(other, _Guarded):
            other = other.fn
        return self.fn == other

    def __hash__(self) -> int:
        return hash(self.fn)


class ComponentPipe(utility.EventDispatcher):
    """The stream the handlers of one component see: stanzas in, ``send()`` out."""

    def __init__(self, collection: "HandlerCollection") -> None:
        super().__init__()
        self._collection = collection
        self.thisEntity = twisted_jid.internJID(collection.domain)
        self.otherEntity = None

    def send(self, obj: Any) -> None:
        self._collection.send(obj)

    def _addObserver(self, onetime, event, observerfn, priority, *args, **kwargs):
        if not isinstance(observerfn, _Guarded):
            observerfn = _Guarded(observerfn, self._collection)
        super()._addObserver(onetime, event, observerfn, priority, *args, **kwargs)


class InboundRoute:
    """What the router holds for a component domain: ``send`` delivers *to* the component."""

    __slots__ = ("collection", "public", "online")

    def __init__(self, collection: "HandlerCollection", public: bool) -> None:
        self.collection = collection
        self.public = public
        self.online = True  # in process: up as long as the server is

    def send(self, stanza: domish.Element) -> None:
        self.collection.receive(stanza)


class HandlerCollection(xmlstream.XMPPHandlerCollection):
    """The handlers of one domain, as wokkel's ``InternalComponent`` connects them."""

    def __init__(self, settings, router, clock) -> None:
        super().__init__()
        self.settings = settings
        self.domain: str = settings.domain
        self.key: str = settings.key
        self.served: bool = settings.served
        self.router = router
        self.clock = clock
        self.jid = jidlib.parse(self.domain)
        self.route = InboundRoute(self, settings.public)
        self.xmlstream = ComponentPipe(self)
        self.loaded: list[tuple[str, Any]] = []  # (factory, handler)
        self._pending: dict[str, tuple[defer.Deferred, Any]] = {}
        # The stanza being dispatched: a reply to it sent meanwhile marks it
        # handled (FallbackHandler answers without setting ``handled``).
        self._dispatching: domish.Element | None = None
        self.started = False

    # -- start-up ------------------------------------------------------------

    def load(self, path: str) -> None:
        """Import every factory and build its handler (ConfigError naming the key)."""
        for spec in self.settings.handlers:
            handler = self._build(spec, path)
            handler.setHandlerParent(self)
            self.loaded.append((spec.factory, handler))

    def _build(self, spec, path: str):
        key = f"{self.key}.handlers"
        module, _, attr = spec.factory.partition(":")
        try:
            target: Any = importlib.import_module(module)
            for part in attr.split("."):
                target = getattr(target, part)
        except Exception as e:  # noqa: BLE001 -- any import failure is a config error
            raise ConfigError(path, key, spec.factory,
                              f"cannot import it ({type(e).__name__}: {e})") from None
        try:
            handler = target(*spec.args, **dict(spec.kwargs))
        except Exception as e:  # noqa: BLE001
            raise ConfigError(path, key, spec.factory,
                              f"calling it failed ({type(e).__name__}: {e})") from None
        if not (hasattr(handler, "makeConnection") and hasattr(handler, "connectionInitialized")
                and hasattr(handler, "setHandlerParent")):
            raise ConfigError(path, key, spec.factory,
                              f"returned {type(handler).__name__}, not a wokkel XMPPHandler")
        return handler

    def start(self, path: str) -> None:
        """Connect every handler, as wokkel's InternalComponent.startService does."""
        for factory, handler in self.loaded:
            try:
                handler.makeConnection(self.xmlstream)
                handler.connectionInitialized()
            except Exception as e:  # noqa: BLE001
                raise ConfigError(path, f"{self.key}.handlers", factory,
                                  f"connectionInitialized failed ({type(e).__name__}: {e})") from None
        self.started = True

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        for factory, handler in self.loaded:
            try:
                handler.connectionLost(None)
            except Exception:
                log.failure("{key}: handler {factory} failed in connectionLost",
                            key=self.key, factory=factory)
        for d, call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()

    def disco_info(self) -> list:
        """Features and identities the handlers give for the bare domain, if known at once."""
        requestor = target = twisted_jid.internJID(self.domain)
        out: list = []
        for factory, handler in self.loaded:
            get = getattr(handler, "getDiscoInfo", None)
            if get is None:
                continue
            found: list = []
            d = defer.maybeDeferred(get, requestor, target, "")
            d.addCallbacks(lambda r: found.append(r or []),
                           lambda f: log.failure("{key}: getDiscoInfo of {factory} failed", f,
                                                 key=self.key, factory=factory))
            if found:
                out.extend(found[0])
        return out

    # -- router -> handlers ----------------------------------------------------

    def receive(self, stanza: domish.Element) -> None:
        """A stanza the router delivers for this domain."""
        if stanza.name == "iq" and stanza.getAttribute("type") in ("result", "error"):
            pending = self._pending.pop(stanza.getAttribute("id", ""), None)
            if pending is not None:
                d, call = pending
                if call.active():
                    call.cancel()
                if stanza["type"] == "error":
                    d.errback(jabber_error.exceptionFromStanza(stanza))
                else:
                    d.callback(stanza)
                return
        stanza.handled = False
        self._dispatching = stanza
        try:
            self.xmlstream.dispatch(stanza)
        finally:
            self._dispatching = None
        if (not stanza.handled and stanza.name == "iq"
                and stanza.getAttribute("type") in ("get", "set")):
            self._answer(stanza, StanzaError("service-unavailable"))

    def observer_failed(self, stanza: Any, observer) -> None:
        """An observer raised: log it, and answer the sender (once)."""
        name = getattr(observer, "__qualname__", repr(observer))
        log.failure("{key}: handler {name} failed", key=self.key, name=name)
        if isinstance(stanza, domish.Element) and not getattr(stanza, "handled", False):
            stanza.handled = True
            if stanza.name != "presence":
                self._answer(stanza, StanzaError("internal-server-error"))

    def _answer(self, stanza: domish.Element, error: StanzaError) -> None:
        reply = error_reply(stanza, error)
        if reply is not None:
            self.send(reply)

    # -- handlers -> router ----------------------------------------------------

    def send(self, obj: Any) -> None:
        """What a handler sends: checked, then routed through the filter chain."""
        if not isinstance(obj, domish.Element):
            log.warn("{key}: a handler sent {type}, not an element: dropped",
                     key=self.key, type=type(obj).__name__)
            return
        if obj.name not in ("message", "presence", "iq"):
            log.warn("{key}: a handler sent <{name}/>, not a stanza: dropped",
                     key=self.key, name=obj.name)
            return
        to_client_namespace(obj, None)
        current = self._dispatching
        if (current is not None and obj.name == "iq" and current.name == "iq"
                and obj.getAttribute("type") in ("result", "error")
                and obj.getAttribute("id") == current.getAttribute("id")):
            current.handled = True
        claimed = obj.getAttribute("from")
        if claimed is None:
            sender = self.jid
            obj["from"] = self.domain
        else:
            try:
                sender = jidlib.parse(claimed)
            except jidlib.InvalidJID:
                sender = None
            if sender is None or not self._may_send_as(sender):
                log.warn("{key}: a handler sent a stanza from {claimed!r}, not from {domain}:"
                         " dropped", key=self.key, claimed=claimed, domain=self.domain)
                return
        to_attr = obj.getAttribute("to")
        try:
            to = jidlib.parse(to_attr) if to_attr else None
        except jidlib.InvalidJID:
            to = None
        if to is None:
            log.warn("{key}: a handler sent a stanza without a valid 'to' ({to!r}): dropped",
                     key=self.key, to=to_attr)
            return
        self.router.deliver(obj, sender, to, self.route)

    def _may_send_as(self, sender: jidlib.JID) -> bool:
        if sender.host != self.domain:
            return False
        return sender.user is None if self.served else True

    def request(self, request) -> defer.Deferred:
        """Send an IQ request and track its response (wokkel's ``StreamManager.request``)."""
        if request.stanzaKind != "iq" or request.stanzaType not in ("get", "set"):
            return defer.fail(ValueError("Not a request"))
        element = request.toElement()
        if not request.stanzaID:
            element.addUniqueId()
            request.stanzaID = element["id"]
        ident = element["id"]
        d = defer.Deferred()
        timeout = getattr(request, "timeout", None) or REQUEST_TIMEOUT

        def expire() -> None:
            if self._pending.pop(ident, None) is not None:
                d.errback(xmlstream.TimeoutError("IQ timed out"))

        self._pending[ident] = (d, self.clock.callLater(timeout, expire))
        self.send(element)
        return d

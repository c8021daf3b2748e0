"""The router: sessions, the filter chain, and the delivery rules.

One function, :meth:`Router.route`, takes every stanza a local client sends
(RFC 6120 §10, RFC 6121 §8).  Plugins that emit stanzas on behalf of users
(presence broadcast, probe answers) use :meth:`Router.deliver`, which runs
the same filter chain, so a filter such as the blocking command sees every
path; stanzas from the server itself (pushes, replies) use
:meth:`Router.send_from_server` and bypass it.

Destinations on other servers go, after the same filter chain, to the s2s
service (:attr:`Router.remote`, see :mod:`xmppd.s2s.service`); stanzas from
other servers come in through :meth:`Router.deliver` like plugin-emitted
ones, so every filter runs on them too.

The hot path is kept free of I/O and configuration look-ups: sessions are
dicts keyed by bare JID and resource, filters are a plain list, IQ handlers a
dict keyed by ``(type, namespace, element)``.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.words.xish import domish

from xmppd import jid as jidlib
from xmppd.jid import JID
from xmppd.plugin import Request
from xmppd.serial import Serial
from xmppd.stanzas import NS_CLIENT, StanzaError, error_reply, iq_result, serialize
from xmppd.storage import StoreError
from xmppd.storefail import stanza_error as store_failure
from xmppd.logfilter import log_observer

log = Logger(observer=log_observer)

DROP = object()
"""A filter verdict: discard silently."""


class Session(Protocol):
    """What the router needs of a client session (the c2s stream)."""

    jid: JID
    priority: int
    available: bool

    def send(self, element: domish.Element) -> None: ...
    def send_bytes(self, data: bytes) -> None: ...

    # Flow control, for bulk senders (offline delivery): False while the
    # client does not keep up; when_drained calls back once it has.
    writable: bool

    def when_drained(self, callback: Callable[[], None]) -> None: ...


class StanzaFilter(Protocol):
    """One link of the filter chain.

    ``check`` returns None to pass, :data:`DROP` to discard silently, or a
    :class:`StanzaError` to bounce (never for presence and error stanzas:
    those are dropped instead).  A filter that needs state it has not
    loaded yet (a user without a session, on a networked store) returns a
    Deferred that fires once it is loaded: the stanza then goes through the
    whole chain again.  ``sender`` is the full JID of the
    originating entity, ``to`` the parsed destination.
    ``name`` labels the filter's refusals on the metrics page.
    """

    name: str

    def check(self, stanza: domish.Element, sender: JID, to: JID) -> Any: ...


class ComponentRoute(Protocol):
    """A component domain (xmppd.components): ``send`` delivers a stanza *to* the component."""

    online: bool  # False while an external component is not connected
    public: bool  # reachable from other servers (s2s); False: local users only

    def send(self, stanza: domish.Element) -> None: ...


class Router:
    def __init__(self, hosts: tuple[str, ...]) -> None:
        self.hosts = frozenset(hosts)
        # Domain -> component; routed like a local domain.  A served host in
        # it gets the IQs to the bare host that no plugin claims.
        self.components: dict[str, ComponentRoute] = {}
        self.sessions: dict[str, dict[str, Session]] = {}
        self.filters: list[StanzaFilter] = []
        self.iq_handlers: dict[tuple[str, str, str], Callable] = {}
        # Hooks set by plugins; defaults implement RFC 6120 behaviour alone.
        self.presence_handler: Callable | None = None  # (stanza, sender, to, session)
        # Inbound presence to a local account, after the filters: (stanza, sender, to)
        self.presence_inbound: Callable | None = None
        # (stanza, to) -> bool stored, or a Deferred of it (fires once stored)
        self.offline_handler: Callable | None = None
        self.user_exists: Callable[[JID], defer.Deferred] = lambda j: defer.succeed(False)
        # Messages for one offline user go through the account look-up and
        # offline storage one after the other: with a networked store the
        # look-ups answer out of order, and messages must not be reordered.
        self._offline_order = Serial()
        self.on_bound: list[Callable[[Session], None]] = []
        self.on_closed: list[Callable[[Session], None]] = []
        # Run after every on_closed hook: drop per-user state that those
        # hooks still read (the unavailable presence broadcast reads the
        # roster and goes through the blocking filter; dropped first, each
        # logout read them back from the store).
        self.on_released: list[Callable[[Session], None]] = []
        # IQ results/errors addressed to a served host (answers to requests
        # the server sent, see xmppd.iqtracker): (stanza, sender) -> bool.
        self.iq_responses: Callable[[domish.Element, JID], bool] | None = None
        # Destinations on other servers: (stanza, to), set by the s2s service
        # (xmppd.s2s.service); None: no federation, they bounce.
        self.remote: Callable[[domish.Element, JID], None] | None = None
        # Read by the metrics page (xmppd.metrics); kept up to date at bind,
        # unbind and refusal, never per delivered stanza.
        self.session_counts: dict[str, int] = dict.fromkeys(self.hosts, 0)
        # (filter name, "bounced" | "dropped") -> stanzas the filter refused
        self.refusals: dict[tuple[str, str], int] = {}
        # (message, bytes) of the last message delivered to a bare JID.
        self.last_serialized: tuple = (None, b"")
        # (message, sender's bare JID, id prefix, seq) of the last message
        # archived for its sender (xmppd.handlers.mam): that archive id goes
        # into the sender's own carbon copy only (xmppd.handlers.carbons).
        self.sent_stanza_id: tuple = (None, "", "", 0)

    # -- session registry -------------------------------------------------

    def bind(self, session: Session) -> Session | None:
        """Register ``session``; return the session it replaces, if any."""
        resources = self.sessions.setdefault(session.jid.bare, {})
        old = resources.get(session.jid.resource)
        resources[session.jid.resource] = session
        if old is None or getattr(old, "remote", False):  # a replaced local one: same count
            host = session.jid.host
            self.session_counts[host] = self.session_counts.get(host, 0) + 1
        for hook in self.on_bound:
            hook(session)
        return old

    def unbind(self, session: Session) -> None:
        resources = self.sessions.get(session.jid.bare)
        if not resources or resources.get(session.jid.resource) is not session:
            return
        del resources[session.jid.resource]
        if not resources:
            del self.sessions[session.jid.bare]
        self.session_counts[session.jid.host] -= 1
        for hooks in (self.on_closed, self.on_released):
            for hook in hooks:
                try:
                    hook(session)
                except Exception:
                    log.failure("session close hook failed for {jid}", jid=session.jid.full)

    def resources_of(self, bare: str) -> dict[str, Session]:
        return self.sessions.get(bare, {})

    def is_local(self, to: JID) -> bool:
        """Delivered by this server: a served host or a component domain."""
        return to.host in self.hosts or to.host in self.components

    # -- entry points -----------------------------------------------------

    def route(self, stanza: domish.Element, session: Session) -> None:
        """A stanza from a local client; ``from`` has been stamped already."""
        sender = session.jid
        to_attr = stanza.getAttribute("to")
        if to_attr is None:
            to = None
        else:
            try:
                to = jidlib.parse(to_attr)
            except jidlib.InvalidJID:
                self.bounce(stanza, StanzaError("jid-malformed"), session)
                return
        name = stanza.name
        if name == "iq":
            self._route_iq(stanza, sender, to, session)
        elif name == "message":
            if to is None:
                to = sender.bare_jid()
            self.deliver(stanza, sender, to, session)
        elif name == "presence":
            if to is None:
                self._track_availability(stanza, session)
            if self.presence_handler is not None:
                self.presence_handler(stanza, sender, to, session)
            elif to is not None:
                self.deliver(stanza, sender, to, session)

    @staticmethod
    def _track_availability(stanza, session) -> None:
        """Broadcast presence sets the session's availability and priority."""
        kind = stanza.getAttribute("type")
        if kind is None:
            session.available = True
            priority = 0
            for child in stanza.elements(NS_CLIENT, "priority"):
                try:
                    priority = max(-128, min(127, int(str(child))))
                except ValueError:
                    priority = 0
            session.priority = priority
        elif kind == "unavailable":
            session.available = False

    def deliver(
        self, stanza: domish.Element, sender: JID, to: JID, session: Session | None = None
    ) -> None:
        """Run the filter chain, then deliver a message/presence/IQ to ``to``."""
        for f in self.filters:
            verdict = f.check(stanza, sender, to)
            if verdict is not None:
                if isinstance(verdict, defer.Deferred):
                    verdict.addCallbacks(lambda _: self.deliver(stanza, sender, to, session),
                                         self._filter_failed, errbackArgs=(stanza, session))
                    return
                if verdict is not DROP and stanza.name != "presence":
                    key = (getattr(f, "name", type(f).__name__), "bounced")
                    self.bounce(stanza, verdict, session)
                else:
                    key = (getattr(f, "name", type(f).__name__), "dropped")
                self.refusals[key] = self.refusals.get(key, 0) + 1
                return
        self.deliver_unfiltered(stanza, sender, to, session)

    def deliver_unfiltered(
        self, stanza: domish.Element, sender: JID, to: JID, session: Session | None = None
    ) -> None:
        """Delivery without the filter chain: for stanzas a filter itself emits."""
        if to.host not in self.hosts:
            component = self.components.get(to.host)
            if component is not None:
                self._to_component(component, stanza, session)
            elif self.remote is not None:
                self.remote(stanza, to)  # the filters ran; s2s bounces what cannot leave
            else:
                self.bounce(stanza, StanzaError("remote-server-not-found"), session)
            return
        if to.user is None:
            self._to_server(stanza, sender, to, session)
        elif to.resource is None:
            self._to_bare(stanza, sender, to, session)
        else:
            self._to_full(stanza, sender, to, session)

    def deliver_quietly(self, stanza: domish.Element, sender: JID, to: JID) -> bool:
        """Filter chain, then delivery; a refusal is dropped, never bounced.

        For stanzas the server emits on a user's behalf where nobody should
        hear of a refusal (PEP notifications: the publisher must not learn
        that a contact blocked them).  Returns False when a filter refused.
        """
        for f in self.filters:
            verdict = f.check(stanza, sender, to)
            if isinstance(verdict, defer.Deferred):  # loading: decided when it fires
                verdict.addCallbacks(lambda _: self.deliver_quietly(stanza, sender, to),
                                     self._filter_failed, errbackArgs=(stanza, None))
                return True
            if verdict is not None:
                key = (getattr(f, "name", type(f).__name__), "dropped")
                self.refusals[key] = self.refusals.get(key, 0) + 1
                return False
        self.deliver_unfiltered(stanza, sender, to)
        return True

    def _filter_failed(self, failure, stanza: domish.Element, session) -> None:
        """A filter could not load what it needs: refuse, never pass unchecked."""
        if failure.check(StoreError):
            if stanza.name != "presence":
                self.bounce(stanza, store_failure(failure.value), session)
            return
        log.failure("filter failed", failure)

    def send_from_server(self, stanza: domish.Element, to: JID) -> None:
        """Deliver a server-generated stanza to a full or bare JID (components and
        remote ones too)."""
        if to.host not in self.hosts:
            component = self.components.get(to.host)
            if component is not None:
                if component.online:
                    component.send(stanza)
            elif self.remote is not None:
                self.remote(stanza, to)
            return
        if to.resource is not None:
            target = self.sessions.get(to.bare, {}).get(to.resource)
            if target is not None:
                target.send(stanza)
            return
        data = serialize(stanza)
        for target in self.sessions.get(to.bare, {}).values():
            target.send_bytes(data)

    def bounce(self, stanza: domish.Element, error: StanzaError, session: Session | None) -> None:
        """Send the error reply for ``stanza`` back to its sender."""
        reply = error_reply(stanza, error)
        if reply is None:
            return
        if session is not None:
            session.send(reply)
            return
        sender = stanza.getAttribute("from")
        if sender:
            try:
                self.send_from_server(reply, jidlib.parse(sender))
            except jidlib.InvalidJID:
                pass

    # -- delivery rules ---------------------------------------------------

    def _route_iq(self, stanza, sender: JID, to: JID | None, session) -> None:
        kind = stanza.getAttribute("type")
        if kind not in ("get", "set", "result", "error"):
            self.bounce(stanza, StanzaError("bad-request", text="bad IQ type"), session)
            return
        if to is None or (to.resource is None and to.bare == sender.bare):
            if kind in ("get", "set"):
                self.dispatch_iq(stanza, sender, None, session)
            return
        self.deliver(stanza, sender, to, session)

    def dispatch_iq(self, stanza, sender: JID, to: JID | None, session) -> None:
        """Hand an IQ get/set for the server or an account to its handler."""
        payload = None
        for child in stanza.children:
            if isinstance(child, domish.Element):
                if payload is not None:
                    payload = None
                    break
                payload = child
        if payload is None:
            # RFC 6120 §8.2.3: exactly one payload child.
            self.bounce(stanza, StanzaError("bad-request"), session)
            return
        handler = self.iq_handlers.get((stanza["type"], payload.uri, payload.name))
        if handler is None:
            # Handlers added to a served host take what no plugin claims.
            extension = self.components.get(to.host) if to is not None and to.user is None else None
            if extension is not None:
                extension.send(stanza)
            else:
                self.bounce(stanza, StanzaError("service-unavailable"), session)
            return
        request = Request(stanza, sender, to, session)
        d = defer.maybeDeferred(handler, request)
        d.addCallbacks(self._iq_answered, self._iq_failed, (request,), None, (request,), None)

    def _iq_answered(self, result, request: Request) -> None:
        if result is False:
            return  # the handler answered by itself
        if isinstance(result, domish.Element) and result.name == "iq":
            reply = result
        else:
            reply = iq_result(request.stanza, result)
        self._reply(reply, request)

    def _iq_failed(self, failure, request: Request) -> None:
        if failure.check(StanzaError):
            error = failure.value
        elif failure.check(StoreError):
            error = store_failure(failure.value)  # one log line, no traceback
        else:
            log.failure("IQ handler failed for {sender}", failure, sender=request.sender.full)
            error = StanzaError("internal-server-error")
        reply = error_reply(request.stanza, error)
        if reply is not None:
            self._reply(reply, request)

    def _reply(self, reply: domish.Element, request: Request) -> None:
        if request.session is not None:
            request.session.send(reply)
        else:
            self.send_from_server(reply, request.sender)

    def _to_component(self, component: ComponentRoute, stanza, session) -> None:
        if component.online:
            component.send(stanza)
        elif stanza.name != "presence":
            # An external component that is not connected: nothing is queued.
            self.bounce(stanza, StanzaError("service-unavailable"), session)

    def _to_server(self, stanza, sender: JID, to: JID, session) -> None:
        if stanza.name == "iq":
            if stanza.getAttribute("type") in ("get", "set"):
                self.dispatch_iq(stanza, sender, to, session)
            elif self.iq_responses is not None:
                self.iq_responses(stanza, sender)
        elif stanza.name == "message" and stanza.getAttribute("type") != "error":
            # Nothing in the server consumes messages yet (RFC 6120 §10.5.3.1
            # allows either): bounce so the sender learns it went nowhere.
            self.bounce(stanza, StanzaError("service-unavailable"), session)

    def _to_bare(self, stanza, sender: JID, to: JID, session) -> None:
        name = stanza.name
        if name == "iq":
            if stanza.getAttribute("type") in ("get", "set"):
                self.dispatch_iq(stanza, sender, to, session)
            return
        resources = self.sessions.get(to.bare)
        if name == "message":
            self._message_to_bare(stanza, to, resources, session)
        elif name == "presence":
            if self.presence_inbound is not None:
                self.presence_inbound(stanza, sender, to)
            elif resources:
                # Directed presence to a bare JID: every available resource.
                data = serialize(stanza)
                for target in resources.values():
                    if target.available:
                        target.send_bytes(data)

    def _message_to_bare(self, stanza, to: JID, resources, session) -> None:
        kind = stanza.getAttribute("type", "normal")
        if resources:
            if kind == "groupchat":
                self.bounce(stanza, StanzaError("service-unavailable"), session)
                return
            best = -129
            targets = []
            for target in resources.values():
                if not target.available or target.priority < 0:
                    continue
                if kind == "headline":
                    targets.append(target)
                elif target.priority > best:
                    best, targets = target.priority, [target]
                elif target.priority == best:
                    targets.append(target)
            if targets:
                data = serialize(stanza)
                # For a wrapper of deliver_unfiltered that keeps the message
                # (the archive): the bytes just sent, not made a second time.
                self.last_serialized = (stanza, data)
                for target in targets:
                    target.send_bytes(data)
                return
        self._message_offline(stanza, to, kind, session)

    def _message_offline(self, stanza, to: JID, kind: str, session) -> None:
        """No available resource: store, or bounce (RFC 6121 §8.5.2.2)."""
        if kind == "error":
            return

        def exists(known: bool) -> None:
            if not known:
                self.bounce(stanza, StanzaError("service-unavailable"), session)
            elif kind in ("normal", "chat") and self.offline_handler is not None:
                def failed(failure) -> None:
                    failure.trap(StoreError)
                    # Never a silent drop: the sender learns it was not kept.
                    self.bounce(stanza, store_failure(failure.value), session)

                def done(stored: bool) -> None:
                    if not stored:
                        self.bounce(stanza, StanzaError("service-unavailable"), session)

                return defer.maybeDeferred(self.offline_handler, stanza, to).addCallbacks(
                    done, failed)
            elif kind != "headline":
                self.bounce(stanza, StanzaError("service-unavailable"), session)

        self._offline_order.run(to.bare, lambda: self.user_exists(to).addCallback(exists)).addErrback(
            lambda f: log.failure("offline delivery failed", f)
        )

    def undelivered(self, stanza: domish.Element, to: JID) -> None:
        """A message a session accepted for ``to`` (bare) but never sent: the session closed.

        It takes the offline path as if no resource had been available
        (normal/chat stored, over quota bounced to its sender).  The filter
        chain is not run again: it ran when the message was routed.  Other
        message types are ephemeral and dropped.
        """
        kind = stanza.getAttribute("type", "normal")
        if kind in ("normal", "chat"):
            self._message_offline(stanza, to, kind, None)

    def _to_full(self, stanza, sender: JID, to: JID, session) -> None:
        name = stanza.name
        if name == "presence" and self.presence_inbound is not None:
            self.presence_inbound(stanza, sender, to)
            return
        target = self.sessions.get(to.bare, {}).get(to.resource)
        if target is not None:
            target.send(stanza)
            return
        if name == "message":
            kind = stanza.getAttribute("type", "normal")
            if kind in ("normal", "chat"):
                self._to_bare(stanza, sender, to.bare_jid(), session)
            elif kind == "groupchat":
                self.bounce(stanza, StanzaError("service-unavailable"), session)
        elif name == "iq":
            if stanza.getAttribute("type") in ("get", "set"):
                self.bounce(stanza, StanzaError("service-unavailable"), session)
        # presence to an absent full JID: silently ignored (RFC 6121 §8.5.3.2.3)

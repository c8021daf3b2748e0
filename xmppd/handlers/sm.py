"""XEP-0198 Stream Management: acknowledgements and session resumption.

Enabled as ``urn:xmpp:sm:3`` in ``[sm] plugins``; settings in
``[stream-management]`` (read once at start-up).  The server offers
``<sm xmlns='urn:xmpp:sm:3'/>`` among the features after authentication.

*Enabling* (``<enable/>``, after resource binding; before it the answer is
``<failed><unexpected-request/></failed>``) gives the session two things:

* an inbound counter: the parser's element callback is swapped for one that
  adds one per stanza before the usual handling; ``<r/>`` is answered with
  ``<a h='...'/>``;
* an output layer (:meth:`C2SStream.set_output_layer`) that keeps the bytes
  of every stanza sent in an :class:`~xmppd.smstate.SMState` queue until the
  client acknowledges them, and asks for acks (``<r/>``) every
  ``request_every`` stanzas (in the same write as the stanza) and, for
  stanzas still unacknowledged, between one and two ``request_interval``
  after they were sent (one timer for all sessions).  More than ``max_unacked`` stanzas or
  ``max_unacked_bytes`` bytes unacknowledged ends the stream with
  ``policy-violation`` (the session is then not resumable).

Sessions without ``<enable/>`` keep their class's methods: they pay nothing.

*Resumption* (``resume='true'``, ``[stream-management] resume_timeout`` > 0,
or the client's shorter ``max``): when the connection of such a session
ends other than by ``</stream:stream>``, a queue limit or a server stop,
the session is *detached*: it stays bound in the router, counts as online,
keeps receiving (into its queue), and its presence stays available.  A new
connection that has done TLS and SASL **as the same account** may
``<resume previd h/>`` it: the new stream takes the session over (same full
JID, roster state, carbons...), acknowledges up to ``h``, answers
``<resumed/>`` and re-sends the rest of the queue in order.  ``previd`` of
another account, unknown or expired gets ``<failed><item-not-found/>
</failed>`` (with ``h`` for the account's own recently expired sessions).
The old connection, if the server has not noticed its end yet, is aborted
without ending the session.

*Expiry*: a detached session not resumed within ``resume_timeout`` (or a
non-resumable SM session when it ends) is unbound as any other session
(unavailable presence goes out now), and the messages it never got
acknowledged take the router's offline path (XEP-0198 §4: treat them as
undelivered): stored and delivered at the next login, never lost, and
never bounced to a sender as failed when they may have been delivered
(only the offline quota can still bounce them).
"""
from __future__ import annotations

import base64
import os
from collections import OrderedDict

from twisted.internet import task
from twisted.logger import Logger
from twisted.words.xish import domish

from xmppd.backlog import OutboundBacklog
from xmppd.handlers.csi import flush_held
from xmppd.logfilter import literal
from xmppd.plugin import Plugin
from xmppd.smstate import MASK, HandledCountTooHigh, SMState
from xmppd.stanzas import NS_CLIENT
from xmppd.stream import AUTHENTICATED, BOUND, CLOSED

log = Logger()

NS_SM = "urn:xmpp:sm:3"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_CARBONS = "urn:xmpp:carbons:2"
_REQUEST = f"<r xmlns='{NS_SM}'/>".encode()
#: Recently expired sessions remembered for <failed h='...'/> (bounded).
MAX_EXPIRED_MEMO = 1000


def _failed(condition: str, h: int | None = None) -> bytes:
    attr = f" h='{h}'" if h is not None else ""
    return (f"<failed xmlns='{NS_SM}'{attr}><{condition} xmlns='{NS_STANZAS}'/></failed>"
            ).encode()


def _raw(stream, data: bytes) -> None:
    """Write ``data`` with the stream's flow control but outside every output layer."""
    type(stream).send_bytes(stream, data)


class SMLayer:
    """The output layer of an SM session: queue, count, ask for acks."""

    order = 10  # nearest the transport: what CSI holds is not sent yet
    __slots__ = ("plugin", "stream", "state", "due", "detached", "detached_at", "taken_over",
                 "expiry", "overflowed", "resume_timeout")

    def __init__(self, plugin: "StreamManagementPlugin", stream, state: SMState) -> None:
        self.plugin = plugin
        self.stream = stream
        self.state = state
        self.due = False  # listed for the plugin's next interval tick
        self.detached = False
        self.detached_at = 0.0
        self.taken_over = False
        self.expiry = None
        self.overflowed = False
        self.resume_timeout = plugin.resume_timeout

    def wrap(self, inner):
        """Per stanza: keep its bytes, count, and every ``request_every`` stanzas
        append ``<r/>`` to the same write (one TLS record, not two)."""
        state = self.state
        queue = state.queue
        append = queue.append
        max_unacked, max_bytes = state.max_unacked, state.max_bytes
        every = self.plugin.request_every
        since = 0

        def send_bytes(data: bytes) -> None:
            nonlocal since
            append(data)
            size = state.size = state.size + len(data)
            since += 1
            if since >= every:
                since = 0
                if not self.detached:
                    data += _REQUEST
            elif not self.due:
                self.due = True
                self.plugin.due.add(self)
            inner(data)
            if (len(queue) > max_unacked or size > max_bytes) and not self.overflowed:
                self.overflowed = True
                self.plugin.server.clock.callLater(0, self._overflow)

        return send_bytes

    def request(self) -> None:
        if not self.detached and self.stream.phase == BOUND:
            _raw(self.stream, _REQUEST)

    def cancel_timers(self) -> None:
        if self.expiry is not None and self.expiry.active():
            self.expiry.cancel()
        self.expiry = None

    def _overflow(self) -> None:
        state = self.state
        state.resumable = False  # a client that does not ack does not get to resume
        if self.detached:
            self.plugin.expire(self.stream)
            return
        stream = self.stream
        if stream.phase != BOUND:
            return
        log.warn("c2s {jid} from {peer}: {n} stanzas ({size} bytes) unacknowledged"
                 " (max_unacked = {limit}, max_unacked_bytes = {blimit}), closing",
                 jid=stream.jid.full, peer=stream.peer, n=len(state.queue), size=state.size,
                 limit=state.max_unacked, blimit=state.max_bytes)
        stream.stream_error("policy-violation", "too many unacknowledged stanzas: ack them")


class StreamManagementPlugin(Plugin):
    name = "urn:xmpp:sm:3"

    def setup(self) -> None:
        sec = self.server.config.section("stream-management")
        self.resume_timeout = sec.number("resume_timeout", 300.0, minimum=0)
        self.max_unacked = sec.int("max_unacked", 500, minimum=1)
        self.max_unacked_bytes = sec.int("max_unacked_bytes", 1048576, minimum=1024)
        self.request_every = sec.int("request_every", 25, minimum=1)
        self.request_interval = sec.number("request_interval", 30.0, minimum=1)
        self.max_detached = sec.int("max_detached_per_account", 10, minimum=1)
        sec.reject_unknown()
        # previd -> the stream now holding the session (attached or detached)
        self.sessions: dict[str, object] = {}
        # previd -> (account, h) of recently expired sessions
        self.expired: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self.stopping = False
        self._trigger = None
        # Layers that sent since the last tick / during the tick before: one
        # timer for all sessions asks those still unacknowledged for an ack
        # (between one and two request_interval after they sent), instead of
        # a timer per session.
        self.due: set[SMLayer] = set()
        self._previous: set[SMLayer] = set()
        self._ticker = None
        self.server.c2s_features.append(self._feature)
        elements = self.server.c2s_elements
        elements[(NS_SM, "enable")] = self.on_enable
        elements[(NS_SM, "resume")] = self.on_resume
        elements[(NS_SM, "r")] = self.on_request
        elements[(NS_SM, "a")] = self.on_ack

    @staticmethod
    def _feature(stream) -> domish.Element:
        return domish.Element((NS_SM, "sm"))

    # -- enabling and counting ------------------------------------------------------

    def on_enable(self, stream, el: domish.Element) -> None:
        if stream.phase != BOUND or stream.state.get("sm") is not None:
            return _raw(stream, _failed("unexpected-request")) if stream.phase == BOUND \
                else stream.transport.write(_failed("unexpected-request"))
        resume = el.getAttribute("resume") in ("true", "1") and self.resume_timeout > 0
        state = SMState(base64.urlsafe_b64encode(os.urandom(18)).decode(), resume,
                        self.max_unacked, self.max_unacked_bytes)
        attrs = ""
        timeout = self.resume_timeout
        if resume:
            wanted = _parse_h(el, "max")  # the client's preferred maximum, if shorter
            if wanted:
                timeout = min(timeout, wanted)
            self.sessions[state.id] = stream
            attrs = f" id='{state.id}' resume='true' max='{max(1, int(timeout))}'"
        if self._trigger is None:
            # Registered by the first session that needs them, so the throw-away
            # servers of `xmppctl check` and reloads never register any.
            trigger = getattr(self.server.clock, "addSystemEventTrigger", None)
            self._trigger = trigger("before", "shutdown", self.shutdown) if trigger else False
            self._ticker = task.LoopingCall(self._tick)
            self._ticker.clock = self.server.clock
            self._ticker.start(self.request_interval, now=False)
        _raw(stream, f"<enabled xmlns='{NS_SM}'{attrs}/>".encode())
        layer = SMLayer(self, stream, state)
        layer.resume_timeout = timeout
        self._attach(stream, layer)
        log.debug("c2s {jid}: stream management enabled (resumable: {r})",
                  jid=stream.jid.full, r=resume)

    def _attach(self, stream, layer: SMLayer) -> None:
        stream.state["sm"] = layer
        stream.set_output_layer("sm", layer)
        state = layer.state
        plain = stream.parser._on_element

        def element(el: domish.Element) -> None:
            if el.uri == NS_CLIENT:
                state.inbound += 1
            plain(el)

        stream.parser._on_element = element

    def on_request(self, stream, el: domish.Element) -> None:
        layer = stream.state.get("sm") if stream.phase == BOUND else None
        if layer is None:
            return stream.stream_error("unsupported-stanza-type", "stream management is not enabled")
        _raw(stream, f"<a xmlns='{NS_SM}' h='{layer.state.h}'/>".encode())

    def on_ack(self, stream, el: domish.Element) -> None:
        layer = stream.state.get("sm") if stream.phase == BOUND else None
        if layer is None:
            return stream.stream_error("unsupported-stanza-type", "stream management is not enabled")
        h = _parse_h(el)
        if h is None:
            return stream.stream_error("bad-format", "h must be an integer from 0 to 2**32-1")
        try:
            layer.state.ack(h)
        except HandledCountTooHigh as e:
            self._count_too_high(stream, e)

    @staticmethod
    def _count_too_high(stream, e: HandledCountTooHigh) -> None:
        log.info("c2s {jid}: {error}", jid=stream.jid.full if stream.jid else stream.peer, error=e)
        if stream.phase == CLOSED:
            return
        if not stream.header_sent:
            stream._send_header()
        stream.transport.write(
            ("<stream:error><undefined-condition xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
             f"<handled-count-too-high xmlns='{NS_SM}' h='{e.h}' send-count='{e.sent}'/>"
             "</stream:error></stream:stream>").encode())
        stream._close()

    # -- end of a connection: detach or expire -------------------------------------

    def session_ended(self, stream) -> None:
        """Called by C2SStream._end_session for a session with SM enabled."""
        layer: SMLayer = stream.state["sm"]
        flush_held(stream)  # what CSI held goes to the queue, in order
        stream.take_backlog()  # never written, but queued: the queue has it all
        if layer.taken_over:
            return  # resumed on another connection: the session lives on there
        if layer.detached:
            return
        if (layer.state.resumable and not layer.overflowed and not self.stopping
                and not stream.closed_by_peer):  # a clean close ends the session (§5)
            layer.detached = True
            layer.detached_at = self.server.clock.seconds()
            layer.expiry = self.server.clock.callLater(layer.resume_timeout, self.expire, stream)
            # Not now: this may run inside a loop over the sessions (a conflict).
            self.server.clock.callLater(0, self._limit_detached, stream.jid.bare)
            log.info("c2s {jid} from {peer}: connection lost; session kept {t:g}s for resumption"
                     " ({n} unacknowledged)", jid=stream.jid.full, peer=stream.peer,
                     t=layer.resume_timeout, n=len(layer.state.queue))
            return
        self.expire(stream)

    def _limit_detached(self, bare: str) -> None:
        """At most ``max_detached_per_account`` detached sessions per account: the
        oldest end first (a client reconnecting in a loop cannot pile them up)."""
        detached = [s for s in self.server.router.resources_of(bare).values()
                    if getattr(s.state.get("sm"), "detached", False)]
        excess = len(detached) - self.max_detached
        if excess > 0:
            detached.sort(key=lambda s: s.state["sm"].detached_at)
            for stream in detached[:excess]:
                log.info("c2s {jid}: more than {n} detached sessions for the account, the"
                         " oldest ends now", jid=stream.jid.full, n=self.max_detached)
                self.expire(stream)

    def expire(self, stream) -> None:
        """The session is over for good: unbind it; unacked messages go offline."""
        layer: SMLayer = stream.state.get("sm")
        if layer is None or layer.taken_over:
            return
        layer.cancel_timers()
        state = layer.state
        if self.sessions.get(state.id) is stream:
            del self.sessions[state.id]
            if state.resumable:
                self.expired[state.id] = (stream.jid.bare, state.h)
                while len(self.expired) > MAX_EXPIRED_MEMO:
                    self.expired.popitem(last=False)
        router = self.server.router
        jid, peer, how = stream.jid.full, stream.peer, " (not resumed in time)" if layer.detached else ""
        log.info(literal(f"c2s {jid} from {peer}: session ended{how}"), jid=jid, peer=peer, how=how)
        router.unbind(stream)  # presence goes unavailable now, not at the disconnection
        stream.state.pop("sm", None)
        stream._bookkeeping("record_logout")
        backlog = OutboundBacklog(0)
        for data in state.take():
            backlog.chunks.append(data)
        messages = [m for m in backlog.messages() if not _is_carbon(m)]
        to = stream.jid.bare_jid()
        for stanza in messages:
            router.undelivered(stanza, to)
        if messages:
            log.info("c2s {jid}: {n} unacknowledged messages take the offline path",
                     jid=stream.jid.full, n=len(messages))

    def _tick(self) -> None:
        """Ask for an ack where stanzas have waited a whole interval unacknowledged."""
        previous, self._previous, self.due = self._previous, self.due, set()
        for layer in previous:
            layer.due = False
            if layer.state.queue and not layer.taken_over:
                layer.request()  # (not when detached or closed)

    def shutdown(self) -> None:
        """The server stops: no session will be resumed, so none may keep messages.

        Detached sessions end now; attached ones end (not detach) when the
        reactor drops their connections; either way their unacknowledged
        messages are in offline storage before the store closes.
        """
        self.stopping = True
        for stream in list(self.sessions.values()):
            layer = stream.state.get("sm")
            if layer is not None and layer.detached:
                self.expire(stream)

    # -- resumption ------------------------------------------------------------------

    def on_resume(self, new, el: domish.Element) -> None:
        if new.phase != AUTHENTICATED:
            return _raw(new, _failed("unexpected-request")) if new.phase == BOUND \
                else new.transport.write(_failed("unexpected-request"))
        previd = el.getAttribute("previd") or ""
        h = _parse_h(el)
        if h is None:
            return new.stream_error("bad-format", "h must be an integer from 0 to 2**32-1")
        account = f"{new.username}@{new.host}"
        old = self.sessions.get(previd)
        layer = old.state.get("sm") if old is not None else None
        router = self.server.router
        if (layer is None or old.jid.bare != account
                or router.resources_of(old.jid.bare).get(old.jid.resource) is not old):
            memo = self.expired.get(previd)
            known = memo is not None and memo[0] == account
            log.info("c2s {peer}: {account} could not resume {previd}: {why}", peer=new.peer,
                     account=account, previd=previd[:12],
                     why="expired" if known else "unknown session")
            new.transport.write(_failed("item-not-found", memo[1] if known else None))
            return
        state = layer.state
        try:
            state.ack(h)
        except HandledCountTooHigh as e:
            return self._count_too_high(new, e)
        # Take the session over from the old connection.
        layer.taken_over = True
        layer.cancel_timers()
        if old.phase != CLOSED:
            old.abort()  # its end is not the session's (taken_over)
        session_state = old.state
        old.state = {}
        session_state.pop("csi", None)  # a new connection starts active
        session_state["output_layers"] = {}
        session_state.pop("sm", None)
        new.state = session_state
        new.jid = old.jid
        new.available, new.priority = old.available, old.priority
        new.phase = BOUND
        new.bound_at = getattr(old, "bound_at", self.server.clock.seconds())
        new.cancel_auth_timeout()
        new.start_producing()
        router.sessions[old.jid.bare][old.jid.resource] = new
        self.sessions[previd] = new
        _raw(new, f"<resumed xmlns='{NS_SM}' previd='{previd}' h='{state.h}'/>".encode())
        for data in state.queue:
            _raw(new, data)
        fresh = SMLayer(self, new, state)
        fresh.resume_timeout = layer.resume_timeout
        self._attach(new, fresh)
        if state.queue:
            new.state["sm"].request()
        log.info("c2s {jid} from {peer}: session resumed, {n} stanzas sent again",
                 jid=new.jid.full, peer=new.peer, n=len(state.queue))


def _parse_h(el: domish.Element, name: str = "h") -> int | None:
    """A 32-bit unsigned attribute (``h``, ``max``), or None when absent or not one."""
    text = el.getAttribute(name)
    if text is None or not (text.isascii() and text.isdigit()) or len(text) > 10:
        return None
    h = int(text)
    return h if h <= MASK else None


def _is_carbon(stanza: domish.Element) -> bool:
    """A carbon copy is the user's own conversation elsewhere: not re-routed."""
    return any(isinstance(c, domish.Element) and c.uri == NS_CARBONS for c in stanza.children)

"""Messages between nodes over Redis pub/sub.

Each node subscribes to its own channel (stanzas for its sessions, requests
to close one) and to the cluster channel (registry changes, cache
invalidations, node departures).

A stanza for a session is ``s<full JID>\n<stanza>``: the bytes the sending
node would have written to a socket, serialised by xmppd from an element it
parsed under its c2s limits and ran through the filters.  The receiving
node writes them as they came, through the session's output layers
(``send_bytes``, the router's own path), without parsing them again: a
second parse cost more than the rest of the cross-node path together
(bench/RESULTS.md, cluster phase), and protects against nothing but a
forger on Redis, who could as well register sessions or close any (Redis
is inside the trust boundary: docs/cluster.rst).  What is checked: the
length (the pub/sub reader's bound), that it is one of the three stanzas,
and that its session is here.  The fallback path (below) does parse.
Everything else is a JSON header line (events, close requests).

Why pub/sub and not streams: a stanza for a session is only useful while
that session exists, pub/sub costs Redis one fan-out and no storage, and
PUBLISH answers how many subscribers got the message.  A 0 (the node died
or lost Redis) sends the stanza down the path it would take with no
session: messages to offline storage, IQ requests bounced.  What pub/sub
cannot cover is a node that received a stanza and died before writing it to
the client; a stream would not help there either (the session died with
the node), and XEP-0198 is the client's answer to that.  See docs/cluster.rst.
"""
from __future__ import annotations

import json
from typing import Callable

from twisted.logger import Logger

from xmppd import jid as jidlib
from xmppd.logfilter import log_observer
from xmppd.stanzas import StanzaError
from xmppd.xmlparser import Limits, XMLStreamError, parse_fragment

log = Logger(observer=log_observer)

PREFIX = "xmppd:"
ALL = PREFIX + "all"
NS_CARBONS = "urn:xmpp:carbons:2"


def node_channel(node: str) -> str:
    return f"{PREFIX}n:{node}"


def encode(header: dict, body: bytes = b"") -> bytes:
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + body


#: What a stanza on the bus may start with.
STANZA_STARTS = (b"<message ", b"<message>", b"<presence ", b"<presence>", b"<presence/",
                 b"<iq ")


def encode_stanza(to: str, data: bytes) -> bytes:
    return b"s" + to.encode() + b"\n" + data


def decode(payload: bytes) -> tuple[dict, bytes]:
    head, _, body = payload.partition(b"\n")
    return json.loads(head), body


class Bus:
    """Sends stanzas and events; hands what arrives to ``on_event``."""

    def __init__(self, node: str, link, router, limits: Limits,
                 on_event: Callable[[dict], None]) -> None:
        self.node = node
        self.link = link
        self.router = router
        self.limits = limits
        self.on_event = on_event
        self.channel = node_channel(node)
        self._channels: dict[str, bytes] = {}  # node -> its channel, encoded once

    # -- out ----------------------------------------------------------------

    def to_session(self, session, data: bytes) -> None:
        """A stanza for a session on another node; fallback if nobody got it."""
        to = session.jid

        def published(receivers) -> None:
            if isinstance(receivers, Exception):
                self._fallback(to, data, str(receivers))
            elif not receivers:
                self._fallback(to, data, "node not listening")
        self.link.publish_nowait(self._channels.get(session.node) or self._channel(session.node),
                                 encode_stanza(to.full, data), published)

    def _channel(self, node: str) -> bytes:
        channel = self._channels[node] = node_channel(node).encode()
        return channel

    def close_session(self, session, condition: str, text: str) -> None:
        self.link.publish(node_channel(session.node), encode(
            {"k": "x", "to": session.jid.full, "t": session.bound_at,
             "cond": condition, "text": text})).addErrback(lambda f: None)

    def event(self, header: dict) -> None:
        """A message to every node (errors ignored: a resync follows every outage)."""
        header["n"] = self.node
        self.link.publish(ALL, encode(header)).addErrback(lambda f: None)

    # -- in -----------------------------------------------------------------

    def received(self, channel: bytes, payload: bytes) -> None:
        if payload[:1] == b"s":
            self._stanza(payload)
            return
        try:
            header, body = decode(payload)
            kind = header["k"]
        except (ValueError, KeyError, TypeError):
            log.warn("cluster: malformed bus message on {channel} ignored", channel=channel)
            return
        if header.get("n") != self.node:
            try:
                self.on_event(header)
            except Exception:
                log.failure("cluster: bus event {kind} failed", kind=kind)

    def _stanza(self, payload: bytes) -> None:
        head, _, body = payload.partition(b"\n")
        try:
            full = head[1:].decode("utf-8")
        except UnicodeDecodeError:
            full = ""
        # The sender wrote a session's normalised full JID: looked up as it is.
        bare, _, resource = full.partition("/")
        if not resource or not body.startswith(STANZA_STARTS):
            log.warn("cluster: malformed stanza on the bus ignored")
            return
        target = self.router.sessions.get(bare, {}).get(resource)
        if target is None or getattr(target, "remote", False):
            try:
                to = jidlib.parse(full)
            except jidlib.InvalidJID:
                return
            self._fallback(to, body, "session gone")
            return
        target.send_bytes(body)

    def _fallback(self, to, data: bytes, why: str) -> None:
        """A stanza nobody delivered: the path it takes with no session."""
        try:
            stanza = parse_fragment(data.decode("utf-8"), self.limits)
        except (XMLStreamError, UnicodeDecodeError):
            return
        name, kind = stanza.name, stanza.getAttribute("type")
        if name == "message":
            if any(getattr(c, "uri", None) == NS_CARBONS for c in stanza.children):
                return  # a carbon copy: the original went its own way
            self.router.undelivered(stanza, to.bare_jid())  # offline storage
        elif name == "iq" and kind in ("get", "set"):
            self.router.bounce(stanza, StanzaError("service-unavailable"), None)
        # presence and the rest: dropped, as for a session that just closed

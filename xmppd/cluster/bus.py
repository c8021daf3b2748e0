"""Messages between nodes over Redis pub/sub.

Each node subscribes to its own channel (stanzas for its sessions, requests
to close one) and to the cluster channel (registry changes, cache
invalidations, node departures).  A message is one JSON header line, a
newline, and for stanzas the stanza's serialisation: the bytes the sending
node would have written to a socket, parsed on arrival under the live
stream's limits (:func:`xmppd.xmlparser.parse_fragment`), so nothing reaches
a client that a client could not have sent, and then written as they came.

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
from typing import Any, Callable

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

    # -- out ----------------------------------------------------------------

    def to_session(self, session, data: bytes) -> None:
        """A stanza for a session on another node; fallback if nobody got it."""
        d = self.link.publish(node_channel(session.node),
                              encode({"k": "s", "to": session.jid.full}, data))
        d.addCallbacks(self._published, self._publish_failed,
                       (session.jid, data), None, (session.jid, data), None)

    def _published(self, receivers, to, data: bytes) -> None:
        if not receivers:
            self._fallback(to, data, "node not listening")

    def _publish_failed(self, failure, to, data: bytes) -> None:
        self._fallback(to, data, failure.getErrorMessage())

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
        try:
            header, body = decode(payload)
            kind = header["k"]
        except (ValueError, KeyError, TypeError):
            log.warn("cluster: malformed bus message on {channel} ignored", channel=channel)
            return
        if kind == "s":
            self._stanza(header, body)
        elif header.get("n") != self.node:
            try:
                self.on_event(header)
            except Exception:
                log.failure("cluster: bus event {kind} failed", kind=kind)

    def _stanza(self, header: dict, body: bytes) -> None:
        try:
            to = jidlib.parse(header["to"])
        except (jidlib.InvalidJID, KeyError, TypeError):
            return
        target = self.router.sessions.get(to.bare, {}).get(to.resource)
        if target is None or getattr(target, "remote", False):
            self._fallback(to, body, "session gone")
            return
        try:
            parse_fragment(body.decode("utf-8"), self.limits)
        except (XMLStreamError, UnicodeDecodeError) as e:
            log.warn("cluster: stanza for {to} dropped: {error}", to=to.full, error=e)
            return
        # Checked, and serialised by a node of this cluster: written as it
        # came (send_bytes is the router's own path, through the session's
        # output layers), not serialised a second time.
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

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
from xmppd.cluster.remote import RemoteSession
from xmppd.cluster.resp import publish_head
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


#: At most this many recipients' decoded names are kept (Bus._names).
NAMES_CACHED = 100_000

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
        self._heads: dict[str, bytes] = {}  # node -> PUBLISH head of its channel
        # A stanza header as it comes (b"s<full JID>") -> (bare, resource):
        # decoded and split once per recipient, not per stanza.  Facts about
        # the bytes, never stale; the session itself is looked up every time
        # (sessions change without hooks, e.g. XEP-0198 resumption).
        self._names: dict[bytes, tuple[str, str]] = {}

    # -- out ----------------------------------------------------------------

    def to_session(self, session, data: bytes) -> None:
        """A stanza for a session on another node; fallback if nobody got it.

        The session carries its PUBLISH head and bus header, made once
        (:meth:`heads`): per message, a few parts and one queue entry."""
        link = self.link
        cmd = link.cmd
        if cmd is None or not link.up:
            self._missed(ConnectionError("Redis link down"), session.jid, data)
            return
        cmd.publish(session.bus_head, session.bus_prefix, data, self._missed, session.jid)

    def heads(self, node: str, full: str) -> tuple[bytes, bytes]:
        """(PUBLISH head of ``node``'s channel, bus header ``s<full JID>\\n``) of a
        remote session, made when the session is (neither can change: a session
        that moves to another node is a new remote session)."""
        head = self._heads.get(node)
        if head is None:
            head = self._heads[node] = publish_head(node_channel(node).encode())
        return head, encode_stanza(full, b"")

    def _missed(self, reply, to, data: bytes) -> None:
        """A PUBLISH that nobody got (0 subscribers) or that failed."""
        self._fallback(to, data, str(reply) if isinstance(reply, Exception)
                       else "node not listening")

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
        if payload[:1] == b"s":  # a stanza: the hot path, kept to a few look-ups
            head, _, body = payload.partition(b"\n")
            names = self._names.get(head)
            if names is not None and body.startswith(STANZA_STARTS):
                resources = self.router.sessions.get(names[0])
                if resources is not None:
                    target = resources.get(names[1])
                    if target is not None and target.__class__ is not RemoteSession:
                        target.send_bytes(body)
                        return
            self._stanza(head, body)
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

    def _stanza(self, head: bytes, body: bytes) -> None:
        """A stanza whose recipient is not in the name cache, or has no session here."""
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
        # A session here: its name is worth keeping (bounded; a full clear
        # is rare and costs one decode per recipient after it).
        if len(self._names) >= NAMES_CACHED:
            self._names.clear()
        self._names[head] = (bare, resource)
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

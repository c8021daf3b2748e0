"""XEP-0352 Client State Indication: hold back what an idle client need not see now.

Enabled as ``urn:xmpp:csi:0`` in ``[sm] plugins``; the server then offers
``<csi xmlns='urn:xmpp:csi:0'/>`` among the stream features after
authentication.  A bound session sends ``<inactive/>`` when its user is not
looking (a phone in a pocket) and ``<active/>`` when they are again.

While a session is inactive, its output passes through a :class:`HoldLayer`:

* presence (available or unavailable, not subscriptions or errors) and
  messages carrying nothing but a chat state (XEP-0085) are *held*, one per
  contact and kind: a newer one from the same full JID replaces the older
  (only the latest state matters) and moves to the end;
* any other message (a body, a receipt, a carbon...) is important: what is
  held is flushed first, in order, then the message goes out at once, so
  the client never sees a state older than a message after it;
* IQs go out at once (they answer requests, nothing depends on their order
  relative to presence);
* ``<active/>`` flushes everything held, in order;
* the queue is bounded by ``[csi] max_held`` contacts: reaching it flushes.

A session that never sends ``<inactive/>`` keeps its class's output methods
(see :meth:`C2SStream.set_output_layer`): CSI costs it nothing.
"""
from __future__ import annotations

import re
from typing import Callable

from twisted.words.xish import domish

from xmppd.plugin import Plugin
from xmppd.stream import BOUND

NS_CSI = "urn:xmpp:csi:0"
NS_CHATSTATES = b"http://jabber.org/protocol/chatstates"

_FROM = re.compile(rb"""\sfrom=(?:'([^']*)'|"([^"]*)")""")
_TYPE = re.compile(rb"""\stype=(?:'([^']*)'|"([^"]*)")""")
_TAGS = re.compile(rb"<([A-Za-z_][\w.:-]*)")
# The children a chat-state-only message may have besides the state.
_STATE_ONLY = frozenset((b"message", b"active", b"composing", b"paused", b"inactive", b"gone",
                         b"thread", b"stanza-id", b"no-store", b"no-permanent-store"))
_P, _M = ord("p"), ord("m")


def _attr(pattern: re.Pattern, tag: bytes) -> bytes | None:
    m = pattern.search(tag)
    if m is None:
        return None
    return m.group(1) if m.group(1) is not None else m.group(2)


def hold_key(data: bytes) -> tuple[int, bytes] | None:
    """The (kind, sender) a serialised stanza is held under, or None to send it now."""
    kind = data[1]
    if kind == _P:
        tag = data[:data.find(b">")]
        ptype = _attr(_TYPE, tag)
        if ptype is not None and ptype != b"unavailable":
            return None  # subscriptions, probes, errors are not mere state
        return (_P, _attr(_FROM, tag) or b"")
    if kind == _M and NS_CHATSTATES in data and b"<body" not in data:
        if not _STATE_ONLY.issuperset(_TAGS.findall(data)):
            return None
        tag = data[:data.find(b">")]
        return (_M, _attr(_FROM, tag) or b"")
    return None


class HoldLayer:
    """The output layer of an inactive session (see the module docstring)."""

    order = 20  # outside stream management's counting: held means not sent yet

    def __init__(self, max_held: int) -> None:
        self.max_held = max_held
        self.held: dict[tuple[int, bytes], bytes] = {}
        self.inner: Callable[[bytes], None] | None = None

    def wrap(self, inner: Callable[[bytes], None]) -> Callable[[bytes], None]:
        self.inner = inner
        held = self.held
        flush = self.flush

        def send_bytes(data: bytes) -> None:
            key = hold_key(data)
            if key is None:
                if data[1] == _M:
                    flush()
                inner(data)
                return
            if key in held:
                del held[key]
            elif len(held) >= self.max_held:
                flush()
            held[key] = data

        return send_bytes

    def flush(self) -> None:
        """Send everything held, oldest first."""
        if not self.held:
            return
        pending = list(self.held.values())
        self.held.clear()
        for data in pending:
            self.inner(data)


class CSIPlugin(Plugin):
    name = "urn:xmpp:csi:0"

    def setup(self) -> None:
        sec = self.server.config.section("csi")
        self.max_held = sec.int("max_held", 100, minimum=1)
        sec.reject_unknown()
        self.server.c2s_features.append(self._feature)
        self.server.c2s_elements[(NS_CSI, "inactive")] = self.on_inactive
        self.server.c2s_elements[(NS_CSI, "active")] = self.on_active

    @staticmethod
    def _feature(stream) -> domish.Element:
        return domish.Element((NS_CSI, "csi"))

    def on_inactive(self, stream, el: domish.Element) -> None:
        if stream.phase != BOUND:
            return stream.stream_error("not-authorized", "bind a resource first")
        if stream.state.get("csi") is None:
            layer = HoldLayer(self.max_held)
            stream.state["csi"] = layer
            stream.set_output_layer("csi", layer)

    def on_active(self, stream, el: domish.Element) -> None:
        if stream.phase != BOUND:
            return stream.stream_error("not-authorized", "bind a resource first")
        layer = stream.state.pop("csi", None)
        if layer is not None:
            stream.set_output_layer("csi", None)
            layer.flush()  # through what is below it (stream management), in order


def flush_held(stream) -> None:
    """Send what an inactive session holds (before stream management detaches it)."""
    layer = stream.state.get("csi")
    if layer is not None:
        layer.flush()

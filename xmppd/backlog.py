"""Output a session holds while its client does not read.

A client session is a streaming producer on its transport (Twisted's
producer/consumer): when the transport's buffer is full, the transport calls
``pauseProducing`` and the session keeps further stanzas here, counted in
bytes, instead of growing the transport's buffer without limit.  When the
transport drains, ``resumeProducing`` hands them over in order.  A client
that lets more than ``[c2s] max_outbound_bytes`` pile up is disconnected,
and the messages still held here are parsed back into stanzas so the router
can store them offline (see :meth:`OutboundBacklog.messages`).

Only slow sessions ever allocate one of these.
"""
from __future__ import annotations

from collections import deque

from twisted.words.xish import domish

# The held bytes are stanzas serialised for a jabber:client stream; this
# header gives them back their namespaces when they are parsed again.
_STREAM_HEADER = (
    b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
)


class OutboundBacklog:
    """Serialised stanzas not yet handed to the transport, in order, with their total size."""

    __slots__ = ("chunks", "size", "limit")

    def __init__(self, limit: int) -> None:
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.limit = limit

    def add(self, data: bytes) -> bool:
        """Hold ``data``; True when this made the held bytes exceed the limit."""
        size = self.size
        self.chunks.append(data)
        self.size = size + len(data)
        return size <= self.limit < self.size

    def popleft(self) -> bytes:
        data = self.chunks.popleft()
        self.size -= len(data)
        return data

    def clear(self) -> None:
        self.chunks.clear()
        self.size = 0

    def messages(self) -> list[domish.Element]:
        """The ``<message/>`` stanzas held (a client session's, for offline storage).

        Other stanzas (presence, IQ) are not worth keeping: the client asks
        for that state again when it reconnects.
        """
        return self.stanzas(("message",))

    def stanzas(self, names: tuple[str, ...] = ("message", "iq", "presence")) -> list[domish.Element]:
        """The stanzas held whose element is one of ``names``, parsed back, oldest first.

        Everything held was serialised by this server (one stanza per
        chunk), so the input is trusted and well-formed; domish's expat
        stream is enough, with text buffering on so that a long body is
        joined in linear time.
        """
        out: list[domish.Element] = []
        prefixes = tuple(b"<" + n.encode() for n in names)
        wanted = [c for c in self.chunks if c.startswith(prefixes)]
        if not wanted:
            return out
        stream = domish.elementStream()
        stream.parser.buffer_text = True
        stream.parser.buffer_size = 65536
        stream.DocumentStartEvent = lambda _root: None
        stream.ElementEvent = out.append
        stream.DocumentEndEvent = lambda: None
        stream.parse(_STREAM_HEADER)
        for chunk in wanted:
            stream.parse(chunk)
        return out

"""XEP-0198 counters and the queue of unacknowledged stanzas of one session.

Kept apart from the plugin (:mod:`xmppd.handlers.sm`) so the arithmetic can
be tested alone: both counters are sequence numbers modulo 2**32 (XEP-0198
§4: "h" wraps to 0 after 2**32 - 1), which a session that lives long enough
reaches.

The inbound count is a plain int incremented per stanza (one add) and
reduced modulo 2**32 only when reported.  Outbound, the server keeps the
serialised bytes of every stanza it sent since the client's last ``<a/>``,
in order, in a list bounded by count and bytes: the client acknowledges
with ``h``, and ``(h - last h) mod 2**32`` stanzas leave the front.
"""
from __future__ import annotations

MASK = 0xFFFFFFFF


class HandledCountTooHigh(Exception):
    """The client acknowledged more stanzas than were sent (XEP-0198 §4)."""

    def __init__(self, h: int, sent: int) -> None:
        super().__init__(f"h={h} acknowledges more than the {sent} stanzas sent")
        self.h = h
        self.sent = sent


class SMState:
    """Counters and unacked queue; ``acked`` and ``inbound`` may start anywhere (tests)."""

    __slots__ = ("id", "resumable", "inbound", "acked", "queue", "size",
                 "max_unacked", "max_bytes")

    def __init__(self, sm_id: str, resumable: bool, max_unacked: int, max_bytes: int,
                 inbound: int = 0, acked: int = 0) -> None:
        self.id = sm_id
        self.resumable = resumable
        self.inbound = inbound  # stanzas handled from the client (unreduced)
        self.acked = acked & MASK  # the client's last h
        # A list, not a deque: an idle session's empty deque costs ~600 bytes,
        # a list 56; acks drop a prefix of at most max_unacked items.
        self.queue: list[bytes] = []
        self.size = 0  # bytes in queue
        self.max_unacked = max_unacked
        self.max_bytes = max_bytes

    @property
    def h(self) -> int:
        """Our ``h``: stanzas handled from the client, modulo 2**32."""
        return self.inbound & MASK

    @property
    def sent_count(self) -> int:
        """What the client's h should reach once it has everything: acked + queued."""
        return (self.acked + len(self.queue)) & MASK

    def sent(self, data: bytes) -> bool:
        """Keep ``data`` until acknowledged; True when over a limit.

        :class:`xmppd.handlers.sm.SMLayer` inlines these lines on its hot
        path; keep both in step.
        """
        self.queue.append(data)
        self.size += len(data)
        return len(self.queue) > self.max_unacked or self.size > self.max_bytes

    def ack(self, h: int) -> int:
        """The client handled everything up to ``h``: drop that; return how many left."""
        n = (h - self.acked) & MASK
        queue = self.queue
        if n > len(queue):
            raise HandledCountTooHigh(h, self.sent_count)
        if n:
            self.size -= sum(map(len, queue[:n]))
            del queue[:n]
        self.acked = h & MASK
        return n

    def take(self) -> list[bytes]:
        """Everything unacknowledged, oldest first; the queue is left empty."""
        out = list(self.queue)
        self.queue.clear()
        self.size = 0
        return out

"""XEP-0198 sequence numbers and unacked queue (xmppd.smstate), across the 2**32 wrap."""
from __future__ import annotations

import pytest

from xmppd.smstate import MASK, HandledCountTooHigh, SMState


def state(**kw) -> SMState:
    return SMState("id", True, max_unacked=100, max_bytes=10_000, **kw)


def test_inbound_h_wraps_to_zero():
    s = state(inbound=2**32 - 2)
    assert s.h == 2**32 - 2
    s.inbound += 1
    assert s.h == MASK
    s.inbound += 1
    assert s.h == 0
    s.inbound += 1
    assert s.h == 1


def test_acks_across_the_wrap():
    s = state(acked=2**32 - 3)
    for i in range(6):
        assert not s.sent(b"<message id='%d'/>" % i)
    assert s.sent_count == 3  # 2**32 - 3 + 6, wrapped
    assert s.ack(2**32 - 1) == 2  # still below the wrap
    assert [d[-5:-3] for d in s.queue] == [b"'2", b"'3", b"'4", b"'5"]
    assert s.ack(1) == 2  # across it: MASK -> 0 -> 1
    assert list(s.queue) == [b"<message id='4'/>", b"<message id='5'/>"]
    assert s.ack(1) == 0  # a repeated h acknowledges nothing new
    assert s.ack(3) == 2 and not s.queue and s.size == 0


def test_h_too_high_is_refused_without_change():
    s = state(acked=MASK)
    s.sent(b"<iq/>")
    with pytest.raises(HandledCountTooHigh) as e:
        s.ack(1)  # only one sent: h may be 0 at most
    assert e.value.sent == 0
    assert len(s.queue) == 1 and s.acked == MASK


def test_limits_by_count_and_bytes():
    s = SMState("id", True, max_unacked=2, max_bytes=1000)
    assert not s.sent(b"x" * 10) and not s.sent(b"x" * 10)
    assert s.sent(b"x")  # a third stanza: over max_unacked
    b = SMState("id", True, max_unacked=100, max_bytes=15)
    assert not b.sent(b"x" * 10)
    assert b.sent(b"x" * 10)  # 20 bytes held > 15
    assert b.take() == [b"x" * 10, b"x" * 10] and b.size == 0

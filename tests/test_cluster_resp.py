"""xmppd.cluster.resp: the RESP2 reader and writer of the Redis links (issue 18).

In-process, on Twisted's StringTransport: replies cut at every byte
boundary, a burst handled in one read, the bound on bulk strings, and the
pipelining of one reactor turn's commands into one write.  The daemon-level
behaviour is tests/test_cluster.py's.
"""
from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from xmppd.cluster.resp import (Commands, RESPError, Subscriber, command, parse,
                                publish_command)


def push(channel: bytes, payload: bytes) -> bytes:
    return command(b"message", channel, payload)


def test_parse_every_type_and_incomplete_input():
    data = b"*4\r\n$3\r\nabc\r\n:42\r\n+OK\r\n$-1\r\n"
    assert parse(data, 0, 100) == ([b"abc", 42, b"OK", None], len(data))
    for cut in range(len(data)):
        value, pos = parse(data[:cut], 0, 100)
        assert pos == 0 and value is not None and not isinstance(value, list)
    value, _ = parse(b"-ERR wrong\r\n", 0, 100)
    assert isinstance(value, RESPError) and "wrong" in str(value)


def test_parse_refuses_oversized_bulk_before_buffering_it():
    with pytest.raises(RESPError):
        parse(b"$1000\r\n", 0, 999)


def test_publish_command_is_resp():
    assert publish_command(b"ch", b"x\r\ny") == command("PUBLISH", "ch", b"x\r\ny")
    assert command("SET", "k", 5) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n5\r\n"


def test_subscriber_burst_cut_anywhere():
    got = []
    sub = Subscriber(["a", "b"], None, lambda ch, p: got.append((ch, p)), max_bulk=1000)
    sub.makeConnection(StringTransport())
    assert sub.transport.value() == command("SUBSCRIBE", "a", "b")
    ready = []
    sub.whenConnected().addCallback(ready.append)
    stream = (command(b"subscribe", b"a", b"1").replace(b"$1\r\n1\r\n", b":1\r\n")
              + command(b"subscribe", b"b", b"2").replace(b"$1\r\n2\r\n", b":2\r\n")
              + push(b"a", b"s" + b"\r\n" * 3 + b"<message/>") + push(b"b", b""))
    for i in range(len(stream)):  # one byte at a time: every cut point
        sub.dataReceived(stream[i:i + 1])
    assert ready == [sub]
    assert got == [(b"a", b"s\r\n\r\n\r\n<message/>"), (b"b", b"")]
    got.clear()
    sub.dataReceived(push(b"a", b"1") * 50)  # a burst: all in this one call
    assert len(got) == 50 and not sub.buf


def test_subscriber_oversized_message_closes_the_connection():
    got = []
    sub = Subscriber(["a"], "pw", lambda ch, p: got.append(p), max_bulk=10)
    transport = StringTransport()
    sub.makeConnection(transport)
    assert transport.value().startswith(command("AUTH", "pw"))
    sub.dataReceived(b"+OK\r\n" + command(b"subscribe", b"a", b"1"))
    sub.dataReceived(push(b"a", b"x" * 11))
    assert got == [] and transport.disconnecting


def test_subscriber_auth_refused_fails_the_connection():
    sub = Subscriber(["a"], "bad", lambda ch, p: None, max_bulk=10)
    sub.makeConnection(StringTransport())
    failed = []
    sub.whenConnected().addErrback(failed.append)
    sub.dataReceived(b"-WRONGPASS invalid password\r\n")
    assert failed and "WRONGPASS" in str(failed[0].value)
    assert sub.transport.disconnecting


def test_commands_pipelined_per_turn_replies_in_order_and_lost_connection():
    clock = Clock()
    cmd = Commands(3, None, 1000, clock)
    transport = StringTransport()
    cmd.makeConnection(transport)
    ready = []
    cmd.whenConnected().addCallback(ready.append)
    clock.advance(0)
    assert transport.value() == command("SELECT", "3")
    cmd.dataReceived(b"+OK\r\n")
    assert ready == [cmd]
    transport.clear()
    results = []
    for i in range(3):
        cmd.send(publish_command(b"ch", b"m%d" % i), results.append)
    d = cmd.execute("HGETALL", "k")
    assert transport.value() == b""  # nothing before the turn ends
    clock.advance(0)
    assert transport.value() == b"".join(
        [publish_command(b"ch", b"m%d" % i) for i in range(3)] + [command("HGETALL", "k")])
    cmd.dataReceived(b":1\r\n:0\r\n")
    cmd.dataReceived(b":1\r\n*2\r\n$1\r\nf\r\n$2\r\nv")
    assert results == [1, 0, 1]
    cmd.dataReceived(b"\xc3\r\n")
    assert d.result == ["f", "v\ufffd"]  # bulk strings as text (bad UTF-8 replaced)
    lost = []
    cmd.send(publish_command(b"ch", b"late"), lost.append)
    cmd.connectionLost(None)
    assert isinstance(lost[0], ConnectionError)


def test_commands_lost_inside_a_reply_callback_stop_reading():
    """A reply's callback may end the connection at once (the last reply before a
    shutdown runs the reactor's disconnectAll): the replies after it are not
    taken for replies to no command, and later commands fail at once."""
    clock = Clock()
    cmd = Commands(0, None, 1000, clock)
    transport = StringTransport()
    cmd.makeConnection(transport)
    clock.advance(0)
    cmd.dataReceived(b"+OK\r\n")
    got = []
    cmd.send(publish_command(b"ch", b"1"), lambda r: (got.append(r), cmd.connectionLost(None)))
    cmd.send(publish_command(b"ch", b"2"), got.append)
    clock.advance(0)
    cmd.dataReceived(b":1\r\n:1\r\n")
    assert got[0] == 1 and isinstance(got[1], ConnectionError) and len(got) == 2
    assert not transport.disconnecting  # no "reply to no command" failure
    cmd.send(publish_command(b"ch", b"3"), got.append)
    assert isinstance(got[2], ConnectionError)

"""Issue 17 items 3 and 5: connections that stall, and clients that stop reading.

Over real TCP/TLS against the daemon:

* connections that never finish TLS (direct TLS port left silent, half a
  ClientHello, STARTTLS ``<proceed/>`` then silence) are aborted at
  ``auth_timeout``, and a graceful close that the peer never completes (TLS
  done, then it neither reads nor answers close_notify) is aborted after
  ``close_timeout``: the daemon's descriptor count returns to its baseline;
* a client that stops reading while another sends it many megabytes costs
  the daemon at most about ``max_outbound_bytes``, is closed, and every
  message is accounted for: read by the client before the close completed,
  stored offline (delivered at its next login) or bounced to the sender,
  while the sender's pings keep being answered.
"""
from __future__ import annotations

import os
import re
import socket
import ssl
import time

import pytest
from twisted.words.xish import domish

from tests.daemon import Daemon
from tests.rawclient import RawClient

STARTTLS = "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def vmrss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def wait_until(predicate, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def stable_fd_count(pid: int) -> int:
    """The descriptor count once the start-up port probes have been released."""
    last = fd_count(pid)
    for _ in range(50):
        time.sleep(0.1)
        now = fd_count(pid)
        if now == last:
            return now
        last = now
    return last


def half_client_hello() -> bytes:
    """The first half of a real TLS ClientHello."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert len(hello) > 100
    return hello[: len(hello) // 2]


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True when the peer closed or reset the connection (whatever it sent before)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, ssl.SSLError):
        return True
    except (socket.timeout, TimeoutError):
        return False
    return True


PER_KIND = 20


def test_stalled_handshakes_and_closes_are_aborted_in_time(tmp_path):
    d = Daemon(tmp_path, direct_tls=True, c2s="auth_timeout = 2\nclose_timeout = 1").start()
    socks: list[socket.socket] = []
    try:
        pid = d.proc.pid
        baseline = stable_fd_count(pid)
        half = half_client_hello()
        for _ in range(PER_KIND):
            # direct TLS port, then silence
            socks.append(socket.create_connection(("127.0.0.1", d.tls_port)))
            # half a ClientHello
            s = socket.create_connection(("127.0.0.1", d.tls_port))
            s.sendall(half)
            socks.append(s)
            # STARTTLS: <proceed/>, then silence
            c = RawClient(d.port)
            c.open_stream()
            c.send(STARTTLS)
            c.read_until(b"<proceed[^>]*/>")
            socks.append(c.sock)
            # TLS done and a stream opened, then never reads nor closes: the
            # stream error's close_notify is never answered
            c = RawClient(d.port, rcvbuf=4096)
            c.open_stream()
            c.starttls()
            c.open_stream()
            socks.append(c.sock)
        opened = 4 * PER_KIND
        assert wait_until(lambda: fd_count(pid) >= baseline + opened, 5), (fd_count(pid), baseline)
        # auth_timeout 2 s (+ close_timeout 1 s for the last kind); generous
        # for a loaded machine, but the old code never closes them at all.
        assert wait_until(lambda: fd_count(pid) <= baseline, 20), \
            f"{fd_count(pid) - baseline} of {opened} stalled connections still open"
        assert all(closed_by_peer(s) for s in socks)
        log = d.logtext()
        assert log.count("TLS handshake not completed in time") == 3 * PER_KIND
        assert "aborting" in log  # the graceful closes that never completed
    finally:
        for s in socks:
            s.close()
        d.stop()


BODY = "x" * 16000
BATCH = 32  # messages (about 512 KB) between two pings
MAX_BATCHES = 48  # 24 MB: what the old code buffered without limit
MESSAGE_ID = re.compile(rb"<message[^>]*id='m(\d+)'")
BOUNCE_ID = re.compile(rb"<message[^>]*type='error'[^>]*id='m(\d+)'|<message[^>]*id='m(\d+)'[^>]*type='error'")


def ids(data: bytes) -> list[int]:
    return [int(m) for m in MESSAGE_ID.findall(data)]


def test_slow_reader_is_bounded_closed_and_loses_nothing(tmp_path):
    d = Daemon(tmp_path, c2s="max_outbound_bytes = 1048576\nclose_timeout = 10",
               extra="[offline]\nmax_messages = 1000\n").start()
    d.adduser("slow@localhost", "slow-secret")
    d.adduser("sender@localhost", "sender-secret")
    slow = RawClient(d.port, rcvbuf=4096)
    sender = RawClient(d.port)
    try:
        slow.login("slow", "slow-secret", "lazy")
        slow.send("<presence/>")
        sender.login("sender", "sender-secret", "fast")
        pid = d.proc.pid
        rss0 = vmrss_kb(pid)
        peak, rtts, sent, sender_data = 0, [], 0, b""
        closed_after = None
        for batch in range(MAX_BATCHES):
            first = sent + 1
            sent += BATCH
            sender.send("".join(
                f"<message to='slow@localhost/lazy' type='chat' id='m{i}'><body>{i} {BODY}</body></message>"
                for i in range(first, sent + 1)
            ))
            # An IQ to the slow session's full JID is answered with an error
            # only once that session is gone; the ping to the server is a
            # barrier (stanzas are handled in order) and the freeze probe.
            sender.send(f"<iq type='get' id='probe{batch}' to='slow@localhost/lazy'>"
                        "<ping xmlns='urn:xmpp:ping'/></iq>"
                        f"<iq type='get' id='ping{batch}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
            start = time.monotonic()
            got = sender.read_until(rf"<iq[^>]*id='ping{batch}'[^>]*>", timeout=20)
            rtts.append(time.monotonic() - start)
            sender_data += got
            peak = max(peak, vmrss_kb(pid) - rss0)
            if closed_after is not None:
                break  # one more batch went the way of a closed session
            if f"id='probe{batch}'".encode() in got:
                closed_after = sent
        assert closed_after is not None, \
            f"slow session still open after {sent} messages; daemon grew {peak // 1024} MB"
        # Bounded: the held output (1 MiB) plus transport and TLS buffers, not
        # the megabytes the client never read.
        assert peak < 8 * 1024, f"daemon grew {peak // 1024} MB"
        assert "client is not reading" in d.logtext()
        # The sender was never held back by the slow reader.
        assert max(rtts) < 5, rtts

        # What the slow client can still read: what was handed to the
        # transport before the close, then the stream error.
        read = slow.read_all(timeout=10)
        assert b"<policy-violation" in read
        received = ids(read)
        slow.close()
        bounced = [int(a or b) for a, b in BOUNCE_ID.findall(sender_data)]

        again = RawClient(d.port)
        again.login("slow", "slow-secret", "back")
        again.send("<presence/>")
        expected = sent - len(received) - len(bounced)
        offline: list[int] = []
        deadline = time.monotonic() + 15
        while len(offline) < expected and time.monotonic() < deadline:
            try:
                offline += ids(again.read_until(rb"</message>", timeout=deadline - time.monotonic()))
            except TimeoutError:
                break
        again.close()
        assert offline, "nothing came from offline storage"
        assert b"Offline storage" not in read
        # Every message exactly once: read before the close, stored offline
        # (in order), or bounced to its sender.
        everything = sorted(received + offline + bounced)
        assert everything == list(range(1, sent + 1)), (
            f"{sent} sent, {len(received)} read, {len(offline)} offline, {len(bounced)} bounced"
        )
        assert offline == sorted(offline)
        assert received == list(range(1, len(received) + 1))  # a prefix, in order
    finally:
        slow.close()
        sender.close()
        d.stop()


def test_overflow_inside_a_delivery_loop_closes_after_it():
    """Two paused resources overflow while one broadcast loops over them.

    Closing unbinds, which would change the router's session dict under the
    loop: the close waits for the next reactor turn, and what the sessions
    were given meanwhile takes the offline path with the rest.
    """
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from xmppd import config
    from xmppd import jid as jidlib
    from xmppd.c2s import BOUND, CLOSED, C2SFactory
    from xmppd.core import Server
    from xmppd.storage import MemoryStore

    clock = Clock()
    store = MemoryStore()  # the server sees it through the asynchronous face
    server = Server(config.from_dict({"c2s": {"max_outbound_bytes": 65536}}),
                    store=store, clock=clock, certs=object())
    server.connector_for("localhost").add_user("u", "localhost", "pw")
    factory = C2SFactory(server)
    sessions = []
    for resource in ("a", "b"):
        s = factory.buildProtocol(None)
        s.makeConnection(StringTransport())
        s.username, s.host = "u", "localhost"
        s.jid = jidlib.make("u", "localhost", resource)
        s.phase = BOUND
        server.router.bind(s)
        s.transport.registerProducer(s, True)
        s._producing = True
        s.pauseProducing()  # as the transport does when its buffer is full
        sessions.append(s)
    bare = jidlib.parse("u@localhost")
    for i in range(3):
        msg = domish.Element((None, "message"))
        msg["type"], msg["id"], msg["from"] = "chat", f"m{i}", "v@localhost/x"
        msg.addElement("body", content="y" * 40000)
        server.router.send_from_server(msg, bare)  # loops over both sessions
    assert all(s.phase == BOUND for s in sessions)  # not inside the loop
    clock.advance(0)
    assert all(s.phase == CLOSED for s in sessions)
    assert all(b"<policy-violation" in s.transport.value() for s in sessions)
    stored = store.items("offline", "u@localhost")
    # each resource held all three; both gave them back (the duplicates are
    # the price of two stalled resources, not a loss)
    assert [re.search(r"id='(m\d)'", xml).group(1) for _k, xml in stored] == ["m0", "m1", "m2"] * 2

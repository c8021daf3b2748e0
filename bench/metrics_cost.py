#!/usr/bin/env python3
"""What ``[metrics]`` costs per routed message, measured in process (issue 19).

Not a test.  Two sessions of one server are bound through the real code
(stream header, bind IQ, initial presence) over a transport that discards
what it is given; then one sends the other chat messages through
``dataReceived``: parser, c2s stream, router, serialisation, ``send_bytes``.
The same two sessions run with metrics off (class ``C2SStream``) and on
(``MeteredC2SStream``), alternating, and the fastest repetition of each is
kept: nothing but the stream class differs.  TLS, the kernel and the reactor are left out, so the path measured
here is cheaper than a real message and the percentage is an upper bound
of what metrics add to the full cost (bench/RESULTS.md: ~15 µs per delivered
message at saturation, of which this path is about half).

    PYTHONPATH=. .venv/bin/python bench/metrics_cost.py [--messages N] [--reps R]
"""
from __future__ import annotations

import argparse
import gc
import time

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from xmppd import c2s, config
from xmppd.core import Server
from xmppd.storage import MemoryStore

HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
          b"xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>")
SATURATED_NS = 14_900  # bench/RESULTS.md: 0.149 CPU-s per 10,000 delivered messages


class NullTransport(StringTransport):
    """Keeps nothing: only the stream's own work is timed."""

    def write(self, data: bytes) -> None:
        pass


def session(factory, user: str, after_bind: bytes = b"", resource: str = "r"):
    """A bound session of ``user`` on a discarding transport; ``after_bind`` is
    fed before the initial presence (e.g. an SM ``<enable/>``)."""
    s = factory.buildProtocol(None)
    s.makeConnection(NullTransport())
    s.username, s.host, s.secure = user, "localhost", True
    s.phase = c2s.AUTHENTICATED
    s._new_parser()
    s.dataReceived(HEADER)
    s.dataReceived(b"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                   b"<resource>%s</resource></bind></iq>" % resource.encode())
    assert s.phase == c2s.BOUND
    if after_bind:
        s.dataReceived(after_bind)
    s.dataReceived(b"<presence/>")
    return s


def build():
    data = {"metrics": {"listen": "tcp:9279:interface=127.0.0.1"}}
    server = Server(config.from_dict(data), store=MemoryStore(), clock=Clock(), certs=object())
    factory = c2s.C2SFactory(server)
    return session(factory, "alice"), session(factory, "bob")


def run(sessions, metrics: bool, messages: list[bytes]) -> float:
    """Nanoseconds of CPU per message alice -> bob (bare JID), with metrics off or on.

    The same two sessions serve both: only their class changes
    (C2SStream or MeteredC2SStream), so nothing else differs between the runs.
    """
    cls = c2s.MeteredC2SStream if metrics else c2s.C2SStream
    for s in sessions:
        s.__class__ = cls
    feed = sessions[0].dataReceived
    sent_before = c2s.STANZAS_SENT_BYTES[ord("m")]
    gc.collect()
    gc.disable()
    try:
        start = time.process_time_ns()
        for m in messages:
            feed(m)
        elapsed = time.process_time_ns() - start
    finally:
        gc.enable()
    counted = c2s.STANZAS_SENT_BYTES[ord("m")] - sent_before
    assert counted == (len(messages) if metrics else 0), counted
    return elapsed / len(messages)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    sessions = build()
    messages = [f"<message to='bob@localhost' type='chat' id='m{i}'>"
                f"<body>message number {i} of the benchmark</body></message>".encode()
                for i in range(args.messages)]
    run(sessions, False, messages), run(sessions, True, messages)  # warm-up
    off, on = [], []
    for _ in range(args.reps):
        off.append(run(sessions, False, messages))
        on.append(run(sessions, True, messages))
    best_off, best_on = min(off), min(on)
    delta = best_on - best_off
    print(f"{args.messages} messages x {args.reps} reps, fastest rep of each:")
    print(f"  metrics off: {best_off:8.0f} ns/message (median {sorted(off)[len(off) // 2]:.0f})")
    print(f"  metrics on:  {best_on:8.0f} ns/message (median {sorted(on)[len(on) // 2]:.0f})")
    print(f"  difference:  {delta:8.0f} ns/message = {100 * delta / best_off:.2f} % of this path, "
          f"{100 * delta / SATURATED_NS:.2f} % of a saturated delivered message ({SATURATED_NS} ns)")


if __name__ == "__main__":
    main()

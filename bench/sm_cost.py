#!/usr/bin/env python3
"""What XEP-0198 stream management costs per routed message, measured in process (issue 14).

Not a test.  Like bench/metrics_cost.py: sessions of one server are bound
through the real code over a transport that discards what it is given, and
one sends the other chat messages through ``dataReceived`` (parser, c2s
stream, router, serialisation, ``send_bytes``).  Two pairs: one plain, one
with ``<enable resume='true'/>`` on both sessions, whose receiver answers
the server's ``<r/>`` (every ``request_every`` stanzas) with ``<a h/>`` as
a client does (that ``<a/>`` is parsed and handled inside the timing).
The pairs run alternately and the fastest repetition of each is kept.
TLS, the kernel and the reactor are left out (they cost the same with and
without SM, except the extra bytes of ``<r/>`` and ``<a/>``), so the
percentage of this path is an upper bound of what SM adds to a whole
delivered message; the second percentage relates the difference to the
whole saturated cost of one (bench/RESULTS.md).

    PYTHONPATH=. .venv/bin/python bench/sm_cost.py [--messages N] [--reps R]
"""
from __future__ import annotations

import argparse
import gc
import time

from twisted.internet.task import Clock

from bench.metrics_cost import SATURATED_NS
from bench.metrics_cost import session as bound_session
from xmppd import c2s, config
from xmppd.core import Server
from xmppd.storage import MemoryStore

PLUGINS = ["roster", "presence", "disco", "ping", "urn:xmpp:sm:3"]


def session(factory, user: str, sm: bool):
    s = bound_session(factory, user, b"<enable xmlns='urn:xmpp:sm:3' resume='true'/>" if sm else b"")
    assert (s.state.get("sm") is not None) == sm
    return s


def build():
    data = {"sm": {"plugins": PLUGINS}}
    server = Server(config.from_dict(data), store=MemoryStore(), clock=Clock(), certs=object())
    factory = c2s.C2SFactory(server)
    plain = (session(factory, "alice", False), session(factory, "bob", False))
    managed = (session(factory, "carol", True), session(factory, "dave", True))
    return server, plain, managed


def run(pair, messages: list[bytes], every: int) -> float:
    """Nanoseconds of CPU per message from pair[0] to pair[1] (bare JID)."""
    sender, receiver = pair
    feed, ack = sender.dataReceived, receiver.dataReceived
    layer = receiver.state.get("sm")
    gc.collect()
    gc.disable()
    try:
        start = time.process_time_ns()
        if layer is None:
            for m in messages:
                feed(m)
        else:
            state = layer.state
            for i, m in enumerate(messages, 1):
                feed(m)
                if i % every == 0:  # the client answers the <r/> that came with it
                    ack(b"<a xmlns='urn:xmpp:sm:3' h='%d'/>" % state.sent_count)
        elapsed = time.process_time_ns() - start
    finally:
        gc.enable()
    if layer is not None:
        assert len(layer.state.queue) < every, len(layer.state.queue)
    return elapsed / len(messages)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    server, plain, managed = build()
    every = server.plugin("urn:xmpp:sm:3").request_every

    def batch(to: str):
        return [f"<message to='{to}@localhost' type='chat' id='m{i}'>"
                f"<body>message number {i} of the benchmark</body></message>".encode()
                for i in range(args.messages)]

    to_plain, to_managed = batch("bob"), batch("dave")
    run(plain, to_plain, every), run(managed, to_managed, every)  # warm-up
    off, on = [], []
    for _ in range(args.reps):
        off.append(run(plain, to_plain, every))
        on.append(run(managed, to_managed, every))
    best_off, best_on = min(off), min(on)
    delta = best_on - best_off
    print(f"{args.messages} messages x {args.reps} reps, fastest rep of each"
          f" (<r/> every {every} stanzas, answered):")
    print(f"  plain:       {best_off:8.0f} ns/message (median {sorted(off)[len(off) // 2]:.0f})")
    print(f"  SM enabled:  {best_on:8.0f} ns/message (median {sorted(on)[len(on) // 2]:.0f})")
    print(f"  difference:  {delta:8.0f} ns/message = {100 * delta / best_off:.2f} % of this path, "
          f"{100 * delta / SATURATED_NS:.2f} % of a saturated delivered message ({SATURATED_NS} ns)")


if __name__ == "__main__":
    main()

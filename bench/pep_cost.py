#!/usr/bin/env python3
"""Server CPU per PEP notification: 1 publish -> N contacts with ``+notify`` (issue 15).

Not a test.  In process, like bench/metrics_cost.py: sessions of one server
are bound through the real code over transports that only count writes;
``alice`` has N mutual contacts, each online with entity caps listing
``NODE+notify`` (the caps cache is primed, so no disco#info round trip is
timed), and publishes items through ``dataReceived`` (parser, c2s stream,
IQ dispatch, PEP publish with a MemoryStore write, recipient computation
from the live roster, filter chain, one notification per contact and the
owner's resource, serialisation).  The same sessions then send chat
messages alice -> bob for the per-message cost next to it.  TLS, the
kernel and the reactor are left out.  The fastest repetition is kept.

    PYTHONPATH=. .venv/bin/python bench/pep_cost.py [--contacts N] [--publishes P] [--reps R]
"""
from __future__ import annotations

import argparse
import gc
import time

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from bench.metrics_cost import SATURATED_NS
from bench.metrics_cost import session as bound_session
from xmppd import c2s, config
from xmppd.core import Server
from xmppd.handlers.roster import Item
from xmppd.storage import MemoryStore

PLUGINS = ["roster", "presence", "disco", "ping", "urn:xmpp:blocking", "caps", "pep"]
NODE = "urn:xmpp:bench:mood"
VER = "benchVer0000000000000000000="
WRITES = [0]


class CountingTransport(StringTransport):
    def write(self, data: bytes) -> None:
        WRITES[0] += 1


def build(contacts: int):
    store = MemoryStore()
    names = [f"c{i}" for i in range(contacts)]
    both = dict(Item.new(), subscription="both")
    for n in names:
        store.put("roster", "alice@localhost", f"{n}@localhost", both)
        store.put("roster", f"{n}@localhost", "alice@localhost", both)
    data = {"sm": {"plugins": PLUGINS}}
    server = Server(config.from_dict(data), store=store, clock=Clock(), certs=object())
    server.plugin("caps").cache[("sha-1", VER)] = frozenset({NODE + "+notify"})
    factory = c2s.C2SFactory(server)
    caps = (b"<presence><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' "
            b"node='bench' ver='" + VER.encode() + b"'/></presence>")
    sessions = {}
    for user in ["alice", *names]:
        s = bound_session(factory, user)
        s.transport = CountingTransport()
        s.dataReceived(caps)
        sessions[user] = s
    return server, sessions


def timed(feed, stanzas: list[bytes]) -> tuple[float, int]:
    gc.collect()
    gc.disable()
    before = WRITES[0]
    try:
        start = time.process_time_ns()
        for s in stanzas:
            feed(s)
        elapsed = time.process_time_ns() - start
    finally:
        gc.enable()
    return elapsed / len(stanzas), WRITES[0] - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contacts", type=int, default=50)
    ap.add_argument("--publishes", type=int, default=400)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    server, sessions = build(args.contacts)
    feed = sessions["alice"].dataReceived
    publishes = [f"<iq type='set' id='p{i}'><pubsub xmlns='http://jabber.org/protocol/pubsub'>"
                 f"<publish node='{NODE}'><item id='current'><mood xmlns='{NODE}'><happy/>"
                 f"<text>publish {i}</text></mood></item></publish></pubsub></iq>".encode()
                 for i in range(args.publishes)]
    messages = [f"<message to='c0@localhost' type='chat' id='m{i}'>"
                f"<body>message number {i} of the benchmark</body></message>".encode()
                for i in range(args.messages)]
    timed(feed, publishes[:50]), timed(feed, messages[:2000])  # warm-up
    pubs, msgs = [], []
    for _ in range(args.reps):
        per_publish, writes = timed(feed, publishes)
        pubs.append(per_publish)
        msgs.append(timed(feed, messages)[0])
    per_pub = min(pubs)
    fanout = writes / args.publishes - 1  # minus the IQ result
    per_msg = min(msgs)
    print(f"{args.contacts} contacts with +notify, {args.publishes} publishes x {args.reps} reps "
          f"(fastest rep; {fanout:.0f} notifications + 1 IQ result written per publish):")
    print(f"  per publish:      {per_pub:9.0f} ns (median {sorted(pubs)[len(pubs) // 2]:.0f})")
    print(f"  per notification: {per_pub / fanout:9.0f} ns (publish cost / notifications)")
    print(f"  per chat message: {per_msg:9.0f} ns on the same path "
          f"(saturated delivered message, TLS included: {SATURATED_NS} ns)")
    print(f"  notification / message: {per_pub / fanout / per_msg:.2f}x")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""What a message crossing cluster nodes costs the two nodes, measured in process (issue 18).

Not a test.  Two servers A and B with ``[cluster]`` on, in one process,
their Redis connections (:mod:`xmppd.cluster.resp` protocols, the real
ones) wired to a small fake Redis in this file instead of a socket: it
answers PUBLISH with the number of subscribers and hands each subscriber
the push Redis would send, with the same bytes.  Sessions are bound
through the real code (as bench/metrics_cost.py: stream header, bind,
initial presence) on discarding transports; the bus events of the binds
give each node the other's sessions as remote sessions, as in the daemon.

Measured, nanoseconds of CPU per message (``time.process_time_ns``):

* **same**: alice -> carol, both on A (``dataReceived`` of alice's stream
  to carol's ``send_bytes``);
* **cross**: alice on A -> bob on B: A's part (the same, up to the bus
  PUBLISH written at the end of the reactor turn), B's part (the
  subscriber's read of the pushes to bob's ``send_bytes``) and A's read of
  the PUBLISH replies.  The fake Redis' own work is not timed.

Messages go ``--batch`` to a reactor turn (one ``Clock.advance(0)`` flushes
the turn's PUBLISH pipeline; B reads the turn's pushes in one read), as
under load.  TLS, the kernel and the reactor are left out: the figures
are the Python work a crossing message adds, the part xmppd can cut.
The runs alternate; the fastest repetition of each is kept.

    PYTHONPATH=. .venv/bin/python bench/cluster_cost.py [--messages N] [--reps R] [--batch B]
    PYTHONPATH=. .venv/bin/python bench/cluster_cost.py --profile   # calls per message
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import time

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from bench.metrics_cost import NullTransport, session as bound_session
from xmppd import c2s, config
from xmppd.cluster.resp import Commands, Subscriber, parse
from xmppd.core import Server
from xmppd.storage import MemoryStore

PLUGINS = ["roster", "presence", "disco", "ping", "urn:xmpp:blocking", "urn:xmpp:sm:3"]


class Capture(StringTransport):
    """A Redis connection's transport: keeps what the node writes, for the fake Redis."""

    def __init__(self) -> None:
        super().__init__()
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)


class FakeRedis:
    """PUBLISH and the registry's commands, enough for two nodes' buses."""

    def __init__(self) -> None:
        self.nodes = []  # (commands, subscriber, channels)

    def join(self, server) -> None:
        link = server.cluster.link
        cmd = Commands(0, None, link.max_message, server.clock)
        cmd.makeConnection(Capture())
        sub = Subscriber(link.channels, None, link.on_message, link.max_message)
        sub.makeConnection(Capture())
        link.cmd, link.sub, link.up = cmd, sub, True
        self.nodes.append((server, cmd, sub, {c.encode() for c in link.channels}))
        self.pump()  # SELECT and SUBSCRIBE answered

    def pending(self) -> bool:
        return any(c.transport.out or s.transport.out for _, c, s, _ in self.nodes)

    def route(self):
        """Turn every node's written commands into (replies per node, pushes per node)."""
        replies = {id(c): [] for _, c, _, _ in self.nodes}
        pushes = {id(s): [] for _, _, s, _ in self.nodes}
        for _, cmd, sub, _ in self.nodes:
            for conn, is_sub in ((cmd, False), (sub, True)):
                data = b"".join(conn.transport.out)
                conn.transport.out.clear()
                pos = 0
                while pos < len(data):
                    args, pos = parse(data, pos, 1 << 24)
                    name = args[0].upper()
                    if is_sub:
                        if name == b"SUBSCRIBE":
                            for ch in args[1:]:
                                pushes[id(sub)].append(
                                    b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:1\r\n" % (len(ch), ch))
                        continue
                    if name == b"PUBLISH":
                        ch, payload = args[1], args[2]
                        n = 0
                        for _, _, other, channels in self.nodes:
                            if ch in channels:
                                n += 1
                                pushes[id(other)].append(
                                    b"*3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
                                    % (len(ch), ch, len(payload), payload))
                        replies[id(cmd)].append(b":%d\r\n" % n)
                    elif name in (b"SELECT", b"SET"):
                        replies[id(cmd)].append(b"+OK\r\n")
                    else:
                        replies[id(cmd)].append(b":1\r\n")
        return ([(c, b"".join(replies[id(c)])) for _, c, _, _ in self.nodes],
                [(s, b"".join(pushes[id(s)])) for _, _, s, _ in self.nodes])

    def pump(self) -> None:
        """Until quiet: flush every node's turn, deliver pushes and replies."""
        for _ in range(100):
            for server, _, _, _ in self.nodes:
                server.clock.advance(0)
            if not self.pending():
                return
            replies, pushes = self.route()
            for sub, data in pushes:
                if data:
                    sub.dataReceived(data)
            for cmd, data in replies:
                if data:
                    cmd.dataReceived(data)
        raise RuntimeError("the fake Redis never went quiet")


class Counting(NullTransport):
    """Discards, counting the writes (every message reached bob)."""

    count = 0

    def write(self, data: bytes) -> None:
        self.count += 1


def two_nodes(store) -> tuple[FakeRedis, Server, Server]:
    """Nodes A and B on one store and one fake Redis (tests/test_cluster_bus.py too)."""
    servers = []
    for node in ("A", "B"):
        data = {"sm": {"plugins": PLUGINS},
                "cluster": {"redis": "redis://127.0.0.1:1/0", "node": node}}
        servers.append(Server(config.from_dict(data), store=store, clock=Clock(), certs=object()))
    redis = FakeRedis()
    for s in servers:
        redis.join(s)
    return redis, servers[0], servers[1]


def build(store):
    redis, a, b = two_nodes(store)
    fa, fb = c2s.C2SFactory(a), c2s.C2SFactory(b)
    alice = bound_session(fa, "alice")
    carol = bound_session(fa, "carol")
    redis.pump()
    bob = bound_session(fb, "bob")
    bob.transport = Counting()
    redis.pump()
    assert getattr(a.router.sessions["bob@localhost"]["r"], "remote", False)
    assert a.router.sessions["bob@localhost"]["r"].available
    return redis, a, b, alice, carol, bob


def messages(to: str, n: int) -> list[bytes]:
    return [f"<message to='{to}' type='chat' id='m{i}'>"
            f"<body>message number {i} of the benchmark</body></message>".encode()
            for i in range(n)]


def run_same(redis, a, alice, msgs, batch: int) -> float:
    feed, clock = alice.dataReceived, a.clock
    gc.collect()
    gc.disable()
    try:
        start = time.process_time_ns()
        for i in range(0, len(msgs), batch):
            for m in msgs[i:i + batch]:
                feed(m)
            clock.advance(0)
        elapsed = time.process_time_ns() - start
    finally:
        gc.enable()
    assert not redis.pending()
    return elapsed / len(msgs)


def run_cross(redis, a, b, alice, bob, msgs, batch: int,
              prof: cProfile.Profile | None = None) -> tuple[float, float, float]:
    """(A's send, B's receive, A's reply handling) in ns per message.

    ``prof``: a profiler to pause while the fake Redis works."""
    feed, clock = alice.dataReceived, a.clock
    ta = tb = tr = 0
    delivered = bob.transport.count
    gc.collect()
    gc.disable()
    try:
        for i in range(0, len(msgs), batch):
            t0 = time.process_time_ns()
            for m in msgs[i:i + batch]:
                feed(m)
            clock.advance(0)
            t1 = time.process_time_ns()
            if prof is not None:
                prof.disable()
            replies, pushes = redis.route()
            if prof is not None:
                prof.enable()
            t2 = time.process_time_ns()
            for sub, data in pushes:
                if data:
                    sub.dataReceived(data)
            t3 = time.process_time_ns()
            for cmd, data in replies:
                if data:
                    cmd.dataReceived(data)
            t4 = time.process_time_ns()
            ta += t1 - t0
            tb += t3 - t2
            tr += t4 - t3
    finally:
        gc.enable()
    assert bob.transport.count - delivered == len(msgs), bob.transport.count - delivered
    assert not redis.pending()
    n = len(msgs)
    return ta / n, tb / n, tr / n


def profile(redis, a, b, alice, carol, bob, n: int, batch: int) -> None:
    """Function calls per message (cProfile), the fake Redis and the timer calls left out."""
    for label in ("same", "cross"):
        prof = cProfile.Profile()
        if label == "same":
            msgs = messages("carol@localhost", n)
            prof.enable()
            run_same(redis, a, alice, msgs, batch)
        else:
            msgs = messages("bob@localhost", n)
            prof.enable()
            run_cross(redis, a, b, alice, bob, msgs, batch, prof)
        prof.disable()
        st = pstats.Stats(prof)
        rows = [(v[1] / n, f"{k[0].split('/')[-1]}:{k[1]} {k[2]}") for k, v in st.stats.items()
                if "cluster_cost" not in k[0] and "process_time_ns" not in k[2]
                and "'disable'" not in k[2] and "'enable'" not in k[2]]
        print(f"{label}: {sum(r[0] for r in rows):.1f} function calls per message")
        for per, name in sorted(rows, reverse=True):
            if per >= 0.05:
                print(f"  {per:6.2f}  {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--batch", type=int, default=10, help="messages per reactor turn")
    ap.add_argument("--profile", action="store_true", help="cProfile call counts per message")
    args = ap.parse_args()
    redis, a, b, alice, carol, bob = build(MemoryStore())
    if args.profile:
        profile(redis, a, b, alice, carol, bob, 2000, args.batch)
        return
    same_msgs = messages("carol@localhost", args.messages)
    cross_msgs = messages("bob@localhost", args.messages)
    run_same(redis, a, alice, same_msgs, args.batch)  # warm-up
    run_cross(redis, a, b, alice, bob, cross_msgs, args.batch)
    same, cross = [], []
    for _ in range(args.reps):
        same.append(run_same(redis, a, alice, same_msgs, args.batch))
        cross.append(run_cross(redis, a, b, alice, bob, cross_msgs, args.batch))
    best_same = min(same)
    best = min(cross, key=sum)
    total = sum(best)
    print(f"{args.messages} messages x {args.reps} reps, {args.batch} per turn, fastest rep:")
    print(f"  same node:       {best_same:7.0f} ns/message")
    print(f"  cross, A sends:  {best[0]:7.0f}")
    print(f"  cross, B reads:  {best[1]:7.0f}")
    print(f"  cross, A replies:{best[2]:7.0f}")
    print(f"  cross, total:    {total:7.0f} ns/message = same + {total - best_same:.0f} "
          f"({total / best_same:.2f}x)")


if __name__ == "__main__":
    main()

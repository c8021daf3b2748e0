#!/usr/bin/env python3
"""What the XEP-0313 archive costs per routed message, measured in process (issue 16).

Not a test.  Like bench/sm_cost.py: two servers, one with ``urn:xmpp:sid:0``
alone, one with ``urn:xmpp:sid:0`` and ``urn:xmpp:mam:2`` (SQLite archive in
a temporary directory, ``synchronous=FULL``), each with two bound sessions
over a discarding transport; one sends the other chat messages through
``dataReceived`` (parser, c2s stream, router, stanza ids, serialisation,
``send_bytes``).  Both parties are local, so every message is archived
twice (sender and recipient): the worst case.  The archive's writes run on
the reactor thread, in the daemon as here: one transaction per ``--batch``
messages (what one ``flush_interval`` collects under load) is inside the
timed CPU.  The checkpoint thread's fsyncs are not (the clock is not
advanced; they are I/O wait, not CPU, in the daemon).  The pairs alternate; the fastest
repetition of each is kept.

    PYTHONPATH=. .venv/bin/python bench/mam_cost.py [--messages N] [--reps R] [--batch B]
"""
from __future__ import annotations

import argparse
import gc
import tempfile
import time

from twisted.internet.task import Clock

from bench.metrics_cost import SATURATED_NS
from bench.metrics_cost import session as bound_session
from xmppd import c2s, config
from xmppd.core import Server
from xmppd.msglog import LogQuery
from xmppd.storage import MemoryStore

BASE = ["roster", "presence", "disco", "ping", "urn:xmpp:sid:0"]


def build(mam: bool, data_dir: str):
    data = {"server": {"data_dir": data_dir},
            "sm": {"plugins": BASE + (["urn:xmpp:mam:2"] if mam else [])},
            "mam": {"max_messages_per_user": 0, "retention": "forever"}}
    server = Server(config.from_dict(data), store=MemoryStore(), clock=Clock(), certs=object())
    plugin = server.plugin("urn:xmpp:mam:2")
    factory = c2s.C2SFactory(server)
    return server, plugin, (bound_session(factory, "alice"), bound_session(factory, "bob"))


def run(pair, plugin, messages: list[bytes], batch: int) -> float:
    """Nanoseconds of CPU per message alice -> bob (bare JID), archive writes included."""
    feed = pair[0].dataReceived
    gc.collect()
    gc.disable()
    try:
        start = time.process_time_ns()
        if plugin is None:
            for m in messages:
                feed(m)
        else:
            flush = plugin.worker.flush
            for i, m in enumerate(messages, 1):
                feed(m)
                if i % batch == 0:
                    flush()
            flush()
        elapsed = time.process_time_ns() - start
    finally:
        gc.enable()
    return elapsed / len(messages)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--batch", type=int, default=500,
                    help="messages per archive transaction (default 500)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        _, _, plain = build(False, tmp + "/plain")
        server, plugin, archived = build(True, tmp + "/mam")
        batch = [f"<message to='bob@localhost' type='chat' id='m{i}'>"
                 f"<body>message number {i} of the benchmark</body></message>".encode()
                 for i in range(args.messages)]
        run(plain, None, batch, args.batch), run(archived, plugin, batch, args.batch)  # warm-up
        off, on = [], []
        for _ in range(args.reps):
            off.append(run(plain, None, batch, args.batch))
            on.append(run(archived, plugin, batch, args.batch))
        rows = plugin.msglog.count(LogQuery("alice@localhost"), 10**9)
        assert rows == (args.reps + 1) * args.messages, rows  # every message archived
        server.close()
    best_off, best_on = min(off), min(on)
    delta = best_on - best_off
    print(f"{args.messages} messages x {args.reps} reps, fastest rep of each, "
          f"{args.batch} messages per archive transaction (2 rows each):")
    print(f"  stanza ids only: {best_off:8.0f} ns/message (median {sorted(off)[len(off) // 2]:.0f})")
    print(f"  with archive:    {best_on:8.0f} ns/message (median {sorted(on)[len(on) // 2]:.0f})")
    print(f"  difference:      {delta:8.0f} ns/message = {100 * delta / best_off:.1f} % of this path, "
          f"{100 * delta / SATURATED_NS:.1f} % of a saturated delivered message ({SATURATED_NS} ns)")


if __name__ == "__main__":
    main()

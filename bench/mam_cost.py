#!/usr/bin/env python3
"""What the XEP-0313 archive costs per routed message, measured in process (issue 16).

Not a test.  Like bench/sm_cost.py: four servers, one without stanza ids,
one with ``urn:xmpp:sid:0`` alone, and two with ``urn:xmpp:sid:0`` and
``urn:xmpp:mam:2``: the in-memory archive (the plugin's Python part alone)
and the SQLite one (in a temporary directory), each with two bound sessions
over a discarding transport; one sends the other chat messages through
``dataReceived`` (parser, c2s stream, router, stanza ids, serialisation,
``send_bytes``).  Both parties are local, so every message is archived
twice (sender and recipient): the worst case.  The archive's writes run on
the reactor thread, in the daemon as here: one transaction per ``--batch``
messages (what one ``flush_interval`` collects under load) is inside the
timed CPU.  The checkpoint thread's work is not (one checkpoint runs at
the first write, in the warm-up; the clock is not advanced after that).
The servers alternate; the fastest repetition of each is kept.

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

BASE = ["roster", "presence", "disco", "ping"]
SID = "urn:xmpp:sid:0"


def build(mam: bool, data_dir: str, storage: str = "sqlite", sid: bool = True):
    plugins = BASE + ([SID] if sid or mam else []) + (["urn:xmpp:mam:2"] if mam else [])
    data = {"server": {"data_dir": data_dir},
            "sm": {"plugins": plugins},
            "mam": {"max_messages_per_user": 0, "retention": "forever", "storage": storage}}
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
        setups = {
            "no stanza ids": build(False, tmp + "/none", sid=False),
            "stanza ids only": build(False, tmp + "/plain"),
            "archive in memory": build(True, tmp + "/memory", storage="memory"),
            "archive in SQLite": build(True, tmp + "/mam"),
        }
        batch = [f"<message to='bob@localhost' type='chat' id='m{i}'>"
                 f"<body>message number {i} of the benchmark</body></message>".encode()
                 for i in range(args.messages)]
        times: dict[str, list] = {name: [] for name in setups}
        for rep in range(args.reps + 1):  # the first is a warm-up
            for name, (_, plugin, pair) in setups.items():
                t = run(pair, plugin, batch, args.batch)
                if rep:
                    times[name].append(t)
        server, plugin, _ = setups["archive in SQLite"]
        rows = plugin.msglog.count(LogQuery("alice@localhost"), 10**9)
        assert rows == (args.reps + 1) * args.messages, rows  # every message archived
        for server, _, _ in setups.values():
            server.close()
    print(f"{args.messages} messages x {args.reps} reps, fastest rep of each, "
          f"{args.batch} messages per archive transaction (2 rows each):")
    base = min(times["no stanza ids"])
    for name, ts in times.items():
        best = min(ts)
        print(f"  {name:18s} {best:8.0f} ns/message (median {sorted(ts)[len(ts) // 2]:.0f}),"
              f" +{best - base:6.0f} ns = {best / base:.2f}x of no stanza ids")
    sqlite_part = min(times["archive in SQLite"]) - min(times["archive in memory"])
    print(f"  SQLite part (SQLite - memory): {sqlite_part:.0f} ns/message; a saturated delivered"
          f" message costs {SATURATED_NS} ns in the daemon")


if __name__ == "__main__":
    main()

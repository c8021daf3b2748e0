#!/usr/bin/env python3
"""Server time of MAM page queries on a 1,000,000-message archive (issue 16).

Not a test.  Fills ``archive.sqlite3`` (schema 3: blocks, see
:mod:`xmppd.msglog_sqlite`) in a temporary directory through
``SQLiteMessageLog.append``, 1,000 rows per transaction as a flush writes
them (one user, 1,000,000 messages with 100 correspondents, a second user
with 100,000), then runs queries through the plugin's own handler
(``MAMPlugin.on_query``: form and RSM parsing, the SQLite reads, the result
messages and ``<fin/>``) and reports wall-clock
milliseconds per query (median and max of ``--reps``).  The first run of
each query is a warm-up (the OS page cache is warm, as on a server that has
served the user before).

    PYTHONPATH=. .venv/bin/python bench/mam_query.py [--rows N] [--reps R]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from twisted.internet.task import Clock
from twisted.words.xish import domish

from xmppd import config
from xmppd import jid as jidlib
from xmppd.core import Server
from xmppd.msglog import SQLiteMessageLog
from xmppd.plugin import Request
from xmppd.storage import MemoryStore
from xmppd.xmlparser import Limits, parse_fragment

BASE_SEQ = 1_700_000_000_000_000  # 2023-11-14, then one message every 10 ms
STEP = 10_000
PREFIX = "BenchPrefix0-"


def fill(data_dir: str, rows: int, batch: int = 1000) -> None:
    """The archive written as the server writes it: ``batch`` rows per
    transaction (one flush), so one block per user per flush."""
    log = SQLiteMessageLog(data_dir)
    body = "x" * 60
    pending = []
    for x in range(rows):
        seq = BASE_SEQ + x * STEP
        for user, s in (("big@localhost", seq), ("small@localhost", seq + 1)):
            if user == "small@localhost" and x >= rows // 10:
                continue
            friend = f"friend{x % 100}@remote.example"
            stanza = (f"<message xmlns='jabber:client' type='chat' id='m{x}' to='{user}'"
                      f" from='{friend}/phone'><body>{body} {x}</body></message>").encode()
            pending.append((s, user, f"{friend}/phone", f"{PREFIX}{s:x}", x % 2, stanza))
        if len(pending) >= batch:
            log.append(pending)
            pending = []
    log.append(pending)
    log.close()


class Sink:
    """A session that keeps what it is sent (the result messages)."""

    def __init__(self, jid) -> None:
        self.jid = jid
        self.sent = 0

    def send_bytes(self, data: bytes) -> None:
        self.sent += 1

    def send(self, element) -> None:
        self.sent += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fill(tmp, args.rows)
        print(f"filled {args.rows} + {args.rows // 10} rows in {time.perf_counter() - t0:.1f} s")
        data = {"server": {"data_dir": tmp},
                "sm": {"plugins": ["roster", "disco", "urn:xmpp:sid:0", "urn:xmpp:mam:2"]},
                "mam": {"max_page": 100, "retention": "forever", "max_messages_per_user": 0}}
        server = Server(config.from_dict(data), store=MemoryStore(), clock=Clock(), certs=object())
        plugin = server.plugin("urn:xmpp:mam:2")
        me = jidlib.parse("big@localhost/bench")
        session = Sink(me)
        mid = BASE_SEQ + (args.rows // 2) * STEP
        mid_id = f"{PREFIX}{mid:x}"
        ids = "".join(f"<value>{PREFIX}{BASE_SEQ + k * (args.rows // 10) * STEP:x}</value>"
                      for k in range(10))

        def form(fields: str) -> str:
            return ("<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'>"
                    f"<value>urn:xmpp:mam:2</value></field>{fields}</x>")

        def stamp(seq: int) -> str:
            return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seq // 1_000_000))

        rsm = "<set xmlns='http://jabber.org/protocol/rsm'><max>{}</max>{}</set>"
        cases = {
            "first page (50)": rsm.format(50, ""),
            "last page (50, <before/>)": rsm.format(50, "<before/>"),
            "page after a middle id (50)": rsm.format(50, f"<after>{mid_id}</after>"),
            "page before a middle id (100)": rsm.format(100, f"<before>{mid_id}</before>"),
            "with=friend7 last page (50)": form("<field var='with'><value>friend7@remote.example"
                                                "</value></field>") + rsm.format(50, "<before/>"),
            "with full JID, middle (50)": form("<field var='with'><value>friend7@remote.example/"
                                               "phone</value></field>") + rsm.format(
                                                   50, f"<after>{mid_id}</after>"),
            "start/end one hour, middle (50)": form(
                f"<field var='start'><value>{stamp(mid)}</value></field>"
                f"<field var='end'><value>{stamp(mid + 3600 * 1_000_000)}</value></field>"
            ) + rsm.format(50, ""),
            "ids (10)": form(f"<field var='ids'>{ids}</field>"),
        }
        limits = Limits(1 << 20, 20, 10_000)
        print(f"{args.reps} runs each, wall-clock ms per query (handler: parse, SQLite, results):")
        for label, inner in cases.items():
            xml = (f"<iq xmlns='jabber:client' type='set' id='q' from='{me.full}'>"
                   f"<query xmlns='urn:xmpp:mam:2' queryid='b'>{inner}</query></iq>")
            stanza = parse_fragment(xml, limits)
            times, results = [], []
            for rep in range(args.reps + 1):
                session.sent = 0
                start = time.perf_counter()
                d = plugin.on_query(Request(stanza, me, None, session))
                reply = []
                d.addBoth(reply.append)
                elapsed = time.perf_counter() - start
                assert isinstance(reply[0], domish.Element), reply[0]
                if rep:
                    times.append(elapsed * 1000)
                results.append(session.sent)
            fin = reply[0].toXml()
            count = fin.split("<count>")[1].split("<")[0] if "<count>" in fin else "-"
            print(f"  {label:34s} median {statistics.median(times):6.2f}  max {max(times):6.2f}"
                  f"  ({results[-1]} results, count {count})")
        server.close()


if __name__ == "__main__":
    main()

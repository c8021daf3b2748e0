#!/usr/bin/env python3
"""Server time of MAM page queries on a 1,000,000-message archive (issue 16).

Not a test.  Fills ``archive.sqlite3`` (schema 2: ``msgs`` and ``archive``,
see :class:`xmppd.msglog.SQLiteMessageLog`) in a temporary directory directly by
SQL (one user, 1,000,000 messages with 100 correspondents, a second user
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
import sqlite3
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


def fill(data_dir: str, rows: int) -> None:
    SQLiteMessageLog(data_dir).close()  # the schema
    db = sqlite3.connect(f"{data_dir}/{SQLiteMessageLog.FILENAME}")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("INSERT INTO jids (id, jid) VALUES (1, 'big@localhost'), (2, 'small@localhost')")
    db.executemany("INSERT INTO jids (id, jid) VALUES (?, ?)",
                   [(10 + i, f"friend{i}@remote.example") for i in range(100)])
    db.execute("INSERT INTO prefixes (id, prefix) VALUES (1, ?)", (PREFIX,))
    body = "x" * 60
    for uid, n, offset in ((1, rows, 0), (2, rows // 10, 1)):
        db.execute(
            "WITH RECURSIVE c(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM c WHERE x < ?) "
            "INSERT INTO msgs SELECT ? + x * ? + ?, 1, ?, NULL, NULL, "
            "CAST('<message xmlns=''jabber:client'' type=''chat'' id=''m' || x || "
            "''' to=''big@localhost'' from=''friend' || (x % 100) || '@remote.example/phone''>"
            f"<body>{body} ' || x || '</body></message>' AS BLOB) FROM c",
            (n - 1, BASE_SEQ, STEP, offset, uid))
        db.execute(
            "WITH RECURSIVE c(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM c WHERE x < ?) "
            "INSERT INTO archive SELECT ?, ? + x * ? + ?, 10 + x % 100, 'phone', 1, x % 2,"
            " ? + x * ? + ? FROM c",
            (n - 1, uid, BASE_SEQ, STEP, offset, BASE_SEQ, STEP, offset))
    db.execute("UPDATE meta SET value=(SELECT max(seq) FROM msgs) WHERE key='last_seq'")
    db.commit()
    db.close()


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

"""User <-> component IQ round trips (issue 13): cost per 10,000, in process and over XEP-0114.

Not part of the test suite.  One xmppd (tests/daemon.py) serves:

* ``localhost`` itself: pings answered by the ping plugin (the baseline: the
  same client, stream and router, no component);
* ``echo.localhost``: wokkel's ``PingHandler`` in process;
* ``wecho.localhost``: the same handler in ``examples/external.py`` (wokkel's
  ``Component``, its own process) over XEP-0114.

One logged-in raw client sends N pings to each, one at a time (each waits
for its answer: round-trip latency), then N with 100 in flight (throughput).
Reported: wall seconds per 10,000 and the server's CPU seconds per 10,000
(xmppd only; the external component's own CPU is shown apart).

    PYTHONPATH=$PWD .venv/bin/python bench/components.py [--n 10000]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.procstat import cpu_seconds  # noqa: E402
from tests.daemon import Daemon, free_port  # noqa: E402
from tests.rawclient import RawClient  # noqa: E402

CONFIG = """
[components]
listen = ["tcp:{cport}:interface=127.0.0.1"]

[components."echo.localhost"]
handlers = ["wokkel.ping:PingHandler"]

[components."wecho.localhost"]
secret = "bench-secret"
"""


def ping(to: str, ident: str) -> bytes:
    return f"<iq type='get' id='{ident}' to='{to}'><ping xmlns='urn:xmpp:ping'/></iq>".encode()


def sequential(c: RawClient, to: str, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        c.send(ping(to, f"s{i}"))
        c.read_until(f"id='s{i}'[^>]*/>")
    return time.perf_counter() - start


def pipelined(c: RawClient, to: str, n: int, window: int = 100) -> float:
    start = time.perf_counter()
    sent = done = 0
    while done < n:
        while sent < n and sent - done < window:
            c.send(ping(to, f"p{sent}"))
            sent += 1
        c.read_until(f"id='p{done}'[^>]*/>")
        done += 1
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000)
    args = parser.parse_args(argv)
    n = args.n
    with tempfile.TemporaryDirectory() as tmp:
        cport = free_port()
        d = Daemon(Path(tmp), extra=CONFIG.format(cport=cport))
        d.start()
        component = None
        try:
            d.adduser("bench@localhost", "bench-pw")
            component = subprocess.Popen(
                [sys.executable, "-m", "examples.external", "--domain", "wecho.localhost",
                 "--port", str(cport), "--secret", "bench-secret"],
                cwd=REPO, env=d.env(), stdout=subprocess.PIPE, text=True)
            assert component.stdout.readline().strip() == "connected"
            c = RawClient(d.port, timeout=30)
            c.login("bench", "bench-pw")
            for to in ("localhost", "echo.localhost", "wecho.localhost"):  # warm-up
                sequential(c, to, 200)
            rows = []
            for label, to in (("server (ping plugin, baseline)", "localhost"),
                              ("in-process wokkel PingHandler", "echo.localhost"),
                              ("XEP-0114 wokkel Component", "wecho.localhost")):
                for mode, fn in (("sequential", sequential), ("100 in flight", pipelined)):
                    cpu0, ext0 = cpu_seconds(d.proc.pid), cpu_seconds(component.pid)
                    wall = fn(c, to, n)
                    cpu = cpu_seconds(d.proc.pid) - cpu0
                    ext = cpu_seconds(component.pid) - ext0
                    scale = 10000 / n
                    rows.append((label, mode, wall * scale, cpu * scale, ext * scale))
            c.close()
        finally:
            if component is not None:
                component.terminate()
                component.wait(10)
            d.stop()
    print(f"IQ round trips, per 10,000 (n = {n}):")
    print(f"{'target':34} {'mode':14} {'wall s':>8} {'xmppd CPU s':>12} {'component CPU s':>16}")
    for label, mode, wall, cpu, ext in rows:
        ext_text = f"{ext:16.2f}" if "0114" in label else f"{'-':>16}"
        print(f"{label:34} {mode:14} {wall:8.2f} {cpu:12.2f} {ext_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

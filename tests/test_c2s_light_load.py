"""Light load (issue 20): a message between two idle TLS clients costs the
server one read and one send, not a reactor turn, a timer and an epoll_ctl
pair for each write (xmppd.fastio).

The count of system calls is exact, unlike CPU time on a shared machine:
``strace -c`` is attached to the daemon while messages go one at a time
(each waits for its delivery), as on a mostly idle server.  Plain TCP
clients and output outside a read (timers) keep Twisted's own path; the
ordering and flow-control tests of test_hardening_conn.py, test_sm.py and
test_csi.py cover those.
"""
from __future__ import annotations

import re
import signal
import subprocess
import time

from tests.daemon import Daemon
from tests.rawclient import RawClient

N = 40


def strace_counts(pid: int, out) -> subprocess.Popen:
    proc = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", str(out)],
                            stderr=subprocess.PIPE, text=True)
    # strace says "Process N attached" (per thread) once it traces.
    deadline = time.monotonic() + 10
    line = ""
    while "attached" not in line and time.monotonic() < deadline:
        line = proc.stderr.readline()
    assert "attached" in line, line
    return proc


def summary(path) -> dict[str, int]:
    calls = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
        if m:
            calls[m.group(2)] = int(m.group(1))
    return calls


def test_message_between_idle_tls_clients_is_one_recv_and_one_send(tmp_path):
    d = Daemon(tmp_path).start()
    try:
        d.adduser("alice@localhost", "password-a")
        d.adduser("bob@localhost", "password-b")
        alice, bob = RawClient(d.port), RawClient(d.port)
        alice.login("alice", "password-a")
        bob_jid = bob.login("bob", "password-b")

        def message(i: int) -> None:
            alice.send(f"<message to='{bob_jid}' type='chat' id='m{i}'><body>hi {i}</body></message>")
            bob.read_until(f"id='m{i}'.*?</message>")

        message(-1)  # warm up
        out = tmp_path / "strace.txt"
        tracer = strace_counts(d.proc.pid, out)
        for i in range(N):
            message(i)
        time.sleep(0.2)
        tracer.send_signal(signal.SIGINT)
        tracer.wait(10)
        calls = summary(out)
        sends = sum(calls.get(c, 0) for c in ("sendto", "sendmsg", "write", "writev"))
        # Before: two epoll_ctl per message (writability on and off), three
        # reactor turns.  Now: the ciphertext goes out from the read's turn.
        assert calls.get("epoll_ctl", 0) <= N // 10, calls
        assert N <= sends <= N + 5, calls
        assert calls.get("recvfrom", 0) + calls.get("read", 0) <= N + 5, calls
        assert calls.get("epoll_wait", 0) <= N + 10, calls
    finally:
        d.stop()

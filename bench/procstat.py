"""CPU time and resident memory of a server's process tree, from /proc.

CPU = utime + stime of every live process in the tree (a process's
/proc/<pid>/stat already sums all its threads, including exited ones).
RSS = VmRSS from /proc/<pid>/status, summed over the tree.
"""

from __future__ import annotations

import os
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'
    rest = raw[raw.rfind(b")") + 2:].split()
    return [x.decode() for x in rest]  # rest[0] is field 3 (state)


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        f = _stat_fields(int(name))
        if f is None:
            continue
        children.setdefault(int(f[1]), []).append(int(name))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_seconds(root: int) -> float:
    total = 0
    for pid in tree_pids(root):
        f = _stat_fields(pid)
        if f is None:
            continue
        total += int(f[11]) + int(f[12])  # utime (field 14), stime (field 15)
    return total / CLK_TCK


def cpu_ns(root: int) -> int:
    """CPU time of the tree's live threads in ns (``/proc/<pid>/task/*/schedstat``).

    Exact where ``cpu_seconds`` counts clock ticks (10 ms): for short windows
    (a logout costs ~0.2 ms, 500 of them ~10 ticks).  Threads that exit
    during a window are missing, so it is only used for single-process
    windows whose thread set is stable (phase 7).
    """
    total = 0
    for pid in tree_pids(root):
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return total


def rss_kb(root: int) -> int:
    total = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def describe(root: int) -> list[str]:
    out = []
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/comm") as f:
                out.append(f"{pid}:{f.read().strip()}")
        except OSError:
            pass
    return out


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


class Sample:
    """A point-in-time snapshot: wall clock, server CPU, server RSS, client CPU."""

    __slots__ = ("wall", "cpu", "cpu_ns", "rss", "client_cpu", "sys_busy")

    def __init__(self, root: int):
        self.wall = time.monotonic()
        self.cpu = cpu_seconds(root)
        self.cpu_ns = cpu_ns(root)
        self.rss = rss_kb(root)
        self.client_cpu = self_cpu()

    def to(self, later: "Sample") -> dict:
        wall = later.wall - self.wall
        cpu = later.cpu - self.cpu
        ccpu = later.client_cpu - self.client_cpu
        return {
            "wall_s": round(wall, 3),
            "server_cpu_s": round(cpu, 3),
            "server_cpu_exact_s": round((later.cpu_ns - self.cpu_ns) / 1e9, 6),
            "server_util": round(cpu / wall, 3) if wall > 0 else None,
            "client_cpu_s": round(ccpu, 3),
            "client_util": round(ccpu / wall, 3) if wall > 0 else None,
            "rss_before_kb": self.rss,
            "rss_after_kb": later.rss,
        }

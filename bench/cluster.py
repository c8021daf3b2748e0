"""The cluster phase (issue 18): two xmppd nodes on one Redis, against one stand-alone node.

    .venv/bin/python bench/run.py --cluster [--quick] [--reps N] [--xmppd-profile DIR]

One store directory (``[storage] dir``) holds the accounts; a private
``redis-server`` (no persistence, loopback, as tests/backends.py starts it)
is shared by nodes A and B (``[cluster]``).  Every server process (the
stand-alone node, A, B and Redis) is pinned to the server CPU and the load
generator to the other, as in the other phases: CPU per message is the
measure, and the two nodes share one core as the s2s phase's two servers do.

Each repetition measures phase 2's closed loop (``pairs`` pairs, ``window``
messages in flight per connection) four times:

1. **solo**: every pair on a stand-alone node (no ``[cluster]``): the
   one-node figure;
2. **same**: nodes A and B up, half the pairs on A and half on B, both
   users of a pair on the same node (no message crosses);
3. **cross**: every pair split, one user on A and one on B: every message
   goes over Redis pub/sub;
4. **mixed**: half the pairs split, the other half same-node (a quarter on
   A, a quarter on B).

Reported per window: delivered msgs/s and server CPU-s per 10,000 delivered
messages summed over A, B **and** Redis (and each part).  Targets (issue 18):
``cross_vs_same`` at most 1.6 (a message crossing nodes against one that
does not), and ``same_vs_solo`` at most 1.1 (a node with no cross-node
traffic costs what a stand-alone node costs, so N nodes scale with cores).
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from pathlib import Path

import procstat
import targets as targets_mod
from report import median_cell
from run import HOST, PASSWORD, Bench, free_port_pair, log
from s2s import cross_pairs


WINDOWS = ("solo", "same", "cross", "mixed")


class RedisProc:
    """A private redis-server on loopback, pinned with the servers."""

    def __init__(self, workdir: Path, cpu: set[int] | None) -> None:
        self.binary = shutil.which("redis-server") or "/usr/sbin/redis-server"
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port_pair()
        self.cpu = cpu
        self.sched_batch = False
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> None:
        cpu, batch = self.cpu, self.sched_batch

        def pre():
            if cpu:
                os.sched_setaffinity(0, cpu)
            if batch:
                os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        self.log = open(self.dir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", HOST, "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir, start_new_session=True,
            preexec_fn=pre)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def log_tail(self, n: int = 10) -> str:
        try:
            return "\n".join((self.dir / "redis.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def io_counts(pid: int) -> dict[str, int]:
    """read/write syscalls (/proc/PID/io) and context switches (/proc/PID/status):
    deterministic enough on a shared machine to show how well work is batched."""
    out = {}
    try:
        for line in open(f"/proc/{pid}/io"):
            k, _, v = line.partition(":")
            if k in ("syscr", "syscw"):
                out[k] = int(v)
        for line in open(f"/proc/{pid}/status"):
            k, _, v = line.partition(":")
            if k in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                out[k.split("_")[0]] = int(v)
    except OSError:
        pass
    return out


def cpu_of(procs) -> dict[str, float]:
    return {name: procstat.cpu_seconds(pid) for name, pid in procs.items()}


async def quiet(procs: dict[str, int], max_wait: float = 60.0) -> None:
    """Until no process of ``procs`` uses CPU any more (two quiet ticks)."""
    last, still = cpu_of(procs), 0
    for _ in range(int(max_wait / 0.25)):
        await asyncio.sleep(0.25)
        now = cpu_of(procs)
        still = still + 1 if sum(now.values()) - sum(last.values()) <= 0.011 else 0
        last = now
        if still >= 2:
            return


async def saturation(bench: Bench, pairs, procs: dict[str, int], p: dict,
                     split: int = 0) -> dict:
    """Bench.saturation with the CPU of every process in ``procs`` sampled;
    the first ``split`` pairs are split across nodes (their share is counted)."""
    conns = [c for ab in pairs for c in ab]
    crossing = conns[:2 * split]
    await quiet(procs)
    await bench.machine_quiet()
    rx0, tx0, err0 = Bench._totals(conns)
    Bench.open_window(conns, p["window"])
    await asyncio.sleep(p["warmup"])
    s0, c0 = bench.sample(), cpu_of(procs)
    io0 = {name: io_counts(pid) for name, pid in procs.items()}
    d0, x0 = Bench._totals(conns)[0], Bench._totals(crossing)[0]
    await asyncio.sleep(p["measure"])
    d1, x1 = Bench._totals(conns)[0], Bench._totals(crossing)[0]
    s1, c1 = bench.sample(), cpu_of(procs)
    io1 = {name: io_counts(pid) for name, pid in procs.items()}
    for c in conns:
        c.reply_on = False
    tx, rx, err = await bench.drain(conns)
    n = d1 - d0
    wall = s1.wall - s0.wall
    cpu = {name: round(c1[name] - c0[name], 3) for name in procs}
    total = sum(cpu.values())
    busy = s1.sys_busy - s0.sys_busy
    return {
        "connections": len(conns), "window_per_conn": p["window"],
        "delivered_in_window": n, "wall_s": round(wall, 3),
        "crossed_share": round((x1 - x0) / n, 3) if n else None,
        "msgs_per_s": round(n / wall, 1),
        "cpu_s": cpu,
        "cpu_s_per_10k_msgs": round(total / n * 10000, 4) if n else None,
        "cpu_s_per_10k_msgs_by_process": {k: round(v / n * 10000, 4) if n else None
                                          for k, v in cpu.items()},
        "servers_util": round(total / wall, 3),
        # per delivered message, by process: syscalls and context switches
        "per_msg": {name: {k: round((io1[name][k] - v) / n, 2) for k, v in io0[name].items()}
                    for name in procs} if n else None,
        "client_cpu_s": round(s1.client_cpu - s0.client_cpu, 3),
        "other_cpu_s": round(max(0.0, busy - total - (s1.client_cpu - s0.client_cpu)), 3),
        "sent": tx - tx0, "delivered": rx - rx0, "lost": (tx - tx0) - (rx - rx0),
        "error_stanzas": err - err0,
    }


async def _login(bench: Bench, users: list[str], p: dict):
    conns, failures, _ = await bench.login_many(users, p["concurrency"])
    if failures:
        log(f"    login failures on {bench.t.domain}:{bench.port}: {failures}")
    return conns


async def cluster_window(ba: Bench, bb: Bench, procs: dict[str, int], p: dict,
                         split: int, same_a: int, same_b: int) -> dict:
    """``split`` pairs across A and B, ``same_a`` pairs on A only, ``same_b`` on B only."""
    users = iter(f"u{i}" for i in range(1, 2 * (split + same_a + same_b) + 1))
    take = (lambda n: [next(users) for _ in range(n)])
    left, right = take(split), take(split)
    on_a, on_b = take(2 * same_a), take(2 * same_b)
    ca = await _login(ba, left + on_a, p)
    cb = await _login(bb, right + on_b, p)
    await asyncio.sleep(0.5)  # every node has heard of the other's new sessions (one bus hop)
    try:
        pairs = cross_pairs(ca[:split], cb[:split])
        pairs += ba.setup_pairs(ca[split:]) + bb.setup_pairs(cb[split:])
        checks = []
        if split:
            checks.append(await ba.verify_routing(pairs[:split]) + " a->b")
            checks.append(await ba.verify_routing([(b, a) for a, b in pairs[:split]]) + " b->a")
        if same_a or same_b:
            checks.append(await ba.verify_routing(pairs[split:]) + " same")
        out = await saturation(ba, pairs, procs, p, split)
        out["pairs"] = {"split": split, "same_a": same_a, "same_b": same_b}
        out["routing_verified"] = ", ".join(checks)
        return out
    finally:
        await ba.close_all(ca)
        await bb.close_all(cb)


async def one_rep(solo: Bench, ba: Bench, bb: Bench, redis: RedisProc, p: dict) -> dict:
    k = p["pairs"]
    out: dict = {}
    which = p.get("cluster_windows") or WINDOWS
    # 1. the stand-alone node
    if "solo" in which:
        out["solo"] = await solo_window(solo, p)
    # 2-4. two nodes and Redis
    for t in (ba.t, bb.t):
        t.start()
    try:
        for b in (ba, bb):
            await b.wait_ready()
        await asyncio.sleep(1.0)  # both nodes connected to Redis and heard of each other
        procs = {"a": ba.t.pid, "b": bb.t.pid, "redis": redis.pid}
        half, quarter = k // 2, k // 4
        windows = {"same": (0, half, k - half), "cross": (k, 0, 0),
                   "mixed": (half, quarter, k - half - quarter)}
        for name, (split, same_a, same_b) in windows.items():
            if name in which:
                out[name] = await cluster_window(ba, bb, procs, p, split, same_a, same_b)
    finally:
        for t in (ba.t, bb.t):
            t.stop()

    def ratio(x, y):
        a, b = (out.get(w, {}).get("cpu_s_per_10k_msgs") for w in (x, y))
        return round(a / b, 3) if a and b else None
    out["cross_vs_same"] = ratio("cross", "same")
    out["same_vs_solo"] = ratio("same", "solo")
    out["cross_vs_solo"] = ratio("cross", "solo")
    out["mixed_vs_same"] = ratio("mixed", "same")
    return out


async def solo_window(solo: Bench, p: dict) -> dict:
    k = p["pairs"]
    solo.t.start()
    try:
        await solo.wait_ready()
        conns = await _login(solo, [f"u{i}" for i in range(1, 2 * k + 1)], p)
        try:
            pairs = solo.setup_pairs(conns)
            await solo.verify_routing(pairs)
            return await saturation(solo, pairs, {"solo": solo.t.pid}, p)
        finally:
            await solo.close_all(conns)
    finally:
        solo.t.stop()


async def run_cluster(args, p: dict, certs: dict, workroot: Path, cpu_server) -> dict:
    root = workroot / "xmppd-cluster"
    store = root / "store"
    store.mkdir(parents=True, exist_ok=True)
    redis = RedisProc(root / "redis", cpu_server)
    redis.sched_batch = p.get("sched_batch", False)
    cls = targets_mod.Xmppd
    domain = "bench.local"
    servers = {}
    for name in ("solo", "a", "b"):
        t = cls(root / name, free_port_pair(), domain, certs, PASSWORD, cpu_server)
        t.sched_batch = p.get("sched_batch", False)
        t.cluster = targets_mod.Cluster(store, None if name == "solo" else redis.url,
                                        None if name == "solo" else f"node-{name}")
        servers[name] = t
    res: dict = {"version": cls.version(), "ports": {n: t.port for n, t in servers.items()},
                 "reps": []}
    benches = {n: Bench(t, p, args) for n, t in servers.items()}
    n_users = 2 * p["pairs"]
    try:
        for t in servers.values():
            t.prepare()
        servers["solo"].provision_offline("u", n_users)
        redis.start()
        # every account logs in once (checks them, fills the client's SCRAM cache)
        solo = benches["solo"]
        servers["solo"].start()
        await solo.wait_ready()
        conns, failures, _ = await solo.login_many([f"u{i}" for i in range(1, n_users + 1)],
                                                   p["concurrency"], presence=False)
        await solo.close_all(conns)
        servers["solo"].stop()
        if failures:
            raise RuntimeError(f"warm-up logins failed: {failures}")
        for rep in range(1, p["reps"] + 1):
            log(f"[xmppd cluster] rep {rep}")
            r = await one_rep(solo, benches["a"], benches["b"], redis, p)
            r["rep"] = rep
            res["reps"].append(r)
            log("    " + "; ".join(
                f"{w} {r[w]['msgs_per_s']} msg/s {r[w]['cpu_s_per_10k_msgs']} CPU-s/10k "
                f"{r[w]['cpu_s_per_10k_msgs_by_process']} lost {r[w]['lost']}"
                for w in WINDOWS if w in r))
            log(f"    cross/same x{r['cross_vs_same']}, same/solo x{r['same_vs_solo']}, "
                f"mixed/same x{r['mixed_vs_same']}")
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
        log(f"[xmppd cluster] FAILED: {res['error']}")
        res["logs"] = {n: t.log_tail(30) for n, t in servers.items()}
        res["logs"]["redis"] = redis.log_tail()
        if args.verbose:
            import traceback
            traceback.print_exc()
    finally:
        for t in servers.values():
            t.stop()
        redis.stop()
    return res


def markdown(result: dict) -> str:
    res = result["targets"].get("xmppd-cluster", {})
    reps = res.get("reps", [])
    if not reps:
        return f"cluster phase failed: {res.get('error', 'no repetition')}\n"
    rows = []
    for w, label in (("solo", "stand-alone node"), ("same", "2 nodes, no pair split"),
                     ("cross", "2 nodes, every pair split"),
                     ("mixed", "2 nodes, half the pairs split")):
        if not any(w in r for r in reps):
            continue
        rows.append((f"{label}: delivered msgs/s", lambda r, w=w: r.get(w, {}).get("msgs_per_s")))
        rows.append((f"{label}: CPU-s per 10,000 msgs (all processes)",
                     lambda r, w=w: r.get(w, {}).get("cpu_s_per_10k_msgs")))
        if w != "solo":
            for part in ("a", "b", "redis"):
                rows.append((f"{label}: of which {part}", lambda r, w=w, part=part: r.get(w, {})
                             .get("cpu_s_per_10k_msgs_by_process", {}).get(part)))
        if w == "mixed":
            rows.append((f"{label}: share of messages that crossed",
                         lambda r: r.get("mixed", {}).get("crossed_share")))
    rows += [("cross / same (target ≤ 1.6)", lambda r: r["cross_vs_same"]),
             ("same / solo (target ≤ 1.1)", lambda r: r["same_vs_solo"]),
             ("mixed / same", lambda r: r["mixed_vs_same"]),
             ("lost messages (cross)", lambda r: r.get("cross", {}).get("lost"))]
    out = [f"| metric (median (min–max) of {len(reps)}) | xmppd ({res['version']}) |", "|---|---|"]
    out += [f"| {label} | {median_cell([get(r) for r in reps])} |" for label, get in rows]
    return "\n".join(out) + "\n"

"""The s2s phase (issue 12): two servers of one kind federating over one s2s link.

    .venv/bin/python bench/run.py --s2s --targets xmppd,prosody,ejabberd [--quick] [--reps N]

For each target: two servers of that kind, ``a.s2s.bench`` and
``b.s2s.bench``, each on its own loopback ports, each with a certificate for
its domain from a CA made for the run (serverAuth + clientAuth, so every
kind can use SASL EXTERNAL) and trusting that CA only, each routed to the
other without DNS (xmppd: ``[s2s.routes]``; Prosody: the test-route plugin;
ejabberd: a loopback SRV server, see bench/targets.py).  Both servers are
pinned to the server CPU, so the pair has the one core a single server has
in the c2s phases.

Each repetition measures, in this order:

1. **c2s baseline**: ``pairs`` pairs of users on server A only, closed loop
   (phase 2's saturation): server CPU-s per 10,000 delivered messages;
2. **s2s**: ``pairs`` users on A each paired with one user on B, the same
   closed loop, so every message crosses the link (A -> B or B -> A): the
   delivered messages/s, and the CPU-s per 10,000 messages of A, of B and
   of both (a message costs its sender's server a c2s read and an s2s write,
   and the receiver's server an s2s read and a c2s write).

``s2s_vs_c2s`` is (CPU of A + CPU of B) per message over the baseline's CPU
per message: what federating a message costs against delivering it
locally (target: at most 1.5).  The established TCP connections between the
two s2s ports are counted after each window (one per direction expected).
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import targets as targets_mod
from report import median_cell
from run import PASSWORD, Bench, free_port_pair, log

DOMAINS = ("a.s2s.bench", "b.s2s.bench")


def _ca():
    """The test CA of tests/pki.py (the repository root on sys.path)."""
    import sys

    root = str(targets_mod.REPO)
    if root not in sys.path:
        sys.path.insert(0, root)
    from tests.pki import CA

    return CA("xmppd bench s2s CA")


def tcp_links(to_port: int) -> int:
    """Established TCP connections to 127.0.0.1:``to_port`` (both /proc/net/tcp sides)."""
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[3] == "01" and int(f[2].split(":")[1], 16) == to_port:
            n += 1
    return n


def cross_pairs(left, right):
    """Pair ``left[i]`` with ``right[i]`` (two servers), as Bench.setup_pairs does on one."""
    from xmppload import COUNT

    body = "Hello! This is a benchmark chat message of a fairly typical length :)"
    pairs = []
    for a, b in zip(left, right):
        if a is None or b is None:
            continue
        a.reply = f"<message to='{b.bare}' type='chat' id='s'><body>{body}</body></message>".encode()
        b.reply = f"<message to='{a.bare}' type='chat' id='s'><body>{body}</body></message>".encode()
        a.partner, b.partner = b, a
        a.start_counting(COUNT)
        b.start_counting(COUNT)
        pairs.append((a, b))
    return pairs


async def saturation_two(ba: Bench, bb: Bench, pairs, p: dict) -> dict:
    """Bench.saturation with both servers' CPU sampled."""
    conns = [c for ab in pairs for c in ab]
    await ba.quiesce()
    await bb.quiesce()
    await ba.machine_quiet()
    rx0, tx0, err0 = Bench._totals(conns)
    Bench.open_window(conns, p["window"])
    await asyncio.sleep(p["warmup"])
    sa, sb = ba.sample(), bb.sample()
    d0 = Bench._totals(conns)[0]
    await asyncio.sleep(p["measure"])
    d1 = Bench._totals(conns)[0]
    sa1, sb1 = ba.sample(), bb.sample()
    for c in conns:
        c.reply_on = False
    tx, rx, err = await ba.drain(conns)
    da, db = ba.delta(sa, sa1), bb.delta(sb, sb1)
    n = d1 - d0
    cpu_a, cpu_b = da["server_cpu_s"], db["server_cpu_s"]
    per10k = (lambda cpu: round(cpu / n * 10000, 4) if n else None)
    return {
        "connections": len(conns), "window_per_conn": p["window"],
        "delivered_in_window": n,
        "msgs_per_s": round(n / da["wall_s"], 1),
        "cpu_s_per_10k_msgs_a": per10k(cpu_a),
        "cpu_s_per_10k_msgs_b": per10k(cpu_b),
        "cpu_s_per_10k_msgs": per10k(cpu_a + cpu_b),
        "sent": tx - tx0, "delivered": rx - rx0, "lost": (tx - tx0) - (rx - rx0),
        "error_stanzas": err - err0,
        "window_a": da, "window_b": db,
    }


async def one_rep(ba: Bench, bb: Bench, p: dict, s2s_ports: tuple[int, int]) -> dict:
    k = p["pairs"]
    out: dict = {}
    # 1. c2s baseline on A
    conns, failures, _ = await ba.login_many([f"u{i}" for i in range(1, 2 * k + 1)], p["concurrency"])
    try:
        pairs = ba.setup_pairs(conns)
        out["c2s_routing_verified"] = await ba.verify_routing(pairs)
        out["c2s"] = await ba.saturation(pairs)
        out["c2s"]["login_failures"] = failures
    finally:
        await ba.close_all(conns)
    # 2. across the link
    left, fa, _ = await ba.login_many([f"u{i}" for i in range(1, k + 1)], p["concurrency"])
    right, fb, _ = await bb.login_many([f"u{i}" for i in range(1, k + 1)], p["concurrency"])
    try:
        pairs = cross_pairs(left, right)
        # the first messages open and authenticate both links
        out["s2s_routing_verified"] = (await ba.verify_routing(pairs) + " a->b, "
                                       + await ba.verify_routing([(b, a) for a, b in pairs]) + " b->a")
        out["s2s"] = await saturation_two(ba, bb, pairs, p)
        out["s2s"]["login_failures"] = {"a": fa, "b": fb}
        out["s2s"]["tcp_links"] = {"a->b": tcp_links(s2s_ports[1]), "b->a": tcp_links(s2s_ports[0])}
    finally:
        await ba.close_all(left)
        await bb.close_all(right)
    c2s, s2s = out["c2s"]["cpu_s_per_10k_msgs"], out["s2s"]["cpu_s_per_10k_msgs"]
    out["s2s_vs_c2s"] = round(s2s / c2s, 3) if c2s and s2s else None
    return out


async def run_s2s_target(name: str, args, p: dict, workroot: Path, cpu_server) -> dict:
    cls = targets_mod.TARGETS[name]
    root = workroot / f"{name}-s2s"
    root.mkdir(parents=True, exist_ok=True)
    ca = _ca()
    ca_file = root / "ca.pem"
    ca_file.write_bytes(ca.pem())
    ports = [free_port_pair() for _ in DOMAINS]
    s2s_ports = (free_port_pair(), free_port_pair())
    servers = []
    for i, domain in enumerate(DOMAINS):
        cert, key = ca.issue_server(domain, root / "certs", client_auth=True)
        t = cls(root / domain, ports[i], domain, {}, PASSWORD, cpu_server)
        t.s2s = targets_mod.S2S(s2s_ports[i], ca_file, Path(cert), Path(key),
                                {DOMAINS[1 - i]: s2s_ports[1 - i]})
        servers.append(t)
    res: dict = {"version": cls.version(), "domains": list(DOMAINS), "c2s_ports": ports,
                 "s2s_ports": list(s2s_ports), "setup": {}, "reps": []}
    log(f"[{name} s2s] {res['version']}: {DOMAINS[0]} c2s {ports[0]} s2s {s2s_ports[0]}, "
        f"{DOMAINS[1]} c2s {ports[1]} s2s {s2s_ports[1]}")
    benches = [Bench(t, p, args) for t in servers]
    n = 2 * p["pairs"]
    try:
        for t in servers:
            t.prepare()
            if t.provisioning == "offline":
                t.provision_offline("u", n)
            t.start()
        for t, b in zip(servers, benches):
            await b.wait_ready()
            if t.provisioning == "ibr":
                await b.provision_ibr("u", n)
            # fills the load generator's SCRAM cache; checks the accounts
            conns, failures, _ = await b.login_many([f"u{i}" for i in range(1, n + 1)],
                                                    p["concurrency"], presence=False)
            await b.close_all(conns)
            if failures:
                raise RuntimeError(f"warm-up logins failed on {t.domain}: {failures}")
        for rep in range(1, p["reps"] + 1):
            log(f"[{name} s2s] rep {rep}")
            r = await one_rep(benches[0], benches[1], p, s2s_ports)
            r["rep"] = rep
            res["reps"].append(r)
            c, s = r["c2s"], r["s2s"]
            log(f"    c2s {c['msgs_per_s']} msg/s {c['cpu_s_per_10k_msgs']} CPU-s/10k; "
                f"s2s {s['msgs_per_s']} msg/s {s['cpu_s_per_10k_msgs']} CPU-s/10k "
                f"(a {s['cpu_s_per_10k_msgs_a']}, b {s['cpu_s_per_10k_msgs_b']}), "
                f"x{r['s2s_vs_c2s']}, lost {s['lost']}, links {s['tcp_links']}")
        res["logs"] = {t.domain: t.log_tail(5) for t in servers}
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
        log(f"[{name} s2s] FAILED: {res['error']}")
        res["logs"] = {t.domain: t.log_tail(30) for t in servers}
        if args.verbose:
            import traceback
            traceback.print_exc()
    finally:
        for t in servers:
            t.stop()
            t.cleanup()
    return res


def markdown(result: dict) -> str:
    names = list(result["targets"])
    rows = [
        ("c2s baseline: delivered msgs/s", lambda r: r["c2s"]["msgs_per_s"]),
        ("c2s baseline: server CPU-s per 10,000 msgs", lambda r: r["c2s"]["cpu_s_per_10k_msgs"]),
        ("s2s: delivered msgs/s", lambda r: r["s2s"]["msgs_per_s"]),
        ("s2s: CPU-s per 10,000 msgs, sender+receiver", lambda r: r["s2s"]["cpu_s_per_10k_msgs"]),
        ("s2s: CPU-s per 10,000 msgs, server A", lambda r: r["s2s"]["cpu_s_per_10k_msgs_a"]),
        ("s2s: CPU-s per 10,000 msgs, server B", lambda r: r["s2s"]["cpu_s_per_10k_msgs_b"]),
        ("s2s cost / c2s cost per message", lambda r: r["s2s_vs_c2s"]),
        ("lost messages (s2s)", lambda r: r["s2s"]["lost"]),
    ]
    out = ["| metric | " + " | ".join(f"{n} ({result['targets'][n]['version']})" for n in names) + " |",
           "|---|" + "---|" * len(names)]
    for label, get in rows:
        cells = []
        for n in names:
            reps = [r for r in result["targets"][n].get("reps", []) if "s2s" in r]
            cells.append(median_cell([get(r) for r in reps]) if reps else result["targets"][n].get("error", "–"))
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    links = {n: [r["s2s"]["tcp_links"] for r in result["targets"][n].get("reps", []) if "s2s" in r]
             for n in names}
    out.append("")
    out.append("TCP connections between the two s2s ports after each window: "
               + "; ".join(f"{n} {v}" for n, v in links.items()))
    return "\n".join(out) + "\n"

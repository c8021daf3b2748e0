"""Summaries and the markdown table of a benchmark run.

    python bench/report.py bench/results/run-XXXX.json [--compare other.json]
    python bench/report.py A.json B.json --write merged.json

re-renders the table of a saved run (``--compare`` takes the columns of targets
missing from the first file from another run, e.g. peers measured earlier);
with several files, later files add the targets the earlier ones lack, and
``--write`` saves the merged run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

# (path in a repetition's dict, label, unit, which way is better)
METRICS = [
    ("logins.logins_per_s", "1. logins/s", "logins/s", "higher"),
    ("logins.cpu_s_per_1000_logins", "1. server CPU per 1,000 logins", "CPU-s", "lower"),
    ("logins.login_ms_p50", "1. login duration p50", "ms", "lower"),
    ("messages.saturation.msgs_per_s", "2. delivered msgs/s at saturation", "msg/s", "higher"),
    ("messages.saturation.cpu_s_per_10k_msgs", "2. server CPU per 10,000 msgs (saturation)", "CPU-s", "lower"),
    ("messages.fixed_rate.lat_p50_ms", "2. latency p50 @ fixed rate", "ms", "lower"),
    ("messages.fixed_rate.lat_p99_ms", "2. latency p99 @ fixed rate", "ms", "lower"),
    ("messages.fixed_rate.cpu_s_per_10k_msgs", "2. server CPU per 10,000 msgs (fixed rate)", "CPU-s", "lower"),
    ("idle.levels.1000.rss_kb_per_conn", "3. RSS per idle connection, 1,000 conns", "kB", "lower"),
    ("idle.levels.10000.rss_kb_per_conn", "3. RSS per idle connection, 10,000 conns", "kB", "lower"),
    ("presence.cpu_ms_per_login", "4. server CPU per login, 50-contact roster", "CPU-ms", "lower"),
    ("presence.presences_received_per_login", "4. presences received per login", "stanzas", ""),
    ("blocking.saturation.msgs_per_s", "5. delivered msgs/s, 1,000-item blocklists", "msg/s", "higher"),
    ("blocking.saturation.cpu_s_per_10k_msgs", "5. server CPU per 10,000 msgs, blocklists", "CPU-s", "lower"),
    ("blocking.throughput_vs_phase2", "5. throughput relative to phase 2", "x", "higher"),
    ("blocking.cpu_vs_phase2", "5. CPU per msg relative to phase 2", "x", "lower"),
    ("blocking.fixed_rate.lat_p99_ms", "5. latency p99 @ fixed rate, blocklists", "ms", "lower"),
    ("blocking.set_cpu_ms_per_account", "5. server CPU to store one 1,000-item blocklist", "CPU-ms", "lower"),
    ("sm_messages.saturation.msgs_per_s", "6. delivered msgs/s, stream management on", "msg/s", "higher"),
    ("sm_messages.saturation.cpu_s_per_10k_msgs", "6. server CPU per 10,000 msgs, SM on", "CPU-s", "lower"),
    ("sm_messages.cpu_vs_phase2", "6. CPU per msg with SM relative to phase 2", "x", "lower"),
    ("sm_idle.levels.1000.rss_kb_per_conn", "6. RSS per idle SM connection, 1,000 conns", "kB", "lower"),
    ("sm_idle.levels.10000.rss_kb_per_conn", "6. RSS per idle SM connection, 10,000 conns", "kB", "lower"),
    ("rss_kb_at_start", "0. RSS before any connection", "kB", "lower"),
    ("light.storm.cpu_ms_per_login", "7. server CPU per login, 50 in parallel (roster, presence, ping)", "CPU-ms", "lower"),
    ("light.storm.cpu_ms_per_logout", "7. server CPU per logout", "CPU-ms", "lower"),
    ("light.fixed_rate.cpu_us_per_msg", "7. server CPU per msg @ 500 msg/s, 50 pairs", "CPU-µs", "lower"),
    ("light.fixed_rate.lat_p50_ms", "7. latency p50 @ 500 msg/s, 50 pairs", "ms", "lower"),
    ("light.fixed_rate.lat_p99_ms", "7. latency p99 @ 500 msg/s, 50 pairs", "ms", "lower"),
]

NOTE_UNSUSTAINED = ("† the server did not keep up with the fixed rate in at least one "
                    "repetition (≥ 90 % of its core busy, or median latency ≥ 10 ms): "
                    "the latency is mostly queueing")

def sustained(fr: dict) -> bool:
    util = get(fr, "window.server_util") or 0
    p50 = fr.get("lat_p50_ms") or 0
    return fr.get("sustained") is not False and util < 0.9 and p50 < 10


LOSSES = [
    ("logins.failed", "1. failed logins"),
    ("messages.saturation.lost", "2. msgs lost (saturation)"),
    ("messages.fixed_rate.lost", "2. msgs lost (fixed rate)"),
    ("presence.failed", "4. failed logins"),
    ("blocking.saturation.lost", "5. msgs lost (saturation)"),
    ("blocking.fixed_rate.lost", "5. msgs lost (fixed rate)"),
    ("sm_messages.saturation.lost", "6. msgs lost with SM (saturation)"),
    ("light.storm.failed", "7. failed logins (storm)"),
    ("light.fixed_rate.lost", "7. msgs lost (500 msg/s)"),
]


def get(d, path):
    for k in path.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def summarize(res: dict) -> dict:
    out = {}
    reps = res.get("reps", [])
    for path, *_ in METRICS:
        vals = [v for v in (get(r, path) for r in reps) if isinstance(v, (int, float))]
        if vals:
            out[path] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
                         "n": len(vals), "values": vals}
    for path, _ in LOSSES:
        vals = [v for v in (get(r, path) for r in reps) if isinstance(v, (int, float))]
        if vals:
            out[path] = {"total": sum(vals), "n": len(vals), "values": vals}
    return out


def median_cell(values) -> str:
    """``median (min–max)`` of the values that are not None ("–" for none), as the
    s2s and cluster tables show them."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return "–"

    def f(x):
        return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"
    mid = statistics.median(values)
    return f"{f(mid)} ({f(values[0])}–{f(values[-1])})" if len(values) > 1 else f(mid)


def fmt(v):
    if v is None:
        return "–"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def cell(s):
    if not s:
        return "–"
    if s["n"] == 1 or s["min"] == s["max"]:
        return fmt(s["median"])
    return f"{fmt(s['median'])} ({fmt(s['min'])}–{fmt(s['max'])})"


def markdown(result: dict, compare: dict | None = None) -> str:
    tg = dict(result.get("targets", {}))
    origin = {n: "this run" for n in tg}
    if compare:
        for n, r in compare.get("targets", {}).items():
            if n not in tg:
                tg[n] = r
                origin[n] = f"from {compare.get('started', '?')}"
    order = [n for n in ("xmppd", "prosody", "ejabberd") if n in tg] + \
            [n for n in tg if n not in ("xmppd", "prosody", "ejabberd")]
    peers = [n for n in order if n != "xmppd"]
    p = result.get("params", {})
    h = result.get("host", {})
    lines = [
        f"## Benchmark run {result.get('started', '?')}",
        "",
        f"- command: `{result.get('command', '')}`",
        f"- host: {h.get('cpu_model', '?')}, {h.get('cpus', '?')} CPUs, kernel {h.get('kernel', '?')}, "
        f"Python {h.get('python', '?')}, {h.get('openssl', '')}; load average at start "
        f"{', '.join('%.2f' % x for x in h.get('loadavg_at_start', []))}",
        f"- profile {p.get('profile')}, {p.get('reps')} repetition(s); pinning: {p.get('pinning')}",
        f"- phase 1: {p.get('logins')} logins, {p.get('concurrency')} in flight; "
        f"phase 2/5: {p.get('pairs')} pairs, {p.get('window')} msgs in flight per connection, "
        f"{p.get('measure')} s measured after {p.get('warmup')} s warm-up, latency at "
        f"{p.get('latency_rate')} msg/s for {p.get('latency_secs')} s; phase 3: "
        f"{', '.join(str(x) for x in p.get('idle', []))} idle connections; phase 4: "
        f"{p.get('roster_users')} users x {p.get('contacts')} contacts; phase 5: "
        f"{p.get('blocklist')}-item blocklists",
    ]
    for n in order:
        r = tg[n]
        extra = f" ({origin[n]})" if origin[n] != "this run" else ""
        if r.get("from_run"):
            extra += f" (measured {r['from_run']})"
        it = r.get("scram_iterations_seen")
        lines.append(f"- {n}: {r.get('version', '?')}{extra}"
                     + (f"; SCRAM iterations seen {it}" if it else "")
                     + (f"; **error: {r['error']}**" if r.get("error") else ""))
        for rep in r.get("reps", []):
            if rep.get("error"):
                lines.append(f"  - rep {rep['rep']} **failed**: {rep['error'][:300]}")
    for n, why in result.get("skipped", {}).items():
        lines.append(f"- {n}: **skipped** – {why}")
    lines.append("")
    lines.append("Cells: median (min–max) over repetitions. Ratios: xmppd median / peer median.")
    lines.append("")
    head = ["metric", "unit", "better"] + order + [f"xmppd/{x}" for x in peers if "xmppd" in order]
    notes: set[str] = set()
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for path, label, unit, better in METRICS:
        sums = {n: tg[n].get("summary", {}).get(path) for n in order}
        if not any(sums.values()):
            continue
        row = [label, unit, better] + [cell(sums[n]) for n in order]
        if ".fixed_rate." in path:
            base = path.split(".fixed_rate.")[0] + ".fixed_rate"
            for k, n in enumerate(order):
                if any(not sustained(get(r, base)) for r in tg[n].get("reps", [])
                       if get(r, base)):
                    row[3 + k] += " †"
                    notes.add(NOTE_UNSUSTAINED)
        if "xmppd" in order:
            for x in peers:
                a, b = sums.get("xmppd"), sums.get(x)
                ratio = a["median"] / b["median"] if a and b and b["median"] else None
                row.append("–" if ratio is None else
                           f"{ratio:.2f}×" if ratio >= 0.01 else f"{ratio:.1g}×")
        lines.append("| " + " | ".join(row) + " |")
    for note in sorted(notes):
        lines.append("")
        lines.append(note)
    lines.append("")
    lines.append("Losses (sum over repetitions; sent − delivered, failed logins):")
    lines.append("")
    lines.append("| count | " + " | ".join(order) + " |")
    lines.append("|---|" + "---|" * len(order))
    for path, label in LOSSES:
        sums = {n: tg[n].get("summary", {}).get(path) for n in order}
        if not any(sums.values()):
            continue
        lines.append(f"| {label} | " + " | ".join(
            str(sums[n]["total"]) if sums[n] else "–" for n in order) + " |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+")
    ap.add_argument("--compare")
    ap.add_argument("--write", help="save the merged run as JSON")
    a = ap.parse_args(argv)
    res = json.loads(Path(a.json[0]).read_text())
    for extra in a.json[1:]:
        other = json.loads(Path(extra).read_text())
        for n, r in other.get("targets", {}).items():
            if n not in res.setdefault("targets", {}) or res["targets"][n].get("error"):
                r = dict(r)
                r["from_run"] = other.get("started")
                res["targets"][n] = r
                res.get("skipped", {}).pop(n, None)
        res.setdefault("merged_from", []).append(other.get("started"))
    if a.write:
        Path(a.write).write_text(json.dumps(res, indent=1, default=str))
    for r in res.get("targets", {}).values():
        r["summary"] = summarize(r)
    cmp_ = json.loads(Path(a.compare).read_text()) if a.compare else None
    if cmp_:
        for r in cmp_.get("targets", {}).values():
            r["summary"] = summarize(r)
    print(markdown(res, cmp_))
    return 0


if __name__ == "__main__":
    sys.exit(main())

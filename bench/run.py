#!/usr/bin/env python3
"""xmppd benchmark runner (issue 9): xmppd against Prosody and ejabberd.

    python bench/run.py --targets xmppd,prosody,ejabberd --reps 3 --out bench/results/
    python bench/run.py --quick --targets prosody

For each target: a private temp dir with its own config, data dir and a
self-signed certificate; the server is started on a free loopback port,
accounts are provisioned, the phases run, the server's CPU time (utime+stime,
all threads, summed over its process tree) and RSS (VmRSS, summed over the
tree) are read from /proc before/after each phase, and it is stopped.
See bench/README.md for what each phase measures.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import re
import resource
import shutil
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import procstat  # noqa: E402
import report  # noqa: E402
import targets as targets_mod  # noqa: E402
import xmppload  # noqa: E402
from xmppload import COUNT, NEGOTIATE, PRESENCE, XMPPError  # noqa: E402

DOMAIN = "bench.local"
PASSWORD = "bench-Pa55word"
HOST = "127.0.0.1"
BODY = "Hello! This is a benchmark chat message of a fairly typical length :)"

PROFILES = {
    # ~2-3 minutes per target on 2 cores
    "quick": dict(reps=1, logins=1000, concurrency=100, pairs=50, window=10, warmup=2.0,
                  measure=5.0, latency_rate=500, latency_secs=5.0, idle=[1000],
                  roster_users=100, contacts=50, blocklist=1000,
                  storm_logins=500, light_secs=5.0),
    # the RESULTS.md numbers
    "full": dict(reps=3, logins=2000, concurrency=100, pairs=200, window=10, warmup=3.0,
                 measure=15.0, latency_rate=1000, latency_secs=15.0, idle=[1000, 10000],
                 roster_users=500, contacts=50, blocklist=1000,
                 storm_logins=1000, light_secs=15.0),
}
# Phase 7 (issue 20), the same in both profiles: a login storm of this many in
# parallel, and a fixed rate over this many pairs.
LIGHT = dict(storm_concurrency=50, light_pairs=50, light_rate=500)


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ---------------------------------------------------------------------------
# environment helpers

def free_port_pair() -> int:
    """A port p such that p and p+1 are both free on loopback."""
    for _ in range(200):
        p = random.randint(20000, 40000)
        ok = True
        for q in (p, p + 1):
            s = socket.socket()
            try:
                s.bind((HOST, q))
            except OSError:
                ok = False
            finally:
                s.close()
        if ok:
            return p
    raise RuntimeError("no free port pair found")


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def make_cert(d: Path, domain: str) -> dict:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
            .sign(key, hashes.SHA256()))
    cp = cert.public_bytes(serialization.Encoding.PEM)
    kp = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())
    d.mkdir(parents=True, exist_ok=True)
    (d / "cert.pem").write_bytes(cp)
    (d / "key.pem").write_bytes(kp)
    (d / "combined.pem").write_bytes(cp + kp)
    for n in ("cert.pem", "key.pem", "combined.pem"):
        os.chmod(d / n, 0o644 if n == "cert.pem" else 0o600)
    return {"cert": d / "cert.pem", "key": d / "key.pem", "combined": d / "combined.pem"}


def system_busy_seconds() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / procstat.CLK_TCK


def host_info() -> dict:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": __import__("ssl").OPENSSL_VERSION,
        "loadavg_at_start": os.getloadavg(),
        "mem_total_kb": int(open("/proc/meminfo").readline().split()[1]),
    }


def pct(vals, p):
    return xmppload.percentile(vals, p)


# ---------------------------------------------------------------------------

class Bench:
    """Runs the phases against one started target."""

    def __init__(self, target: targets_mod.Target, p: dict, args):
        self.t = target
        self.p = p
        self.args = args
        self.port = target.port
        self.domain = target.domain
        self.sslctx = xmppload.client_ssl_context()
        self.iterations_seen: set[int] = set()
        self.last_done: list[float] = []
        self.server_cores = len(target.cpu) if target.cpu else (os.cpu_count() or 1)

    # -- measurement helpers ------------------------------------------------
    def sample(self) -> procstat.Sample:
        s = procstat.Sample(self.t.pid)
        s.sys_busy = system_busy_seconds()
        return s

    def delta(self, a, b) -> dict:
        d = a.to(b)
        other = (b.sys_busy - a.sys_busy) - d["server_cpu_s"] - d["client_cpu_s"]
        d["other_cpu_s"] = round(max(0.0, other), 3)  # CPU used by anything else
        su, cu = d["server_util"] or 0, d["client_util"] or 0
        d["bottleneck"] = ("server" if su >= 0.9 * self.server_cores else
                           "load generator" if cu >= 0.9 else "neither")
        return d

    async def machine_quiet(self, max_wait: float = 120.0, limit: float = 0.25) -> float:
        """Wait (bounded) until processes other than the server and this load
        generator use less than ``limit`` cores, so that other work on a shared
        machine disturbs the measurement less.  Returns the seconds waited."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < max_wait:
            a = self.sample()
            await asyncio.sleep(1.0)
            b = self.sample()
            if self.delta(a, b)["other_cpu_s"] / (b.wall - a.wall) < limit:
                break
        waited = time.monotonic() - t0
        if waited > 1.5:
            log(f"    waited {waited:.0f} s for other processes to calm down")
        return round(waited, 1)

    async def quiesce(self, max_wait: float = 60.0, tick: float = 0.25) -> float:
        """Wait until the server's CPU time stops growing (two quiet ticks)."""
        t0 = time.monotonic()
        last = procstat.cpu_seconds(self.t.pid)
        quiet = 0
        while time.monotonic() - t0 < max_wait:
            await asyncio.sleep(tick)
            if not self.t.alive():
                raise RuntimeError("server died:\n" + self.t.log_tail())
            now = procstat.cpu_seconds(self.t.pid)
            quiet = quiet + 1 if now - last <= 0.011 else 0
            last = now
            if quiet >= 2:
                break
        return time.monotonic() - t0

    # -- connections ----------------------------------------------------------
    async def wait_ready(self, timeout: float = 90.0):
        t0 = time.monotonic()
        err = None
        while time.monotonic() - t0 < timeout:
            if not self.t.alive():
                raise RuntimeError(f"{self.t.name} exited during startup:\n" + self.t.log_tail())
            try:
                conn, feats = await xmppload.connect_tls(HOST, self.port, self.domain, self.sslctx, 5)
                conn.close()
                return time.monotonic() - t0
            except XMPPError as e:
                err = e
                await asyncio.sleep(0.3)
        raise RuntimeError(f"{self.t.name} not ready after {timeout}s: {err}\n" + self.t.log_tail())

    async def login_many(self, users: list[str], concurrency: int, *, resource: str = "bench",
                         presence: bool = True, roster_get: bool = False, sm: bool = False):
        """Log ``users`` in with at most ``concurrency`` logins in flight.
        Returns (conns in order (None for failures), failures by stage, per-login seconds);
        ``self.last_done`` keeps the completion times (monotonic) of the logins."""
        conns: list = [None] * len(users)
        done_at: list[float] = []
        self.last_done = done_at
        failures: dict[str, int] = {}
        errors: list[str] = []
        durations: list[float] = []
        it = iter(range(len(users)))

        async def worker():
            for i in it:
                t0 = time.perf_counter()
                try:
                    c = await xmppload.login(HOST, self.port, self.domain, users[i], PASSWORD,
                                             resource, self.sslctx, presence=presence,
                                             roster_get=roster_get, sm=sm, timeout=60)
                except Exception as e:
                    stage = e.stage if isinstance(e, XMPPError) else type(e).__name__
                    failures[stage] = failures.get(stage, 0) + 1
                    if len(errors) < 5:
                        errors.append(f"{users[i]}: {e}")
                    continue
                durations.append(time.perf_counter() - t0)
                done_at.append(time.monotonic())
                self.iterations_seen.add(c.iterations)
                conns[i] = c

        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(users)))))
        self.last_reflected = sum(1 for c in conns if c is not None and c.self_presence)
        if errors:
            log("  login errors (first %d): %s" % (len(errors), "; ".join(errors)))
        return conns, failures, durations

    @staticmethod
    def steady_rate(done_at: list[float]):
        """Completions per second between the 10th and 90th percentile completion,
        i.e. without the ramp-up of the first and the drain of the last logins."""
        if len(done_at) < 20:
            return None
        d = sorted(done_at)
        a, b = d[len(d) // 10], d[(len(d) * 9) // 10]
        n = (len(d) * 9) // 10 - len(d) // 10
        return round(n / (b - a), 1) if b > a else None

    async def close_all(self, conns):
        for c in conns:
            if c is not None:
                c.close()
        await asyncio.sleep(0.2)
        await self.quiesce()

    # -- provisioning ---------------------------------------------------------
    async def provision_ibr(self, prefix: str, count: int, per_stream: int = 100,
                            concurrency: int = 16):
        names = [f"{prefix}{i}" for i in range(1, count + 1)]
        chunks = [names[i:i + per_stream] for i in range(0, len(names), per_stream)]
        created = existed = 0
        it = iter(chunks)

        async def worker():
            nonlocal created, existed
            for ch in it:
                c, e = await xmppload.register(HOST, self.port, self.domain, ch, PASSWORD, self.sslctx)
                created += c
                existed += e

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return created, existed

    async def provision_rosters(self, users: list[str], contacts: int, roster_set: bool = True):
        """Mutual ('both') subscriptions between each user and its ``contacts``
        ring neighbours, through the protocol: roster set of every contact, then
        subscribe -> subscribed handshakes in both directions."""
        g = len(users)
        half = contacts // 2
        if g <= contacts:
            raise ValueError("need more roster users than contacts per roster")
        t0 = time.monotonic()
        conns, failures, _ = await self.login_many(users, self.p["concurrency"], resource="prov",
                                                   roster_get=True)
        if failures:
            raise RuntimeError(f"roster provisioning: logins failed {failures}")
        jids = [c.bare for c in conns]
        index = {j: i for i, j in enumerate(jids)}
        got = [set() for _ in range(g)]
        sent_sub = [set() for _ in range(g)]
        done = asyncio.get_running_loop().create_future()
        remaining = [g]

        def on_presence(conn, ptype, pfrom):
            i = conn.idx
            bare = pfrom.split("/", 1)[0]
            if ptype == "subscribe":
                conn.send("<presence to='%s' type='subscribed'/>" % bare)
                if bare not in sent_sub[i]:
                    sent_sub[i].add(bare)
                    conn.send("<presence to='%s' type='subscribe'/>" % bare)
            elif ptype == "subscribed":
                if bare in index and bare not in got[i]:
                    got[i].add(bare)
                    if len(got[i]) == contacts:
                        remaining[0] -= 1
                        if remaining[0] == 0 and not done.done():
                            done.set_result(None)

        rs_id = re.compile(rb"""id=['"]rs\d+['"]""")

        def neighbours(i):
            return ([(i + d) % g for d in range(1, half + 1)]
                    + [(i - d) % g for d in range(1, contacts - half + 1)])

        async def wait_until(cond, what):
            """Wait for cond(); fail only if the server sent nothing for 120 s."""
            last, last_t = -1, time.monotonic()
            next_log = time.monotonic() + 30
            while not cond():
                await asyncio.sleep(0.2)
                rx = sum(c.rx_bytes for c in conns)
                if rx != last:
                    last, last_t = rx, time.monotonic()
                elif time.monotonic() - last_t > 120:
                    short = sum(1 for s in got if len(s) < contacts)
                    raise RuntimeError(f"roster provisioning stalled ({what}): {short}/{g} users "
                                       f"lack 'subscribed' from all {contacts} contacts")
                if not self.t.alive():
                    raise RuntimeError("server died:\n" + self.t.log_tail())
                if time.monotonic() > next_log:
                    next_log += 30
                    log(f"    rosters: {what}; {sum(len(s) for s in got)}/{g * contacts} "
                        "subscriptions approved")

        # The work goes out in waves of ``wave`` users, each wave sent once the
        # previous one is done, so the server never holds a huge backlog (Prosody
        # rewrites a roster file per change and would otherwise go silent for
        # minutes while it works through tens of thousands of queued stanzas).
        wave = 20
        try:
            for i, c in enumerate(conns):
                c.idx = i
                c.on_presence = on_presence
                c.rs_results = 0
                c.rs_tail = b""
                c.start_counting(PRESENCE)

            def count_rs(conn, data):
                buf = conn.rs_tail + data
                k = len(conn.rs_tail)
                conn.rs_results += sum(1 for m in rs_id.finditer(buf) if m.end() > k)
                conn.rs_tail = buf[-12:]
            for c in conns:
                c.on_data = count_rs
            if roster_set:
                for lo in range(0, g, wave):
                    part = range(lo, min(lo + wave, g))
                    for i in part:
                        conns[i].send("".join(
                            "<iq type='set' id='rs%d'><query xmlns='jabber:iq:roster'>"
                            "<item jid='%s' name='Contact %d'><group>Bench</group></item>"
                            "</query></iq>" % (n, jids[j], j)
                            for n, j in enumerate(neighbours(i))))
                    await wait_until(lambda: all(conns[i].rs_results >= contacts for i in part),
                                     f"roster sets {lo}/{g}")
            for c in conns:
                c.on_data = None
            for lo in range(0, g, wave):
                part = range(lo, min(lo + wave, g))
                for i in part:
                    fwd = [jids[j] for j in neighbours(i)[:half]]
                    sent_sub[i].update(fwd)
                    conns[i].send("".join("<presence to='%s' type='subscribe'/>" % j for j in fwd))
                await wait_until(
                    lambda: all(len(got[i]) >= half for i in part), f"subscriptions {lo}/{g}")
            await wait_until(done.done, "last handshakes")
        except BaseException:
            for c in conns:
                c.abort()
            raise
        # verify one roster through the protocol
        c = conns[0]
        c.start_counting(NEGOTIATE)
        await asyncio.sleep(0.5)
        c.buf.clear()
        r = await xmppload.iq_roundtrip(
            c, "rg1", b"<iq type='get' id='rg1'><query xmlns='jabber:iq:roster'/></iq>")
        both = r.count(b"subscription='both'") + r.count(b'subscription="both"')
        await self.close_all(conns)
        return {"users": g, "contacts": contacts, "seconds": round(time.monotonic() - t0, 2),
                "verified_both_items_of_first_user": both}

    # -- phase 1: logins -------------------------------------------------------
    async def phase_logins(self):
        p = self.p
        users = [f"u{i}" for i in range(1, p["logins"] + 1)]
        await self.quiesce()
        await self.machine_quiet()
        s0 = self.sample()
        t0 = time.monotonic()
        conns, failures, durs = await self.login_many(users, p["concurrency"])
        t1 = time.monotonic()
        reflected = self.last_reflected
        await self.quiesce()
        s1 = self.sample()
        await self.close_all(conns)
        ok = len(durs)
        d = self.delta(s0, s1)
        durs.sort()
        return {
            "logins": ok, "failed": sum(failures.values()), "failures": failures,
            "concurrency": p["concurrency"],
            "logins_per_s": self.steady_rate(self.last_done),
            "logins_per_s_overall": round(ok / (t1 - t0), 1) if ok else 0,
            "self_presence_reflected": reflected,
            "server_util_while_logging_in": round(d["server_cpu_s"] / (t1 - t0), 3),
            "client_util_while_logging_in": round(d["client_cpu_s"] / (t1 - t0), 3),
            "cpu_s_per_1000_logins": round(d["server_cpu_s"] / ok * 1000, 3) if ok else None,
            "login_ms_p50": round(pct(durs, 50) * 1000, 1) if durs else None,
            "login_ms_p99": round(pct(durs, 99) * 1000, 1) if durs else None,
            "rss_kb_per_conn": round((s1.rss - s0.rss) / ok, 1) if ok else None,
            "window": d,
        }

    # -- phase 2/5 building blocks ----------------------------------------------
    def setup_pairs(self, conns):
        pairs = []
        for i in range(0, len(conns) - 1, 2):
            a, b = conns[i], conns[i + 1]
            if a is None or b is None:
                continue
            a.reply = ("<message to='%s' type='chat' id='s'><body>%s</body></message>"
                       % (b.bare, BODY)).encode()
            b.reply = ("<message to='%s' type='chat' id='s'><body>%s</body></message>"
                       % (a.bare, BODY)).encode()
            a.partner, b.partner = b, a
            a.start_counting(COUNT)
            b.start_counting(COUNT)
            pairs.append((a, b))
        return pairs

    async def verify_routing(self, pairs, n: int = 5) -> str:
        """Before counting: a few messages must reach the partner, from the sender."""
        ok = 0
        sample = pairs[:n]
        for a, b in sample:
            a.start_counting(NEGOTIATE)
            b.start_counting(NEGOTIATE)
        for a, b in sample:
            a.send("<message to='%s' type='chat' id='vfy1'><body>verify</body></message>" % b.bare)
        for a, b in sample:
            fj = re.escape(a.jid.encode())
            try:
                await b.expect(re.compile(
                    rb"<message\b(?=[^>]*\bfrom=(?:'" + fj + rb"'|\"" + fj + rb"\"))"
                    rb"(?=[^>]*\bid=(?:'vfy1'|\"vfy1\"))[^>]*>.*?</message>", re.S),
                    "verify-routing", 10)
                ok += 1
            except XMPPError as e:
                log(f"  routing check failed: {e}")
        for a, b in sample:
            a.start_counting(COUNT)
            b.start_counting(COUNT)
            a.msgs = b.msgs = 0
        return f"{ok}/{len(sample)}"

    @staticmethod
    def _totals(conns):
        return sum(c.msgs for c in conns), sum(c.sent for c in conns), sum(c.errors for c in conns)

    @staticmethod
    def open_window(conns, window: int) -> None:
        """Closed loop: every connection answers each delivery with a new message,
        and starts with ``window`` messages in flight."""
        for c in conns:
            c.reply_on = True
        for c in conns:
            c.transport.write(c.reply * window)
            c.sent += window

    async def drain(self, conns, max_wait: float = 30.0):
        """Wait until every sent message has been delivered, or nothing moved for 3 s."""
        last, still, t0 = None, 0.0, time.monotonic()
        while time.monotonic() - t0 < max_wait:
            rx, tx, _ = self._totals(conns)
            if rx >= tx:
                break
            if rx == last:
                still += 0.1
                if still >= 3.0:
                    break
            else:
                still = 0.0
            last = rx
            await asyncio.sleep(0.1)
        rx, tx, err = self._totals(conns)
        return tx, rx, err

    async def saturation(self, pairs):
        """Closed loop: every connection keeps ``window`` messages in flight to its
        partner; each delivery is answered by one new message."""
        p = self.p
        conns = [c for ab in pairs for c in ab]
        await self.quiesce()
        await self.machine_quiet()
        rx0, tx0, err0 = self._totals(conns)
        self.open_window(conns, p["window"])
        await asyncio.sleep(p["warmup"])
        s0 = self.sample()
        d0 = self._totals(conns)[0]
        await asyncio.sleep(p["measure"])
        d1 = self._totals(conns)[0]
        s1 = self.sample()
        for c in conns:
            c.reply_on = False
        tx, rx, err = await self.drain(conns)
        d = self.delta(s0, s1)
        n = d1 - d0
        return {
            "connections": len(conns), "window_per_conn": p["window"],
            "delivered_in_window": n,
            "msgs_per_s": round(n / d["wall_s"], 1),
            "cpu_s_per_10k_msgs": round(d["server_cpu_s"] / n * 10000, 4) if n else None,
            "sent": tx - tx0, "delivered": rx - rx0, "lost": (tx - tx0) - (rx - rx0),
            "error_stanzas": err - err0,
            "window": d,
        }

    async def fixed_rate(self, pairs, rate: int | None = None, secs: float | None = None):
        """Open loop at ``rate`` (default ``latency_rate``) msgs/s; each body carries its send time."""
        p = self.p
        rate = rate or p["latency_rate"]
        secs = secs or p["latency_secs"]
        conns = [c for ab in pairs for c in ab]
        await self.quiesce()
        await self.machine_quiet()
        rx0, tx0, err0 = self._totals(conns)
        lat: list[int] = []
        for c in conns:
            c.lat = lat
            c.ltail = b""
        tmpl = {c: ("<message to='%s' type='chat' id='l'><body>L%%d</body></message>"
                    % c.partner.bare) for c in conns}
        s0 = self.sample()
        t0 = time.monotonic()
        sent = 0
        k = 0
        nconn = len(conns)
        while True:
            now = time.monotonic()
            el = now - t0
            if el >= secs:
                break
            due = int(el * rate) - sent
            for _ in range(due):
                c = conns[k]
                k = (k + 1) % nconn
                c.transport.write((tmpl[c] % time.monotonic_ns()).encode())
                c.sent += 1
            sent += max(due, 0)
            await asyncio.sleep(0.002)
        tx, rx, err = await self.drain(conns)
        s1 = self.sample()
        for c in conns:
            c.lat = None
        d = self.delta(s0, s1)
        lat.sort()
        n = rx - rx0
        return {
            "rate": rate, "seconds": secs,
            # the server kept up: below 90 % of its core, nothing lost, and a median
            # latency that is not queueing (it is well under 1 ms on loopback)
            "sustained": ((d["server_util"] or 0) < 0.9 * self.server_cores and n == tx - tx0
                          and bool(lat) and pct(lat, 50) < 10e6),
            "sent": tx - tx0, "delivered": n, "lost": (tx - tx0) - n,
            "error_stanzas": err - err0,
            "latency_samples": len(lat),
            "lat_p50_ms": round(pct(lat, 50) / 1e6, 3) if lat else None,
            "lat_p90_ms": round(pct(lat, 90) / 1e6, 3) if lat else None,
            "lat_p99_ms": round(pct(lat, 99) / 1e6, 3) if lat else None,
            "lat_max_ms": round(lat[-1] / 1e6, 3) if lat else None,
            "cpu_s_per_10k_msgs": round(d["server_cpu_s"] / n * 10000, 4) if n else None,
            "window": d,
        }

    # -- phase 2 (and 6: the same with XEP-0198 on every connection) ---------------
    async def phase_messages(self, sm: bool = False):
        p = self.p
        users = [f"u{i}" for i in range(1, 2 * p["pairs"] + 1)]
        conns, failures, _ = await self.login_many(users, p["concurrency"], sm=sm)
        pairs = self.setup_pairs(conns)
        try:
            routing = await self.verify_routing(pairs)
            sat = await self.saturation(pairs)
            fix = await self.fixed_rate(pairs)
            return {"pairs": len(pairs), "login_failures": failures,
                    "routing_verified": routing,
                    "saturation": sat, "fixed_rate": fix}, conns, pairs
        except BaseException:
            await self.close_all(conns)
            raise

    # -- phase 7 (issue 20): light load, login storm, logout ---------------------
    async def phase_light(self):
        """What a mostly idle server sees: a login storm (``storm_concurrency`` in
        parallel, each as a client does it: STARTTLS, SCRAM, bind, roster get,
        initial presence, ping), the logout of all of them (``</stream:stream>``
        and close), and messages at a fixed ``light_rate`` over ``light_pairs``
        pairs.  Server CPU per login, per logout and per message."""
        p = self.p
        n = p["storm_logins"]
        users = [f"u{i}" for i in range(1, n + 1)]
        await self.quiesce()
        await self.machine_quiet()
        s0 = self.sample()
        t0 = time.monotonic()
        conns, failures, durs = await self.login_many(users, p["storm_concurrency"],
                                                      roster_get=True)
        t1 = time.monotonic()
        await self.quiesce()
        s1 = self.sample()
        ok = len(durs)
        for c in conns:
            if c is not None:
                c.close()
        await asyncio.sleep(0.2)
        await self.quiesce()
        s2 = self.sample()
        login, logout = self.delta(s0, s1), self.delta(s1, s2)
        durs.sort()
        # schedstat (ns) rather than clock ticks: 500 logouts are ~10 ticks
        lcpu = login["server_cpu_exact_s"] or login["server_cpu_s"]
        ocpu = logout["server_cpu_exact_s"] or logout["server_cpu_s"]
        out = {
            "storm": {
                "logins": ok, "failed": sum(failures.values()), "failures": failures,
                "concurrency": p["storm_concurrency"],
                "logins_per_s_overall": round(ok / (t1 - t0), 1) if ok else 0,
                "cpu_ms_per_login": round(lcpu / ok * 1000, 3) if ok else None,
                "cpu_ms_per_logout": round(ocpu / ok * 1000, 4) if ok else None,
                "login_ms_p50": round(pct(durs, 50) * 1000, 1) if durs else None,
                "login_ms_p99": round(pct(durs, 99) * 1000, 1) if durs else None,
                "window_login": login, "window_logout": logout,
            },
        }
        users = [f"u{i}" for i in range(1, 2 * p["light_pairs"] + 1)]
        conns, failures, _ = await self.login_many(users, p["storm_concurrency"])
        try:
            pairs = self.setup_pairs(conns)
            await self.verify_routing(pairs)
            fix = await self.fixed_rate(pairs, p["light_rate"], p["light_secs"])
            n_msgs = fix["delivered"]
            cpu = fix["window"]["server_cpu_exact_s"] or fix["window"]["server_cpu_s"]
            fix["cpu_us_per_msg"] = round(cpu / n_msgs * 1e6, 1) if n_msgs else None
            fix["pairs"] = len(pairs)
            fix["login_failures"] = failures
            out["fixed_rate"] = fix
        finally:
            await self.close_all(conns)
        return out

    # -- phase 5: blocking --------------------------------------------------------
    def block_iq(self, idx: int) -> bytes:
        items = "".join("<item jid='s%d.u%d@spam.example'/>" % (j, idx)
                        for j in range(1, self.p["blocklist"] + 1))
        return ("<iq type='set' id='blk'><block xmlns='urn:xmpp:blocking'>%s</block></iq>"
                % items).encode()

    async def _iq_all(self, conns, make, iq_id, concurrency):
        it = iter(enumerate(conns))
        bad = []

        async def worker():
            for i, c in it:
                c.start_counting(NEGOTIATE)
                r = await xmppload.iq_roundtrip(c, iq_id, make(i), timeout=120)
                if not (b"type='result'" in r or b'type="result"' in r):
                    bad.append(r[:300])
                c.start_counting(COUNT)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return bad

    async def phase_blocking(self, conns, pairs, base: dict):
        live = [c for ab in pairs for c in ab]
        await self.quiesce()
        s0 = self.sample()
        bad = await self._iq_all(live, self.block_iq, "blk", self.p["concurrency"])
        await self.quiesce()
        s1 = self.sample()
        if bad:
            raise RuntimeError(f"block IQ failed on {len(bad)} accounts: {bad[0]!r}")
        dset = self.delta(s0, s1)
        # check one blocklist through the protocol
        c = live[0]
        c.start_counting(NEGOTIATE)
        r = await xmppload.iq_roundtrip(
            c, "bl1", b"<iq type='get' id='bl1'><blocklist xmlns='urn:xmpp:blocking'/></iq>")
        c.start_counting(COUNT)
        items = r.count(b"<item")
        sat = await self.saturation(pairs)
        fix = await self.fixed_rate(pairs)
        # restore: unblock everything so later repetitions start clean
        bad = await self._iq_all(
            live, lambda i: b"<iq type='set' id='unb'><unblock xmlns='urn:xmpp:blocking'/></iq>",
            "unb", self.p["concurrency"])
        out = {
            "accounts": len(live), "items_per_blocklist": self.p["blocklist"],
            "verified_items_first_account": items,
            "set_cpu_ms_per_account": round(dset["server_cpu_s"] / len(live) * 1000, 2),
            "set_rss_kb_per_account": round((s1.rss - s0.rss) / len(live), 1),
            "set_window": dset,
            "saturation": sat, "fixed_rate": fix,
            "unblock_failures": len(bad),
        }
        b2, b5 = base["saturation"], sat
        if b2.get("msgs_per_s") and b5.get("msgs_per_s"):
            out["throughput_vs_phase2"] = round(b5["msgs_per_s"] / b2["msgs_per_s"], 3)
        if b2.get("cpu_s_per_10k_msgs") and b5.get("cpu_s_per_10k_msgs"):
            out["cpu_vs_phase2"] = round(b5["cpu_s_per_10k_msgs"] / b2["cpu_s_per_10k_msgs"], 3)
        return out

    # -- phase 4: presence ---------------------------------------------------------
    async def phase_presence(self):
        p = self.p
        users = [f"r{i}" for i in range(1, p["roster_users"] + 1)]
        await self.quiesce()
        await self.machine_quiet()
        s0 = self.sample()
        t0 = time.monotonic()
        conns, failures, durs = await self.login_many(users, p["concurrency"], roster_get=True)
        t1 = time.monotonic()
        done_at = self.last_done
        for c in conns:
            if c is not None:
                c.start_counting(COUNT)
        items = [c.roster_items for c in conns if c is not None]
        await self.quiesce()
        s1 = self.sample()
        ok = len(durs)
        pres = sum(c.consumed_presences + c.presences for c in conns if c is not None)
        await self.close_all(conns)
        d = self.delta(s0, s1)
        durs.sort()
        return {
            "logins": ok, "failed": sum(failures.values()), "failures": failures,
            "contacts_per_roster": p["contacts"],
            "logins_per_s": self.steady_rate(done_at),
            "logins_per_s_overall": round(ok / (t1 - t0), 1) if ok else 0,
            "cpu_s_per_1000_logins": round(d["server_cpu_s"] / ok * 1000, 3) if ok else None,
            "cpu_ms_per_login": round(d["server_cpu_s"] / ok * 1000, 3) if ok else None,
            "presences_received_per_login": round(pres / ok, 1) if ok else None,
            "roster_items_min_max": [min(items), max(items)] if items else None,
            "login_ms_p50": round(pct(durs, 50) * 1000, 1) if durs else None,
            "login_ms_p99": round(pct(durs, 99) * 1000, 1) if durs else None,
            "window": d,
        }

    # -- phase 3: idle memory ---------------------------------------------------------
    async def phase_idle(self, sm: bool = False):
        p = self.p
        levels = sorted(p["idle"])
        # warm-up: one-time allocations of the first logins are not per-connection cost
        warm, _, _ = await self.login_many([f"u{i}" for i in range(1, 21)], 10, sm=sm)
        await self.close_all(warm)
        await asyncio.sleep(1.0)
        await self.quiesce()
        await self.machine_quiet()
        s0 = self.sample()
        out = {"baseline_rss_kb": s0.rss, "levels": {}}
        conns: list = []
        have = 0
        try:
            for lvl in levels:
                users = [f"u{i}" for i in range(have + 1, lvl + 1)]
                t0 = time.monotonic()
                new, failures, _ = await self.login_many(users, p["concurrency"], sm=sm)
                conns += new
                have = lvl
                for c in new:
                    if c is not None:
                        c.start_counting(COUNT)
                await asyncio.sleep(1.0)
                await self.quiesce()
                s = self.sample()
                n = sum(1 for c in conns if c is not None and not c.closed)
                out["levels"][str(lvl)] = {
                    "connections": n, "login_failures": failures,
                    "login_seconds": round(time.monotonic() - t0, 1),
                    "rss_kb": s.rss,
                    "rss_kb_per_conn": round((s.rss - s0.rss) / n, 2) if n else None,
                }
                log(f"    idle {n} connections: RSS {s.rss} kB "
                    f"({out['levels'][str(lvl)]['rss_kb_per_conn']} kB/conn)")
        finally:
            await self.close_all(conns)
        return out


# ---------------------------------------------------------------------------

def scrape_stanza_counts(port: int) -> dict:
    """The stanza counters of xmppd's metrics page (shows it was on and counting)."""
    import urllib.request

    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(("xmppd_stanzas_received_total", "xmppd_stanzas_sent_total")):
            name, _, number = line.rpartition(" ")
            out[name.replace("xmppd_stanzas_", "").replace("_total", "")] = int(float(number))
    return out


async def run_target(name: str, args, p: dict, certs: dict, workroot: Path, cpu_server):
    cls = targets_mod.TARGETS[name]
    port = free_port_pair()
    t = cls(workroot / name, port, DOMAIN, certs, PASSWORD, cpu_server)
    res = {"version": cls.version(), "port": port, "setup": {}, "reps": []}
    n_accounts = max(p["logins"], 2 * p["pairs"], max(p["idle"]), p["storm_logins"],
                     2 * p["light_pairs"], 20)
    log(f"[{name}] {res['version']} on {HOST}:{port}, dir {t.dir}")
    t.prepare()
    b = Bench(t, p, args)
    try:
        if t.provisioning == "offline":
            t0 = time.monotonic()
            t.provision_offline("u", n_accounts)
            t.provision_offline("r", p["roster_users"])
            res["setup"]["accounts_seconds"] = round(time.monotonic() - t0, 1)
        t.start()
        res["setup"]["ready_seconds"] = round(await b.wait_ready(), 2)
        res["setup"]["server_tree"] = procstat.describe(t.pid)
        if t.provisioning == "ibr":
            t0 = time.monotonic()
            c1, e1 = await b.provision_ibr("u", n_accounts)
            c2, e2 = await b.provision_ibr("r", p["roster_users"])
            res["setup"]["accounts_created"] = c1 + c2
            res["setup"]["accounts_existing"] = e1 + e2
            res["setup"]["accounts_seconds"] = round(time.monotonic() - t0, 1)
        # every account logs in once: checks the accounts, and fills the load
        # generator's SCRAM SaltedPassword cache so that the measured logins do not
        # pay the client-side PBKDF2
        t0 = time.monotonic()
        for lo in range(1, n_accounts + 1, 2000):
            users = [f"u{i}" for i in range(lo, min(lo + 2000, n_accounts + 1))]
            conns, failures, _ = await b.login_many(users, p["concurrency"], presence=False)
            await b.close_all(conns)
            if failures:
                raise RuntimeError(f"warm-up logins failed: {failures}")
        res["setup"]["warmup_login_seconds"] = round(time.monotonic() - t0, 1)
        log(f"[{name}] {n_accounts} + {p['roster_users']} accounts ready "
            f"({res['setup']['accounts_seconds']} s, warm-up logins "
            f"{res['setup']['warmup_login_seconds']} s); provisioning rosters")
        if not args.skip_presence:
            res["setup"]["rosters"] = await b.provision_rosters(
                [f"r{i}" for i in range(1, p["roster_users"] + 1)], p["contacts"])
            log(f"[{name}] rosters: {res['setup']['rosters']}")
        t.stop()

        for rep in range(1, p["reps"] + 1):
            r: dict = {"rep": rep}
            res["reps"].append(r)
            try:
                t.start()
                await b.wait_ready()
                await b.quiesce()
                # before any connection (issue 20); the bench config, not the default one
                r["rss_kb_at_start"] = b.sample().rss
                log(f"[{name}] rep {rep}: RSS at start {r['rss_kb_at_start']} kB; phase 1 logins")
                r["logins"] = await b.phase_logins()
                log(f"    {r['logins']['logins_per_s']} logins/s, "
                    f"{r['logins']['cpu_s_per_1000_logins']} CPU-s/1000, failed {r['logins']['failed']}")
                if not args.skip_light:
                    log(f"[{name}] rep {rep}: phase 7 light load (login storm, logout, "
                        f"{p['light_rate']} msg/s)")
                    r["light"] = await b.phase_light()
                    st, lf = r["light"]["storm"], r["light"]["fixed_rate"]
                    log(f"    {st['cpu_ms_per_login']} CPU-ms/login, {st['cpu_ms_per_logout']} "
                        f"CPU-ms/logout, failed {st['failed']}; @{lf['rate']}/s "
                        f"{lf['cpu_us_per_msg']} CPU-us/msg p99 {lf['lat_p99_ms']} ms "
                        f"lost {lf['lost']}")
                if not args.only_light:
                    log(f"[{name}] rep {rep}: phase 2 messages")
                    r["messages"], conns, pairs = await b.phase_messages()
                    sat, fix = r["messages"]["saturation"], r["messages"]["fixed_rate"]
                    log(f"    {sat['msgs_per_s']} msg/s, {sat['cpu_s_per_10k_msgs']} CPU-s/10k, "
                        f"lost {sat['lost']}; @{fix['rate']}/s p50 {fix['lat_p50_ms']} ms "
                        f"p99 {fix['lat_p99_ms']} ms lost {fix['lost']}")
                    if getattr(t, "metrics_port", None):
                        r["metrics_scrape"] = scrape_stanza_counts(t.metrics_port)
                        log(f"    metrics page: {r['metrics_scrape']}")
                    try:
                        if not args.skip_blocking:
                            log(f"[{name}] rep {rep}: phase 5 blocking")
                            r["blocking"] = await b.phase_blocking(conns, pairs, r["messages"])
                            bl = r["blocking"]
                            log(f"    {bl['saturation']['msgs_per_s']} msg/s "
                                f"({bl.get('throughput_vs_phase2')}x), "
                                f"{bl['saturation']['cpu_s_per_10k_msgs']} CPU-s/10k "
                                f"({bl.get('cpu_vs_phase2')}x), p99 {bl['fixed_rate']['lat_p99_ms']} ms")
                    finally:
                        await b.close_all(conns)
                if not args.skip_sm and getattr(t, "stream_management", False):
                    log(f"[{name}] rep {rep}: phase 6 messages with stream management")
                    r["sm_messages"], conns, _ = await b.phase_messages(sm=True)
                    await b.close_all(conns)
                    sm_sat = r["sm_messages"]["saturation"]
                    plain = sat["cpu_s_per_10k_msgs"]
                    if plain and sm_sat["cpu_s_per_10k_msgs"]:
                        r["sm_messages"]["cpu_vs_phase2"] = round(
                            sm_sat["cpu_s_per_10k_msgs"] / plain, 3)
                        r["sm_messages"]["throughput_vs_phase2"] = round(
                            sm_sat["msgs_per_s"] / sat["msgs_per_s"], 3)
                    log(f"    {sm_sat['msgs_per_s']} msg/s, {sm_sat['cpu_s_per_10k_msgs']} "
                        f"CPU-s/10k ({r['sm_messages'].get('cpu_vs_phase2')}x plain), "
                        f"lost {sm_sat['lost']}")
                if not args.skip_presence:
                    log(f"[{name}] rep {rep}: phase 4 presence")
                    r["presence"] = await b.phase_presence()
                    log(f"    {r['presence']['cpu_s_per_1000_logins']} CPU-s/1000 logins, "
                        f"{r['presence']['presences_received_per_login']} presences/login")
                if not args.skip_idle:
                    log(f"[{name}] rep {rep}: phase 3 idle memory (fresh server)")
                    t.stop()
                    t.start()
                    await b.wait_ready()
                    await b.quiesce()
                    r["idle"] = await b.phase_idle()
                    if not args.skip_sm and getattr(t, "stream_management", False):
                        log(f"[{name}] rep {rep}: phase 6 idle memory with stream management"
                            " (fresh server)")
                        t.stop()
                        t.start()
                        await b.wait_ready()
                        await b.quiesce()
                        r["sm_idle"] = await b.phase_idle(sm=True)
            except Exception as e:
                r["error"] = f"{type(e).__name__}: {e}"
                log(f"[{name}] rep {rep} FAILED: {r['error']}")
                if args.verbose:
                    traceback.print_exc()
            finally:
                r["server_log_tail"] = t.log_tail(5) if "error" in r else None
                t.stop()
        res["scram_iterations_seen"] = sorted(b.iterations_seen)
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
        log(f"[{name}] FAILED: {res['error']}")
        if args.verbose:
            traceback.print_exc()
    finally:
        t.stop()
    res["summary"] = report.summarize(res)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="xmppd,prosody,ejabberd",
                    help="comma-separated: " + ",".join(targets_mod.TARGETS))
    ap.add_argument("--quick", action="store_true", help="short run (~2-3 min per target)")
    ap.add_argument("--reps", type=int, help="repetitions (default: quick 1, full 3)")
    ap.add_argument("--out", default=str(HERE / "results"), help="directory for JSON + markdown")
    ap.add_argument("--no-idle-10k", action="store_true",
                    help="idle-memory phase at 1,000 connections only")
    ap.add_argument("--idle", help="comma-separated idle connection levels (e.g. 1000,10000)")
    ap.add_argument("--logins", type=int)
    ap.add_argument("--concurrency", type=int, help="logins in flight")
    ap.add_argument("--pairs", type=int, help="K connected pairs in the message phases")
    ap.add_argument("--window", type=int, help="messages in flight per connection at saturation")
    ap.add_argument("--measure", type=float, help="saturation measurement seconds")
    ap.add_argument("--latency-rate", type=int, help="msgs/s of the fixed-rate latency run")
    ap.add_argument("--latency-secs", type=float)
    ap.add_argument("--roster-users", type=int)
    ap.add_argument("--skip-presence", action="store_true")
    ap.add_argument("--skip-blocking", action="store_true")
    ap.add_argument("--skip-sm", action="store_true",
                    help="no phase 6 (messages and idle memory with XEP-0198 stream management)")
    ap.add_argument("--skip-idle", action="store_true")
    ap.add_argument("--skip-light", action="store_true",
                    help="no phase 7 (issue 20: login storm of 50 in parallel, logout, "
                         "500 msg/s over 50 pairs)")
    ap.add_argument("--only-light", action="store_true",
                    help="phase 7 only (skips phases 2-6; phase 1 still runs)")
    ap.add_argument("--no-pin", action="store_true",
                    help="do not pin the server to CPU 0 and the load generator to CPU 1")
    ap.add_argument("--compare", help="earlier results JSON whose targets fill the peer columns "
                                      "of the table (e.g. an xmppd-only run against peers "
                                      "measured before)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dirs")
    ap.add_argument("--xmppd-metrics", action="store_true",
                    help="run xmppd with its [metrics] page on (port + 1), scraped after "
                         "each message phase: compare with a run without it")
    ap.add_argument("--xmppd-mam", action="store_true",
                    help="run xmppd with the message archive (urn:xmpp:sid:0 + urn:xmpp:mam:2): "
                         "compare the message phase with a run without it (issue 16)")
    ap.add_argument("--xmppd-profile", metavar="DIR",
                    help="run xmppd under cProfile (twistd --profile); stats in DIR at shutdown")
    ap.add_argument("--s2s", action="store_true",
                    help="the s2s phase only (bench/s2s.py): two servers of each target "
                         "federating, against a c2s baseline on one of them")
    ap.add_argument("--cluster", action="store_true",
                    help="the cluster phase only (bench/cluster.py): two xmppd nodes on one "
                         "Redis (same-node, cross-node and mixed pairs) against a stand-alone node")
    ap.add_argument("--cluster-windows", default="solo,same,cross,mixed",
                    help="with --cluster: the windows to run (e.g. cross, to profile it alone)")
    ap.add_argument("--sched-batch", action="store_true",
                    help="with --cluster: run every server process under SCHED_BATCH (no "
                         "wake-up preemption between the processes sharing the server CPU)")
    ap.add_argument("--verbose", "-v", action="store_true")
    args = ap.parse_args(argv)

    p = dict(PROFILES["quick" if args.quick else "full"])
    for k in ("reps", "logins", "concurrency", "pairs", "window", "measure", "latency_rate",
              "latency_secs", "roster_users"):
        v = getattr(args, k)
        if v is not None:
            p[k] = v
    if args.idle:
        p["idle"] = [int(x) for x in args.idle.split(",")]
    elif args.no_idle_10k:
        p["idle"] = [x for x in p["idle"] if x <= 1000] or [1000]
    p["profile"] = "quick" if args.quick else "full"
    p.update(LIGHT)
    if args.only_light:
        args.skip_presence = args.skip_blocking = args.skip_sm = args.skip_idle = True
        args.skip_light = False

    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    targets_mod.Xmppd.metrics = args.xmppd_metrics
    targets_mod.Xmppd.mam = args.xmppd_mam
    p["xmppd_mam"] = args.xmppd_mam
    if args.xmppd_profile:
        targets_mod.Xmppd.profile_dir = Path(args.xmppd_profile).resolve()
    p["xmppd_metrics"] = args.xmppd_metrics
    for n in names:
        if n not in targets_mod.TARGETS:
            ap.error(f"unknown target {n!r}")

    nofile = raise_nofile()
    need = max(p["idle"]) + 200
    if nofile[0] < need:
        log(f"WARNING: RLIMIT_NOFILE is {nofile[0]}, the idle phase needs ~{need}")

    cpu_server = None
    if not args.no_pin and (os.cpu_count() or 1) >= 2:
        cpu_server = {0}
        os.sched_setaffinity(0, {1})
    p["pinning"] = ("server CPU 0, load generator CPU 1" if cpu_server
                    else "none")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workroot = Path(tempfile.mkdtemp(prefix="xmppbench-"))
    os.chmod(workroot, 0o755)
    certs = make_cert(workroot / "certs", DOMAIN)

    result = {
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "host": host_info(),
        "params": p,
        "targets": {},
        "skipped": {},
    }
    log(f"profile {p['profile']}, reps {p['reps']}, pinning: {p['pinning']}, "
        f"workdir {workroot}")
    kind = "s2s" if args.s2s else "cluster" if args.cluster else "run"
    if args.s2s:
        import s2s
    if args.cluster:
        import cluster
        p["cluster_windows"] = [w for w in args.cluster_windows.split(",") if w]
        p["sched_batch"] = args.sched_batch
        names = []
        result["targets"]["xmppd-cluster"] = asyncio.run(
            cluster.run_cluster(args, p, certs, workroot, cpu_server))
    try:
        for n in names:
            ok, why = targets_mod.TARGETS[n].available()
            if not ok:
                log(f"[{n}] SKIPPED: {why}")
                result["skipped"][n] = why
                continue
            if args.s2s:
                result["targets"][n] = asyncio.run(s2s.run_s2s_target(n, args, p, workroot, cpu_server))
            else:
                result["targets"][n] = asyncio.run(run_target(n, args, p, certs, workroot, cpu_server))
            # write after every target so a crash keeps what was measured
            jpath = out_dir / f"{kind}-{stamp}.json"
            jpath.write_text(json.dumps(result, indent=1, default=str))
    finally:
        if not args.keep:
            shutil.rmtree(workroot, ignore_errors=True)
        else:
            log(f"kept {workroot}")
    result["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    jpath = out_dir / f"{kind}-{stamp}.json"
    jpath.write_text(json.dumps(result, indent=1, default=str))
    if args.s2s:
        md = s2s.markdown(result)
    elif args.cluster:
        md = cluster.markdown(result)
    else:
        compare = json.loads(Path(args.compare).read_text()) if args.compare else None
        md = report.markdown(result, compare)
    mpath = out_dir / f"{kind}-{stamp}.md"
    mpath.write_text(md)
    print()
    print(md)
    log(f"wrote {jpath} and {mpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``xmppctl``'s side of the admin socket (:mod:`xmppd.admin`): one blocking
request with a timeout, and the text each answer is shown as.

A plain socket rather than a Twisted endpoint: xmppctl asks one question and
exits, and a timeout bounds the wait.
"""
from __future__ import annotations

import json
import os
import socket
import time
from datetime import datetime, timezone

from xmppd.admin import SOCKET_NAME, VERSION

TIMEOUT = 30.0  # seconds for connect + answer (a reload re-reads every certificate)
MAX_ANSWER = 64 * 1024 * 1024  # bytes; a `users` listing of a large server fits


class NotRunning(Exception):
    """No server answers on the socket (one line for the operator)."""


class Refused(Exception):
    """The server answered with an error (its one line)."""


def socket_path(data_dir: str) -> str:
    return os.path.join(data_dir, SOCKET_NAME)


def _not_running(data_dir: str, path: str, why: str) -> NotRunning:
    from xmppd.pidfile import held_by_live_process

    pidfile = os.path.join(data_dir, "xmppd.pid")
    if held_by_live_process(pidfile):
        try:
            pid = open(pidfile).read().strip()
        except OSError:
            pid = "?"
        return NotRunning(f"xmppd (pid {pid}) holds {pidfile} but does not answer on {path} "
                          f"({why}); was it started before it had an admin socket?")
    return NotRunning(f"xmppd is not running (no server answers on {path}: {why})")


def request(data_dir: str, command: str, args: dict | None = None,
            timeout: float = TIMEOUT) -> object:
    """Send one request; return the answer's data, or raise NotRunning / Refused."""
    path = socket_path(data_dir)
    line = json.dumps({"v": VERSION, "cmd": command, "args": args or {}}).encode() + b"\n"
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise _not_running(data_dir, path, e.strerror or str(e)) from None
        except PermissionError:
            raise Refused(f"cannot connect to {path}: permission denied; run xmppctl as the "
                          f"server's user (e.g. runuser -u xmppd -- xmppctl ...)") from None
        except OSError as e:
            raise Refused(f"cannot connect to {path}: {e.strerror or e}") from None
        answer = b""
        try:
            s.sendall(line)
            while not answer.endswith(b"\n"):
                s.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
                if len(answer) > MAX_ANSWER:
                    raise Refused(f"answer from {path} larger than {MAX_ANSWER} bytes")
        except socket.timeout:
            raise Refused(f"no answer from xmppd on {path} within {timeout:g}s") from None
        except OSError as e:
            raise Refused(f"connection to {path} failed: {e.strerror or e}") from None
    try:
        message = json.loads(answer)
    except ValueError:
        raise Refused(f"unreadable answer from {path}: {answer[:200]!r}") from None
    if not isinstance(message, dict) or message.get("v") != VERSION:
        raise Refused(f"answer from {path} is not admin protocol version {VERSION}")
    if not message.get("ok"):
        raise Refused(str(message.get("error", "error without text")))
    return message.get("data")


# -- what the operator sees ------------------------------------------------------


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s"


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    return datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def format_status(data: dict) -> str:
    rss = data.get("vm_rss_kib")
    memory = f"{rss / 1024:.1f} MiB (VmRSS)" if rss is not None else "unknown"
    total = sum(data["sessions"].values())
    lines = [
        f"xmppd {data['version']}, pid {data['pid']}, up {_duration(data['uptime'])} "
        f"(since {_when(data['started'])} UTC)",
        f"config:   {data['config']}",
        f"data_dir: {data['data_dir']}",
        f"memory:   {memory}",
        f"sessions: {total}",
    ]
    width = max(len(h) for h in data["hosts"])
    lines += [f"  {host.ljust(width)}  {data['sessions'].get(host, 0)}" for host in data["hosts"]]
    s2s = data.get("s2s")
    if s2s is None:
        lines.append("s2s:      off ([s2s] enabled = false)")
    else:
        lines.append(f"s2s:      {s2s.get('in', 0)} incoming, {s2s.get('out', 0)} outgoing "
                     f"established (xmppctl s2s lists them)")
    return "\n".join(lines) + "\n"


def _table(header: tuple, rows: list[tuple]) -> str:
    rows = [header] + rows
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    return "".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() + "\n"
                   for r in rows)


def format_sessions(rows: list[dict]) -> str:
    if not rows:
        return "no sessions\n"
    body = _table(("JID", "ADDRESS", "SINCE (UTC)", "TLS", "PRESENCE"), [
        (r["jid"], f"[{r['address']}]:{r['port']}" if ":" in (r["address"] or "") else
         f"{r['address']}:{r['port']}", _when(r["since"]), r["tls"] or "none",
         f"available, priority {r['priority']}" if r["available"] else "unavailable")
        for r in rows])
    return body + f"{len(rows)} session(s)\n"


def format_users(data: dict) -> str:
    lines = []
    for host, info in data.items():
        count = "unknown" if info["count"] is None else info["count"]
        lines.append(f"{host}: {count} account(s) ({info['connector']} connector)")
        if info["users"] is None:
            lines.append("  (this connector cannot list its accounts)")
            continue
        lines += [f"  {u}" for u in info["users"]]
        more = (info["count"] or 0) - len(info["users"])
        if more > 0:
            lines.append(f"  ... and {more} more")
    return "\n".join(lines) + "\n"


def format_reload(data: dict, pid: object) -> str:
    lines = [f"xmppd (pid {pid}) reloaded"]
    if data["applied"]:
        lines.append("now in force: " + ", ".join(data["applied"]))
    else:
        lines.append("no reloadable setting changed")
    if data["restart"]:
        lines.append("changed but need a restart (running values kept): "
                     + ", ".join(data["restart"]))
    lines += [f"certificates: {m}" for m in data["certificates"]]
    return "\n".join(lines) + "\n"


def cert_infos(rows: list[dict]) -> list:
    """The admin socket's ``certs`` rows back into :class:`~xmppd.certs.CertInfo`."""
    from xmppd.certs import CertInfo

    out = []
    for row in rows:
        row = dict(row)
        for key in ("not_before", "not_after"):
            row[key] = datetime.fromisoformat(row[key])
        for key in ("sans", "sources", "notes"):
            row[key] = tuple(row[key])
        out.append(CertInfo(**row))
    return out


def format_s2s(rows: list[dict] | None) -> str:
    """``xmppctl s2s``: one line per connection."""
    if rows is None:
        return "federation is off ([s2s] enabled = false)\n"
    if not rows:
        return "no s2s connections\n"
    lines = [f"{'DIR':4} {'DOMAINS':40} {'STATE':12} {'TLS':8} {'AUTH':9} PEER"]
    for r in rows:
        lines.append(f"{r.get('direction', '?'):4} {', '.join(r.get('pairs', [])):40} "
                     f"{r.get('state', '?'):12} {r.get('tls', '?'):8} {r.get('auth', '?'):9} "
                     f"{r.get('peer', '')}")
    return "\n".join(lines) + "\n"

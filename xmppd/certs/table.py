"""
What ``xmppctl certs`` shows: a :class:`CertInfo` per host, and the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from xmppd.certs.model import _now


@dataclass(frozen=True)
class CertInfo:
    """What ``xmppctl certs`` shows about the certificate a host serves."""

    host: str
    status: str  # ok | expiring | expired | self-signed | mismatch | stale
    subject: str
    sans: tuple[str, ...]
    issuer: str
    serial: int
    not_before: datetime
    not_after: datetime
    fingerprint: str  # SHA-256 of the leaf, colon-separated hex
    origin: str  # explicit | certs_dir | wildcard | letsencrypt | default | generated
    sources: tuple[str, ...]
    notes: tuple[str, ...] = ()


def format_cert_table(infos: list[CertInfo], now: datetime | None = None) -> str:
    """
    The ``xmppctl certs`` table: one row per host, then indented lines with
    the certificate's names and any notes (``!``).
    """
    now = now or _now()
    header = ("HOST", "STATUS", "EXPIRES (UTC)", "SERIAL", "ISSUER", "SOURCE")
    rows = [header] + [_row(info, now) for info in infos]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    indent = " " * (widths[0] + 2)
    lines = []
    for n, row in enumerate(rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            continue
        info = infos[n - 1]
        lines.append(f"{indent}names: {', '.join(info.sans) or '(none)'}")
        lines.extend(f"{indent}! {note}" for note in info.notes)
    return "\n".join(lines) + "\n"


def _row(info: CertInfo, now: datetime) -> tuple[str, ...]:
    left = info.not_after - now
    when = f"in {left.days} days" if left > timedelta(0) else f"{(-left).days} days ago"
    return (info.host, info.status, f"{info.not_after:%Y-%m-%d %H:%M} ({when})",
            f"{info.serial:x}",
            info.issuer, f"{info.origin}: {', '.join(info.sources)}")

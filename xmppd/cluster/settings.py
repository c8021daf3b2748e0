"""``[cluster]``: read once at start-up (docs/cluster.rst).

Absent or without ``redis``, clustering is off and nothing of
:mod:`xmppd.cluster` is imported beyond this module.
"""
from __future__ import annotations

import os
import socket
import urllib.parse
from dataclasses import dataclass

from xmppd.config import Config


@dataclass(frozen=True)
class ClusterConfig:
    host: str
    port: int
    db: int
    password: str | None
    node: str
    heartbeat: float
    expiry: float


def settings(config: Config) -> ClusterConfig | None:
    """The validated ``[cluster]`` table, or None when clustering is off."""
    sec = config.section("cluster")
    url = sec.str("redis", None)
    node = sec.str("node", None)
    heartbeat = sec.number("heartbeat", 5.0, minimum=0.1)
    expiry = sec.number("expiry", 15.0, minimum=0.3)
    sec.reject_unknown()
    if url is None:
        return None
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        raise sec.error("redis", url, 'a URL "redis://host[:port][/db]" (TLS: not yet)')
    try:
        port = parts.port or 6379
        path = parts.path.strip("/")
        db = int(path) if path else 0
    except ValueError:
        raise sec.error("redis", url, "port and database must be integers") from None
    if expiry < 2 * heartbeat:
        raise sec.error("expiry", expiry, f"must be at least twice heartbeat ({heartbeat})")
    if node is None:
        # Unique per process: a restarted node is a new node, and the old
        # one's sessions are reaped as those of a dead node.
        node = f"{socket.gethostname()}-{os.getpid()}"
    if not node or any(c.isspace() for c in node) or len(node) > 100:
        raise sec.error("node", node, "1 to 100 characters, no spaces")
    return ClusterConfig(host=parts.hostname, port=port, db=db,
                         password=urllib.parse.unquote(parts.password) if parts.password else None,
                         node=node, heartbeat=heartbeat, expiry=expiry)

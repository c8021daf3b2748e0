"""The per-address connection limit of the listeners that take clients.

Client (c2s) and external-component (XEP-0114) listeners both refuse a
connection from an address that already has ``[c2s]
max_connections_per_ip`` open (0: no limit), so that one host cannot use
up the descriptors of all others.  Both count with this one mixin.

The limit is read from the configuration on each new connection (not per
stanza), so a configuration reload that changes it applies to the next
connection without a restart.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xmppd.core import Server


class PerAddressLimit:
    """Counts open connections per peer address for a factory with ``server``.

    A stream calls :meth:`admit` once when its connection is made and
    :meth:`release` once when it is lost, whether it was admitted or not.
    """

    server: "Server"

    def __init__(self) -> None:
        self.per_ip: dict[str, int] = {}

    def admit(self, ip: str) -> bool:
        """Count one more connection from ``ip``; False if that is over the limit."""
        count = self.per_ip.get(ip, 0) + 1
        self.per_ip[ip] = count
        limit = self.server.config.c2s.max_connections_per_ip
        return not limit or count <= limit

    def release(self, ip: str) -> None:
        """One connection from ``ip`` is gone; an address with none is forgotten."""
        count = self.per_ip.get(ip, 0) - 1
        if count > 0:
            self.per_ip[ip] = count
        else:
            self.per_ip.pop(ip, None)

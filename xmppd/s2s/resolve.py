"""Where a remote domain's server listens: DNS SRV, then A/AAAA (RFC 6120 §3.2, XEP-0368).

Everything goes through :mod:`twisted.names`, so no lookup ever blocks the
reactor, and every lookup is bounded by ``[s2s] dns_timeout`` (one try per
query; the resolver of ``/etc/resolv.conf`` or ``[s2s] nameservers``).

For a domain, :meth:`Resolver.targets` asks for ``_xmpps-server._tcp``
(direct TLS) and ``_xmpp-server._tcp`` (STARTTLS) at once and merges the
answers: lower priority first, within a priority direct TLS first, and
within that the RFC 2782 weighted random order.  A single record with
target ``.`` means "no service here" (an empty list: the domain does not
federate).  No SRV records at all, or a failed SRV lookup, fall back to the
domain itself on port 5269 with STARTTLS.  :meth:`Resolver.addresses` then
turns a target host into IP addresses (AAAA and A, IPv6 first).
"""
from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger

from xmppd.logfilter import log_observer
from twisted.names import dns, error

log = Logger(observer=log_observer)

DEFAULT_PORT = 5269
SERVICES = (("_xmpps-server._tcp.", True), ("_xmpp-server._tcp.", False))


@dataclass(frozen=True)
class Target:
    """One place to try: ``host`` (a name or an IP), ``port``, and how TLS starts."""

    host: str
    port: int
    direct_tls: bool

    def describe(self) -> str:
        return f"{'tls' if self.direct_tls else 'tcp'}:{self.host}:{self.port}"


@dataclass(frozen=True)
class SRVRecord:
    priority: int
    weight: int
    port: int
    target: str
    direct_tls: bool


def order_records(records: list[SRVRecord], choice: Callable[[int], int] | None = None) -> list[SRVRecord]:
    """RFC 2782 order: by priority; in a priority, direct TLS first, then by weighted draw.

    ``choice(total)`` returns an integer in ``[0, total]`` (tests fix it).
    """
    if choice is None:
        choice = lambda total: random.randint(0, total)  # noqa: E731 -- not for secrets
    out: list[SRVRecord] = []
    for key in sorted({(r.priority, not r.direct_tls) for r in records}):
        group = [r for r in records if (r.priority, not r.direct_tls) == key]
        # Zero-weight records first, so they get a (small) chance at the front.
        group.sort(key=lambda r: r.weight != 0)
        while group:
            total = sum(r.weight for r in group)
            pick = choice(total)
            running = 0
            for i, r in enumerate(group):
                running += r.weight
                if running >= pick:
                    out.append(group.pop(i))
                    break
    return out


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Resolver:
    """SRV and address look-ups for s2s, bounded in time."""

    def __init__(self, timeout: float, nameservers: tuple[tuple[str, int], ...] = (),
                 resolver: Any = None) -> None:
        if resolver is None:
            from twisted.names import client

            if nameservers:
                resolver = client.createResolver(servers=list(nameservers))
            else:
                resolver = client.createResolver()
        self.resolver = resolver
        self.timeout = (timeout,)

    def targets(self, domain: str) -> defer.Deferred:
        """Deferred list of :class:`Target` for ``domain`` (empty: no service)."""
        queries = [self._srv(prefix + domain, direct) for prefix, direct in SERVICES]
        d = defer.gatherResults(queries)
        d.addCallback(self._merge, domain)
        return d

    def _srv(self, name: str, direct_tls: bool) -> defer.Deferred:
        d = self.resolver.lookupService(name, timeout=self.timeout)

        def answered(result):
            answers = result[0]
            return [SRVRecord(rr.payload.priority, rr.payload.weight, rr.payload.port,
                              rr.payload.target.name.decode("ascii", "replace").rstrip("."), direct_tls)
                    for rr in answers if rr.type == dns.SRV]

        def failed(failure):
            if not failure.check(error.DNSNameError):
                log.debug("s2s: SRV look-up of {name} failed: {why}", name=name,
                          why=failure.getErrorMessage() or failure.type.__name__)
                return None  # unknown: fall back to the domain itself
            return []

        return d.addCallbacks(answered, failed)

    @staticmethod
    def _merge(results: list, domain: str) -> list[Target]:
        records = [r for found in results if found for r in found]
        if not records:
            return [Target(domain, DEFAULT_PORT, False)]
        if len(records) == 1 and records[0].target in ("", "."):
            return []  # RFC 2782: the service is decidedly not available
        records = [r for r in records if r.target not in ("", ".")]
        return [Target(r.target, r.port, r.direct_tls) for r in order_records(records)]

    def addresses(self, host: str) -> defer.Deferred:
        """Deferred list of IP addresses of ``host`` (IPv6 first); fails when there are none."""
        if is_ip(host):
            return defer.succeed([host])
        queries = [
            self.resolver.lookupIPV6Address(host, timeout=self.timeout).addCallbacks(
                lambda r: [rr.payload.dottedQuad() if rr.type == dns.A else
                           _ipv6(rr.payload.address) for rr in r[0] if rr.type in (dns.A, dns.AAAA)],
                lambda f: []),
            self.resolver.lookupAddress(host, timeout=self.timeout).addCallbacks(
                lambda r: [rr.payload.dottedQuad() for rr in r[0] if rr.type == dns.A],
                lambda f: []),
        ]

        def merged(results):
            found = [a for addrs in results for a in addrs]
            if not found:
                raise error.DNSNameError(f"{host}: no address")
            return list(dict.fromkeys(found))

        return defer.gatherResults(queries).addCallback(merged)


def _ipv6(packed: bytes) -> str:
    return str(ipaddress.IPv6Address(packed))

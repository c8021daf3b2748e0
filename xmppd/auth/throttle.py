"""Brute-force protection in front of every connector.

The SASL layer asks :meth:`LoginThrottle.blocked` before it lets a client try
a password, and reports each outcome with :meth:`record_failure` /
:meth:`record_success`.  Two independent sliding windows are kept:

* per client address: ``max_failures_per_ip`` failed logins within
  ``window`` seconds block further attempts from that address.  IPv6
  addresses count per /64 (one subscriber usually owns a whole /64, so
  counting single addresses would be trivially evaded); IPv4-mapped IPv6
  addresses count as their IPv4 address.
* per account (bare JID): ``max_failures_per_account`` failures within
  ``window`` block further attempts on that account from *every* address
  (this stops a botnet spreading its guesses over many addresses, at the
  price that an attacker can keep a known account locked; size it above
  what a person mistyping produces).

A limit of 0 disables that dimension; an empty ``ip`` or ``account`` is
ignored (the SASL layer may not know the account before the exchange).
A success clears the *account's* failures (its owner is back) but not the
address's (one valid account must not launder guesses against others).

Blocking answers how long remains until the oldest counted failure leaves
the window, so a client that keeps retrying does not extend its own block,
and memory is bounded: at most ``max`` timestamps per key, and keys whose
failures have all expired are swept when the tables grow.
"""
from __future__ import annotations

import ipaddress
from collections import deque

from twisted.logger import Logger

log = Logger(namespace="xmppd.auth.throttle")

_SWEEP_AT = 4096


def ip_key(ip: str) -> str:
    """The unit an address is counted in: itself (IPv4) or its /64 (IPv6)."""
    text = ip.strip()
    if text.startswith("[") and "]" in text:
        text = text[1 : text.index("]")]
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return ip  # not an address (a UNIX socket, a test name): count it as given
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class _Window:
    """Failure timestamps per key, at most ``limit`` of them, within ``window``."""

    def __init__(self, kind: str, limit: int, window: float) -> None:
        self.kind, self.limit, self.window = kind, limit, window
        self.failures: dict[str, deque] = {}
        self._sweep_at = _SWEEP_AT

    def _live(self, key: str, now: float) -> deque | None:
        times = self.failures.get(key)
        if times is None:
            return None
        cutoff = now - self.window
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self.failures[key]
            return None
        return times

    def remaining(self, key: str, now: float) -> float:
        if not self.limit or not key:
            return 0.0
        times = self._live(key, now)
        if times is None or len(times) < self.limit:
            return 0.0
        return max(0.0, times[0] + self.window - now)

    def add(self, key: str, now: float) -> None:
        if not self.limit or not key:
            return
        times = self._live(key, now)
        if times is None:
            times = self.failures[key] = deque(maxlen=self.limit)
        before = len(times)
        times.append(now)
        if before < self.limit <= len(times):
            log.warn(
                "login throttle engaged for {kind} {key}: {count} failed logins within "
                "{window:.0f}s; further attempts refused for {wait:.0f}s",
                kind=self.kind, key=key, count=len(times), window=self.window,
                wait=times[0] + self.window - now, xmppd_throttle=self.kind,
            )
        if len(self.failures) >= self._sweep_at:
            self.sweep(now)

    def clear(self, key: str) -> None:
        self.failures.pop(key, None)

    def sweep(self, now: float) -> None:
        for key in list(self.failures):
            self._live(key, now)
        self._sweep_at = max(_SWEEP_AT, 2 * len(self.failures))


class LoginThrottle:
    """Sliding-window failure counters per client address and per account."""

    def __init__(
        self, max_failures_per_ip: int, max_failures_per_account: int, window: float,
        clock=None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        if max_failures_per_ip < 0 or max_failures_per_account < 0:
            raise ValueError("failure limits must be >= 0 (0 disables)")
        if window <= 0:
            raise ValueError("window must be > 0 seconds")
        self.clock = clock
        self.window = float(window)
        self._ips = _Window("address", int(max_failures_per_ip), self.window)
        self._accounts = _Window("account", int(max_failures_per_account), self.window)

    def blocked(self, ip: str, account: str) -> float:
        """Seconds until a login from ``ip`` for ``account`` may be tried (0: now)."""
        now = self.clock.seconds()
        return max(
            self._ips.remaining(ip_key(ip) if ip else "", now),
            self._accounts.remaining(account, now),
        )

    def record_failure(self, ip: str, account: str) -> None:
        now = self.clock.seconds()
        self._ips.add(ip_key(ip) if ip else "", now)
        self._accounts.add(account, now)

    def record_success(self, ip: str, account: str) -> None:
        if account:
            self._accounts.clear(account)

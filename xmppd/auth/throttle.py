"""Brute-force protection in front of every connector.

The SASL layer asks :meth:`LoginThrottle.blocked` before it lets a client try
a password, and reports each outcome with :meth:`record_failure` /
:meth:`record_success`.  Failed logins are counted in sliding windows under
three keys ("modes"); each limit blocks only what its key names:

``address+account``
    failures for one account from one client address.  Blocks that address
    for that account only.  Stops a single host guessing one password without
    handing anyone a way to lock the account's owner out: the owner logs in
    from another address.
``address``
    failures from one client address for any accounts.  Blocks the address
    for every account.  Stops one host trying one password against many
    accounts ("password spraying"); the price is that users behind one NAT
    share the counter.
``account``
    failures for one account from every address.  Blocks the account from
    everywhere.  Stops a botnet spreading its guesses over many addresses, at
    the price that anyone who knows the JID can keep the account locked; it
    is meant as a last resort with a limit far above the other two.

IPv6 addresses count per prefix (``/64`` by default: one subscriber usually
owns a whole /64, so single addresses would be trivially evaded);
IPv4-mapped IPv6 addresses count as their IPv4 address.

A limit of 0 switches that counter off; an empty ``ip`` or ``account`` is
ignored (the SASL layer may not know the account before the exchange).  A
success clears the account's and the address+account failures (the owner
is back) but not the address's (one valid account must not launder guesses
against others).

Blocking answers how long remains until the oldest counted failure leaves
the window, so a client that keeps retrying does not extend its own block.

Memory is bounded whatever clients send: a key keeps at most ``limit``
timestamps, and each counter tracks at most ``max_entries`` keys.  Keys are
kept in order of their latest failure, so expired ones are dropped from the
front as time passes (no scan of the table), and when the table is full the
key with the oldest latest failure is forgotten to make room.
"""
from __future__ import annotations

import ipaddress
from collections import OrderedDict

from twisted.logger import Logger

from xmppd.logfilter import log_observer

log = Logger(namespace="xmppd.auth.throttle", observer=log_observer)

#: The counters, in the order ``blocked`` consults them.
MODES = ("address+account", "address", "account")
DEFAULT_MAX_ENTRIES = 50_000
DEFAULT_IPV6_PREFIX = 64


def ip_key(ip: str, ipv6_prefix: int = DEFAULT_IPV6_PREFIX) -> str:
    """The unit an address is counted in: itself (IPv4) or its IPv6 prefix."""
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
        return str(ipaddress.IPv6Network((addr, ipv6_prefix), strict=False))
    return str(addr)


class _Counter:
    """Failure timestamps per key: at most ``limit`` each, ``max_entries`` keys.

    ``failures`` is ordered by each key's latest failure (oldest first), which
    makes both expiry and eviction a pop from the front.
    """

    def __init__(self, kind: str, limit: int, window: float, max_entries: int) -> None:
        self.kind, self.limit, self.window = kind, limit, window
        self.max_entries = max_entries
        self.failures: OrderedDict[str, list[float]] = OrderedDict()
        self.evicted = 0
        self.engaged = 0  # times a key reached the limit (the metrics page reads it)
        self._evict_logged_until = float("-inf")

    def _expire(self, now: float) -> None:
        """Drop keys whose latest failure has left the window (front of the order)."""
        cutoff = now - self.window
        failures = self.failures
        while failures:
            key = next(iter(failures))
            if failures[key][-1] > cutoff:
                break
            del failures[key]

    def _live(self, key: str, now: float) -> list[float] | None:
        times = self.failures.get(key)
        if times is None:
            return None
        cutoff = now - self.window
        drop = 0
        while drop < len(times) and times[drop] <= cutoff:
            drop += 1
        if drop:
            del times[:drop]
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
        self._expire(now)
        times = self._live(key, now)
        if times is None:
            if len(self.failures) >= self.max_entries:
                self._evict(now)
            times = self.failures[key] = []
        else:
            self.failures.move_to_end(key)
        before = len(times)
        times.append(now)
        if len(times) > self.limit:
            del times[0]
        if before < self.limit <= len(times):
            self.engaged += 1
            log.warn(
                "login throttle engaged for {kind} {key}: {count} failed logins within "
                "{window:.0f}s; further attempts refused for {wait:.0f}s",
                kind=self.kind, key=key, count=len(times), window=self.window,
                wait=times[0] + self.window - now, xmppd_throttle=self.kind,
            )

    def _evict(self, now: float) -> None:
        self.failures.popitem(last=False)
        self.evicted += 1
        if now >= self._evict_logged_until:  # once per window, not per eviction
            self._evict_logged_until = now + self.window
            log.warn(
                "login throttle: {max} {kind} keys tracked, forgetting the oldest "
                "(many distinct clients failing; raise [limits] auth_throttle_max_entries "
                "if this is not an attack)",
                max=self.max_entries, kind=self.kind, xmppd_throttle_full=self.kind,
            )

    def clear(self, key: str) -> None:
        if key:
            self.failures.pop(key, None)


class LoginThrottle:
    """Sliding-window failure counters per address+account, address and account."""

    def __init__(
        self, *, per_ip_account: int, per_ip: int, per_account: int, window: float,
        ipv6_prefix: int = DEFAULT_IPV6_PREFIX, max_entries: int = DEFAULT_MAX_ENTRIES,
        clock=None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        if min(per_ip_account, per_ip, per_account) < 0:
            raise ValueError("failure limits must be >= 0 (0 disables)")
        if window <= 0:
            raise ValueError("window must be > 0 seconds")
        if not 1 <= ipv6_prefix <= 128:
            raise ValueError("ipv6_prefix must be 1..128")
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.clock = clock
        self.window = float(window)
        self.ipv6_prefix = ipv6_prefix
        self._ip_accounts = _Counter("address+account", int(per_ip_account), self.window, max_entries)
        self._ips = _Counter("address", int(per_ip), self.window, max_entries)
        self._accounts = _Counter("account", int(per_account), self.window, max_entries)

    def counters(self) -> tuple[_Counter, ...]:
        return (self._ip_accounts, self._ips, self._accounts)

    def retune(self, other: "LoginThrottle") -> None:
        """Take ``other``'s limits (a config reload), keeping the failures counted so far.

        Starting the counts afresh would hand an attacker a clean slate each
        time the operator reloads.
        """
        self.window = other.window
        self.ipv6_prefix = other.ipv6_prefix
        for mine, theirs in zip(self.counters(), other.counters()):
            mine.limit, mine.window, mine.max_entries = theirs.limit, theirs.window, theirs.max_entries

    def _keys(self, ip: str, account: str) -> tuple[str, str, str]:
        address = ip_key(ip, self.ipv6_prefix) if ip else ""
        pair = f"{account} from {address}" if address and account else ""
        return pair, address, account

    def blocked(self, ip: str, account: str) -> float:
        """Seconds until a login from ``ip`` for ``account`` may be tried (0: now)."""
        now = self.clock.seconds()
        pair, address, account = self._keys(ip, account)
        return max(
            self._ip_accounts.remaining(pair, now),
            self._ips.remaining(address, now),
            self._accounts.remaining(account, now),
        )

    def record_failure(self, ip: str, account: str) -> None:
        now = self.clock.seconds()
        pair, address, account = self._keys(ip, account)
        self._ip_accounts.add(pair, now)
        self._ips.add(address, now)
        self._accounts.add(account, now)

    def record_success(self, ip: str, account: str) -> None:
        pair, _address, account = self._keys(ip, account)
        self._ip_accounts.clear(pair)
        self._accounts.clear(account)

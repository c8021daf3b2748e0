"""Outage bookkeeping shared by the networked connectors.

A backend that is down makes every login attempt fail; logging each attempt
would flood the log exactly when an operator needs to read it.  A
:class:`BackendHealth` logs the *first* failure of an outage (with the
reason), counts the rest silently, and logs one recovery line (with the
duration and the number of refused requests) at the first success after it.

It also builds the :class:`TemporaryAuthFailure` that the connector raises.
The exception text reaches the client (as the text of
``<temporary-auth-failure/>``), so it names the connector only, never the
host, the URI or the driver's message; those go to the server log.
"""
from __future__ import annotations

from twisted.logger import Logger

from xmppd.auth.base import TemporaryAuthFailure
from xmppd.logfilter import log_observer


class BackendHealth:
    """Up/down state of one backend, logged once per transition."""

    def __init__(self, name: str, clock=None, log: Logger | None = None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.name = name
        self.clock = clock
        self.log = log if log is not None else Logger(namespace=f"xmppd.auth.{name}", observer=log_observer)
        self.down_since: float | None = None
        self.reason: str | None = None
        self.refused = 0

    @property
    def up(self) -> bool:
        return self.down_since is None

    def failure(self, reason: str) -> TemporaryAuthFailure:
        """Record a failed request; returns the exception to raise."""
        self.refused += 1
        if self.down_since is None:
            self.down_since = self.clock.seconds()
            self.reason = reason
            self.log.error(
                "auth backend {backend} unavailable: {reason}; logins through it get "
                "temporary-auth-failure until it answers again",
                backend=self.name, reason=reason, xmppd_auth_outage="down",
            )
        return TemporaryAuthFailure(f"{self.name} authentication backend unavailable")

    def success(self) -> None:
        """Record an answered request; logs the recovery after an outage."""
        if self.down_since is None:
            return
        duration = self.clock.seconds() - self.down_since
        self.log.info(
            "auth backend {backend} recovered after {duration:.1f}s "
            "({refused} requests refused; cause was: {reason})",
            backend=self.name, duration=duration, refused=self.refused,
            reason=self.reason, xmppd_auth_outage="up",
        )
        self.down_since = None
        self.reason = None
        self.refused = 0

"""A failed store operation: one log line for the operator, one stanza error for the user.

A full disk or a read-only data directory makes every write fail the same
way, possibly thousands of times a minute.  The operator needs to know once,
clearly (which file, which operation, why), not a traceback per write; the
user whose stanza caused the write needs an error, never silence.

:func:`stanza_error` does both and is what the router's IQ-failure path, the
offline-storage path and the plugins that write outside an IQ (presence
subscription state) call on a :class:`~xmppd.storage.StoreError`.  Identical
lines (same file, operation and reason, whoever the user) are logged at most
once per :data:`LOG_INTERVAL` seconds; the next line says how many were held
back.
"""
from __future__ import annotations

import time
from typing import Callable

from twisted.logger import Logger

from xmppd.stanzas import StanzaError
from xmppd.storage import StoreError
from xmppd.logfilter import log_observer

log = Logger(observer=log_observer)

LOG_INTERVAL = 60.0
"""Seconds between two log lines for the same failure (file, operation, reason)."""

_TEXTS = {
    "resource-constraint": "the server cannot store this right now (out of space); try again later",
    "internal-server-error": "the server could not store this",
}


class FailureLog:
    """Rate-limited, traceback-free log lines for store failures."""

    def __init__(self, interval: float = LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        # (path, operation, reason) -> [time of the last line, failures held back since]
        self._seen: dict[tuple[str, str, str], list] = {}

    def report(self, err: StoreError) -> None:
        key = (err.path, err.operation, err.reason)
        now = self.clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.interval:
            seen[1] += 1
            return
        held = seen[1] if seen is not None else 0
        if len(self._seen) > 1000:  # bounded: distinct failures are few in practice
            self._seen.clear()
        self._seen[key] = [now, 0]
        log.error(
            "store failure: {operation}{user} on {path} failed: {reason}; "
            "answering {condition}{held}",
            operation=err.operation, user=f" for {err.user}" if err.user else "",
            path=err.path, reason=err.reason, condition=err.condition,
            held=f" ({held} more like this in the last {self.interval:.0f} s)" if held else "",
        )


failures = FailureLog()


def report(err: StoreError) -> None:
    """Log ``err`` (rate-limited, one line); for failures no user is waiting on."""
    failures.report(err)


def stanza_error(err: StoreError) -> StanzaError:
    """Log ``err`` once and return the error for the user whose stanza caused it."""
    failures.report(err)
    return StanzaError(err.condition, text=getattr(err, "text", None) or _TEXTS.get(err.condition))

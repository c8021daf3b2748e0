"""Stanzas waiting for a link to a remote domain, bounded in length and in time.

While a connection to a remote domain is resolved, connected and
authenticated, stanzas for it wait here.  At most ``[s2s]
queue_max_stanzas`` wait (one more is refused at once), and none waits
longer than ``[s2s] queue_timeout``: a single timer, set for the oldest
stanza, expires whatever is overdue.  The owner decides what an expired or
refused stanza gets (a bounce); this module only keeps them, each exactly
once: a stanza leaves through :meth:`take_all` or the expiry callback,
never both.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable

from twisted.words.xish import domish


class PendingQueue:
    """FIFO of ``(deadline, stanza)`` with one expiry timer."""

    def __init__(self, clock: Any, max_stanzas: int, timeout: float,
                 expired: Callable[[list[domish.Element]], None]) -> None:
        self.clock = clock
        self.max_stanzas = max_stanzas
        self.timeout = timeout
        self.expired = expired
        self._items: deque[tuple[float, domish.Element]] = deque()
        self._timer = None

    def __len__(self) -> int:
        return len(self._items)

    def add(self, stanza: domish.Element) -> bool:
        """Keep ``stanza``; False (not kept) when the queue is full."""
        if len(self._items) >= self.max_stanzas:
            return False
        self._items.append((self.clock.seconds() + self.timeout, stanza))
        if self._timer is None:
            self._timer = self.clock.callLater(self.timeout, self._expire)
        return True

    def take_all(self) -> list[domish.Element]:
        """Everything waiting, oldest first; the queue is empty after."""
        self._cancel()
        items = [stanza for _deadline, stanza in self._items]
        self._items.clear()
        return items

    def _cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _expire(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        overdue = []
        while self._items and self._items[0][0] <= now:
            overdue.append(self._items.popleft()[1])
        if self._items:
            self._timer = self.clock.callLater(max(0.0, self._items[0][0] - now), self._expire)
        if overdue:
            self.expired(overdue)

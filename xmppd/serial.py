"""Run read-modify-write steps of one key (one user's data) one after another.

With the embedded store every step finishes inside the call that starts it
(its Deferreds have fired), so steps never overlap and this adds nothing but
a dict look-up.  With a networked store (PostgreSQL) a step waits for the
database between its read and its write; a second stanza of the same user
arriving meanwhile must not read the old value and overwrite the first
step's change, so its step waits for the first to end.  Steps of different
keys still run side by side.
"""
from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer


class Serial:
    """Per-key queue of Deferred-returning steps."""

    def __init__(self) -> None:
        # key -> Deferred of the last step queued (fires when it has ended)
        self._tail: dict[Any, defer.Deferred] = {}

    def run(self, key: Any, step: Callable, *args: Any, **kwargs: Any) -> defer.Deferred:
        """``step(*args, **kwargs)`` once every earlier step of ``key`` has ended;
        a Deferred of its result."""
        tail = self._tail.get(key)
        if tail is None:
            d = defer.maybeDeferred(step, *args, **kwargs)
            if d.called:  # finished at once: nothing to queue behind
                return d
        else:
            d = defer.Deferred()
            tail.addBoth(lambda _: defer.maybeDeferred(step, *args, **kwargs).chainDeferred(d))
        ended = defer.Deferred()
        self._tail[key] = ended
        d.addBoth(self._ended, key, ended)
        return d

    def busy(self, key: Any) -> bool:
        """Whether a step of ``key`` is under way (a caller that must keep
        order behind it then goes through :meth:`run`; others need not)."""
        return key in self._tail

    def _ended(self, result: Any, key: Any, ended: defer.Deferred) -> Any:
        if self._tail.get(key) is ended:
            del self._tail[key]
        ended.callback(None)
        return result

"""Keep the start-up heap out of the cyclic garbage collector's full passes.

Start-up leaves ~50,000-200,000 container objects that live as long as the
process (modules, classes, functions, the configuration, plugin tables).
CPython's full (generation 2) collection walks every one of them; it runs
whenever enough survivors were promoted, which under steady traffic happens
at an unpredictable moment in the middle of a message, a 15-40 ms stall for
every connection.  Stanzas are the garbage that matters: a parsed
``domish.Element`` points at its parent and children, so each stanza is a
reference cycle freed by the young generations' passes, which stay cheap.

``settle()`` runs one full collection once start-up is done and moves the
survivors to the permanent generation (``gc.freeze``), so later full passes
walk only what was allocated since.  A reload replaces objects that may be
part of frozen cycles: ``unsettle()`` before it and ``settle()`` after let
the collector free them instead of keeping them for the life of the process.
"""
from __future__ import annotations

import gc
from time import perf_counter

from twisted.logger import Logger

from xmppd.logfilter import log_observer

log = Logger(observer=log_observer)

#: A full collection longer than this is logged (it stalled every connection).
SLOW_FULL_COLLECTION = 0.010


def settle() -> int:
    """Collect, then freeze what survived; returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def unsettle() -> None:
    """Give the frozen objects back to the collector (before a reload)."""
    gc.unfreeze()


class FullCollectionWatch:
    """Logs each full collection that stalled the reactor for long (info level).

    Called by the interpreter at the start and end of every collection
    (one per ~100 stanzas): two comparisons unless a full one ends slow.
    """

    def __init__(self, threshold: float = SLOW_FULL_COLLECTION) -> None:
        self.threshold = threshold
        self.started = 0.0
        self.slow = 0

    def __call__(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self.started = perf_counter()
            return
        took = perf_counter() - self.started
        if took >= self.threshold:
            self.slow += 1
            log.info("gc: a full collection held every connection for {ms:.0f} ms "
                     "({collected} objects freed, {frozen} frozen)", ms=took * 1000,
                     collected=info["collected"], frozen=gc.get_freeze_count())

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)


watch = FullCollectionWatch()

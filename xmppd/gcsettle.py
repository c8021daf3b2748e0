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


def settle() -> int:
    """Collect, then freeze what survived; returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def unsettle() -> None:
    """Give the frozen objects back to the collector (before a reload)."""
    gc.unfreeze()

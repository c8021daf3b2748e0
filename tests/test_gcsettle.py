"""xmppd.gcsettle: the start-up heap leaves the full collections; reloads give it back."""
from __future__ import annotations

import gc
import weakref

import pytest

from xmppd import gcsettle


class Node:
    """A reference cycle, as a parsed stanza is (parent <-> child)."""

    def __init__(self) -> None:
        self.other = self


@pytest.fixture(autouse=True)
def unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_settle_frees_garbage_then_freezes_the_rest():
    garbage = Node()
    dead = weakref.ref(garbage)
    del garbage
    kept = Node()
    frozen = gcsettle.settle()
    assert dead() is None  # collected first, not frozen for the life of the process
    assert frozen > 1000  # modules, classes, functions: the start-up heap
    assert gc.get_freeze_count() == frozen
    # A full collection no longer walks them: only what was tracked since.
    assert len(gc.get_objects()) < frozen / 10
    assert kept.other is kept


def test_unsettle_lets_frozen_cycles_be_collected():
    old = Node()
    gcsettle.settle()
    dead = weakref.ref(old)
    del old  # e.g. a configuration a reload replaced
    gc.collect()
    assert dead() is not None  # frozen: a full pass never sees it
    gcsettle.unsettle()
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert dead() is None


def test_reload_unfreezes_and_freezes_again(monkeypatch):
    from xmppd import tap

    calls = []

    class FakeServer:
        def reload(self):
            calls.append(gc.get_freeze_count())
            return "outcome"

    svc = tap.ServerService.__new__(tap.ServerService)
    svc.server = FakeServer()
    svc.notifier = type("N", (), {"reloading": lambda self: None, "ready": lambda self, *a: None})()
    gcsettle.settle()
    old = Node()
    gc.freeze()
    dead = weakref.ref(old)
    del old
    assert svc.reload("test") == "outcome"
    assert calls == [0]  # the reload ran with nothing frozen
    assert dead() is None  # garbage from before the reload was collected
    assert gc.get_freeze_count() > 1000  # and the heap is frozen again


def test_slow_full_collections_are_logged_once_each():
    from twisted.logger import globalLogPublisher

    seen = []
    globalLogPublisher.addObserver(seen.append)
    watch = gcsettle.FullCollectionWatch(threshold=0.0)
    watch.install()
    watch.install()  # once only
    try:
        gc.collect(0)  # a young pass: not reported
        assert watch.slow == 0
        gc.collect()
    finally:
        watch.remove()
        globalLogPublisher.removeObserver(seen.append)
    assert watch.slow == 1
    lines = [e for e in seen if "full collection" in e.get("log_format", "")]
    assert len(lines) == 1 and lines[0]["ms"] >= 0
    gc.collect()
    assert watch.slow == 1  # removed: no longer called

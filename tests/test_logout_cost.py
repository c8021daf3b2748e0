"""Issue 20: a logout reads nothing from the store.

The unavailable presence broadcast at logout needs the user's roster; it
must come from memory (pinned while the user is online), not from a store
read after the roster plugin has dropped it (one query per logout, a
network round trip on PostgreSQL).  In-process, on the router and the
roster and presence plugins.
"""
from __future__ import annotations

from twisted.words.xish import domish

from tests.test_caps import FakeServer, FakeSession


def test_logout_broadcasts_unavailable_from_the_roster_in_memory():
    server = FakeServer()
    roster = server.plugin("roster")
    server.store.put("roster", "u@a.test", "c@a.test", {"subscription": "both"})
    session = FakeSession("u@a.test/r")
    contact = FakeSession("c@a.test/x")
    server.router.bind(contact)
    server.router.bind(session)
    server.plugin("presence")._broadcast(domish.Element((None, "presence")), session, None)
    assert session.state["sent_presence"] and contact.sent  # initial presence reached c
    contact.sent.clear()

    reads = []
    store = roster.rosters.store
    for name in ("items", "get"):
        real = getattr(store, name)
        setattr(store, name, lambda *a, _real=real, _name=name: reads.append((_name, a)) or _real(*a))
    server.router.unbind(session)

    assert reads == []
    sent = [el if isinstance(el, bytes) else el.toXml().encode() for el in contact.sent]
    assert len(sent) == 1 and b"type='unavailable'" in sent[0] and b"from='u@a.test/r'" in sent[0], sent
    assert roster.rosters.cached_items("u@a.test") is None  # dropped after the broadcast

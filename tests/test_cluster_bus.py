"""Two cluster nodes in one process: the bus's hot paths and the blocking filter (issue 18).

Nodes A and B are real servers (plugins, router, xmppd.cluster) whose Redis
connections talk to the fake Redis of bench/cluster_cost.py (PUBLISH and
SUBSCRIBE as Redis answers them), so every step is deterministic: a bus
hop happens exactly when ``redis.pump()`` runs.  The daemon-level
behaviour over real Redis is tests/test_cluster.py's.
"""
from __future__ import annotations

from twisted.internet import defer
from twisted.internet.testing import StringTransport

from bench.cluster_cost import two_nodes
from bench.metrics_cost import session as bound_session
from xmppd import c2s
from xmppd.cluster.resp import Commands, publish_head
from xmppd.storage import MemoryStore


class Capture(StringTransport):
    """What a client was sent."""

    def text(self) -> str:
        return self.value().decode()


def login(server, user, resource="r"):
    s = bound_session(c2s.C2SFactory(server), user, resource=resource)
    s.transport = Capture()
    return s


def message(sender, to: str, body: str) -> None:
    sender.dataReceived(f"<message to='{to}' type='chat' id='{body}'><body>{body}</body>"
                        f"</message>".encode())


def block(session, jid: str) -> None:
    session.dataReceived(f"<iq type='set' id='bl'><block xmlns='urn:xmpp:blocking'>"
                         f"<item jid='{jid}'/></block></iq>".encode())


class GatedReads:
    """A store whose blocklist reads answer only when ``release`` is called:
    a networked store's read, in flight for as long as a test wants."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.held: list[tuple[defer.Deferred, defer.Deferred]] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def items(self, store, user):
        later: defer.Deferred = defer.Deferred()
        self.held.append((self.inner.items(store, user), later))
        return later

    def release(self) -> None:
        held, self.held = self.held, []
        for read, later in held:
            read.addCallbacks(later.callback, later.errback)


def test_remote_session_users_blocklist_is_held_in_memory_and_dropped_with_it():
    store = MemoryStore()
    redis, a, b = two_nodes(store)
    alice = login(a, "alice")
    bob = login(b, "bob")
    redis.pump()
    blocking = a.plugin("urn:xmpp:blocking")
    lists = blocking.lists
    reads = []
    items = blocking.store.items
    blocking.store.items = lambda kind, user: reads.append(user) or items(kind, user)
    message(alice, "bob@localhost", "hello")
    message(alice, "bob@localhost", "again")
    redis.pump()
    assert "hello" in bob.transport.text() and "again" in bob.transport.text()
    # bob has no session on A: his list, read once, is held as for a local
    # user, so the filter reads a set (no offline-cache load) for each message.
    assert reads == ["bob@localhost"] and "bob@localhost" in lists
    b.router.unbind(bob)
    redis.pump()
    assert "bob@localhost" not in lists and "bob@localhost" not in a.router.sessions


def test_block_made_on_another_node_stops_the_next_message_at_once():
    """bob, on B only, blocks alice; the next message alice sends from A is
    refused, with no wait beyond the bus hop of the invalidation."""
    redis, a, b = two_nodes(MemoryStore())
    alice = login(a, "alice")
    bob = login(b, "bob")
    redis.pump()
    message(alice, "bob@localhost", "before")
    redis.pump()
    assert "before" in bob.transport.text()
    block(bob, "alice@localhost")
    redis.pump()  # B's invalidation reaches A
    alice.transport.clear(), bob.transport.clear()
    message(alice, "bob@localhost", "after")
    redis.pump()
    assert "service-unavailable" in alice.transport.text()
    assert "after" not in bob.transport.text()


def test_invalidation_drops_a_local_users_list_until_read_again():
    """dave has sessions on A and on B and blocks carol from B.  On A, his list
    (held for his local session) is dropped when the invalidation arrives:
    a message carol sends while the new list is still being read waits for
    it and is refused, instead of passing on the old list."""
    store = MemoryStore()
    redis, a, b = two_nodes(store)
    carol = login(a, "carol")
    dave_a = login(a, "dave", "da")
    dave_b = login(b, "dave", "db")
    redis.pump()
    blocking = a.plugin("urn:xmpp:blocking")
    assert "dave@localhost" in blocking.lists
    gate = GatedReads(blocking.store)
    blocking.store = gate
    block(dave_b, "carol@localhost")
    redis.pump()
    message(carol, "dave@localhost/da", "racing")
    assert gate.held  # A reads dave's list again, the message waits for it
    assert "racing" not in dave_a.transport.text()
    gate.release()
    redis.pump()
    assert "racing" not in dave_a.transport.text()
    assert "service-unavailable" in carol.transport.text()
    assert "dave@localhost" in blocking.lists  # held again once read


def test_stanza_reaches_the_session_now_in_the_slot_not_a_cached_one():
    """The receiving node caches recipients' decoded names, never sessions: a
    session replaced in the router without hooks (XEP-0198 resumption does
    that) gets the next stanza."""
    redis, a, b = two_nodes(MemoryStore())
    alice = login(a, "alice")
    bob = login(b, "bob")
    redis.pump()
    message(alice, "bob@localhost/r", "one")
    redis.pump()
    assert "one" in bob.transport.text()
    resumed = login(b, "bob", "other")
    b.router.sessions["bob@localhost"]["r"] = resumed
    message(alice, "bob@localhost/r", "two")
    redis.pump()
    assert "two" in resumed.transport.text() and "two" not in bob.transport.text()


def test_stanza_for_a_session_that_left_goes_offline_path():
    """A stanza for a session the sender still believed in (the bus event of
    its end not yet seen) is not lost: B finds no session and takes the
    offline path (the message is stored for bob)."""
    store = MemoryStore()
    store.put("accounts", "bob@localhost", "password", {"x": 1})
    redis, a, b = two_nodes(store)
    alice = login(a, "alice")
    bob = login(b, "bob")
    redis.pump()
    message(alice, "bob@localhost/r", "warm")  # B now has bob's name cached
    redis.pump()
    del b.router.sessions["bob@localhost"]  # gone on B, A not told yet
    stored = []
    b.router.offline_handler = lambda stanza, to: stored.append((str(stanza.body), to.full)) or True
    b.router.user_exists = lambda to: defer.succeed(True)
    message(alice, "bob@localhost/r", "late")
    redis.pump()
    assert stored == [("late", "bob@localhost")]
    assert "late" not in bob.transport.text()


def _commands():
    from twisted.internet.task import Clock

    clock = Clock()
    cmd = Commands(0, None, 1000, clock)
    cmd.makeConnection(StringTransport())
    clock.advance(0)
    cmd.dataReceived(b"+OK\r\n")  # SELECT
    cmd.transport.clear()
    return clock, cmd


def test_publish_reports_misses_only_and_takes_replies_of_one_in_bulk():
    clock, cmd = _commands()
    head = publish_head(b"ch")
    missed = []

    def miss(reply, context, data):
        missed.append((reply, context, data))

    other = []
    for i in range(3):
        cmd.publish(head, b"s", b"m%d" % i, miss, i)
    cmd.send(b"*1\r\n$4\r\nPING\r\n", other.append)
    cmd.publish(head, b"s", b"m3", miss, 3)
    clock.advance(0)
    assert cmd.transport.value() == (
        b"".join(b"*3\r\n$7\r\nPUBLISH\r\n$2\r\nch\r\n$3\r\nsm%d\r\n" % i for i in range(3))
        + b"*1\r\n$4\r\nPING\r\n" + b"*3\r\n$7\r\nPUBLISH\r\n$2\r\nch\r\n$3\r\nsm3\r\n")
    cmd.dataReceived(b":1\r\n:1\r\n:1\r\n:1\r\n")  # the bulk path: the PING's callback too
    assert missed == [] and other == [1]
    cmd.dataReceived(b":0\r\n")  # nobody subscribed
    assert missed == [(0, 3, b"m3")]
    cmd.publish(head, b"s", b"m4", miss, 4)
    cmd.publish(head, b"s", b"m5", miss, 5)
    cmd.dataReceived(b"-ERR no\r\n")
    assert str(missed[1][0]) == "ERR no" and missed[1][1:] == (4, b"m4")
    cmd.connectionLost(None)
    assert isinstance(missed[2][0], ConnectionError) and missed[2][1] == 5
    cmd.publish(head, b"s", b"m6", miss, 6)  # after the loss: at once
    assert isinstance(missed[3][0], ConnectionError) and missed[3][1] == 6


def test_bulk_replies_to_no_command_close_the_connection():
    clock, cmd = _commands()
    cmd.publish(publish_head(b"ch"), b"s", b"x", lambda *a: None, None)
    cmd.dataReceived(b":1\r\n:1\r\n")
    assert cmd.transport.disconnecting

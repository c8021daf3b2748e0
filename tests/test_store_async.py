"""Issue 18 follow-up: nothing in the running server waits for the store on the reactor.

* No server module has a synchronous path to the store (the offline tools
  keep theirs): a scan of the source.
* The PostgreSQL reactor guard (tests only, :data:`xmppd.storage_pg.GUARD_ENV`)
  refuses a statement on the reactor thread; every PostgreSQL daemon of the
  tests runs with it and :meth:`tests.daemon.Daemon.stop` fails the test if
  the log shows one.
* A representative subset of the PEP (with bookmarks, the avatar
  conversion and private XML), MAM preferences, domain filter and ad-hoc
  daemon tests, run
  again against one shared PostgreSQL server: the test functions are the
  same; the module fixtures below give them a PostgreSQL daemon.
"""
from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
from twisted.internet import reactor

from xmppd import storage_pg
from xmppd.storage import FiredStore, IAsyncKeyValueStore, MemoryStore, StoreError
from zope.interface import implementer

# The daemon tests, collected here against the fixtures of this module.
from tests.test_pep import (  # noqa: F401
    pep_daemon,
    test_disco_account_identity_features_and_items,
    test_notifications_to_contacts_with_notify_and_last_item_on_login,
    test_blocked_contact_gets_nothing_at_once,
    test_access_models_and_changes_at_once,
    test_publish_options_preconditions,
    test_items_retract_purge_delete_and_quotas,
    test_private_xml_and_bookmarks_compat_raw,
    test_omemo_devicelist_and_bundle_exchange,
)
from tests.test_pep_compat import (  # noqa: F401
    compat_daemon,
    test_bookmarks_compat_pep_raw,
    test_avatar_vcard_conversion_raw,
)
from tests.test_domainfilter import (  # noqa: F401
    filter_daemon,
    test_policy_enforced_both_ways_on_a_live_session,
    test_multi_stage_command_prefills_and_applies_immediately_and_offline,
    test_xmppctl_filter_sets_shows_and_reaches_live_sessions,
)
from tests.test_mam import (  # noqa: F401
    mam_daemon,
    test_preferences_always_never_roster_and_jid_preparation,
)
from tests.test_adhoc import (  # noqa: F401
    adhoc_daemon,
    test_disco_lists_exactly_the_permitted_commands,
    test_denied_commands_are_forbidden_and_logged,
    test_add_change_password_and_delete_user,
    test_online_users_counts_and_list,
    test_end_user_session_and_announce,
)

REPO = Path(__file__).resolve().parent.parent
# Offline tools (and the stores themselves): synchronous on purpose.
OFFLINE = {"ctl.py", "migrate.py", "storemigrate.py", "storeconfig.py", "storage.py",
           "storage_pg.py", "msglog_pg.py"}
SYNC_PATH = re.compile(
    r"store\.blocking\b|\.blocking\.(get|put|put_many|batch|delete|delete_many|items|users|"
    r"delete_user)\(|\b(item_now|get_now)\(|store\.sync\.(get|put|put_many|batch|delete|"
    r"delete_many|items|users|delete_user)\(|\bPostgresStore\("
)


@pytest.fixture(scope="module")
def pd(tmp_path_factory):
    yield from pep_daemon(tmp_path_factory.mktemp("pep-pg"), store="postgresql")


@pytest.fixture(scope="module")
def cd(tmp_path_factory):
    yield from compat_daemon(tmp_path_factory.mktemp("pepcompat-pg"), store="postgresql")


@pytest.fixture(scope="module")
def fd(tmp_path_factory):
    yield from filter_daemon(tmp_path_factory.mktemp("dfilter-pg"), store="postgresql")


@pytest.fixture(scope="module")
def md(tmp_path_factory):
    yield from mam_daemon(tmp_path_factory.mktemp("mam-pg"), store="postgresql")


@pytest.fixture(scope="module")
def ad(tmp_path_factory):
    yield from adhoc_daemon(tmp_path_factory.mktemp("adhoc-pg"), store="postgresql")


def test_no_server_module_has_a_synchronous_store_path():
    found = []
    for path in sorted((REPO / "xmppd").rglob("*.py")):
        if path.parent == REPO / "xmppd" and path.name in OFFLINE:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if SYNC_PATH.search(line):
                found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "synchronous store calls in the server:\n" + "\n".join(found)
    # The server's face of an embedded store offers none either.
    assert not hasattr(FiredStore(MemoryStore()), "blocking")


def test_reactor_guard_refuses_a_statement_on_the_reactor_thread(monkeypatch):
    monkeypatch.setattr(storage_pg, "_GUARD", True)
    monkeypatch.setattr(reactor, "running", True, raising=False)
    conn = storage_pg.Connection("postgresql://nobody@127.0.0.1:1/none", 1, 1000)
    with pytest.raises(StoreError) as caught:
        conn.run("read roster", "alice@localhost", lambda c: None)
    assert caught.value.reason == storage_pg.GUARD_TEXT
    # On a pool thread the statement goes on (here: to a port nobody listens on).
    errors = []

    def worker():
        try:
            conn.run("read roster", "alice@localhost", lambda c: None)
        except StoreError as e:
            errors.append(e)

    t = threading.Thread(target=worker)
    t.start()
    t.join(10)
    assert errors and errors[0].reason != storage_pg.GUARD_TEXT


# -- a networked store's timing, deterministically -------------------------------------


@implementer(IAsyncKeyValueStore)
class ManualStore:
    """The asynchronous face over a MemoryStore whose calls run only when
    :meth:`run` is called (a networked store's latency, under the test's control)."""

    def __init__(self) -> None:
        self.sync = MemoryStore()
        self.pending: list = []

    def __getattr__(self, name: str):
        method = getattr(self.sync, name)

        def call(*args, **kwargs):
            from twisted.internet import defer

            d = defer.Deferred()
            self.pending.append((method, args, kwargs, d))
            return d

        return call

    def run(self) -> int:
        """Run every call queued so far (and those their results queue); how many."""
        from twisted.internet import defer

        n = 0
        while self.pending:
            method, args, kwargs, d = self.pending.pop(0)
            n += 1
            try:
                result = method(*args, **kwargs)
            except Exception:
                d.errback()
            else:
                d.callback(result)
        return n


def outcome(d):
    """What ``d`` has fired with so far (None if nothing), left in place."""
    box = []

    def seen(result):
        box.append(result)
        return result

    d.addBoth(seen)
    return box[0] if box else None


def test_pep_quota_is_checked_against_stored_state_in_the_owner_queue():
    from twisted.python.failure import Failure

    from xmppd.pepstore import PepStore, QuotaExceeded, Quotas, default_config

    store = ManualStore()
    pep = PepStore(store, Quotas(user_items=1, user_nodes=5))
    pep.load_owners()
    store.run()
    config = default_config(pep.quotas)
    owner = "alice@localhost"

    def create_and_publish(name: str):
        d = pep.create(owner, name, config)
        return d.addCallback(lambda node: pep.publish(owner, node, "1", "<x xmlns='t'/>"))

    # Two requests of one owner while the store has not answered yet: the
    # second one runs after the first is stored, and finds the quota used.
    first = pep.serial.run(owner, create_and_publish, "n1")
    second = pep.serial.run(owner, create_and_publish, "n2")
    assert outcome(first) is None and outcome(second) is None  # both waiting
    store.run()
    assert outcome(first) == []
    failure = outcome(second)
    assert isinstance(failure, Failure) and failure.check(QuotaExceeded)
    second.addErrback(lambda f: None)
    assert [k for k, _ in store.sync.items("pep_items", owner)] == ["n1\x1f1"]
    # Memory changed only with what was stored.
    assert outcome(pep.nodes(owner))["n1"].ids() == ["1"]
    assert outcome(pep.nodes(owner))["n2"].ids() == []


def test_domain_filter_waits_for_a_cold_policy_on_a_slow_store():
    from tests.test_domainfilter import FakeServer, J, verdict
    from xmppd import filtering
    from xmppd.handlers.domainfilter import DomainFilterPlugin
    from xmppd.stanzas import StanzaError

    server = FakeServer()
    server.store = ManualStore()
    plugin = DomainFilterPlugin()
    plugin.attach(server)
    server.plugins.append(plugin)
    server.store.run()  # the change poll's start-up read
    server.store.sync.put(filtering.STORE, "a1@a.test", filtering.KEY,
                          filtering.Policy("OWN").to_json())
    # No policy in memory: the filter hands the router a Deferred, never a verdict
    # from the default.
    waiting = verdict(plugin, "x@remote.example/r", "a1@a.test")
    again = verdict(plugin, "y@remote.example/r", "a1@a.test")
    assert not isinstance(waiting, StanzaError) and waiting is not None
    assert outcome(waiting) is None and outcome(again) is None
    assert not waiting.called and not again.called
    assert server.store.run() == 1  # one read for both
    assert waiting.called and again.called
    # Once read, the chain run again refuses with the stored policy, from memory.
    refused = verdict(plugin, "x@remote.example/r", "a1@a.test")
    assert isinstance(refused, StanzaError) and refused.condition == "service-unavailable"
    assert server.store.pending == []

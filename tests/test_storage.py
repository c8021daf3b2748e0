"""The key-value store: one shared suite for every implementation, plus crash safety."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.backends import pg_store_conf, pg_truncate, postgres  # noqa: F401 (fixtures)
from xmppd.storage import MemoryStore, SQLiteStore, StoreError


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "postgresql":
        from xmppd.storage_pg import PostgresStore

        conf = request.getfixturevalue("pg_store_conf")
        pg_truncate(conf)
        s = PostgresStore(conf)
    else:
        s = MemoryStore() if request.param == "memory" else SQLiteStore(str(tmp_path))
    yield s
    s.close()


def test_put_get_delete(store):
    assert store.get("roster", "a@b", "c@d") is None
    assert store.get("roster", "a@b", "c@d", 7) == 7
    store.put("roster", "a@b", "c@d", {"subscription": "both", "groups": ["x"]})
    assert store.get("roster", "a@b", "c@d") == {"subscription": "both", "groups": ["x"]}
    store.delete("roster", "a@b", "c@d")
    assert store.get("roster", "a@b", "c@d") is None
    store.delete("roster", "a@b", "never-there")


def test_partitions_are_separate(store):
    store.put("roster", "a@b", "k", 1)
    store.put("roster", "x@b", "k", 2)
    store.put("blocklist", "a@b", "k", 3)
    assert store.items("roster", "a@b") == [("k", 1)]
    assert store.users("roster") == ["a@b", "x@b"]
    store.delete_user(None, "a@b")
    assert store.items("blocklist", "a@b") == [] and store.get("roster", "x@b", "k") == 2


def test_put_many_and_order(store):
    store.put_many("s", "u", {"b": 2, "a": 1, "c": [1, "x"]})
    assert store.items("s", "u") == [("a", 1), ("b", 2), ("c", [1, "x"])]
    store.delete_many("s", "u", ["a", "c"])
    assert store.items("s", "u") == [("b", 2)]


def test_values_are_json_not_objects(store):
    with pytest.raises(TypeError):
        store.put("s", "u", "k", object())


def test_batch_is_one_transaction(store):
    store.put("roster", "a@b", "old", 1)
    store.batch(puts=[("roster", "a@b", "c@d", {"s": "to"}), ("settings", "a@b", "ver", 2)],
                deletes=[("roster", "a@b", "old")])
    assert store.items("roster", "a@b") == [("c@d", {"s": "to"})]
    assert store.get("settings", "a@b", "ver") == 2
    with pytest.raises(TypeError):  # one bad value: nothing of the batch is stored
        store.batch(puts=[("roster", "a@b", "x", 1), ("roster", "a@b", "y", object())])
    assert store.get("roster", "a@b", "x") is None


def test_keys_in_byte_order_and_unicode(store):
    keys = ["b", "B", "a", "\u00e9t\u00e9@x", "Z", "000000000010", "000000000002"]
    store.put_many("s", "\u00fcser@b", {k: k for k in keys})
    assert [k for k, _ in store.items("s", "\u00fcser@b")] == sorted(keys)  # code point order
    assert store.users("s") == ["\u00fcser@b"]


def test_sqlite_uses_wal_and_survives_reopen(tmp_path):
    s = SQLiteStore(str(tmp_path))
    s.put("accounts", "a@b", "scram", {"x": 1})
    assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s.close()
    assert SQLiteStore(str(tmp_path)).get("accounts", "a@b", "scram") == {"x": 1}


def test_unwritable_data_dir_names_the_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    with pytest.raises(StoreError) as e:
        SQLiteStore(str(blocker / "sub"))
    assert "xmppd.sqlite3" in str(e.value)


WRITER = """
import sys
from xmppd.storage import SQLiteStore
s = SQLiteStore(sys.argv[1])
print("ready", flush=True)
i = 0
while True:
    i += 1
    # Overwrite the same 500 keys again and again, as roster updates do.
    s.put_many("crash", "u", {f"k{n}": {"round": i, "n": n} for n in range(500)})
    s.put("crash", "u", "last", i)
"""


def test_kill_9_mid_write_loses_nothing_committed(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)],
                            stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    s = SQLiteStore(str(tmp_path))
    assert s._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    last = s.get("crash", "u", "last")
    assert last and last > 1
    rounds = {v["round"] for _, v in s.items("crash", "u") if isinstance(v, dict)}
    # Every put_many is atomic: all 500 keys are from one round, the last
    # committed one or the one after it (committed just before the kill).
    assert len(rounds) == 1 and rounds.pop() in (last, last + 1)
    assert len(s.items("crash", "u")) == 501

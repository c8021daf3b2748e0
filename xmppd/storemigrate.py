"""``xmppctl migrate-store``: copy the embedded SQLite store into PostgreSQL.

What is copied: every key-value row (accounts, rosters, blocklists, PEP,
offline messages... as stored, the JSON text unchanged) and the message
archive of every account, read through :class:`~xmppd.msglog.IMessageLog`
(so the copy does not depend on the SQLite archive's internals).

One transaction for the key-value rows and one per archive page: a copy
that fails half-way leaves the key-value rows whole or absent, and is run
again with ``--force``.  A target that holds anything is refused unless
``--force`` (which empties it first): two servers' data must never merge
by accident.  The server must be stopped (its state in memory would be
lost to the copy, and it writes while running).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from xmppd.auth.internal import STORE as ACCOUNTS
from xmppd.msglog import LogQuery
from xmppd.storage import SQLiteStore

PAGE = 1000


class MigrateStoreError(Exception):
    """Refused before anything was written (or the target was left as it was)."""


@dataclass
class Counts:
    kv_rows: int = 0
    archive_rows: int = 0
    archives: int = 0


def target_rows(target) -> tuple[int, int]:
    return target.run("count rows", lambda c: c.execute(
        "SELECT (SELECT count(*) FROM kv), (SELECT count(*) FROM archive)").fetchone())


def migrate(data_dir: str, target, target_log, force: bool = False) -> Counts:
    """Copy ``data_dir``'s store (and archive, if any) into ``target`` (PostgresStore)."""
    source = SQLiteStore(data_dir, read_only=True)
    try:
        kv, archive = target_rows(target)
        if (kv or archive) and not force:
            raise MigrateStoreError(
                f"{target.path} is not empty ({kv} key-value rows, {archive} archive rows): "
                "use --force to replace its contents")
        counts = Counts()
        rows = source._db.execute("SELECT store, user, key, value FROM kv").fetchall()

        def copy_kv(conn):
            if force:
                conn.execute("TRUNCATE kv, archive")
            with conn.cursor() as cur:
                for i in range(0, len(rows), PAGE):
                    cur.executemany("INSERT INTO kv (store, username, key, value)"
                                    " VALUES (%s, %s, %s, %s)", rows[i:i + PAGE])

        target.run("copy key-value rows", copy_kv)
        counts.kv_rows = len(rows)
        counts.archive_rows, counts.archives = _copy_archive(data_dir, source, target_log)
        return counts
    finally:
        source.close()


def _copy_archive(data_dir: str, source: SQLiteStore, target_log) -> tuple[int, int]:
    from xmppd.msglog import SQLiteMessageLog

    if not os.path.isfile(os.path.join(data_dir, SQLiteMessageLog.FILENAME)):
        return 0, 0
    log = SQLiteMessageLog(data_dir, create=False)
    copied = archives = 0
    try:
        for user in source.users(ACCOUNTS):
            after = None
            found = False
            while True:
                page = log.query(LogQuery(user, lo=after, limit=PAGE))
                if not page:
                    break
                target_log.append([tuple(r) for r in page])
                copied += len(page)
                after = page[-1].seq
                found = True
            archives += found
    finally:
        log.close()
    return copied, archives

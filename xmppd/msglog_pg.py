"""The message archive (:class:`xmppd.msglog.IMessageLog`) on PostgreSQL.

Table ``archive`` (made by ``xmppctl create-schema``, xmppd.storage_pg):
one row per archived message, keyed by ``(username, seq)``; ``with_bare``
is stored beside ``with_full`` so that the with= filter is an index range
(``archive_with``), and ``archive_seq`` serves expiry, oldest first.

Synchronous, like the interface it implements: ``xmppctl migrate-store`` and
the shared test suite use it; the server's archive stays on its own
``[mam] storage`` for now (docs/design.rst, "Storage").
"""
from __future__ import annotations

from typing import Any

from zope.interface import implementer

from xmppd.msglog import IMessageLog, LogQuery, Row
from xmppd.storage_pg import Connection

_COLUMNS = "seq, username, with_full, id, dir, stanza"


def _where(q: LogQuery) -> tuple[str, list]:
    sql, args = ["username = %s"], [q.user]
    if q.with_jid is not None:
        sql.append("with_full = %s" if q.with_full else "with_bare = %s")
        args.append(q.with_jid)
    if q.lo is not None:
        sql.append("seq > %s")
        args.append(q.lo)
    if q.hi is not None:
        sql.append("seq < %s")
        args.append(q.hi)
    return " AND ".join(sql), args


def _row(r) -> Row:
    return Row(r[0], r[1], r[2], r[3], r[4], bytes(r[5]))


@implementer(IMessageLog)
class PostgresMessageLog:
    def __init__(self, conf: Any) -> None:
        self._conn = Connection(conf.dsn, conf.connect_timeout, conf.statement_timeout)
        self.path = self._conn.path

    def _run(self, operation: str, user: str, work):
        return self._conn.run(operation, user, work)

    def last_seq(self) -> int:
        return self._run("read archive", "", lambda c: c.execute(
            "SELECT coalesce(max(seq), 0) FROM archive").fetchone()[0])

    def append(self, rows: list, max_per_user: int = 0) -> dict:
        data = [(r[1], r[0], r[2], r[2].split("/", 1)[0], r[3], r[4], bytes(r[5])) for r in rows]
        users = sorted({r[1] for r in rows})

        def work(conn):
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO archive (username, seq, with_full, with_bare, id, dir, stanza)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s)", data)
            dropped = {}
            if max_per_user > 0:
                for user in users:
                    n = conn.execute(
                        "DELETE FROM archive WHERE username = %s AND seq <= (SELECT seq FROM"
                        " archive WHERE username = %s ORDER BY seq DESC OFFSET %s LIMIT 1)",
                        (user, user, max_per_user)).rowcount
                    if n > 0:
                        dropped[user] = n
            return dropped

        return self._run("append archive", ", ".join(users), work)

    def query(self, q: LogQuery) -> list:
        where, args = _where(q)
        order = "DESC" if q.reverse else "ASC"
        return self._run("read archive", q.user, lambda c: [_row(r) for r in c.execute(
            f"SELECT {_COLUMNS} FROM archive WHERE {where} ORDER BY seq {order} LIMIT %s",
            args + [q.limit]).fetchall()])

    def count(self, q: LogQuery, cap: int) -> int | None:
        where, args = _where(q)
        n = self._run("count archive", q.user, lambda c: c.execute(
            f"SELECT count(*) FROM (SELECT 1 FROM archive WHERE {where} LIMIT %s) t",
            args + [cap + 1]).fetchone()[0])
        return None if n > cap else n

    def get(self, user: str, seqs: list) -> list:
        if not seqs:
            return []
        return self._run("read archive", user, lambda c: [_row(r) for r in c.execute(
            f"SELECT {_COLUMNS} FROM archive WHERE username = %s AND seq = ANY(%s) ORDER BY seq",
            (user, sorted(set(seqs)))).fetchall()])

    def delete_user(self, user: str, before: int | None = None, limit: int | None = None) -> int:
        sql, args = "username = %s", [user]
        if before is not None:
            sql += " AND seq < %s"
            args.append(before)
        tail = "" if limit is None else " ORDER BY seq LIMIT %s"
        if limit is not None:
            args.append(limit)
        return self._run("delete archive", user, lambda c: c.execute(
            f"DELETE FROM archive WHERE (username, seq) IN"
            f" (SELECT username, seq FROM archive WHERE {sql}{tail})", args).rowcount)

    def expire(self, before: int, limit: int) -> int:
        return self._run("expire archive", "", lambda c: c.execute(
            "DELETE FROM archive WHERE (username, seq) IN (SELECT username, seq FROM archive"
            " WHERE seq < %s ORDER BY seq LIMIT %s)", (before, limit)).rowcount)

    def checkpoint(self) -> None:
        pass  # every commit is durable (the server's synchronous_commit decides)

    def close(self) -> None:
        self._conn.close()

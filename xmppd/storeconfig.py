"""``[storage]``: which backend holds accounts, rosters and the rest, read once.

``backend = "sqlite"`` (the default) is the embedded store in the data
directory; ``"postgresql"`` is a shared database (xmppd.storage_pg), the
store several nodes of one service use.  The DSN may carry the password; a
``dsn_file`` keeps it out of the config (a file readable by the server only).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from xmppd.config import Config, ConfigError

BACKENDS = ("sqlite", "postgresql")


@dataclass(frozen=True)
class StorageConfig:
    backend: str = "sqlite"
    dsn: str = ""
    pool_size: int = 4
    connect_timeout: float = 5.0
    statement_timeout: float = 10.0
    #: The embedded store's directory (``[storage] dir``), "" = ``data_dir``.
    dir: str = ""


def settings(config: Config) -> StorageConfig:
    """The validated ``[storage]`` table (errors name file and key)."""
    sec = config.section("storage")
    backend = sec.choice("backend", BACKENDS, "sqlite")
    dsn = sec.str("dsn", "")
    dsn_file = sec.str("dsn_file", "")
    directory = sec.str("dir", "")
    if directory and not os.path.isabs(directory) and config.path and os.path.exists(config.path):
        directory = os.path.join(os.path.dirname(os.path.abspath(config.path)), directory)
    result = StorageConfig(
        backend=backend,
        pool_size=sec.int("pool_size", 4, minimum=1),
        connect_timeout=sec.number("connect_timeout", 5.0, minimum=0.1),
        statement_timeout=sec.number("statement_timeout", 10.0, minimum=0.1),
        dir=directory,
    )
    sec.reject_unknown()
    if backend == "postgresql":
        if bool(dsn) == bool(dsn_file):
            raise sec.error("dsn", dsn or dsn_file, "exactly one of dsn and dsn_file "
                            "when backend is \"postgresql\"")
        if dsn_file:
            if not os.path.isabs(dsn_file):
                dsn_file = os.path.join(os.path.dirname(os.path.abspath(config.path)), dsn_file)
            try:
                with open(dsn_file, encoding="utf-8") as f:
                    dsn = f.read().strip()
            except OSError as e:
                raise ConfigError(config.path, sec.key("dsn_file"), dsn_file,
                                  f"a readable file ({e.strerror})") from None
        result = StorageConfig(backend, dsn, result.pool_size, result.connect_timeout,
                               result.statement_timeout, directory)
    return result


def open_store(config: Config, reactor: Any = None) -> Any:
    """The store the running server uses (asynchronous face for PostgreSQL)."""
    conf = settings(config)
    if conf.backend == "postgresql":
        from xmppd.storage_pg import AsyncPostgresStore

        if reactor is None:
            from twisted.internet import reactor
        return AsyncPostgresStore(conf, reactor)
    from xmppd.storage import SQLiteStore

    return SQLiteStore(store_dir(config))


def store_dir(config: Config) -> str:
    """The directory of the embedded store: ``[storage] dir``, default ``data_dir``.

    Apart from the data directory so that several nodes of a cluster on one
    machine (docs/cluster.rst) can share one store while each keeps its own
    pid file and admin socket in its own ``data_dir``; SQLite's WAL mode
    serialises their writes.  A relative path is relative to the config file.
    """
    return settings(config).dir or config.data_dir


def open_sync_store(config: Config, create: bool = False, read_only: bool = False) -> Any:
    """The store for offline tools (xmppctl): synchronous, blocking is fine there."""
    conf = settings(config)
    if conf.backend == "postgresql":
        from xmppd.storage_pg import PostgresStore

        return PostgresStore(conf)
    from xmppd.storage import SQLiteStore

    return SQLiteStore(store_dir(config), create=create, read_only=read_only)

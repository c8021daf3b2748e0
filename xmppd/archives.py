"""Which message archive (XEP-0313) the server and ``xmppctl`` open, and how.

``[mam] storage``: ``"postgresql"`` (the default when ``[storage] backend =
"postgresql"``), ``"sqlite"`` (the default otherwise: ``archive.sqlite3`` in
the embedded store's directory, :func:`xmppd.storeconfig.store_dir`) or
``"memory"`` (tests).  Chosen here once, so that the plugin and the offline
tools agree on where an archive is.

A cluster (``[cluster] redis``) archives into PostgreSQL: nodes sharing one
SQLite archive file would each keep their own idea of its counts and of the
next ``seq``, so a cluster with ``storage = "sqlite"`` refuses to start
with one line that says so (docs/mam.rst, "Clusters").
"""
from __future__ import annotations

from typing import Any

from xmppd.config import Config, ConfigError
from xmppd.msglog import LogWorker, MemoryMessageLog, Sequence, SQLiteMessageLog
from xmppd.storeconfig import settings as storage_settings
from xmppd.storeconfig import store_dir

STORAGES = ("sqlite", "memory", "postgresql")


def default_storage(config: Config) -> str:
    """The archive follows the store: PostgreSQL with PostgreSQL, else SQLite."""
    return "postgresql" if storage_settings(config).backend == "postgresql" else "sqlite"


def check(config: Config, storage: str) -> None:
    """Refuse what cannot work, naming ``[mam] storage`` (ConfigError)."""
    if storage == "postgresql" and storage_settings(config).backend != "postgresql":
        raise ConfigError(config.path, "mam.storage", storage,
                          'needs [storage] backend = "postgresql" (the archive is in that database)')
    if storage == "sqlite":
        from xmppd.cluster.settings import settings as cluster_settings

        if cluster_settings(config) is not None:
            raise ConfigError(config.path, "mam.storage", storage,
                              "a cluster's nodes archive into PostgreSQL: set [storage] "
                              'backend = "postgresql" (docs/mam.rst, "Clusters"), or remove '
                              "urn:xmpp:mam:2 from [sm] plugins")


def open_for_server(server: Any, s: Any, **callbacks: Any) -> tuple:
    """(archive, :class:`Sequence`, worker) of the running server for ``[mam]`` ``s``.

    ``callbacks``: the worker's ``on_trimmed``/``on_overflow``/``on_failure``.
    """
    config, clock = server.config, server.clock
    check(config, s.storage)
    options = dict(flush_interval=s.flush_interval, max_buffer=s.max_buffer,
                   max_per_user=s.max_messages_per_user, **callbacks)
    if s.storage == "postgresql":
        from xmppd.msglog_pg import SLOT_BITS, AsyncLogWorker, AsyncPostgresArchive

        archive = AsyncPostgresArchive(server.store)
        sequence = Sequence(clock, archive.last_seq(), SLOT_BITS, archive.slot)
        return archive, sequence, AsyncLogWorker(archive, clock, **options)
    archive = MemoryMessageLog() if s.storage == "memory" else SQLiteMessageLog(store_dir(config))
    worker = LogWorker(archive, clock, checkpoint_interval=s.checkpoint_interval, **options)
    return archive, Sequence(clock, archive.last_seq()), worker


def open_offline(config: Config, storage: str) -> Any:
    """The synchronous archive for ``xmppctl`` (server stopped); None when there is none."""
    if storage == "postgresql":
        from xmppd.msglog_pg import PostgresMessageLog

        return PostgresMessageLog(storage_settings(config))
    if storage == "memory":
        return None
    from xmppd.storage import StoreNotFound

    try:
        return SQLiteMessageLog(store_dir(config), create=False)
    except StoreNotFound:
        return None

"""``xmppctl``: the operator's command-line tool.

It works on the same config file and store as the daemon (SQLite in WAL mode
allows both at once) and talks to connectors through the same interface, so
``adduser`` on an SQL-backed vhost writes to that database.
"""
from __future__ import annotations

import argparse
import getpass
import os
import signal
import sys

from twisted.internet import defer, task

from xmppd import jid as jidlib
from xmppd.config import ConfigError, load


class CtlError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def _parse_account(text: str, config) -> jidlib.JID:
    try:
        j = jidlib.parse(text)
    except jidlib.InvalidJID as e:
        raise CtlError(f"{text!r} is not a valid JID: {e}") from None
    if j.user is None or j.resource is not None:
        raise CtlError(f"{text!r} is not an account JID (user@host)")
    if j.host not in config.hosts:
        raise CtlError(f"{j.host} is not a host of this server ({', '.join(config.hosts)})")
    return j


def _password(given: str | None) -> str:
    password = given if given is not None else _read_password()
    _check_length(password)
    return password


def _check_length(password: str) -> None:
    from xmppd.auth.passwords import check_password_length

    problem = check_password_length(password)
    if problem is not None:
        raise CtlError(problem)


def _read_password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Again: "):
            raise CtlError("passwords differ")
        return first
    line = sys.stdin.readline().rstrip("\n")
    if not line:
        raise CtlError("empty password on stdin")
    return line


def _acceptable(password: str, connector) -> str:
    """``password`` if the connector may store it (docs/auth.rst, "Password length")."""
    from xmppd.auth.passwords import MIN_PASSWORD_LENGTH, UnacceptablePassword, check_new_password

    try:
        check_new_password(password, connector, min_length=MIN_PASSWORD_LENGTH)
    except UnacceptablePassword as e:
        raise CtlError(f"password refused: {e}") from None
    return password


#: Where the server's config lives when installed as README.rst and
#: etc/xmppd.service describe; used when --config is not given.
DEFAULT_CONFIG = "/etc/xmppd/xmppd.toml"


def _config_path(args) -> str | None:
    """The config file to use: --config, else DEFAULT_CONFIG, else refuse.

    Guessing (the built-in defaults put the store in ./var of whatever the
    current directory is) would let ``adduser`` fill a store the server never
    reads; the built-in configuration is used only when asked for.
    """
    if args.config is not None:
        return args.config
    if args.defaults:
        return None
    if os.path.exists(DEFAULT_CONFIG):
        return DEFAULT_CONFIG
    raise CtlError(f"no --config given and no {DEFAULT_CONFIG}: name the server's config "
                   f"file with --config FILE (or --defaults for the built-in configuration, "
                   f"data in ./var, as `twistd -n xmppd` without --config)")


# How each command may use the store: not at all, read only, an existing
# store, or one it may create (a first account on a fresh install).
NO_STORE, READ, WRITE, CREATE = "none", "read", "write", "create"
STORE_ACCESS = {
    "check": NO_STORE, "reload": NO_STORE, "certs": NO_STORE,
    "status": NO_STORE, "sessions": NO_STORE, "s2s": NO_STORE, "mam": NO_STORE,
    "reports": READ, "blocklist": READ, "users": READ, "export": READ,
    "import": CREATE,
    "passwd": WRITE, "deluser": WRITE,
    "adduser": CREATE, "addusers": CREATE, "create-schema": CREATE,
    "migrate-store": NO_STORE,
}


def _store_access(args) -> str:
    if args.command == "filter":
        return WRITE if args.policy else READ
    return STORE_ACCESS[args.command]


def _open_store(config, access: str):
    from xmppd.storage import SQLiteStore, StoreNotFound
    from xmppd.storeconfig import settings, store_dir

    if settings(config).backend == "postgresql":
        from xmppd.storage_pg import PostgresStore

        # create-schema opens the database before the schema exists.
        return PostgresStore(settings(config), require_schema=access != CREATE)
    if access == CREATE:
        existed = os.path.isfile(os.path.join(store_dir(config), SQLiteStore.FILENAME))
        store = SQLiteStore(store_dir(config))
        if not existed:
            sys.stderr.write(f"xmppctl: created a new store at {store.path}\n")
        return store
    try:
        return SQLiteStore(store_dir(config), create=False, read_only=access == READ)
    except StoreNotFound as e:
        raise CtlError(f"{e}: is --config right?") from None


@defer.inlineCallbacks
def run(reactor, args) -> defer.Deferred:
    from xmppd.core import build_connectors

    config = load(_config_path(args))
    if args.command == "check":
        problems = yield check(config, reactor)
        for p in problems:
            print(p)
        errors = [p for p in problems if not p.startswith("warning:")]
        if errors:
            raise CtlError(f"{len(errors)} error(s) found")
        print(f"{config.path}: OK" + (f" ({len(problems)} warning(s))" if problems else ""))
        return
    if args.command in LIVE_COMMANDS:
        live = yield _live(config, args)
        if live:
            return
    if args.command == "migrate-store":
        _migrate_store(config, args)
        return
    # Arguments first: a typo must not create a store or ask for a password.
    account = _parse_account(args.jid, config) if hasattr(args, "jid") else None
    if args.command == "import":
        from xmppd.migrate import MigrationError, parse_host_map

        try:
            host_map = parse_host_map(args.host_map, config.hosts)
        except MigrationError as e:
            raise CtlError(str(e)) from None
        if _server_running(config):
            raise CtlError("xmppd is running: stop it before an import (it keeps the rosters and "
                           "blocklists of online users in memory)")
    if args.command == "addusers":
        _check_length(args.password)
    password = _password(args.password) if args.command in ("adduser", "passwd") else None
    store = _open_store(config, _store_access(args))
    try:
        connectors = build_connectors(config, store, reactor)
        if args.command == "users":
            yield _offline_users(config, connectors, args.host)
            return
        if args.command == "reports":
            from xmppd.handlers.blocking import REPORTS

            for reported in store.users(REPORTS):
                for _key, r in store.items(REPORTS, reported):
                    print(f"{r['time']}  {reported}  reported by {r['reporter']}  {r['reason']}  {r['text']}")
            return
        if args.command in ("import", "export"):
            yield _migrate(args, config, store, connectors, host_map if args.command == "import" else None)
            return
        if args.command == "create-schema":
            done = set()
            if hasattr(store, "run"):  # [storage] backend = "postgresql"
                from xmppd.storage_pg import create_schema

                created = store.run("create schema", create_schema)
                print(f"{'created' if created else 'checked'} the store schema in {store.path}")
                done.add(id(store))
            for host, connector in connectors.items():
                create = getattr(connector, "create_schema", None)
                if create is None or id(connector) in done:
                    continue
                done.add(id(connector))
                yield create()
                print(f"created the default {connector.name} schema for {host}")
            if not done:
                raise CtlError("no schema to create (only [storage] backend = \"postgresql\" and "
                               "[auth] connector = \"sql\" have one)")
            return
        if args.command == "addusers":
            host = config.default_host
            connector = connectors[host]
            _acceptable(args.password, connector)
            for i in range(1, args.count + 1):
                yield connector.add_user(jidlib.prep_localpart(f"{args.prefix}{i}"), host, args.password)
            print(f"created {args.count} accounts {args.prefix}1..{args.prefix}{args.count}@{host}")
            return
        connector = connectors[account.host]
        if args.command == "adduser":
            yield connector.add_user(account.user, account.host, _acceptable(password, connector))
            print(f"created {account.bare}")
        elif args.command == "passwd":
            password = _acceptable(password, connector)
            yield connector.set_password(account.user, account.host, password)
            print(f"password changed for {account.bare}")
        elif args.command == "deluser":
            yield connector.remove_user(account.user, account.host)
            _purge_archive(config, account.bare)
            print(f"deleted {account.bare}")
        elif args.command == "blocklist":
            from xmppd.handlers.blocking import STORE as BLOCK_STORE

            if not (yield connector.user_exists(account.user, account.host)):
                raise CtlError(f"no such account {account.bare}")
            for key, _ in store.items(BLOCK_STORE, account.bare):
                print(key)
        elif args.command == "filter":
            from xmppd.filtering import FilterError, ctl_filter

            try:
                yield ctl_filter(config, store, connector, account, args.policy, args.values)
            except FilterError as e:
                raise CtlError(str(e)) from None

    finally:
        store.close()


def _migrate_store(config, args) -> None:
    """``xmppctl migrate-store [--from DIR] [--force]``: SQLite store -> PostgreSQL."""
    from xmppd.msglog_pg import PostgresMessageLog
    from xmppd.storage import StoreNotFound
    from xmppd.storage_pg import PostgresStore
    from xmppd.storemigrate import MigrateStoreError, migrate
    from xmppd.storeconfig import settings, store_dir

    conf = settings(config)
    if conf.backend != "postgresql":
        raise CtlError("migrate-store copies into PostgreSQL: set [storage] backend = "
                       "\"postgresql\" and its dsn in the config first")
    source = args.source or store_dir(config)
    if args.source is None and _server_running(config):
        raise CtlError("xmppd is running: stop it before copying its store")
    target = PostgresStore(conf)
    log = PostgresMessageLog(conf)
    try:
        counts = migrate(source, target, log, force=args.force)
    except (MigrateStoreError, StoreNotFound) as e:
        raise CtlError(str(e)) from None
    finally:
        target.close()
        log.close()
    print(f"copied {counts.kv_rows} key-value rows and {counts.archive_rows} archived messages "
          f"({counts.archives} archives) from {source} to {target.path}")


# Commands answered by the running server over its admin socket (xmppd/admin.py).
LIVE_COMMANDS = ("status", "sessions", "certs", "reload", "users", "s2s", "mam")


def _purge_archive(config, bare: str, before: str | None = None) -> int | None:
    """Delete ``bare``'s message archive (XEP-0313); None when there is none.

    Through the running server when it has the archive open (it also drops
    what it has not written yet), else in the archive file itself.
    """
    from xmppd import adminclient

    args = {"jid": bare} if before is None else {"jid": bare, "before": before}
    try:
        return adminclient.request(config.data_dir, "mam_purge", args)["deleted"]
    except adminclient.NotRunning:
        pass
    except adminclient.Refused as e:
        if "unknown command" not in str(e):  # the running server has no archive plugin
            raise CtlError(str(e)) from None
    from xmppd.archives import open_offline
    from xmppd.handlers.mam import parse_time, settings

    try:
        cut = parse_time(before) if before is not None else None
    except ValueError as e:
        raise CtlError(f"--before: {e}") from None
    log = open_offline(config, settings(config).storage)
    if log is None:
        return None
    try:
        return log.delete_user(bare, cut)
    finally:
        log.close()


def _mam(config, args) -> None:
    """``xmppctl mam purge JID [--before DATE]`` / ``xmppctl mam expire``."""
    from xmppd import adminclient

    if args.action == "purge":
        if args.jid is None:
            raise CtlError("mam purge: whose archive? (a bare JID)")
        try:
            account = jidlib.parse(args.jid)
        except jidlib.InvalidJID as e:
            raise CtlError(f"{args.jid!r} is not a valid JID: {e}") from None
        if account.user is None or account.host not in config.hosts:
            raise CtlError(f"{args.jid} is not an account of this server")
        n = _purge_archive(config, account.bare, args.before)
        when = f" before {args.before}" if args.before else ""
        print(f"deleted {n or 0} archived messages of {account.bare}{when}")
        return
    if args.jid is not None or args.before is not None:
        raise CtlError("mam expire takes no arguments")
    try:
        data = adminclient.request(config.data_dir, "mam_expire")
    except adminclient.NotRunning:
        import time as _time

        from xmppd.archives import open_offline
        from xmppd.handlers.mam import settings

        s = settings(config)
        if s.retention is None:
            print("retention is forever: nothing to expire")
            return
        log = open_offline(config, s.storage)
        if log is None:
            print("no archive")
            return
        cutoff, total = int((_time.time() - s.retention) * 1_000_000), 0
        try:
            while True:
                n = log.expire(cutoff, s.delete_chunk)
                total += n
                if n < s.delete_chunk:
                    break
        finally:
            log.close()
        data = {"deleted": total}
    print(f"deleted {data['deleted']} archived messages past the retention period")


@defer.inlineCallbacks
def _live(config, args):
    """Run a command on the running server; False when the offline route should run.

    ``status``, ``sessions`` and ``reload`` need the server.  ``certs`` and
    ``users`` fall back to reading the files (certs says it is a preview).
    """
    from xmppd import adminclient

    data_dir = config.data_dir
    try:
        if args.command == "status":
            print(adminclient.format_status(adminclient.request(data_dir, "status")), end="")
        elif args.command == "sessions":
            if args.action is None:
                if args.jid is not None:
                    raise CtlError("usage: xmppctl sessions [kick JID [--text TEXT] [--reset]]")
                print(adminclient.format_sessions(adminclient.request(data_dir, "sessions")),
                      end="")
            else:
                if args.jid is None:
                    raise CtlError("sessions kick: which JID? (full JID: one session; "
                                   "bare JID: all of them)")
                kicked = adminclient.request(data_dir, "kick", {
                    "jid": args.jid, "text": args.text or "",
                    "condition": "reset" if args.reset else "policy-violation"})
                for jid in kicked:
                    print(f"kicked {jid}")
        elif args.command == "certs":
            from xmppd.certs import format_cert_table

            infos = adminclient.cert_infos(adminclient.request(data_dir, "certs"))
            print("what the running server serves now:")
            print(format_cert_table(infos), end="")
        elif args.command == "reload":
            data = adminclient.request(data_dir, "reload")
            print(adminclient.format_reload(data, data.get("pid")), end="")
        elif args.command == "s2s":
            print(adminclient.format_s2s(adminclient.request(data_dir, "s2s")), end="")
        elif args.command == "mam":
            _mam(config, args)
        elif args.command == "users":
            args_ = {"host": args.host} if args.host else {}
            print(adminclient.format_users(adminclient.request(data_dir, "users", args_)), end="")
        return True
    except adminclient.Refused as e:
        raise CtlError(str(e)) from None
    except adminclient.NotRunning as e:
        if args.command == "reload" and _sighup(config):
            return True
        if args.command in ("status", "sessions", "reload", "s2s"):
            raise CtlError(str(e)) from None
    if args.command == "certs":
        yield _offline_certs(config)
        return True
    return False


def _sighup(config) -> bool:
    """``reload`` of a server without an admin socket: SIGHUP to the locked pid file's pid."""
    pidfile = os.path.join(config.data_dir, "xmppd.pid")
    # The server holds a lock on its pid file: without it, the pid in a
    # leftover file may now belong to an unrelated process.
    if not _server_running(config):
        return False
    try:
        pid = int(open(pidfile).read().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as e:
        raise CtlError(f"cannot signal the server via {pidfile}: {e}") from None
    print(f"sent SIGHUP to xmppd (pid {pid}): it has no admin socket, see its log for the outcome")
    return True


def _offline_certs(config):
    from xmppd.certs import format_cert_table

    store = _cert_store(config)
    store.load()
    print("xmppd is not running; a PREVIEW of what a fresh start would serve:")
    print(format_cert_table(store.describe()), end="")
    return defer.succeed(None)


@defer.inlineCallbacks
def _offline_users(config, connectors, host):
    from xmppd import adminclient
    from xmppd.admin import MAX_LISTED_USERS, list_accounts

    if host is not None and host not in config.hosts:
        raise CtlError(f"{host} is not a host of this server ({', '.join(config.hosts)})")
    out = {}
    for h in ([host] if host else config.hosts):
        out[h] = yield list_accounts(connectors[h], h, MAX_LISTED_USERS)
    print(adminclient.format_users(out), end="")


def _server_running(config) -> bool:
    from xmppd.pidfile import held_by_live_process

    return held_by_live_process(os.path.join(config.data_dir, "xmppd.pid"))


@defer.inlineCallbacks
def _migrate(args, config, store, connectors, host_map):
    """``import`` / ``export`` (XEP-0227, docs/migration.rst)."""
    from xmppd.migrate import MigrationError, export_file, import_files

    try:
        if args.command == "export":
            users, hosts = export_file(args.file, config, store, connectors)
            print(f"exported {users} account(s) of {hosts} host(s) to {args.file} (mode 0600)")
            return
        summary = yield import_files(args.files, config, store, connectors,
                                     replace=args.replace, host_map=host_map)
    except MigrationError as e:
        raise CtlError(str(e)) from None
    for line in summary.lines():
        print(line)


def _cert_store(config):
    from xmppd.core import build_cert_store

    return build_cert_store(config, generate=False)


def check(config, reactor):
    """
    All problems an operator should fix before starting: a list of lines.

    The server is built as start-up builds it (:class:`xmppd.core.Server`,
    whose plugins read and check their own tables, then the listeners of
    :func:`xmppd.listen.listeners`), except that nothing listens, nothing is
    scheduled on the reactor and nothing is written: the store is an empty
    in-memory one and certificates are only read.
    """
    from xmppd.core import Server, build_connectors
    from xmppd.storage import MemoryStore, SQLiteStore
    from xmppd.listen import listeners

    problems = []
    store = MemoryStore()
    try:
        connectors = build_connectors(config, store, reactor)
        listeners(Server(config, store=store, clock=task.Clock(), certs=_cert_store(config),
                         connectors=connectors))
    except ConfigError as e:
        return [str(e)]
    seen = set()
    for host, connector in connectors.items():
        if id(connector) in seen:
            continue
        seen.add(id(connector))
        try:
            for p in (yield connector.check()):
                problems.append(f"auth ({connector.name}): {p}")
        finally:
            closer = getattr(connector, "close", None)
            if closer is not None:
                closer()
    try:
        from xmppd.certs import check_certificates

        certs = _cert_store(config)
        problems.extend(check_certificates(certs))
    except Exception as e:  # a broken cert file must be reported, not crash check
        problems.append(f"certificates: {e}")
    from xmppd.storeconfig import store_dir

    path = os.path.join(store_dir(config), SQLiteStore.FILENAME)
    if not os.path.isfile(path):
        problems.append(f"warning: no store at {path} yet; the server creates an empty one "
                        f"(is [server] data_dir right?)")
    return problems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="xmppctl", description="Operate an xmppd server.")
    import xmppd

    parser.add_argument("--version", action="version", version=f"xmppctl {xmppd.__version__}")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--config", "-c", default=None,
                       help=f"the server's TOML config file (default: {DEFAULT_CONFIG})")
    where.add_argument("--defaults", action="store_true",
                       help="use the built-in configuration (host localhost, data in ./var), "
                            "as `twistd -n xmppd` without --config does")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("adduser", "create an account"), ("passwd", "change a password")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("jid")
        p.add_argument("password", nargs="?", help="read from stdin when omitted")
    sub.add_parser("deluser", help="delete an account and its data").add_argument("jid")
    p = sub.add_parser("addusers", help="bulk-create PREFIX1..PREFIXn on the first host")
    p.add_argument("prefix")
    p.add_argument("count", type=int)
    p.add_argument("password")
    sub.add_parser("check", help="validate config, certificates and backends")
    sub.add_parser("create-schema", help="create the PostgreSQL store's tables ([storage]) and "
                   "the sql connector's default table(s)")
    p = sub.add_parser("migrate-store", help="copy the embedded SQLite store (and archive) into "
                       "the PostgreSQL store of [storage]")
    p.add_argument("--from", dest="source", default=None, metavar="DIR",
                   help="the data directory to copy (default: [server] data_dir)")
    p.add_argument("--force", action="store_true",
                   help="empty a target that holds data first (default: refuse)")
    sub.add_parser("reload", help="reload certificates and the reloadable config keys "
                                  "in the running server")
    sub.add_parser("certs", help="show which certificate serves which host (the running "
                                 "server's, else a preview)")
    sub.add_parser("status", help="the running server: version, uptime, sessions, memory")
    p = sub.add_parser("sessions", help="list the running server's sessions, or kick one",
                       description="Without arguments: every session. `kick JID` closes the "
                       "session of a full JID, or every session of a bare JID, with a "
                       "policy-violation stream error (--reset: a reset one).")
    p.add_argument("action", nargs="?", choices=["kick"])
    p.add_argument("jid", nargs="?")
    p.add_argument("--text", default=None, help="the stream error's text")
    p.add_argument("--reset", action="store_true",
                   help="send <reset/> (reconnect now) instead of <policy-violation/>")
    sub.add_parser("users", help="accounts per host (count, and the list where the "
                                 "connector can list)").add_argument("host", nargs="?")
    sub.add_parser("s2s", help="list the live server-to-server connections")
    p = sub.add_parser("mam", help="message archive: purge a user's, or apply retention now",
                       description="`purge JID` deletes the user's archived messages (only those "
                       "before DATE with --before, an XEP-0082 date or date-time, UTC unless it "
                       "says otherwise); `expire` deletes everything older than [mam] retention "
                       "now. Through the running server when there is one, else in the archive "
                       "file.")
    p.add_argument("action", choices=["purge", "expire"])
    p.add_argument("jid", nargs="?")
    p.add_argument("--before", default=None, metavar="DATE")
    sub.add_parser("blocklist", help="show a user's XEP-0191 blocklist").add_argument("jid")
    p = sub.add_parser("filter", help="show or set a user's domain filter",
                       description="POLICY is ALL, LOCAL, OWN, BLOCK, LIST, BLACKLIST, CUSTOM or "
                       "DEFAULT (drop the user's own setting); LIST/BLACKLIST take domains, CUSTOM "
                       "takes rules, one quoted argument each ('allow example.org' 'deny *'). "
                       "Without POLICY the current setting is shown.")
    p.add_argument("jid")
    p.add_argument("policy", nargs="?")
    p.add_argument("values", nargs="*", help="domains (LIST, BLACKLIST) or rules (CUSTOM)")
    sub.add_parser("reports", help="list XEP-0377 spam reports received with block requests")
    p = sub.add_parser("export", help="write every account and its data to an XEP-0227 file",
                       description="Accounts (SCRAM credentials), rosters, subscription "
                       "requests, vCards, offline messages and blocklists of every host, as one "
                       "XEP-0227 file written atomically with mode 0600. See docs/migration.rst.")
    p.add_argument("file")
    p = sub.add_parser("import", help="import accounts and their data from XEP-0227 files",
                       description="FILE: an XEP-0227 file (XIncludes followed, as ejabberd's "
                       "export_piefxis writes), or a directory of them (Prosody's xep0227 "
                       "storage writes one per user). Each account is imported whole or not at "
                       "all; what is left out is listed. The server must be stopped. See "
                       "docs/migration.rst.")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--replace", action="store_true",
                   help="overwrite existing accounts (their imported data is replaced)")
    p.add_argument("--host-map", action="append", default=[], metavar="OLD=NEW",
                   help="import the users of host OLD into host NEW of this server (repeatable)")
    args = parser.parse_args(argv)

    def done(result):
        return result

    status = {"code": 0}

    def failed(failure):
        from xmppd.auth.base import NoSuchUser, NotSupported, UserExists
        from xmppd.certs import CertificateError
        from xmppd.storage import StoreError

        err = failure.value
        if isinstance(err, (CtlError, ConfigError, StoreError, CertificateError)):
            msg = str(err)
        elif isinstance(err, UserExists):
            msg = f"account {err} already exists"
        elif isinstance(err, NoSuchUser):
            msg = f"no such account {err}"
        elif isinstance(err, NotSupported):
            msg = f"not supported by this connector: {err}"
        else:
            msg = f"{type(err).__name__}: {err}"
        sys.stderr.write(f"xmppctl: {msg}\n")
        status["code"] = 1

    def go(reactor):
        return run(reactor, args).addCallbacks(done, failed)

    try:
        task.react(go)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    sys.exit(status["code"])


if __name__ == "__main__":
    main()

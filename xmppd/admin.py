"""The admin channel: a UNIX socket in ``data_dir`` that ``xmppctl`` talks to.

Why a socket and not signals: an operator wants answers from the running
server (what it serves, who is connected, what a reload did), not from a
fresh reading of the files.  Who may ask is decided by the file system and
checked again by the kernel: the socket is created mode 0600 (under a umask,
so it is never reachable more widely, not even for an instant) in the
server's data directory, and every connection's peer credentials
(``SO_PEERCRED``) must be the server's own uid or root.

Protocol (version :data:`VERSION`): one request per connection, one JSON
object on one line::

    {"v": 1, "cmd": "status", "args": {}}

answered by one line, after which the server closes the connection::

    {"v": 1, "ok": true, "data": ...}
    {"v": 1, "ok": false, "error": "one line"}

Bounded: a request line of at most :data:`MAX_REQUEST` bytes, at most
:data:`MAX_CONNECTIONS` connections at once, :data:`IDLE_TIMEOUT` seconds to
send the request.  Commands: ``status``, ``sessions``, ``kick``, ``certs``,
``reload``, ``users`` (see :class:`AdminChannel`).
"""
from __future__ import annotations

import json
import os
import socket
import struct
import time
from dataclasses import asdict
from typing import Any, Callable

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

import xmppd
from xmppd.logfilter import log_observer

log = Logger(observer=log_observer)

VERSION = 1
SOCKET_NAME = "xmppd.ctl"
MAX_REQUEST = 16 * 1024  # bytes of the request line; requests are a few dozen bytes
MAX_CONNECTIONS = 8  # xmppctl needs one; more are a loop or an attack
IDLE_TIMEOUT = 30.0  # seconds to send the request line
MAX_LISTED_USERS = 10000  # per host in one `users` answer (the count is always exact)
# The longest path bind() takes for an AF_UNIX socket (sun_path minus the NUL).
MAX_PATH = 107


class AdminError(Exception):
    """A refused request: its text goes back to xmppctl as the error line."""


def socket_path(data_dir: str) -> str:
    return os.path.join(data_dir, SOCKET_NAME)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected AF_UNIX socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def peer_allowed(uid: int, own_uid: int) -> bool:
    """Only the server's own user (and root, who could read its files anyway)."""
    return uid == own_uid or uid == 0


def vm_rss_kib(pid: int | str = "self") -> int | None:
    """Resident memory in KiB, from /proc (None where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class AdminProtocol(LineOnlyReceiver):
    """One connection: peer check, one request line, one answer, close."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST
    factory: "AdminFactory"

    def connectionMade(self) -> None:
        self._done = False
        self._timeout = None
        factory = self.factory
        if len(factory.connections) >= MAX_CONNECTIONS:
            log.warn("admin socket: more than {n} connections at once; refusing one",
                     n=MAX_CONNECTIONS)
            return self._answer_error("too many admin connections")
        try:
            uid = peer_uid(self.transport.getHandle())
        except OSError as e:
            log.warn("admin socket: cannot read the peer's credentials: {err}", err=e)
            return self._answer_error("peer credentials unavailable")
        if not peer_allowed(uid, factory.own_uid):
            log.warn("admin socket: refused a connection from uid {uid} (only uid {own} or root)",
                     uid=uid, own=factory.own_uid)
            return self._answer_error("permission denied: not the server's user")
        factory.connections.add(self)
        self._timeout = factory.clock.callLater(IDLE_TIMEOUT, self._idle)

    def connectionLost(self, reason=None) -> None:
        self.factory.connections.discard(self)
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()

    def _idle(self) -> None:
        self._timeout = None
        self._answer_error(f"no request within {IDLE_TIMEOUT:g}s")

    def lineLengthExceeded(self, line: bytes) -> None:
        self._answer_error(f"request longer than {MAX_REQUEST} bytes")

    def lineReceived(self, line: bytes) -> None:
        if self._done:
            return
        self._done = True  # one request per connection
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("not an object")
        except ValueError:
            return self._answer_error("request is not a JSON object")
        if request.get("v") != VERSION:
            return self._answer_error(f"protocol version {request.get('v')!r} not supported "
                                      f"(this server speaks {VERSION})")
        command, args = request.get("cmd"), request.get("args") or {}
        if not isinstance(command, str) or not isinstance(args, dict):
            return self._answer_error("cmd must be a string and args an object")
        d = defer.maybeDeferred(self.factory.channel.run, command, args)
        d.addCallbacks(self._answer, self._failed, errbackArgs=(command,))

    def _failed(self, failure, command: str) -> None:
        if failure.check(AdminError):
            return self._answer_error(str(failure.value))
        log.failure("admin socket: {command} failed", failure, command=command)
        self._answer_error(f"internal error: {failure.getErrorMessage()}")

    def _answer(self, data: Any) -> None:
        self._send({"v": VERSION, "ok": True, "data": data})

    def _answer_error(self, text: str) -> None:
        self._done = True
        self._send({"v": VERSION, "ok": False, "error": text})

    def _send(self, message: dict) -> None:
        if not self.transport.connected:
            return
        self.transport.write(json.dumps(message).encode() + b"\n")
        self.transport.loseConnection()


class AdminFactory(protocol.ServerFactory):
    protocol = AdminProtocol

    def __init__(self, channel: "AdminChannel", clock: Any) -> None:
        self.channel = channel
        self.clock = clock
        self.own_uid = os.getuid()
        self.connections: set[AdminProtocol] = set()


class AdminChannel:
    """The commands, on the running server's own objects (nothing re-read)."""

    def __init__(self, server, reload: Callable[[str], Any]) -> None:
        self.server = server
        self.reload_server = reload  # ServerService.reload: sd_notify around Server.reload
        self.started = time.time()
        self.commands = {
            "status": self.status, "sessions": self.sessions, "kick": self.kick,
            "certs": self.certs, "reload": self.reload, "users": self.users,
            "s2s": self.s2s,
        }
        # Commands of plugins (e.g. mam_purge); the built-in names win.
        for name, handler in getattr(server, "admin_commands", {}).items():
            self.commands.setdefault(name, handler)

    def run(self, command: str, args: dict):
        handler = self.commands.get(command)
        if handler is None:
            raise AdminError(f"unknown command {command!r}; known: {', '.join(self.commands)}")
        import inspect

        try:
            inspect.signature(handler).bind(**args)
        except TypeError as e:
            raise AdminError(f"{command}: bad arguments ({e})") from None
        return handler(**args)

    # -- commands ------------------------------------------------------------

    def _all_sessions(self) -> list:
        return [s for resources in self.server.router.sessions.values() for s in resources.values()]

    def status(self) -> dict:
        config = self.server.config
        per_host = {host: 0 for host in config.hosts}
        for session in self._all_sessions():
            per_host[session.jid.host] = per_host.get(session.jid.host, 0) + 1
        return {
            "version": xmppd.__version__, "pid": os.getpid(),
            "uptime": time.time() - self.started, "started": self.started,
            "config": config.path, "data_dir": config.data_dir, "hosts": list(config.hosts),
            "sessions": per_host, "vm_rss_kib": vm_rss_kib(),
            "s2s": self._s2s_counts(),
        }

    def s2s(self) -> list[dict] | None:
        """Live server-to-server connections (None: federation is off)."""
        service = getattr(self.server, "s2s", None)
        return service.describe() if service is not None else None

    def _s2s_counts(self) -> dict | None:
        links = self.s2s()
        if links is None:
            return None
        counts = {"in": 0, "out": 0}
        for link in links:
            if link.get("state") == "established":
                counts[link["direction"]] = counts.get(link["direction"], 0) + 1
        return counts

    def sessions(self) -> list[dict]:
        out = []
        for s in self._all_sessions():
            if getattr(s, "remote", False):  # bound on another cluster node
                out.append(s.describe())
                continue
            peer = s.transport.getPeer()
            tls = None
            conn = s._tls_connection() if hasattr(s, "_tls_connection") else None
            if conn is not None:
                tls = conn.get_protocol_version_name()
            out.append({
                "jid": s.jid.full, "address": getattr(peer, "host", str(peer)),
                "port": getattr(peer, "port", None), "since": getattr(s, "bound_at", None),
                "tls": tls, "available": s.available, "priority": s.priority,
            })
        out.sort(key=lambda row: row["jid"])
        return out

    def kick(self, jid: str, text: str = "", condition: str = "policy-violation") -> list[str]:
        """Close the session of a full JID, or every session of a bare JID."""
        from xmppd import jid as jidlib

        if condition not in ("policy-violation", "reset"):
            raise AdminError("condition must be policy-violation or reset")
        if not isinstance(text, str) or len(text) > 1000:
            raise AdminError("text must be a string of at most 1000 characters")
        if not isinstance(jid, str):
            raise AdminError("jid must be a string")
        try:
            target = jidlib.parse(jid)
        except jidlib.InvalidJID as e:
            raise AdminError(f"{jid!r} is not a valid JID: {e}") from None
        resources = self.server.router.resources_of(target.bare)
        victims = [s for r, s in resources.items()
                   if target.resource is None or r == target.resource]
        if not victims:
            raise AdminError(f"no session of {jid}")
        text = text or "disconnected by the server administrator"
        kicked = []
        for session in victims:  # a copy: closing unbinds
            log.warn("admin: kicking {jid} from {peer} ({condition}: {text})",
                     jid=session.jid.full, peer=session.peer, condition=condition, text=text)
            kicked.append(session.jid.full)
            session.stream_error(condition, text)
        return kicked

    def certs(self) -> list[dict]:
        out = []
        for info in self.server.certs.describe():
            row = asdict(info)
            row["not_before"] = info.not_before.isoformat()
            row["not_after"] = info.not_after.isoformat()
            out.append(row)
        return out

    def reload(self) -> dict:
        outcome = self.reload_server("xmppctl reload")
        if outcome.error is not None:
            raise AdminError(f"reload refused, nothing changed: {outcome.error}")
        return {**outcome.to_json(), "pid": os.getpid()}

    @defer.inlineCallbacks
    def users(self, host: str | None = None):
        hosts = self.server.config.hosts
        if host is not None and host not in hosts:
            raise AdminError(f"{host} is not a host of this server ({', '.join(hosts)})")
        out = {}
        for h in ([host] if host else hosts):
            out[h] = yield list_accounts(self.server.connectors[h], h, MAX_LISTED_USERS)
        return out


@defer.inlineCallbacks
def list_accounts(connector, host: str, limit: int):
    """``{"count": n, "users": [...] or None}``; None where the connector cannot list.

    Shared by the admin socket and ``xmppctl users`` without a running server.
    """
    from xmppd.auth.base import NotSupported

    lister = getattr(connector, "list_users", None)
    if lister is not None:
        names = yield lister(host)
        return {"count": len(names), "users": names[:limit], "connector": connector.name}
    try:
        count = yield connector.count_users(host)
    except NotSupported:
        count = None
    return {"count": count, "users": None, "connector": connector.name}


def listen(reactor: Any, data_dir: str, channel: AdminChannel):
    """Bind ``data_dir/xmppd.ctl`` (mode 0600); call with the pid file locked.

    A socket file left there by a server that died is removed first: the pid
    file lock proves no live server owns it.  Raises OSError (or
    CannotListenError) when it cannot be bound.
    """
    path = socket_path(data_dir)
    if len(os.fsencode(path)) > MAX_PATH:
        raise OSError(f"{path} is longer than the {MAX_PATH} bytes a UNIX socket path may have")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    # The umask makes bind() create the file 0600 already; twisted's chmod
    # afterwards would leave a moment with the default mode.  Start-up is
    # single-threaded, so the process-wide umask is safe to change here.
    old = os.umask(0o177)
    try:
        return reactor.listenUNIX(path, AdminFactory(channel, reactor), mode=0o600)
    finally:
        os.umask(old)

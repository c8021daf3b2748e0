"""Two xmppd daemons federating on loopback, for the s2s tests.

:class:`Federation` starts ``a.test`` and ``b.test``, each with a server
certificate from a test CA made here (or from a rogue CA, for the
"untrusted certificate" cases), each trusting the test CA only
(``ca_system = false``: nothing on this machine decides), with
``[s2s.routes]`` pointing at the other's loopback port, so no test reaches
DNS or any other machine.
"""
from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

from tests.daemon import Daemon
from tests.pki import CA
from tests.rawclient import RawClient
from tests.tlsclient import TLSClient

PASSWORD = "fed-secret"


def configure(daemon: Daemon, domain: str, cert: str, key: str, ca_file: Path,
              routes: dict[str, str], lines: str = "", extra: str = "", plugins=None) -> None:
    """(Re)write ``daemon``'s config to federate as ``domain``: ``cert``/``key``
    for it, ``ca_file`` as the only trust anchor, ``routes`` (remote domain ->
    endpoint string) in ``[s2s.routes]``, ``lines`` added to ``[s2s]``."""
    table = "".join(f'"{d}" = "{r}"\n' for d, r in routes.items())
    daemon.s2s = f'ca_file = "{ca_file}"\nca_system = false\n{lines}\n[s2s.routes]\n{table}'
    daemon.write_config(f'\n[hosts."{domain}".tls]\ncert = "{cert}"\nkey = "{key}"\n' + extra, plugins)


class Federation:
    def __init__(self, tmp: Path, a_s2s: str = "", b_s2s: str = "", a_trusted: bool = True,
                 b_trusted: bool = True, a_extra: str = "", b_extra: str = "", plugins=None,
                 direct_tls: bool = False, start: bool = True, a_routes: dict | None = None,
                 a_domains: tuple[str, ...] = ()) -> None:
        """``a_domains``: more domains a.test serves (components), routed to it from b.test."""
        tmp = Path(tmp)
        ca, rogue = CA("xmppd federation test CA"), CA("Rogue CA")
        ca_file = tmp / "ca.pem"
        tmp.mkdir(parents=True, exist_ok=True)
        ca_file.write_bytes(ca.pem())
        self.ca, self.ca_file, self.tmp = ca, ca_file, tmp
        self.a = Daemon(tmp / "a", hosts=("a.test",), s2s="", s2s_direct_tls=direct_tls, plugins=plugins)
        self.b = Daemon(tmp / "b", hosts=("b.test",), s2s="", s2s_direct_tls=direct_tls, plugins=plugins)
        pairs = ((self.a, "a.test", self.b, "b.test", a_s2s, a_extra, a_trusted),
                 (self.b, "b.test", self.a, "a.test", b_s2s, b_extra, b_trusted))
        for daemon, domain, other, other_domain, lines, extra, trusted in pairs:
            cert, key = (ca if trusted else rogue).issue_server(domain, tmp / "certs")
            if direct_tls:
                route = f"tls:127.0.0.1:{other.s2s_tls_port}"
            else:
                route = f"tcp:127.0.0.1:{other.s2s_port}"
            if daemon is self.a:
                routes = {other_domain: route, **(a_routes or {})}
            else:  # b.test reaches a.test's extra domains (components) on a.test too
                routes = {other_domain: route, **{d: route for d in a_domains}}
            configure(daemon, domain, cert, key, ca_file, routes, lines, extra, plugins)
        if start:
            self.start()

    def start(self) -> "Federation":
        for daemon in (self.a, self.b):
            daemon.start()
        for daemon, user in ((self.a, "alice@a.test"), (self.b, "bob@b.test")):
            daemon.adduser(user, PASSWORD)
        return self

    def stop(self) -> None:
        for daemon in (self.a, self.b):
            if daemon.proc is not None:
                daemon.stop()

    def login(self, daemon: Daemon, user: str, resource: str = "raw", presence: bool = True) -> RawClient:
        """A raw client logged in as ``user`` (local part) on ``daemon``'s host."""
        client = RawClient(daemon.port, host=daemon.hosts[0])
        client.login(user, PASSWORD, resource)
        if presence:
            client.send("<presence/>")
        return client


def wait_for_log(daemon: Daemon, pattern: str, timeout: float = 10.0) -> str:
    """Wait until ``pattern`` (regex) appears in the daemon's log; return the match."""
    deadline = time.monotonic() + timeout
    while True:
        m = re.search(pattern, daemon.logtext())
        if m:
            return m.group(0)
        if time.monotonic() > deadline:
            raise AssertionError(f"no {pattern!r} in the log of {daemon.hosts[0]}:\n"
                                 + daemon.logtext()[-3000:])
        time.sleep(0.05)


class S2SPeer(TLSClient):
    """A hand-driven remote server: STARTTLS, then SASL EXTERNAL with ``cert``/``key``.

    For what a real peer would never send (forged addresses); it speaks
    only the initiating side, from ``domain`` to ``to``.  Raw I/O, STARTTLS
    and close are :class:`tests.tlsclient.TLSClient`'s.
    """

    def __init__(self, port: int, domain: str, to: str, cert: str, key: str) -> None:
        super().__init__(port, host=to, cert=cert, key=key)
        self.domain, self.to = domain, to

    def open(self) -> str:
        self.send("<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                  "xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
                  f"from='{self.domain}' to='{self.to}' version='1.0'>")
        return self.read_until("</stream:features>|<stream:features/>")

    def authenticate(self) -> None:
        assert "starttls" in self.open()
        self.starttls()
        features = self.open()
        assert "EXTERNAL" in features, features
        self.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>")
        assert "<success" in self.read_until("<success[^>]*/>|</success>|</failure>")
        self.open()


class SilentPeer:
    """Accepts one connection, reads what comes for ``hold`` seconds, then closes it."""

    def __init__(self, hold: float) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.received = b""
        self.accepted_at: float | None = None  # time.monotonic() of the connection
        self.closed_at: float | None = None
        self.hold = hold
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.sock.accept()
        self.accepted_at = time.monotonic()
        conn.settimeout(0.1)
        deadline = time.monotonic() + self.hold
        while time.monotonic() < deadline:
            try:
                data = conn.recv(65536)
            except socket.timeout:
                continue
            if not data:
                break
            self.received += data
        conn.close()
        self.closed_at = time.monotonic()
        self.sock.close()

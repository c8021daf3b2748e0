#!/usr/bin/env python3
"""A loopback DNS server answering SRV queries, for federation tests and benchmarks.

    python bench/srvdns.py _xmpp-server._tcp.xmppd.test=localhost:5270 ...

Some servers cannot be told "send s2s for this domain to that port" and
always resolve the domain: ejabberd 23.01 looks up ``_xmpp-server._tcp``
SRV records with Erlang's own resolver (whose name servers, ports
included, come from the ``inetrc`` file of its config dir), then the SRV
target with the system's getaddrinfo.  This server answers those SRV
look-ups from the command line (target ``localhost``, which every system
resolves to loopback, and the port of the server under test) and says
NXDOMAIN to everything else, so nothing leaves the machine and no system
file (/etc/hosts, /etc/resolv.conf) is touched.  It binds an ephemeral UDP
port on 127.0.0.1 and prints ``port N`` on stdout once it answers.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.names import common, dns, error, server


class SRVServer:
    """This script as a child process: ``SRVServer({"_xmpp-server._tcp.b.test":
    ("localhost", 5270)})``, ``.port`` once started, ``.stop()``."""

    def __init__(self, table: dict[str, tuple[str, int]]) -> None:
        args = [f"{name}={host}:{port}" for name, (host, port) in table.items()]
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args],
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("port "):
            self.stop()
            raise RuntimeError(f"srvdns did not start: {line!r}")
        self.port = int(line.split()[1])

    def inetrc(self) -> str:
        """An Erlang inetrc asking this server only (not /etc/resolv.conf's)."""
        return f'{{resolv_conf, ""}}.\n{{nameserver, {{127,0,0,1}}, {self.port}}}.\n'

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


class SRVRecords(common.ResolverBase):
    """SRV records from a fixed table; NXDOMAIN for any other name or type."""

    def __init__(self, table: dict[str, tuple[str, int]]) -> None:
        super().__init__()
        self.table = {name.lower().rstrip("."): target for name, target in table.items()}

    def _lookup(self, name, cls, type, timeout):  # noqa: A002 (twisted's signature)
        key = (name.decode() if isinstance(name, bytes) else name).lower().rstrip(".")
        if type == dns.SRV and key in self.table:
            target, port = self.table[key]
            answer = dns.RRHeader(name=key, type=dns.SRV, ttl=60, auth=True,
                                  payload=dns.Record_SRV(0, 0, port, target, ttl=60))
            return defer.succeed(([answer], [], []))
        return defer.fail(error.DomainError(key))


class Factory(server.DNSServerFactory):
    """Echoes the query's RD flag, as RFC 1035 §4.1.1 says: Erlang's resolver
    (OTP 25) rejects a reply whose RD differs from its query's."""

    def _responseFromMessage(self, message, *args, **kwargs):
        response = super()._responseFromMessage(message, *args, **kwargs)
        response.recDes = message.recDes
        return response


def parse(argv: list[str]) -> dict[str, tuple[str, int]]:
    table = {}
    for arg in argv:
        name, _, target = arg.partition("=")
        host, _, port = target.rpartition(":")
        table[name] = (host, int(port))
    return table


def main(argv: list[str]) -> None:
    factory = Factory(authorities=[SRVRecords(parse(argv))])
    port = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    print(f"port {port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])

"""``[c2s] reuse_port``: several daemons on one host share the c2s port (issue 18).

Two real daemons bind the same loopback port with SO_REUSEPORT and the
kernel spreads connections over both; without the key the second one
refuses to start, naming the listener.  Each daemon has its own store here
(no cluster needed to show who accepted a connection: each lists its own
sessions).
"""
from __future__ import annotations

import pytest

from tests.daemon import Daemon
from tests.rawclient import RawClient

PW = "pw-secret"
CONNECTIONS = 16


def shared(tmp, name, port, reuse: bool) -> Daemon:
    d = Daemon(tmp / name, c2s="reuse_port = true" if reuse else "")
    text = d.config_path.read_text().replace(f"tcp:{d.port}:", f"tcp:{port}:")
    d.config_path.write_text(text)
    d.port = port
    return d


def test_two_daemons_share_the_c2s_port_and_both_get_connections(tmp_path):
    first = Daemon(tmp_path / "first", c2s="reuse_port = true")
    second = shared(tmp_path, "second", first.port, reuse=True)
    clients = []
    try:
        for d in (first, second):
            d.start()
            d.adduser("u@localhost", PW)
        for i in range(CONNECTIONS):
            c = RawClient(first.port)
            c.login("u", PW, f"r{i}")
            clients.append(c)
        counts = [d.ctl("sessions").stdout.count("u@localhost/r") for d in (first, second)]
        assert sum(counts) == CONNECTIONS and min(counts) > 0, counts
    finally:
        for c in clients:
            c.close()
        for d in (first, second):
            if d.proc is not None:
                d.stop()


def test_without_reuse_port_the_second_daemon_refuses_to_start(tmp_path):
    first = Daemon(tmp_path / "first", c2s="reuse_port = true").start()
    try:
        second = shared(tmp_path, "second", first.port, reuse=False)
        second.start(wait=False)
        assert second.proc.wait(20) != 0
        assert f"c2s.listen = 'tcp:{first.port}:" in second.logtext()
        assert "cannot listen: address already in use" in second.logtext().lower()
    finally:
        first.stop()


def test_reuse_port_refuses_listeners_it_cannot_share():
    from xmppd.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="c2s.listen.*tcp: or tcp6:"):
        from_dict({"server": {"hosts": ["a.test"]},
                   "c2s": {"reuse_port": True, "listen": ["unix:/tmp/x.sock"], "listen_tls": []}})
    config = from_dict({"server": {"hosts": ["a.test"]}, "c2s": {"reuse_port": True}})
    assert config.c2s.reuse_port is True
    assert from_dict({"server": {"hosts": ["a.test"]}}).c2s.reuse_port is False

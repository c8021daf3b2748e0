"""Issue 19: the ``[metrics]`` OpenMetrics/Prometheus page, scraped from the running daemon.

Traffic goes through raw clients (exact stanza counts); the page is fetched
over HTTP and parsed with prometheus_client's own parser, and each counter is
checked to move by what the traffic should add.
"""
from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon import Daemon, free_port
from tests.rawclient import RawClient

PW = "pw-secret-1"
USERS = ["alice@localhost", "bob@localhost", "carol@localhost", "dave@localhost",
         "erin@other.test"]
YEAR = 365 * 86400
PLUGINS = ["roster", "presence", "disco", "ping", "version", "offline", "vcard",
           "urn:xmpp:blocking", "domain-filter"]


def scrape(port: int, path: str = "/metrics", accept: str | None = None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if accept:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.headers.get("Content-Type"), response.read().decode()


def samples(port: int) -> dict:
    """{(sample name, frozenset of labels): value} of one scrape."""
    _, text = scrape(port)
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(snapshot: dict, name: str, **labels) -> float:
    return snapshot.get((name, frozenset(labels.items())), 0.0)


def wait_for(port: int, name: str, expected: float, timeout: float = 10, **labels) -> dict:
    """Scrape until ``name{labels}`` reads ``expected`` (session ends are asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        snap = samples(port)
        if value(snap, name, **labels) == expected:
            return snap
        assert time.monotonic() < deadline, (name, labels, value(snap, name, **labels), expected)
        time.sleep(0.05)


@pytest.fixture(scope="module")
def md(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("metrics")
    mport = free_port()
    d = Daemon(tmp, hosts=("localhost", "other.test"), plugins=PLUGINS, extra=f"""
        [metrics]
        listen = "tcp:{mport}:interface=127.0.0.1"

        [limits]
        auth_failures_per_ip_account = 2

        [domain-filter]
        default = "BLACKLIST"
        domains = ["spam.example"]
        """)
    d.metrics_port = mport
    for u in USERS:
        d.adduser(u, PW)
    d.start()
    yield d
    d.stop()


def login(d, jid: str, resource: str = "r", presence: bool = True) -> RawClient:
    user, host = jid.split("@")
    c = RawClient(d.port, host=host)
    c.login(user, PW, resource)
    if presence:
        c.send("<presence/>")
        c.read_until(b"<presence[^>]*/>|</presence>")  # the server reflects it (RFC 6121 4.2.2)
    return c


def test_messages_in_and_out_and_sessions_per_host(md):
    port = md.metrics_port
    before = samples(port)
    alice, bob = login(md, "alice@localhost"), login(md, "bob@localhost")
    erin = login(md, "erin@other.test")
    snap = samples(port)
    assert value(snap, "xmppd_sessions", host="localhost") == value(before, "xmppd_sessions", host="localhost") + 2
    assert value(snap, "xmppd_sessions", host="other.test") == value(before, "xmppd_sessions", host="other.test") + 1
    # Three initial presences came in and each was reflected to its sender.
    assert value(snap, "xmppd_stanzas_received_total", kind="presence") - \
        value(before, "xmppd_stanzas_received_total", kind="presence") == 3
    assert value(snap, "xmppd_stanzas_sent_total", kind="presence") - \
        value(before, "xmppd_stanzas_sent_total", kind="presence") >= 3

    # 5 to a bare JID (the router's serialised path), 3 to a full JID (element path).
    for i in range(5):
        alice.send(f"<message to='bob@localhost' type='chat' id='a{i}'><body>hi {i}</body></message>")
    for i in range(3):
        bob.send(f"<message to='alice@localhost/r' type='chat' id='b{i}'><body>yo {i}</body></message>")
    for i in range(5):
        bob.read_until(f"<body>hi {i}</body></message>")
    for i in range(3):
        alice.read_until(f"<body>yo {i}</body></message>")
    after = samples(port)
    assert value(after, "xmppd_stanzas_received_total", kind="message") - \
        value(snap, "xmppd_stanzas_received_total", kind="message") == 8
    assert value(after, "xmppd_stanzas_sent_total", kind="message") - \
        value(snap, "xmppd_stanzas_sent_total", kind="message") == 8

    # An IQ to the server: one in, one out.
    alice.iq("<iq type='get' id='p1' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>", "p1")
    later = samples(port)
    assert value(later, "xmppd_stanzas_received_total", kind="iq") - \
        value(after, "xmppd_stanzas_received_total", kind="iq") == 1
    assert value(later, "xmppd_stanzas_sent_total", kind="iq") - \
        value(after, "xmppd_stanzas_sent_total", kind="iq") == 1

    # Logging out brings the gauge back down.
    n = value(later, "xmppd_sessions", host="localhost")
    alice.send("</stream:stream>")
    alice.close()
    wait_for(port, "xmppd_sessions", n - 1, host="localhost")
    erin.close()
    wait_for(port, "xmppd_sessions", value(before, "xmppd_sessions", host="other.test"),
             host="other.test")
    bob.close()
    wait_for(port, "xmppd_sessions", n - 2, host="localhost")


def test_blocked_contact_counts_as_refused_by_blocking(md):
    port = md.metrics_port
    carol, dave = login(md, "carol@localhost"), login(md, "dave@localhost")
    reply = carol.iq("<iq type='set' id='bl'><block xmlns='urn:xmpp:blocking'>"
                     "<item jid='dave@localhost'/></block></iq>", "bl")
    assert "type='result'" in reply
    before = samples(port)
    dave.send("<message to='carol@localhost' type='chat' id='m1'><body>let me in</body></message>")
    dave.read_until("<message[^>]*type='error'.*?</message>")
    carol.send("<message to='dave@localhost' type='chat' id='m2'><body>no</body></message>")
    carol.read_until("<message[^>]*type='error'.*?</message>")
    after = samples(port)
    assert value(after, "xmppd_stanzas_refused_total", filter="blocking", action="bounced") - \
        value(before, "xmppd_stanzas_refused_total", filter="blocking", action="bounced") == 2
    # Both were received; only their error replies went out.
    assert value(after, "xmppd_stanzas_received_total", kind="message") - \
        value(before, "xmppd_stanzas_received_total", kind="message") == 2
    assert value(after, "xmppd_stanzas_sent_total", kind="message") - \
        value(before, "xmppd_stanzas_sent_total", kind="message") == 2
    # The domain filter refuses what the blocklist would not see.
    carol.send("<message to='x@spam.example' type='chat' id='m3'><body>hello</body></message>")
    carol.read_until("<message[^>]*type='error'.*?</message>")
    final = samples(port)
    assert value(final, "xmppd_stanzas_refused_total", filter="domain-filter", action="bounced") - \
        value(after, "xmppd_stanzas_refused_total", filter="domain-filter", action="bounced") == 1
    assert value(final, "xmppd_stanzas_refused_total", filter="blocking", action="bounced") == \
        value(after, "xmppd_stanzas_refused_total", filter="blocking", action="bounced")
    carol.close()
    dave.close()


def test_store_writes_are_timed(md):
    port = md.metrics_port
    before = samples(port)
    carol = login(md, "carol@localhost", presence=False)
    reply = carol.iq("<iq type='set' id='bl2'><block xmlns='urn:xmpp:blocking'>"
                     "<item jid='spam.example'/></block></iq>", "bl2")
    assert "type='result'" in reply
    after = samples(port)
    assert value(after, "xmppd_store_write_seconds_count") > value(before, "xmppd_store_write_seconds_count")
    assert value(after, "xmppd_store_write_seconds_sum") > value(before, "xmppd_store_write_seconds_sum")
    carol.close()


def test_auth_outcomes_by_mechanism_and_connector_and_throttle(md):
    port = md.metrics_port
    ok = dict(mechanism="PLAIN", connector="internal")
    bad = dict(ok, condition="not-authorized")
    before = samples(port)
    login(md, "dave@localhost", presence=False).close()
    c = RawClient(md.port)
    c.open_stream()
    c.starttls()
    c.open_stream()
    assert b"not-authorized" in c.auth_plain("dave", "wrong-password")
    mid = samples(port)
    assert value(mid, "xmppd_auth_successes_total", **ok) - value(before, "xmppd_auth_successes_total", **ok) == 1
    assert value(mid, "xmppd_auth_failures_total", **bad) - value(before, "xmppd_auth_failures_total", **bad) == 1
    # A second failure reaches auth_failures_per_ip_account = 2: the throttle engages.
    assert b"not-authorized" in c.auth_plain("dave", "wrong-again")
    after = samples(port)
    mode = dict(mode="address+account")
    assert value(after, "xmppd_auth_throttle_engagements_total", **mode) - \
        value(mid, "xmppd_auth_throttle_engagements_total", **mode) == 1
    # Now refused before any exchange, with the mechanism the client asked for.
    reply = c.auth_plain("dave", PW)
    assert b"temporary-auth-failure" in reply, reply
    final = samples(port)
    wait = dict(ok, condition="temporary-auth-failure")
    assert value(final, "xmppd_auth_failures_total", **wait) - value(after, "xmppd_auth_failures_total", **wait) == 1
    c.close()


def test_certificate_expiry_per_host_and_page_formats(md):
    port = md.metrics_port
    snap = samples(port)
    for host in ("localhost", "other.test"):
        left = value(snap, "xmppd_certificate_expiry_seconds", host=host)
        # The generated self-signed certificate lives a year from start-up.
        assert YEAR - 3600 < left <= YEAR, (host, left)
    # OpenMetrics when asked for, ending in # EOF; 404 for any other path.
    ctype, text = scrape(port, accept="application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text") and text.endswith("# EOF\n")
    with pytest.raises(urllib.error.HTTPError) as e:
        scrape(port, "/")
    assert e.value.code == 404
    # No JID or address is a label value anywhere on the page.
    _, text = scrape(port)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            for label in s.labels.values():
                assert "@" not in label and "127.0.0.1" not in label, s


def listening_ports(pid: int) -> set[int]:
    """TCP ports the process ``pid`` listens on (its sockets matched in /proc/net/tcp*)."""
    import os

    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_metrics_off_by_default_nothing_else_listens(tmp_path):
    d = Daemon(tmp_path).start()
    try:
        assert listening_ports(d.proc.pid) == {d.port}
    finally:
        d.stop()


def test_metrics_listener_that_cannot_bind_stops_start_up(tmp_path):
    mport = free_port()
    d = Daemon(tmp_path, extra=f"""
        [metrics]
        listen = "tcp:{mport}:interface=127.0.0.1"
        """)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", mport))
    blocker.listen()
    try:
        d.start(wait=False)
        assert d.proc.wait(timeout=30) != 0
        log = d.logtext()
        lines = [line for line in log.splitlines() if line.startswith("xmppd:")]
        assert lines == [f"xmppd: {d.config_path}: metrics.listen = 'tcp:{mport}:interface=127.0.0.1': "
                         "cannot listen: address already in use"], log
        assert "xmppd serving" not in log and "Traceback" not in log
    finally:
        blocker.close()
        d.stop()


@pytest.mark.parametrize("table, key", [
    ('listen = "tcp:99999"', "metrics.listen = 'tcp:99999'"),
    ('listen = 9279', "metrics.listen = 9279"),
    ('port = 9279', "metrics.port = 9279"),
])
def test_bad_metrics_config_is_refused_by_check(tmp_path, table, key):
    d = Daemon(tmp_path, extra=f"[metrics]\n{table}\n")
    r = d.ctl("check", check=False)
    assert r.returncode == 1 and key in r.stdout + r.stderr, r.stdout + r.stderr

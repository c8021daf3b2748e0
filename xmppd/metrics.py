"""``[metrics]``: an optional OpenMetrics/Prometheus page on ``twisted.web``.

Off unless ``[metrics] listen`` names an endpoint.  The page is served at
``/metrics`` in the Prometheus text format, or in OpenMetrics when the
scraper asks for it (``Accept``); every other path is 404.

Why the counting is done the way it is: at saturation xmppd spends ~15 µs of
CPU per delivered message, and a ``prometheus_client`` ``Counter.inc()`` (a
lock and a float add, with a label look-up) per stanza in and out would cost
5–10 % of it.  So nothing on the hot path calls prometheus_client: the parts
keep plain integer counters on objects they already have (the router's
session and refusal counts, the throttle's engagements, the c2s module's
stanza and SASL tables), and :class:`ServerCollector` turns them into metric
families only when the page is scraped.  Stanzas are counted only when this
section is configured (``xmppd.c2s.MeteredC2SStream``), so a server without
metrics pays nothing.  The one prometheus_client metric updated as things
happen is the store-write histogram: a write is an fsync'd SQLite
transaction, milliseconds next to which the histogram's lock is nothing.

The page is rendered in the reactor thread, not in the thread pool
prometheus_client's own Twisted resource uses: the collector reads the
server's live dicts, which only the reactor thread may walk.  A scrape is a
few dozen series and costs well under a millisecond of reactor time.

No label takes a value from the network: hosts come from the config,
mechanisms and connectors from the server's own sets, filter names and SASL
conditions from the code.  No JID or address is ever a label.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Iterator

from twisted.logger import Logger

from xmppd.config import Config, endpoint
from xmppd.logfilter import log_observer

if TYPE_CHECKING:
    from xmppd.core import Server

log = Logger(observer=log_observer)

# Buckets of the store-write histogram, seconds: a WAL commit with
# synchronous=FULL is one fsync, ~0.1–10 ms on most disks; the tail shows a
# slow or busy disk (busy_timeout is 5 s).
WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True)
class MetricsSettings:
    """``[metrics]``: where the page listens."""

    listen: str


def settings(config: Config) -> MetricsSettings | None:
    """``[metrics]`` of ``config``, or None when metrics are off (the default)."""
    sec = config.section("metrics")
    listen = endpoint(sec, "listen", None)
    sec.reject_unknown()
    if listen is None:
        return None
    interface = _interface(listen)
    if interface is not None and not _loopback(interface):
        log.warn("{key} = {value!r} is not on a loopback interface: anyone who can reach it "
                 "reads the server's metrics (host names, session and login counts)",
                 key=sec.key("listen"), value=listen)
    return MetricsSettings(listen)


def _interface(description: str) -> str | None:
    """The address a TCP endpoint binds ("" for every interface), None for other kinds."""
    from twisted.internet import endpoints, reactor

    ep = endpoints.serverFromString(reactor, description)
    if not isinstance(ep, (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint)):
        return None  # a UNIX socket is guarded by its file mode
    return getattr(ep, "_interface", "") or ""


def _loopback(interface: str) -> bool:
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False  # "" (every interface)


# -- the collector ---------------------------------------------------------------


class ServerCollector:
    """Reads the server's plain counters at scrape time (a prometheus_client collector)."""

    def __init__(self, server: "Server") -> None:
        self.server = server

    def describe(self) -> list:
        # Nothing to check at registration: the names are this module's own.
        return []

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from xmppd import c2s

        server = self.server
        router = server.router

        sessions = GaugeMetricFamily(
            "xmppd_sessions", "Bound client sessions (resources), per virtual host.",
            labels=["host"])
        for host in server.config.hosts:
            sessions.add_metric([host], router.session_counts.get(host, 0))
        yield sessions

        received = CounterMetricFamily(
            "xmppd_stanzas_received", "Stanzas received from bound client sessions, by kind.",
            labels=["kind"])
        sent = CounterMetricFamily(
            "xmppd_stanzas_sent", "Stanzas handed to client sessions for sending, by kind.",
            labels=["kind"])
        by_byte = c2s.STANZAS_SENT_BYTES
        for kind in ("message", "presence", "iq"):
            received.add_metric([kind], c2s.STANZAS_RECEIVED[kind])
            sent.add_metric([kind], c2s.STANZAS_SENT[kind] + by_byte[ord(kind[0])])
        yield received
        yield sent

        if server.s2s is not None:
            # Per direction and state only: remote domains are not labels
            # (any server on the internet could add one).
            links = GaugeMetricFamily(
                "xmppd_s2s_connections", "Server-to-server streams, by direction and state.",
                labels=["direction", "state"])
            counts = {(d, st): 0 for d in ("in", "out") for st in ("established", "negotiating")}
            for link in server.s2s.describe():
                key = (link.get("direction", "?"), link.get("state", "?"))
                counts[key] = counts.get(key, 0) + 1
            for (direction, state), n in sorted(counts.items()):
                links.add_metric([direction, state], n)
            yield links

        refused = CounterMetricFamily(
            "xmppd_stanzas_refused",
            "Stanzas refused by a filter of the router's chain: bounced with an error "
            "or dropped silently.", labels=["filter", "action"])
        names = [getattr(f, "name", type(f).__name__) for f in router.filters]
        counts = dict(router.refusals)
        for name in names:  # every filter shows, refused or not
            for action in ("bounced", "dropped"):
                counts.setdefault((name, action), 0)
        for (name, action), n in sorted(counts.items()):
            refused.add_metric([name, action], n)
        yield refused

        successes = CounterMetricFamily(
            "xmppd_auth_successes", "Successful SASL authentications.",
            labels=["mechanism", "connector"])
        failures = CounterMetricFamily(
            "xmppd_auth_failures",
            "Failed SASL exchanges, by the SASL failure condition sent.",
            labels=["mechanism", "connector", "condition"])
        for (mechanism, connector, condition), n in sorted(c2s.AUTH_OUTCOMES.items()):
            if condition:
                failures.add_metric([mechanism, connector, condition], n)
            else:
                successes.add_metric([mechanism, connector], n)
        yield successes
        yield failures

        if server.throttle is not None:
            throttle = CounterMetricFamily(
                "xmppd_auth_throttle_engagements",
                "Times a login-throttle key reached its failure limit, by throttle mode.",
                labels=["mode"])
            for counter in server.throttle.counters():
                throttle.add_metric([counter.kind], counter.engaged)
            yield throttle

        expiry = GaugeMetricFamily(
            "xmppd_certificate_expiry_seconds",
            "Seconds until the certificate served for the host expires (negative once expired).",
            labels=["host"])
        now = datetime.now(timezone.utc)
        try:
            infos = server.certs.describe(now)
        except Exception:  # noqa: BLE001 -- a broken store must not break the page
            log.failure("metrics: cannot describe the certificates")
            infos = []
        for info in infos:
            expiry.add_metric([info.host], (info.not_after - now).total_seconds())
        yield expiry


# -- the web page ---------------------------------------------------------------


def site(server: "Server"):
    """The ``twisted.web`` site of the page, with its registry; hooks the store's timer.

    twisted.web and prometheus_client are imported here, so a server
    without ``[metrics]`` never loads them.
    """
    from prometheus_client import CollectorRegistry, Histogram, PlatformCollector, ProcessCollector

    from xmppd.metricspage import MetricsPage, MetricsSite

    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)  # CPU, memory, descriptors of this process
    PlatformCollector(registry=registry)  # python_info
    registry.register(ServerCollector(server))
    writes = Histogram("xmppd_store_write_seconds",
                       "Time of each write transaction of the embedded store (lock wait included).",
                       buckets=WRITE_BUCKETS, registry=registry)
    if hasattr(server.store, "observe_write"):
        server.store.observe_write = writes.observe
    return MetricsSite(MetricsPage(registry))

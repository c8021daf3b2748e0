"""The running server: config, store, router, connectors, certificates, plugins.

One :class:`Server` object is built at start-up from the validated config
and handed to every listener and plugin; it is the only place where the
parts are wired together.
"""
from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from xmppd.auth.base import IAuthConnector
from xmppd.config import Config
from xmppd.jid import JID
from xmppd.registry import load_plugin
from xmppd.router import Router
from xmppd.storage import IAsyncKeyValueStore, IKeyValueStore, as_async
from xmppd.logfilter import log_observer

log = Logger(observer=log_observer)


class Server:
    """Everything a stream or a plugin may need, built once."""

    def __init__(
        self, config: Config, store: IKeyValueStore | IAsyncKeyValueStore | None = None, clock: Any = None,
        certs: Any = None, connectors: dict[str, IAuthConnector] | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        from xmppd import metrics

        self.config = config
        self.clock = clock
        # [metrics]: None when off (the default); read before any listener exists.
        self.metrics = metrics.settings(config)
        # The server always sees the asynchronous face (xmppd.storage); an
        # embedded store given by a test or a tool is wrapped.
        if store is None:
            from xmppd.storeconfig import open_store

            store = open_store(config, clock)
        self.store = as_async(store)
        self.router = Router(config.hosts)
        self.connectors: dict[str, IAuthConnector] = (
            connectors if connectors is not None
            else build_connectors(config, self.store, self.clock))
        self.router.user_exists = self._user_exists
        # Requests the server itself sends (caps resolution); answers come
        # back through the router (xmppd.iqtracker).
        from xmppd.iqtracker import IQTracker

        self.iq_tracker = IQTracker(self.router, clock)
        self.router.iq_responses = self.iq_tracker.response
        self.throttle = self._build_throttle()
        self.certs = certs if certs is not None else self._build_certs()
        self.s2s = None
        if config.s2s is not None and config.s2s.enabled:
            from xmppd.s2s.service import S2SService

            self.s2s = S2SService(self, config.s2s)
        # Client-stream extensions declared by plugins (XEP-0198, XEP-0352):
        # top-level elements of a non-client namespace, by (uri, name) ->
        # handler(stream, element), reached only off the stanza path; and
        # stream features offered after authentication, as callables
        # (stream) -> element or None.
        self.c2s_elements: dict[tuple[str, str], Any] = {}
        self.c2s_features: list[Any] = []
        # Admin socket commands added by plugins (xmppd.admin), by name ->
        # callable(**args) returning JSON-able data or a Deferred of it.
        self.admin_commands: dict[str, Any] = {}
        self.plugins = []
        for name in config.plugins:
            plugin = load_plugin(name, config.path)
            plugin.attach(self)
            self.plugins.append(plugin)
        # After the plugins: components list themselves in the disco plugin.
        from xmppd.components import Components

        self.components = Components(self)
        # [cluster] (xmppd.cluster): None for a stand-alone node.  Its
        # login_gate says why a login must wait (Redis unreachable).
        self.login_gate = None
        from xmppd.cluster import attach as attach_cluster

        self.cluster = attach_cluster(self)

    # -- wiring ----------------------------------------------------------------

    def _build_throttle(self, config: Config | None = None):
        """The login throttle of ``[limits]`` (docs/auth.rst, "Brute-force protection").

        ``config``: another config than the running one (a reload builds the
        new throttle from it before anything is swapped).
        """
        from xmppd.auth.throttle import DEFAULT_IPV6_PREFIX, DEFAULT_MAX_ENTRIES, LoginThrottle

        sec = (config or self.config).section("limits")
        per_ip_account = sec.int("auth_failures_per_ip_account", 10, minimum=0)
        per_account = sec.int("auth_failures_per_account", 100, minimum=0)
        prefix = sec.int("auth_ipv6_prefix", DEFAULT_IPV6_PREFIX, minimum=1)
        if prefix > 128:
            raise sec.error("auth_ipv6_prefix", prefix, "must be an integer from 1 to 128")
        if 0 < per_account <= per_ip_account:
            log.warn(
                "{key} = {value} is not above auth_failures_per_ip_account = {pair}: anyone "
                "who knows a JID can lock that account out from every address with that many "
                "wrong passwords; the per-account limit is a last resort (default 100)",
                key=sec.key("auth_failures_per_account"), value=per_account, pair=per_ip_account,
            )
        return LoginThrottle(
            per_ip_account=per_ip_account,
            per_ip=sec.int("auth_failures_per_ip", 20, minimum=0),
            per_account=per_account,
            window=sec.number("auth_failure_window", 300.0, minimum=1),
            ipv6_prefix=prefix,
            max_entries=sec.int("auth_throttle_max_entries", DEFAULT_MAX_ENTRIES, minimum=100),
            clock=self.clock,
        )

    def _build_certs(self):
        store = build_cert_store(self.config)
        store.load()  # logs its own warnings
        return store

    # -- services used by streams and plugins -----------------------------

    def connector_for(self, host: str) -> IAuthConnector:
        return self.connectors[host]

    def _user_exists(self, to: JID):
        return self.connector_for(to.host).user_exists(to.user, to.host)

    def disco_features(self) -> list[str]:
        out = []
        for p in self.plugins:
            out.extend(p.features)
        out.extend(self.components.server_features())
        return out

    def plugin(self, name: str):
        for p in self.plugins:
            if p.name == name:
                return p
        return None

    def reload(self):
        """SIGHUP / ``xmppctl reload``: the config's reloadable keys, then certificates.

        A config file that start-up would refuse changes nothing, not even the
        certificates (:mod:`xmppd.reconfig`).  Returns a
        :class:`~xmppd.reconfig.ReloadOutcome`.
        """
        from xmppd.reconfig import reload_config

        outcome = reload_config(self)
        if outcome.error is None:
            outcome.certificates = self.certs.reload()
            for message in outcome.certificates:
                log.info("certificates: {message}", message=message)
        return outcome

    def close(self) -> None:
        self.iq_tracker.cancel_all()
        self.components.stop()
        for plugin in self.plugins:
            close = getattr(plugin, "close", None)
            if close is not None:  # e.g. the archive writes what it buffered
                try:
                    close()
                except Exception:
                    log.failure("closing plugin {name} failed", name=plugin.name)
        self.store.close()


def build_connectors(config: Config, store: IKeyValueStore, reactor: Any) -> dict[str, IAuthConnector]:
    """
    One connector per served host (``[auth]``, or ``[hosts."x".auth]`` where
    given; hosts without their own table share one).  The daemon and
    ``xmppctl`` both build them here, so both refuse the same tables.
    """
    from xmppd.auth.factory import build_connector

    default = build_connector(config.auth.table, config.path, "auth", store, reactor)
    connectors = {}
    for host in config.hosts:
        section = config.host_sections.get(host)
        table = section.table.get("auth") if section is not None else None
        if table is not None:
            connectors[host] = build_connector(
                table, config.path, f'hosts."{host}".auth', store, reactor
            )
        else:
            connectors[host] = default
    return connectors


def build_cert_store(config: Config, generate: bool = True):
    """The certificate store described by ``[tls]`` and ``[hosts.*.tls]`` (not loaded)."""
    from xmppd.certs import CertificateStore, ClientCertPolicy, TLSPolicy
    from xmppd.components.settings import public_domains

    tls = config.tls
    explicit = {}
    for host, section in config.host_sections.items():
        t = section.table_of("tls")
        cert = t.str("cert", None)
        if cert is not None:
            explicit[host] = (cert, t.str("key", None))
    default_cert = (tls.default_cert, tls.default_key) if tls.default_cert else None
    client_certs = {}
    for host in config.hosts:
        c = config.client_cert(host)
        if c.enabled:
            client_certs[host] = ClientCertPolicy(mode=c.mode, ca=c.ca, crl=c.crl,
                                                  system=c.ca_system)
    return CertificateStore(
        hosts=list(config.hosts), data_dir=config.data_dir,
        certs_dir=tls.certs_dir, letsencrypt_dir=tls.letsencrypt_dir,
        explicit=explicit, default_cert=default_cert,
        policy=TLSPolicy(min_version=tls.min_version, ciphers=tls.ciphers, groups=tls.groups),
        default_host=config.default_host, client_certs=client_certs, generate=generate,
        names=public_domains(config),
    )

"""The s2s service: the router's way to other servers, and theirs to us.

Built once at start-up from ``[s2s]`` (:mod:`xmppd.s2s.settings`), it owns

* the outgoing links, one per (local domain, remote domain) pair
  (:class:`~xmppd.s2s.outbound.OutboundLink`), created on the first stanza
  and dropped when idle;
* the incoming streams (:mod:`xmppd.s2s.inbound`) and their per-domain
  count;
* the dialback keys, the peer trust store, the TLS contexts and the DNS
  resolver.

The router calls :meth:`send` for every destination it does not host
(after its filter chain ran, as for local ones); the local side of a link
is the sender's domain: a served host or a public component domain
(:meth:`federates`).  Stanzas arriving from an
authenticated peer enter :meth:`Router.deliver` through :meth:`inbound`,
exactly where a local client's stanzas enter it, so the blocking command,
the domain filter and every plugin see them.  Bounces are built here for
stanzas that cannot leave (``remote-server-not-found`` /
``-timeout``), once per stanza, never for errors, results or presence.
"""
from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.words.xish import domish

from xmppd import jid as jidlib
from xmppd.jid import JID
from xmppd.s2s.common import s2s_limits
from xmppd.s2s.dialback import DialbackKeys, load_secret
from xmppd.s2s.inbound import InboundFactory
from xmppd.s2s.outbound import MAX_PENDING_VERIFY, OutboundLink, OutboundStream
from xmppd.s2s.resolve import Resolver
from xmppd.s2s.settings import S2SConfig
from xmppd.s2s.tls import PeerTrust, S2STLS
from xmppd.stanzas import StanzaError, error_reply
from xmppd.logfilter import log_observer

log = Logger(observer=log_observer)

#: Domain pairs whose last link failed, remembered for [s2s] retry_delay.
MAX_FAILED_PAIRS = 10000


class S2SService:
    """Federation for one server; see the module docstring."""

    def __init__(self, server: Any, config: S2SConfig, reactor: Any = None,
                 resolver: Resolver | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.server = server
        self.config = config
        self.reactor = reactor
        self.limits, self.preauth_limits = s2s_limits(config)
        # [s2s.domains."x"] max_stanza_size: that domain's own post-authentication limits.
        self._domain_limits = {
            domain: replace(self.limits, stanza_size=d.max_stanza_size)
            for domain, d in config.domains.items() if d.max_stanza_size != config.max_stanza_size
        }
        self._keys: DialbackKeys | None = None  # read from the data dir at first use
        try:
            self.trust = PeerTrust(config.ca_file, config.ca_dir, config.ca_system)
        except (OSError, ValueError) as e:
            from xmppd.config import ConfigError

            key = "s2s.ca_dir" if config.ca_dir and config.ca_dir in str(e) else "s2s.ca_file"
            value = config.ca_dir if key == "s2s.ca_dir" else config.ca_file
            raise ConfigError(server.config.path, key, value,
                              f"cannot read trust anchors: {getattr(e, 'strerror', None) or e}") from None
        from xmppd.certs import TLSPolicy

        tls = server.config.tls
        policy = TLSPolicy(min_version=tls.min_version, ciphers=tls.ciphers, groups=tls.groups)
        self.tls = S2STLS(server.certs, policy, server.config.default_host)
        self._resolver = resolver  # built at first use (it schedules resolv.conf re-reads)
        self.links: dict[tuple[str, str], OutboundLink] = {}
        self.inbound_streams: set = set()
        self._inbound_count: dict[str, int] = {}
        # [s2s] max_unauthenticated_inbound: incoming streams not yet authenticated.
        self.unauthenticated = 0
        self._refusing = False  # refusals since the last admission (logged once)
        # [s2s] max_connecting_domains: links resolving, connecting or
        # negotiating; the others wait in line (their stanzas for at most
        # queue_timeout, as any queued stanza).
        self.connecting_links: set[OutboundLink] = set()
        self._waiting_links: deque[OutboundLink] = deque()
        self._starting_waiting = False  # end_connecting's loop is running (no recursion)
        # (local, remote) -> (until, reason): recent failures, so that a
        # dead domain is not hammered with one attempt per stanza.
        self._failed: dict[tuple[str, str], tuple[float, str]] = {}
        server.router.remote = self.send
        self._idle = task.LoopingCall(self._housekeeping)
        # Outstanding XEP-0199 pings of our links: iq id -> link.
        self._pings: dict[str, OutboundLink] = {}
        self._ping_serial = 0
        self._idle.clock = server.clock

    @property
    def resolver(self) -> Resolver:
        if self._resolver is None:
            self._resolver = Resolver(self.config.dns_timeout, self.config.nameservers)
        return self._resolver

    @property
    def keys(self) -> DialbackKeys:
        if self._keys is None:
            from xmppd.storeconfig import store_dir

            # Shared by the nodes of a cluster that share the store's directory.
            self._keys = DialbackKeys(load_secret(store_dir(self.server.config)))
        return self._keys

    def start(self) -> None:
        self.keys  # noqa: B018 -- create the secret now, not at the first dialback
        cfg = self.config
        periods = [60.0, cfg.idle_timeout / 4]
        if cfg.ping_interval:
            periods += [cfg.ping_interval / 2, cfg.ping_timeout / 2]
        self._idle.start(max(1.0, min(periods)), now=False)

    def stop(self) -> None:
        if self._idle.running:
            self._idle.stop()
        for link in list(self.links.values()):
            link.close()
        for stream in list(self.inbound_streams):
            stream.close()

    # -- listeners ----------------------------------------------------------------

    def listeners(self) -> list[tuple[str, str, Any]]:
        out = [("s2s.listen", desc, InboundFactory(self)) for desc in self.config.listen]
        if self.config.listen_tls:
            direct = self.tls.direct_tls_factory(InboundFactory(self, direct_tls=True))
            out += [("s2s.listen_tls", desc, direct) for desc in self.config.listen_tls]
        return out

    # -- policy -------------------------------------------------------------------

    def federates(self, domain: str) -> bool:
        """Is ``domain`` a local side of federation: a served host or a *public* component?

        Private components (``[components."x"] public = false``) are not:
        other servers are told they are unknown here, and what they send is
        never federated.  ``router.components`` is filled once at start-up,
        so this is two dict look-ups per call.
        """
        router = self.server.router
        if domain in router.hosts:
            return True
        component = router.components.get(domain)
        return component is not None and component.public

    def refuse_domain(self, domain: str) -> str | None:
        """Why ``domain`` may not federate with us at all, or None."""
        if domain in self.config.blocked_domains:
            return f"{domain} is blocked by this server's policy"
        if domain in self.server.router.hosts or domain in self.server.router.components:
            return f"{domain} is served here"
        return None

    def limits_for(self, domain: str | None):
        """Parser limits of an authenticated stream from ``domain``."""
        return self._domain_limits.get(domain, self.limits) if domain else self.limits

    def admit_inbound(self, domain: str) -> bool:
        count = self._inbound_count.get(domain, 0)
        if count >= self.config.connections_for(domain):
            return False
        self._inbound_count[domain] = count + 1
        return True

    def admit_unauthenticated(self, peer: str) -> bool:
        """One more incoming stream that has not authenticated; False over the cap."""
        if self.unauthenticated >= self.config.max_unauthenticated_inbound:
            if not self._refusing:
                self._refusing = True
                log.warn("s2s in {peer}: refused: {n} incoming connections are not authenticated yet"
                         " ([s2s] max_unauthenticated_inbound); refusing more until one is",
                         peer=peer, n=self.unauthenticated)
            return False
        self._refusing = False
        self.unauthenticated += 1
        return True

    def release_unauthenticated(self) -> None:
        self.unauthenticated -= 1

    def begin_connecting(self, link: OutboundLink) -> bool:
        """May ``link`` start resolving and connecting now?  If not, it waits its turn."""
        if link in self.connecting_links:
            return True
        if len(self.connecting_links) < self.config.max_connecting_domains:
            self.connecting_links.add(link)
            return True
        if not link.waiting_turn:
            link.waiting_turn = True
            if not self._waiting_links:
                log.info("s2s out {local} -> {remote}: {n} remote domains are being connected"
                         " ([s2s] max_connecting_domains); waiting for one", local=link.local,
                         remote=link.remote, n=len(self.connecting_links))
            self._waiting_links.append(link)
        return False

    def end_connecting(self, link: OutboundLink) -> None:
        """``link`` is set up or gave up: the next waiting link (if any) starts."""
        if link not in self.connecting_links:
            return
        self.connecting_links.discard(link)
        if self._starting_waiting:
            return  # a link that failed at once while this loop started it
        self._starting_waiting = True
        try:
            waiting = self._waiting_links
            while waiting and len(self.connecting_links) < self.config.max_connecting_domains:
                nxt = waiting.popleft()
                nxt.waiting_turn = False
                if self.links.get((nxt.local, nxt.remote)) is not nxt:
                    continue
                if len(nxt.queue) or nxt.verify_waiting:
                    nxt.start()
                else:
                    self.link_idle(nxt)  # everything it held expired while it waited
        finally:
            self._starting_waiting = False

    def release_inbound(self, domain: str) -> None:
        count = self._inbound_count.get(domain, 0) - 1
        if count > 0:
            self._inbound_count[domain] = count
        else:
            self._inbound_count.pop(domain, None)

    # -- stanzas out ------------------------------------------------------------------

    def send(self, stanza: domish.Element, to: JID) -> None:
        """The router's hand-off for a destination it does not host (filters already ran)."""
        try:
            sender = jidlib.parse(stanza.getAttribute("from") or "")
        except jidlib.InvalidJID:
            sender = None
        if sender is not None:
            link = self.links.get((sender.host, to.host))
            if link is not None:
                # A link exists only for a pair that passed the checks below
                # (federates, refuse_domain: fixed at start-up).
                link.send(stanza)
                return
        if sender is None or not self.federates(sender.host):
            if sender is not None and sender.host in self.server.router.components:
                # A private component: local users only, nothing leaves for it.
                self.bounce(stanza, "service-unavailable",
                            f"{sender.host} does not federate (public = false)")
                return
            # Never relay between two other servers.
            log.info("s2s: dropped a <{name}/> to {to} whose sender is not local",
                     name=stanza.name, to=to.host)
            return
        refusal = self.refuse_domain(to.host)
        if refusal:
            self.bounce(stanza, "remote-server-not-found", refusal)
            return
        key = (sender.host, to.host)
        link = self.links.get(key)
        if link is None:
            recent = self.recent_failure(key)
            if recent is not None:
                self.bounce(stanza, "remote-server-not-found", recent)
                return
            link = self.links[key] = OutboundLink(self, sender.host, to.host)
        link.send(stanza)

    def recent_failure(self, key: tuple[str, str]) -> str | None:
        """Why the last link for ``key`` failed, while ``retry_delay`` has not passed."""
        failed = self._failed.get(key)
        if failed is None:
            return None
        until, reason = failed
        if self.server.clock.seconds() < until:
            return f"{reason} (not retried for {self.config.retry_delay:g} s)"
        del self._failed[key]
        return None

    def link_failed(self, link: OutboundLink, reason: str) -> None:
        if self.config.retry_delay <= 0:
            return
        failed = self._failed
        if len(failed) >= MAX_FAILED_PAIRS:
            now = self.server.clock.seconds()
            for key in [k for k, (until, _r) in failed.items() if until <= now]:
                del failed[key]
            while len(failed) >= MAX_FAILED_PAIRS:
                del failed[next(iter(failed))]
        failed[(link.local, link.remote)] = (self.server.clock.seconds() + self.config.retry_delay, reason)

    def bounce(self, stanza: domish.Element, condition: str, text: str | None = None) -> None:
        """The error reply to a stanza that could not leave, to its (local) sender."""
        if stanza.name == "presence":
            return  # RFC 6121 keeps presence best-effort; no error storms at login
        kind = stanza.getAttribute("type")
        if stanza.name == "iq" and kind not in ("get", "set"):
            return
        reply = error_reply(stanza, StanzaError(condition, text=text))
        if reply is None:
            return
        try:
            to = jidlib.parse(reply["to"])
        except (KeyError, jidlib.InvalidJID):
            return
        if self.server.router.is_local(to):  # a local user or a component
            self.server.router.send_from_server(reply, to)

    # -- stanzas in ---------------------------------------------------------------------

    def inbound(self, stanza: domish.Element, sender: JID, to: JID) -> None:
        """An authenticated peer's stanza, addressed to one of our hosts or public components."""
        if self._pings and stanza.name == "iq" and stanza.getAttribute("type") in ("result", "error") \
                and self._pong(stanza, sender, to):
            return
        self.server.router.deliver(stanza, sender, to)

    # -- dialback verification (we are the receiving server) ------------------------------

    def verify_dialback(self, local: str, remote: str, stream_id: str, key: str) -> defer.Deferred:
        """Ask ``remote``'s authoritative server about ``key``: "valid", "invalid" or a reason."""
        link = self.links.get((local, remote))
        if link is None:
            recent = self.recent_failure((local, remote))
            if recent is not None:
                return defer.succeed(recent)
            link = self.links[(local, remote)] = OutboundLink(self, local, remote)
        d: defer.Deferred = defer.Deferred()
        stream = link.stream or link.connecting
        sent = len(stream.verify_sent) if stream is not None else 0
        if len(link.verify_waiting) + sent >= MAX_PENDING_VERIFY:
            d.callback("too many dialback requests pending")
            return d
        entry = (stream_id, key, d)
        d.addTimeout(self.config.auth_timeout, self.server.clock,
                     onTimeoutCancel=lambda *_: "authoritative server did not answer in time")
        if stream is not None and stream.verify_ready:
            self._send_verify(link, stream, entry)
        else:
            link.verify_waiting.append(entry)
            link.start()
        return d

    def _send_verify(self, link: OutboundLink, stream: OutboundStream, entry) -> None:
        stream_id, key, d = entry
        if d.called:
            return
        stream.verify_sent[stream_id] = d
        stream.send_verify(
            f"<db:verify from='{link.local}' to='{link.remote}' id='{domish.escapeToXml(stream_id, True)}'>"
            f"{domish.escapeToXml(key)}</db:verify>".encode())

    def flush_verifies(self, stream: OutboundStream) -> None:
        link = stream.link
        waiting, link.verify_waiting = link.verify_waiting, []
        for entry in waiting:
            self._send_verify(link, stream, entry)

    def verify_answered(self, stream: OutboundStream, el: domish.Element) -> None:
        link = stream.link
        if el.getAttribute("from") != link.remote or el.getAttribute("to") != link.local:
            log.info("s2s out {local} -> {remote}: db:verify answer for other domains ignored",
                     local=link.local, remote=link.remote)
            return
        d = stream.verify_sent.pop(el.getAttribute("id", ""), None)
        if d is None or d.called:
            return
        kind = el.getAttribute("type")
        d.callback(kind if kind in ("valid", "invalid") else "authoritative server answered with an error")

    def verifies_lost(self, stream: OutboundStream) -> None:
        link = stream.link
        sent, stream.verify_sent = stream.verify_sent, {}
        waiting = []
        if link.stream is None and link.connecting is None:
            waiting, link.verify_waiting = link.verify_waiting, []
        for d in list(sent.values()) + [entry[2] for entry in waiting]:
            if not d.called:
                d.callback(f"connection to {link.remote} lost")

    def link_idle(self, link: OutboundLink) -> None:
        """A link without a stream: drop it when nothing waits on it."""
        if link.stream is not None or link.connecting is not None or link.attempt is not None:
            return
        if link.waiting_turn:
            return  # in line for a connection slot (end_connecting decides)
        if link.verify_waiting:
            for _sid, _key, d in link.verify_waiting:
                if not d.called:
                    d.callback(link.last_failure.reason if link.last_failure else "no connection")
            link.verify_waiting = []
        if len(link.queue):
            return
        if self.links.get((link.local, link.remote)) is link:
            del self.links[(link.local, link.remote)]

    def _housekeeping(self) -> None:
        """Close idle streams; ping our links (XEP-0199) and drop those that do not answer."""
        now = self.server.clock.seconds()
        cfg = self.config
        limit = cfg.idle_timeout
        for link in list(self.links.values()):
            stream = link.stream
            if stream is None:
                continue
            if now - link.last_used > limit:
                log.info("s2s out {local} -> {remote}: idle, closing", local=link.local, remote=link.remote)
                self.forget_ping(link)
                stream.close()
            elif link.ping_id is not None:
                if now - link.ping_sent > cfg.ping_timeout:
                    log.info("s2s out {local} -> {remote}: no answer to a ping in {t:g} s, dropping the link",
                             local=link.local, remote=link.remote, t=cfg.ping_timeout)
                    self.forget_ping(link)
                    stream.abort()
            elif cfg.ping_interval and now - link.alive > cfg.ping_interval:
                self._ping(link, stream, now)
        for stream in list(self.inbound_streams):
            if now - stream.last_active > limit:
                log.info("s2s in {peer}: idle, closing", peer=stream.peer)
                stream.close()

    def _ping(self, link: OutboundLink, stream: OutboundStream, now: float) -> None:
        self._ping_serial += 1
        ident = f"s2s-ping-{self._ping_serial}"
        link.ping_id, link.ping_sent = ident, now
        self._pings[ident] = link
        stream.send_bytes(f"<iq type='get' id='{ident}' from='{link.local}' to='{link.remote}'>"
                          "<ping xmlns='urn:xmpp:ping'/></iq>".encode())

    def forget_ping(self, link: OutboundLink) -> None:
        if link.ping_id is not None:
            self._pings.pop(link.ping_id, None)
            link.ping_id = None

    def _pong(self, stanza: domish.Element, sender: JID, to: JID) -> bool:
        """An answer to one of our pings (any answer, errors too, shows the peer is there)."""
        link = self._pings.get(stanza.getAttribute("id", ""))
        if link is None or link.remote != sender.host or link.local != to.host or to.user is not None:
            return False
        del self._pings[link.ping_id]
        link.ping_id = None
        link.alive = self.server.clock.seconds()
        return True

    # -- status for xmppctl s2s / status (the admin socket) ------------------------------

    def describe(self) -> list[dict]:
        out = []
        for link in self.links.values():
            for stream in (link.stream, link.connecting):
                if stream is not None:
                    out.append(stream.describe())
            if link.stream is None and link.connecting is None:
                out.append({"direction": "out", "peer": "", "pairs": [f"{link.local}->{link.remote}"],
                            "tls": "none", "auth": "none", "state": "connecting",
                            "queued": len(link.queue)})
        out.extend(stream.describe() for stream in self.inbound_streams)
        return out

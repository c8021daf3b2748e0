"""Domain-based packet filtering in the router's filter chain (``domain-filter``).

The policies and their rule syntax are in :mod:`xmppd.filtering`.  This
plugin holds them in memory and enforces them on every stanza that crosses
:meth:`Router.deliver` (client stanzas, presence broadcasts and probes,
subscription handling), in both directions:

* the *sender's* filter is checked against the recipient (outbound), for
  senders that are accounts of this server;
* the *recipient's* filter is checked against the sender (inbound), for
  recipients that are accounts of this server, online or not.

What a refused stanza gets (RFC 6120 §8.3):

* outbound message / IQ get-set: ``<policy-violation/>`` (type ``modify``)
  with a text naming the domain filter, the policy and the refused domain,
  so the user learns why;
* inbound message / IQ get-set: ``<service-unavailable/>`` (type ``cancel``),
  the answer RFC 6121 §8.5 gives for an account that does not take the
  stanza, which does not reveal the recipient's filter;
* presence, IQ results and errors, message errors: dropped silently.

The user's own account (any resource) and own server (the bare domain of
its vhost) are always reachable, whatever the policy.

Configuration (read at start-up; a reload applies all but ``poll_interval``)::

    [domain-filter]                  # server-wide default
    default = "ALL"                  # ALL LOCAL OWN BLOCK LIST BLACKLIST CUSTOM
    domains = []                     # for LIST / BLACKLIST
    rules = []                       # for CUSTOM
    poll_interval = 5.0              # seconds; picks up `xmppctl filter` changes
    max_entries = 1000               # domains or rules of one user's setting

    [hosts."example.org".domain-filter]   # per-vhost default, same keys
    default = "LOCAL"

Per-user settings (ad-hoc command ``urn:xmppd:admin#set-domain-filter``,
``xmppctl filter``) override the defaults.  Online users' policies live in a
dict; the filter does at most two dict look-ups and a few set look-ups per
stanza, never the store or the config.  A local recipient that is offline is
looked up in the store once and cached (bounded, invalidated on change).

The store is the server's asynchronous one: an online user's policy is
read at bind in the background; until it is in (and for an account with
no session, not cached, on a networked store) the filter returns a
Deferred and the router passes the stanza through the chain again once the
policy is cached (a failed read refuses the stanza with the store's
error).  With the embedded store the read is done within the call.
"""
from __future__ import annotations

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.words.xish import domish

from xmppd import filtering
from xmppd import jid as jidlib
from xmppd.filtering import FilterError, Policy
from xmppd.jid import JID
from xmppd.plugin import Plugin
from xmppd.router import DROP
from xmppd.stanzas import StanzaError
from xmppd.storage import StoreError
from xmppd.storefail import report
from xmppd.logfilter import log_observer

log = Logger(observer=log_observer)

OFFLINE_CACHE_SIZE = 10000


class DomainFilter:
    """The router filter: in-memory look-ups only for online users."""

    name = "domain-filter"

    def __init__(self, plugin: "DomainFilterPlugin") -> None:
        self.plugin = plugin
        self.hosts = plugin.router.hosts

    def check(self, stanza: domish.Element, sender: JID, to: JID):
        if sender.bare == to.bare:
            return None  # one's own account is always reachable
        hosts = self.hosts
        policy_of = self.plugin.policy_of
        # Outbound: the sender's filter against the recipient.
        if sender.user is not None and sender.host in hosts:
            policy = self.plugin.online.get(sender.bare) or policy_of(sender)
            if isinstance(policy, defer.Deferred):
                return policy  # read, then the chain again
            if (policy.name != "ALL"
                    and not (to.user is None and to.resource is None and to.host == sender.host)
                    and not policy.allows(sender.host, to)):
                return self._refuse(stanza, sender, to, policy, outbound=True)
        # Inbound: the recipient's filter against the sender.
        if to.user is not None and to.host in hosts:
            policy = self.plugin.online.get(to.bare) or policy_of(to)
            if isinstance(policy, defer.Deferred):
                return policy
            if (policy.name != "ALL"
                    and not (sender.user is None and sender.resource is None and sender.host == to.host)
                    and not policy.allows(to.host, sender)):
                return self._refuse(stanza, sender, to, policy, outbound=False)
        return None

    @staticmethod
    def _refuse(stanza, sender: JID, to: JID, policy: Policy, outbound: bool):
        if stanza.name == "presence" or stanza.getAttribute("type") in ("error", "result"):
            return DROP
        if outbound:
            return StanzaError(
                "policy-violation", "modify",
                text=f"domain filter: your policy {policy.name} does not allow "
                     f"communication with {to.host}",
            )
        return StanzaError("service-unavailable")


class DomainFilterPlugin(Plugin):
    name = "domain-filter"

    def setup(self) -> None:
        config = self.server.config
        # Not reloadable: the poll loop is started once (xmppd/reconfig.py).
        self.poll_interval = config.section("domain-filter").number("poll_interval", 5.0)
        self.server_default, self.defaults, self.max_entries = self.read_defaults(config)
        # bare JID -> Policy, for users with at least one session.
        self.online: dict[str, Policy] = {}
        self._offline: dict[str, Policy] = {}
        self._loading: dict[str, defer.Deferred] = {}  # bare -> read of its setting under way
        self._seen_changes: dict[str, float] = {}
        self.router.filters.insert(0, DomainFilter(self))
        self.router.on_bound.append(self._bound)
        self.router.on_closed.append(self._closed)
        self._poll = None
        self._baseline: defer.Deferred | None = None  # the read of changes under way
        if self.poll_interval > 0:
            # What xmppctl changed before this start is in the stored settings
            # already; the poll applies what changes after.  Read before the
            # first poll (at once on an embedded store).
            self._baseline = self.store.items(filtering.CHANGES, filtering.CHANGES_USER)
            self._baseline.addCallbacks(self._seen_at_start, self._unreadable_changes)
            self._poll = task.LoopingCall(self.poll_changes)
            self._poll.clock = self.server.clock
            self._poll.start(self.poll_interval, now=False)

    def read_defaults(self, config) -> tuple[Policy, dict[str, Policy], int]:
        """The server-wide default, the per-vhost defaults and ``max_entries`` (ConfigError)."""
        hosts = config.hosts
        sec = config.section("domain-filter")
        server_default = filtering.from_section(sec, hosts)
        sec.number("poll_interval", 5.0)
        # Per user: what one setting may list (the ad-hoc command checks it
        # before parsing; checks per stanza cost the same whatever the length).
        max_entries = sec.int("max_entries", 1000, minimum=1)
        sec.reject_unknown()
        defaults: dict[str, Policy] = {}
        for host in hosts:
            host_sec = config.host_sections.get(host)
            if host_sec is None:
                defaults[host] = server_default
                continue
            sub = host_sec.table_of("domain-filter")
            defaults[host] = filtering.from_section(sub, hosts, server_default)
            sub.reject_unknown()
        return server_default, defaults, max_entries

    def use_defaults(self, server_default: Policy, defaults: dict[str, Policy],
                     max_entries: int) -> None:
        """A config reload: new defaults for everyone without a setting of their own.

        Online users who follow the default switch at once (no store look-up:
        their policy says where it came from); the offline cache is dropped.
        """
        self.server_default, self.defaults, self.max_entries = server_default, defaults, max_entries
        self._offline.clear()
        for bare, policy in list(self.online.items()):
            if policy.source != "user":
                self.online[bare] = self.default_for(bare.rsplit("@", 1)[-1])

    # -- policies ----------------------------------------------------------------

    def default_for(self, host: str) -> Policy:
        return self.defaults.get(host, self.server_default)

    def load(self, account: JID) -> defer.Deferred:
        """Deferred[the effective policy of a local account, from the store]."""
        return filtering.load_setting(self.store, account.bare).addCallback(self._policy, account)

    def _policy(self, stored: dict | None, account: JID) -> Policy:
        if stored is not None:
            try:
                return filtering.from_json(stored, self.router.hosts)
            except FilterError as e:
                log.error("domain filter of {user} unusable, using the default: {error}",
                          user=account.bare, error=str(e))
        return self.default_for(account.host)

    def policy_of(self, account: JID) -> Policy | defer.Deferred:
        """For an account with no session: the store, through a bounded cache.

        The policy when it can be had at once (cached, or read from an
        embedded store); else a Deferred that fires (with None) once it is
        cached, or fails with the store's error."""
        bare = account.bare
        policy = self._offline.get(bare)
        if policy is not None:
            return policy
        loading = self._loading.get(bare)
        if loading is None:
            loading = self._loading[bare] = defer.Deferred()

            def loaded(policy: Policy) -> None:
                if self._loading.get(bare) is loading:
                    del self._loading[bare]
                    if len(self._offline) >= OFFLINE_CACHE_SIZE:
                        self._offline.clear()
                    self._offline[bare] = policy
                loading.callback(None)

            def failed(failure) -> None:
                if self._loading.get(bare) is loading:
                    del self._loading[bare]
                loading.errback(failure)

            self.load(account).addCallbacks(loaded, failed)
            policy = self._offline.get(bare)
            if policy is not None:  # an embedded store: read already
                return policy
            if loading.called:  # an embedded store that failed: the failure itself
                return loading
        waiter = defer.Deferred()
        loading.addBoth(_relay, waiter)
        return waiter

    def effective(self, account: JID) -> defer.Deferred:
        """Deferred[the policy in force for ``account``]."""
        policy = self.online.get(account.bare)
        if policy is not None:
            return defer.succeed(policy)
        policy = self.policy_of(account)
        if not isinstance(policy, defer.Deferred):
            return defer.succeed(policy)
        return policy.addCallback(lambda _: self.online.get(account.bare)
                                  or self._offline.get(account.bare)
                                  or self.effective(account))

    def _bound(self, session) -> None:
        bare = session.jid.bare
        if bare in self.online:
            return

        def loaded(policy: Policy) -> None:
            # Unless the user left meanwhile, or a change set it first.
            if bare not in self.online and self.router.resources_of(bare):
                self._offline.pop(bare, None)
                self.online[bare] = policy

        def failed(failure) -> None:
            failure.trap(StoreError)
            report(failure.value)  # the filter reads the store until a policy is in

        self.load(session.jid).addCallbacks(loaded, failed)

    def _closed(self, session) -> None:
        if not self.router.resources_of(session.jid.bare):
            self.online.pop(session.jid.bare, None)

    def forget(self, bare: str) -> None:
        """Drop what is cached for an account (deleted, or changed behind our back)."""
        self.online.pop(bare, None)
        self._offline.pop(bare, None)
        self._loading.pop(bare, None)

    def _refresh(self, account: JID) -> defer.Deferred:
        """Read ``account``'s setting again; Deferred[the policy now in force]."""
        bare = account.bare
        self._offline.pop(bare, None)
        self._loading.pop(bare, None)  # a read begun before the change may miss it

        def loaded(policy: Policy) -> Policy:
            self._offline.pop(bare, None)
            if bare in self.online or self.router.resources_of(bare):
                self.online[bare] = policy
            return policy

        return self.load(account).addCallback(loaded)

    # -- changes -----------------------------------------------------------------

    def set_filter(self, account: JID, policy: Policy | None, by: str = "") -> defer.Deferred:
        """Store ``policy`` for ``account`` (None: back to the defaults); effective once the
        Deferred fires (with the policy now in force)."""
        if policy is not None and max(len(policy.domains), len(policy.rules)) > self.max_entries:
            return defer.fail(StanzaError("policy-violation",
                                          text=f"at most {self.max_entries} domains or rules"))
        if policy is None:
            d = self.store.delete(filtering.STORE, account.bare, filtering.KEY)
        else:
            d = self.store.put(filtering.STORE, account.bare, filtering.KEY, policy.to_json())

        def stored(_) -> defer.Deferred:
            return self._refresh(account)

        def logged(effective: Policy) -> Policy:
            log.info("domain filter of {user} set to {policy}{by}", user=account.bare,
                     policy=effective.describe() + ("" if policy is not None else " (default)"),
                     by=f" by {by}" if by else "")
            return effective

        return d.addCallback(stored).addCallback(logged)

    def _seen_at_start(self, changes) -> None:
        self._seen_changes = dict(changes)
        self._baseline = None

    def _unreadable_changes(self, failure) -> None:
        self._baseline = None
        failure.trap(StoreError)
        report(failure.value)  # the first poll then applies every recorded change again

    def poll_changes(self) -> defer.Deferred | None:
        """Apply changes made by ``xmppctl filter`` (another process) to online users.

        Skipped while the previous poll (or the start-up read) is under way."""
        if self._baseline is not None:
            return None
        d = self._baseline = self.store.items(filtering.CHANGES, filtering.CHANGES_USER)
        d.addCallbacks(self._apply_changes, self._poll_failed)
        return d

    def _poll_failed(self, failure) -> None:
        self._baseline = None
        if failure.check(StoreError):
            report(failure.value)  # every poll_interval: rate-limited, no traceback
        else:
            log.failure("domain filter: cannot read changes", failure)

    @defer.inlineCallbacks
    def _apply_changes(self, changes):
        try:
            yield self._apply(changes)
        except StoreError as e:
            report(e)
        except Exception:
            log.failure("domain filter: cannot apply changes")
        finally:
            self._baseline = None

    @defer.inlineCallbacks
    def _apply(self, changes):
        for bare, stamp in changes:
            if self._seen_changes.get(bare) == stamp:
                continue
            self._seen_changes[bare] = stamp
            try:
                account = jidlib.parse(bare)
            except jidlib.InvalidJID:
                continue
            policy = yield self._refresh(account)
            log.info("domain filter of {user} changed by xmppctl: {policy}",
                     user=bare, policy=policy.describe())



def _relay(result, waiter: defer.Deferred):
    """Pass a shared read's outcome to one waiter (each gets its own failure)."""
    if isinstance(result, Failure):
        waiter.errback(result)
    else:
        waiter.callback(result)
    return None

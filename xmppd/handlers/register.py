"""XEP-0077 In-Band Registration: off unless ``register`` is in ``[sm] plugins``.

* Account creation happens on an encrypted, not yet authenticated stream
  (the c2s stream hands such IQs to :meth:`RegisterPlugin.pre_auth`), and
  only when ``[register] allow_create`` is true, for the vhosts listed in
  ``hosts`` (default: all), at most ``max_per_ip`` accounts per address in
  ``window`` seconds.
* A logged-in user can change the password (on connectors that allow it)
  and remove the account.
"""
from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger
from twisted.words.xish import domish

from xmppd import jid as jidlib
from xmppd.auth.base import NoSuchUser, NotSupported, TemporaryAuthFailure, UserExists
from xmppd.auth.passwords import UnacceptablePassword, check_new_password
from xmppd.plugin import Plugin, Request
from xmppd.stanzas import StanzaError, error_reply, iq_result
from xmppd.storage import StoreError
from xmppd.storefail import stanza_error as store_failure
from xmppd.logfilter import log_observer

log = Logger(observer=log_observer)

NS_REGISTER = "jabber:iq:register"
NS_FEATURE = "http://jabber.org/features/iq-register"


def _fields(query: domish.Element) -> dict[str, str]:
    return {c.name: str(c) for c in query.elements() if c.uri == NS_REGISTER}


class RegisterPlugin(Plugin):
    name = "register"
    features = (NS_REGISTER,)

    def setup(self) -> None:
        sec = self.server.config.section("register")
        self.allow_create = sec.bool("allow_create", True)
        hosts = sec.strings("hosts", self.server.config.hosts)
        for h in hosts:
            if h not in self.server.config.hosts:
                raise sec.error("hosts", h, "not one of server.hosts")
        self.hosts = frozenset(hosts)
        self.max_per_ip = sec.int("max_per_ip", 5, minimum=0)
        self.window = sec.number("window", 3600.0, minimum=1)
        self.min_password = sec.int("min_password_length", 8, minimum=1)
        sec.reject_unknown()
        self._recent: dict[str, list[float]] = {}
        self._sweep_at = 1024
        self.handle_iq("get", NS_REGISTER, "query", self.on_get)
        self.handle_iq("set", NS_REGISTER, "query", self.on_set)

    # -- before authentication (account creation) ---------------------------

    def _open_for(self, host: str) -> bool:
        # A certificate-only vhost has no password logins: an account made
        # here with a password could never log in.
        return (self.allow_create and host in self.hosts
                and self.server.config.sasl_for(host).password_mechanisms)

    def stream_feature(self, host: str) -> domish.Element | None:
        if self._open_for(host):
            return domish.Element((NS_FEATURE, "register"))
        return None

    def pre_auth(self, stream, iq: domish.Element) -> None:
        """An IQ on an unauthenticated (but encrypted) stream."""
        query = iq.firstChildElement()
        d = defer.maybeDeferred(self._pre_auth, stream, iq, query)

        def failed(f):
            if f.check(StanzaError):
                error = f.value
            elif f.check(StoreError):
                error = store_failure(f.value)  # one log line, no traceback
            else:
                log.failure("registration failed", f)
                error = StanzaError("internal-server-error")
            stream.send(error_reply(iq, error))

        d.addCallbacks(lambda reply: stream.send(reply), failed)

    def _pre_auth(self, stream, iq, query):
        if not self._open_for(stream.host):
            raise StanzaError("not-allowed", text="registration is closed on this host")
        if iq.getAttribute("type") == "get":
            form = domish.Element((NS_REGISTER, "query"))
            form.addElement("instructions", content="Choose a username and password.")
            form.addElement("username")
            form.addElement("password")
            return iq_result(iq, form)
        if iq.getAttribute("type") != "set":
            raise StanzaError("bad-request")
        fields = _fields(query)
        try:
            username = jidlib.prep_localpart(fields.get("username", ""))
        except jidlib.InvalidJID:
            raise StanzaError("jid-malformed", "modify", text="invalid username") from None
        connector = self.server.connector_for(stream.host)
        password = self._acceptable(fields.get("password", ""), connector)
        now = self.server.clock.seconds()
        recent = [t for t in self._recent.get(stream.peer, []) if now - t < self.window]
        if self.max_per_ip and len(recent) >= self.max_per_ip:
            log.warn("registration from {peer} refused: rate limit", peer=stream.peer)
            raise StanzaError("resource-constraint", "wait", text="too many registrations")
        d = connector.add_user(username, stream.host, password)

        def created(_):
            recent.append(now)
            self._recent[stream.peer] = recent
            self._forget_old(now)
            log.info("registered {user}@{host} from {peer}", user=username, host=stream.host, peer=stream.peer)
            return iq_result(iq)

        return d.addCallbacks(created, self._map_errors)

    def _forget_old(self, now: float) -> None:
        """Drop addresses with no registration in the window, so the table
        holds only what the rate limit needs (not every address ever seen).
        Swept when it has doubled since the last sweep: amortised O(1)."""
        if len(self._recent) <= self._sweep_at:
            return
        window = self.window
        self._recent = {peer: times for peer, times in self._recent.items()
                        if times and now - times[-1] < window}
        self._sweep_at = max(1024, 2 * len(self._recent))

    def _acceptable(self, password: str, connector) -> str:
        """``password`` if it may be stored (length limits, SASLprep), else not-acceptable."""
        try:
            check_new_password(password, connector, min_length=self.min_password)
        except UnacceptablePassword as e:
            raise StanzaError("not-acceptable", text=str(e)) from None
        return password

    @staticmethod
    def _map_errors(failure):
        if failure.check(UserExists):
            raise StanzaError("conflict", text="username taken")
        if failure.check(NotSupported):
            raise StanzaError("not-allowed", text="this host's account backend is read-only")
        if failure.check(NoSuchUser):
            raise StanzaError("item-not-found")
        if failure.check(TemporaryAuthFailure):
            raise StanzaError("resource-constraint", "wait", text="account backend unavailable")
        return failure

    # -- authenticated users ------------------------------------------------

    def on_get(self, request: Request):
        if request.to is not None and request.to.user is not None:
            raise StanzaError("service-unavailable")
        query = domish.Element((NS_REGISTER, "query"))
        query.addElement("registered")
        query.addElement("username", content=request.sender.user)
        return query

    def on_set(self, request: Request):
        if request.to is not None and request.to.user is not None:
            raise StanzaError("service-unavailable")
        query = request.payload
        sender = request.sender
        connector = self.server.connector_for(sender.host)
        if any(c.name == "remove" for c in query.elements()):
            d = connector.remove_user(sender.user, sender.host)

            def removed(_):
                log.info("{user} removed their account", user=sender.bare)
                self.router.send_from_server(iq_result(request.stanza), sender)
                for session in list(self.router.resources_of(sender.bare).values()):
                    session.stream_error("not-authorized", "account removed")
                return False

            return d.addCallbacks(removed, self._map_errors)
        fields = _fields(query)
        if fields.get("username") not in (None, sender.user):
            raise StanzaError("bad-request", text="you can only change your own password")
        password = self._acceptable(fields.get("password", ""), connector)
        d = connector.set_password(sender.user, sender.host, password)

        def changed(_):
            log.info("{user} changed their password", user=sender.bare)
            return None

        return d.addCallbacks(changed, self._map_errors)

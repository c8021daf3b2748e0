"""XEP-0199 XMPP Ping, both ways.

* Pings addressed to the server (or to an account's bare JID, which the
  server answers for, RFC 6121 §8.5.1) get an empty result.
* The server pings sessions that have been silent for ``[ping] interval``
  seconds and closes those that stay silent ``timeout`` seconds more with a
  ``connection-timeout`` stream error, so dead TCP connections (and the
  presence of their users) do not linger.  ``interval = 0`` switches it off.
"""
from twisted.internet import task
from twisted.logger import Logger
from twisted.words.xish import domish

from xmppd.plugin import Plugin, Request
from xmppd.stanzas import NS_CLIENT
from xmppd.logfilter import log_observer

log = Logger(observer=log_observer)

NS_PING = "urn:xmpp:ping"


class PingPlugin(Plugin):
    name = "ping"
    features = (NS_PING,)
    account_features = (NS_PING,)

    def setup(self) -> None:
        sec = self.server.config.section("ping")
        self.interval = sec.number("interval", 300.0)
        self.timeout = sec.number("timeout", 60.0, minimum=1)
        sec.reject_unknown()
        self.handle_iq("get", NS_PING, "ping", self.on_ping)
        self._loop = None
        if self.interval > 0:
            self._loop = task.LoopingCall(self.check_idle)
            self._loop.clock = self.server.clock
            self._loop.start(min(self.interval, self.timeout) / 2, now=False)

    def on_ping(self, request: Request) -> None:
        return None  # an empty result

    def check_idle(self) -> None:
        now = self.server.clock.seconds()
        for resources in list(self.router.sessions.values()):
            for session in list(resources.values()):
                idle = now - session.last_active
                sent = session.state.get("ping_sent_at")
                if sent is not None and session.last_active < sent and now - sent >= self.timeout:
                    log.info("{jid}: no answer to ping, closing", jid=session.jid.full)
                    session.stream_error("connection-timeout", "no answer to ping")
                elif idle >= self.interval and (sent is None or session.last_active >= sent):
                    session.state["ping_sent_at"] = now
                    iq = domish.Element((NS_CLIENT, "iq"))
                    iq["type"] = "get"
                    iq["id"] = f"srv-ping-{int(now)}"
                    iq["from"] = session.jid.host
                    iq["to"] = session.jid.full
                    iq.addElement((NS_PING, "ping"))
                    session.send(iq)

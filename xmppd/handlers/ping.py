"""XEP-0199 XMPP Ping: the server answers pings addressed to it.

Pings between users are routed like any IQ; pings to an account's bare JID
are answered by the server on the account's behalf (RFC 6121 §8.5.1 says
IQs to a bare JID are the server's to handle).
"""
from xmppd.plugin import Plugin, Request

NS_PING = "urn:xmpp:ping"


class PingPlugin(Plugin):
    name = "ping"
    features = (NS_PING,)
    account_features = (NS_PING,)

    def setup(self) -> None:
        self.handle_iq("get", NS_PING, "ping", self.on_ping)

    def on_ping(self, request: Request) -> None:
        return None  # an empty result

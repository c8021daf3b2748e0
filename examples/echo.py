"""An echo bot as a wokkel handler: every chat or normal message comes back.

In process (xmppd.toml)::

    [components."echo.example.org"]
    name = "Echo bot"
    handlers = [
        "examples.echo:EchoBot",
        "wokkel.ping:PingHandler",
        "wokkel.disco:DiscoHandler",
        {factory = "wokkel.generic:VersionHandler", args = ["Echo bot", "1.0"]},
        "wokkel.generic:FallbackHandler",
    ]

The same handlers run as an external component (XEP-0114) with
``examples/external.py``.  Nothing here knows about xmppd except the import
of wokkel through ``xmppd.wokkel_compat`` (wokkel 18 needs one attribute that
current Twisted no longer has; the shim sets it).
"""
from __future__ import annotations

from twisted.words.xish import domish
from zope.interface import implementer

from xmppd.wokkel_compat import disco, iwokkel, subprotocols

MESSAGE = "/message/body"


@implementer(iwokkel.IDisco)
class EchoBot(subprotocols.XMPPHandler):
    """Sends the body of each message back to its sender."""

    def connectionInitialized(self) -> None:
        self.xmlstream.addObserver(MESSAGE, self.onMessage)

    def onMessage(self, message: domish.Element) -> None:
        kind = message.getAttribute("type", "normal")
        if kind not in ("chat", "normal") or getattr(message, "handled", False):
            return  # never answer errors; no group chats; another handler took it
        reply = domish.Element((None, "message"))
        reply["to"] = message["from"]
        reply["from"] = message["to"]
        reply["type"] = kind
        reply.addElement("body", content=str(message.body))
        self.send(reply)
        message.handled = True

    def getDiscoInfo(self, requestor, target, nodeIdentifier=""):
        if nodeIdentifier:
            return []
        return [disco.DiscoIdentity("component", "generic", "Echo bot")]

    def getDiscoItems(self, requestor, target, nodeIdentifier=""):
        return []

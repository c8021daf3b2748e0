"""wokkel handlers that misbehave, for tests/test_components.py."""
from __future__ import annotations

from twisted.words.xish import domish

from xmppd.wokkel_compat import subprotocols


class Crashy(subprotocols.XMPPHandler):
    """Raises on ``<crash xmlns='urn:test:crash'/>`` IQs and on messages whose body is 'crash'."""

    def connectionInitialized(self) -> None:
        self.xmlstream.addObserver("/iq[@type='get']/crash[@xmlns='urn:test:crash']", self.onCrash)
        self.xmlstream.addObserver("/message/body", self.onMessage, priority=1)

    def onCrash(self, iq) -> None:
        raise RuntimeError("handler bug (test)")

    def onMessage(self, message) -> None:
        if str(message.body) == "crash":
            raise RuntimeError("handler bug in a message observer (test)")
        if str(message.body) == "forge":
            # Speaks for the served host's user and another domain: both must be dropped.
            for sender in ("alice@localhost", "other.example"):
                forged = domish.Element((None, "message"))
                forged["to"] = message["from"]
                forged["from"] = sender
                forged.addElement("body", content=f"forged from {sender}")
                self.send(forged)
            message.handled = True


class BadInit(subprotocols.XMPPHandler):
    def connectionInitialized(self) -> None:
        raise RuntimeError("no backend (test)")


def not_a_handler():
    return object()

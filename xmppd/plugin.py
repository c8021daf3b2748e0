"""The session-manager plugin contract.

A plugin is enabled by name in ``[sm] plugins``.  At start-up it is attached
to the running server and declares, once, what it serves: IQ payloads (by
type and qualified child name), disco features/identities, session hooks and
stanza filters.  The router keeps these in dicts and lists, so dispatch costs
one dict look-up per IQ and nothing per message.

This mirrors wokkel's ``XMPPHandler``/``IQHandlerMixin`` idea (handlers
declared up front, Deferreds for answers) but keys handlers by exact payload
instead of XPath queries, and dispatches on the ``to`` address as well.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from zope.interface import Attribute, Interface, implementer

if TYPE_CHECKING:
    from twisted.words.xish.domish import Element

    from xmppd.core import Server
    from xmppd.jid import JID


class Request:
    """An IQ on its way to a handler.

    ``to`` is None when the IQ is addressed to the sender's own account (no
    ``to``, or the sender's bare JID); otherwise the parsed ``to`` (a served
    domain, or another local account's bare JID).  ``session`` is the
    sender's c2s session when the IQ came from a local client.
    """

    __slots__ = ("stanza", "sender", "to", "session")

    def __init__(self, stanza: "Element", sender: "JID", to: "JID | None", session: Any) -> None:
        self.stanza = stanza
        self.sender = sender
        self.to = to
        self.session = session

    @property
    def payload(self) -> "Element":
        return self.stanza.firstChildElement()


class ISessionManagerPlugin(Interface):
    name = Attribute("The name used in [sm] plugins.")
    features = Attribute("disco#info features this plugin adds to the server.")
    account_features = Attribute("disco#info features it adds to account JIDs.")
    identities = Attribute("(category, type, name) tuples for the server.")
    account_identities = Attribute("(category, type, name) tuples it adds to account JIDs.")

    def attach(server: "Server") -> None:
        """Read config, register handlers, hooks and filters."""


@implementer(ISessionManagerPlugin)
class Plugin:
    """Base class with empty declarations; subclasses fill what they need."""

    name = ""
    features: tuple = ()
    account_features: tuple = ()
    identities: tuple = ()
    account_identities: tuple = ()

    def attach(self, server: "Server") -> None:
        self.server = server
        self.router = server.router
        # The asynchronous face (xmppd.storage); an embedded store handed
        # over directly (unit tests' fake servers) is wrapped.
        from xmppd.storage import as_async

        self.store = as_async(server.store)
        self.setup()

    def setup(self) -> None:
        """Subclass hook after attach (config parsed, router reachable)."""

    def handle_iq(self, type: str, ns: str, name: str, handler: Callable) -> None:
        self.router.iq_handlers[(type, ns, name)] = handler

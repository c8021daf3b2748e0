"""XEP-0092 Software Version, configurable and hideable.

``[version] name``, ``version``, ``os`` set the reply; ``hide = true``
answers ``service-unavailable`` (and drops the disco feature), for operators
who do not want to advertise what they run.
"""
from __future__ import annotations

import platform

from twisted.words.xish import domish

import xmppd
from xmppd.plugin import Plugin, Request
from xmppd.stanzas import StanzaError

NS_VERSION = "jabber:iq:version"


class VersionPlugin(Plugin):
    name = "version"

    def setup(self) -> None:
        sec = self.server.config.section("version")
        self.hide = sec.bool("hide", False)
        self.software = sec.str("name", "xmppd")
        self.version = sec.str("version", xmppd.__version__)
        self.os = sec.str("os", "" if sec.bool("hide_os", True) else platform.system())
        sec.reject_unknown()
        self.features = () if self.hide else (NS_VERSION,)
        self.handle_iq("get", NS_VERSION, "query", self.on_version)

    def on_version(self, request: Request):
        if self.hide or (request.to is not None and request.to.user is not None):
            # Accounts answer for themselves (their clients); the server
            # answers only for itself, and only when not hidden.
            raise StanzaError("service-unavailable")
        query = domish.Element((NS_VERSION, "query"))
        query.addElement("name", content=self.software)
        query.addElement("version", content=self.version)
        if self.os:
            query.addElement("os", content=self.os)
        return query

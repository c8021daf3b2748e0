"""XEP-0054 vcard-temp storage: users set their own, anyone may read.

The vCard is kept as serialised XML (``vcard/<bare JID>/vcard``) after a
size check, and returned as it was stored, after a re-parse with the
stream's limits (a stored vCard beyond them, from an older version, is
skipped with a log line: the owner appears to have none).
"""
from __future__ import annotations

from twisted.logger import Logger
from twisted.words.xish import domish

from xmppd.plugin import Plugin, Request
from xmppd.stanzas import StanzaError
from xmppd.xmlparser import Limits, XMLStreamError, parse_fragment

log = Logger()

NS_VCARD = "vcard-temp"
STORE = "vcard"


class VCardPlugin(Plugin):
    name = "vcard"
    features = (NS_VCARD,)
    account_features = (NS_VCARD,)

    def setup(self) -> None:
        sec = self.server.config.section("vcard")
        self.max_size = sec.int("max_size", 65536, minimum=1024)
        sec.reject_unknown()
        c2s = self.server.config.c2s
        self.limits = Limits(self.max_size, c2s.max_depth, c2s.max_stanza_nodes).for_stored(1024)
        self.handle_iq("get", NS_VCARD, "vCard", self.on_get)
        self.handle_iq("set", NS_VCARD, "vCard", self.on_set)

    def on_get(self, request: Request):
        owner = request.sender.bare if request.to is None else request.to.bare
        if request.to is not None and request.to.user is None:
            raise StanzaError("service-unavailable")  # the server has no vCard
        stored = self.store.get(STORE, owner, "vcard")
        if stored is not None:
            try:
                return parse_fragment(stored, self.limits)
            except XMLStreamError as e:
                log.warn("stored vCard of {user} skipped: {error}", user=owner, error=e)
        # An empty vCard, whether or not the account exists.
        return domish.Element((NS_VCARD, "vCard"))

    def on_set(self, request: Request):
        if request.to is not None:
            raise StanzaError("forbidden", text="only your own vCard")
        xml = request.payload.toXml()
        if len(xml.encode("utf-8")) > self.max_size:
            raise StanzaError("not-acceptable", text=f"vCard larger than {self.max_size} bytes")
        self.store.put(STORE, request.sender.bare, "vcard", xml)
        return None

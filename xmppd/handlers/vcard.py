"""XEP-0054 vcard-temp storage: users set their own, anyone may read.

The vCard is kept as serialised XML (``vcard/<bare JID>/vcard``) after a
size check, and returned as it was stored, after a re-parse with the
stream's limits (a stored vCard beyond them, from an older version, is
skipped with a log line: the owner appears to have none).

``[vcard] max_size`` bounds the stored XML.  It is checked twice: first on a
walk of the tree that adds up the bytes of names, attributes and text and
stops as soon as they exceed the limit (so a vCard near the stanza size
limit is refused without being serialised), then on the serialised text.
``max_elements`` bounds the elements (what a get costs to parse again).

Writes of one user's vCard (a set, and the XEP-0398 conversion's
read-modify-write of the PHOTO) run in that user's :attr:`VCardPlugin.serial`
queue; the ``on_stored`` hooks run after the write, outside it, and the IQ
result waits for them.
"""
from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger
from twisted.words.xish import domish

from xmppd.plugin import Plugin, Request
from xmppd.serial import Serial
from xmppd.stanzas import NS_CLIENT, StanzaError, serialize_fragment
from xmppd.xmlparser import Limits, XMLStreamError, parse_fragment
from xmppd.logfilter import log_observer

log = Logger(observer=log_observer)

NS_VCARD = "vcard-temp"
STORE = "vcard"


class TooLarge(Exception):
    """The vCard exceeds a limit; the message names it."""


def check_size(vcard: domish.Element, max_bytes: int, max_elements: int) -> None:
    """Raise :class:`TooLarge` as soon as a lower bound of the XML size, or the element count, is over.

    Iterative (no recursion on hostile depth) and linear; each element adds
    at least its name twice (start and end tag) and its attributes' text.
    """
    total = 0
    elements = 0
    stack = [vcard]
    while stack:
        el = stack.pop()
        elements += 1
        if elements > max_elements:
            raise TooLarge(f"vCard has more than {max_elements} elements")
        total += 2 * len(el.name) + 5
        for key, value in el.attributes.items():
            total += len(value) + (len(key) if key.__class__ is str else len(key[1])) + 4
        for child in el.children:
            if child.__class__ is str:
                total += len(child)
            else:
                stack.append(child)
        if total > max_bytes:
            raise TooLarge(f"vCard larger than {max_bytes} bytes")


def size_limits(sec) -> tuple[int, int]:
    """``[vcard] max_size`` and ``max_elements``: read here for the plugin and for imports."""
    return sec.int("max_size", 65536, minimum=1024), sec.int("max_elements", 1000, minimum=16)


class VCardPlugin(Plugin):
    name = "vcard"
    features = (NS_VCARD,)
    account_features = (NS_VCARD,)

    def setup(self) -> None:
        sec = self.server.config.section("vcard")
        self.max_size, self.max_elements = size_limits(sec)
        sec.reject_unknown()
        c2s = self.server.config.c2s
        self.limits = Limits(self.max_size, c2s.max_depth, c2s.max_stanza_nodes).for_stored(1024)
        # Hooks run after a user stored a vCard: (bare JID, the vCard element)
        # (XEP-0398 publishes its PHOTO as a PEP avatar); None or a Deferred.
        self.on_stored: list = []
        self.serial = Serial()  # writes of one user's vCard, one after another
        self.handle_iq("get", NS_VCARD, "vCard", self.on_get)
        self.handle_iq("set", NS_VCARD, "vCard", self.on_set)

    def on_get(self, request: Request):
        owner = request.sender.bare if request.to is None else request.to.bare
        if request.to is not None and request.to.user is None:
            raise StanzaError("service-unavailable")  # the server has no vCard
        return self.store.get(STORE, owner, "vcard").addCallback(self._answer, owner)

    def _answer(self, stored: str | None, owner: str) -> domish.Element:
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
        vcard = request.payload
        try:
            check_size(vcard, self.max_size, self.max_elements)
        except TooLarge as e:
            raise StanzaError("not-acceptable", text=str(e), echo=False) from None
        xml = serialize_fragment(vcard, NS_CLIENT)
        if len(xml.encode("utf-8")) > self.max_size:
            raise StanzaError("not-acceptable", text=f"vCard larger than {self.max_size} bytes",
                              echo=False)
        owner = request.sender.bare

        @defer.inlineCallbacks
        def stored(_):
            for hook in self.on_stored:
                yield hook(owner, vcard)
            return None

        return self.serial.run(owner, self.store.put, STORE, owner, "vcard", xml).addCallback(stored)

"""XEP-0398: the vCard PHOTO (XEP-0153) and the PEP avatar (XEP-0084) kept as one.

Enabled as ``urn:xmpp:pep-vcard-conversion:0`` in ``[sm] plugins`` after
``presence``, ``vcard`` and ``pep``; announced on the account.

* **PEP to vCard**: a publish to ``urn:xmpp:avatar:metadata`` (or its
  retract, purge, delete) rewrites the PHOTO of the stored vCard from the
  ``urn:xmpp:avatar:data`` item its first ``<info/>`` without ``url`` names,
  after checking that the image's SHA-1 is that id; metadata without such an
  ``<info/>`` (XEP-0084 "avatar disabled") removes the PHOTO.
* **vCard to PEP**: a vCard set with an embedded PHOTO publishes the image to
  ``urn:xmpp:avatar:data`` (id = its SHA-1) and then one ``<info/>`` to
  ``urn:xmpp:avatar:metadata``, with the usual notifications; a vCard set
  without one, while the PEP avatar names an image, publishes empty metadata.
* **Presence**: each available presence of the user, broadcast or directed
  (MUC joins), gets ``<x xmlns='vcard-temp:x:update'><photo>SHA-1</photo></x>``
  unless the client put a ``<photo/>`` there itself (XEP-0398 §4).

Limits: a conversion that would break the other side's limit is skipped
with one log line and leaves that side as it was (the request that caused
it succeeds): the vCard with the new PHOTO must fit ``[vcard] max_size``, the
data item ``[pep] max_item_bytes`` and the account's PEP quotas.

Costs: the hash of each online user's PHOTO is kept in memory (read with
the vCard at the first session's bind, in the background, only parsed when
the vCard has a BINVAL); a presence costs a child scan and a dict look-up.

Order (on the asynchronous store): a conversion to PEP runs in the owner's
PEP queue and a conversion to the vCard in the owner's vCard queue, each
before the IQ result of the request that caused it; the PEP side may wait
for the vCard side, never the reverse.
"""
from __future__ import annotations

import base64
import binascii
import hashlib

from twisted.internet import defer
from twisted.logger import Logger
from twisted.words.xish import domish

from xmppd.handlers.vcard import NS_VCARD, STORE as VCARD_STORE, TooLarge, check_size
from xmppd.logfilter import log_observer
from xmppd.plugin import Plugin
from xmppd.stanzas import NS_CLIENT, serialize_fragment
from xmppd.storage import StoreError
from xmppd.storefail import report as store_report
from xmppd.xmlparser import Limits, XMLStreamError, parse_fragment

log = Logger(observer=log_observer)

NS_CONVERSION = "urn:xmpp:pep-vcard-conversion:0"
NS_DATA = "urn:xmpp:avatar:data"
NS_METADATA = "urn:xmpp:avatar:metadata"
NS_UPDATE = "vcard-temp:x:update"
_NO_NS = "\x00"


def _text(el: domish.Element, name: str) -> str | None:
    for child in el.elements():
        if child.name == name:
            return "".join(c for c in child.children if isinstance(c, str))
    return None


def _decode(text: str) -> bytes | None:
    """Base64 as vCards and avatar items carry it (line breaks allowed); None when broken."""
    try:
        return base64.b64decode(text)
    except (binascii.Error, ValueError):
        return None


def vcard_photo(vcard: domish.Element) -> tuple[str, bytes] | None:
    """(MIME type, image) of the vCard's embedded PHOTO; None without one (EXTVAL only)."""
    for photo in vcard.elements():
        if photo.name != "PHOTO":
            continue
        image = _decode(_text(photo, "BINVAL") or "")
        if image:
            return (_text(photo, "TYPE") or "").strip() or "image/png", image
    return None


def photo_hash(vcard: domish.Element) -> str:
    """XEP-0153 hash: SHA-1 hex of the PHOTO's image, "" without one."""
    photo = vcard_photo(vcard)
    return hashlib.sha1(photo[1]).hexdigest() if photo else ""


class AvatarConversionPlugin(Plugin):
    name = NS_CONVERSION
    account_features = (NS_CONVERSION,)

    def setup(self) -> None:
        self.vcard = self.server.plugin("vcard")
        self.pep = self.server.plugin("pep")
        presence = self.server.plugin("presence")
        if self.vcard is None or self.pep is None or presence is None:
            raise self.server.config.section("sm").error(
                "plugins", self.name, "needs the presence, vcard and pep plugins before it")
        c2s = self.server.config.c2s
        self.item_limits = Limits(self.pep.quotas.item_bytes, c2s.max_depth,
                                  c2s.max_stanza_nodes).for_stored(1024)
        # Online users: bare JID -> SHA-1 hex of the vCard PHOTO ("" none).
        self.hashes: dict[str, str] = {}
        # Owners whose PEP avatar this plugin is writing (inside the owner's
        # PEP queue), so that the write is not converted back.
        self._converting: set[str] = set()
        self.vcard.on_stored.append(self._vcard_stored)
        self.pep.on_change.append(self._pep_changed)
        presence.on_broadcast.append(self._presence)
        presence.on_directed.append(self._presence)
        self.router.on_bound.append(self._bound)
        self.router.on_closed.append(self._closed)

    # -- the hash in presence -------------------------------------------------

    def _parsed(self, xml: str | None, owner: str) -> domish.Element | None:
        if xml is None:
            return None
        try:
            return parse_fragment(xml, self.vcard.limits)
        except XMLStreamError as e:
            log.warn("stored vCard of {user} skipped: {error}", user=owner, error=e)
            return None

    def _stored_vcard(self, owner: str) -> defer.Deferred:
        """Deferred[the stored vCard, None without one (or an unreadable one)]."""
        return self.store.get(VCARD_STORE, owner, "vcard").addCallback(self._parsed, owner)

    def _bound(self, session) -> None:
        owner = session.jid.bare
        if owner in self.hashes:
            return

        def loaded(xml: str | None) -> None:
            if owner in self.hashes or not self.router.resources_of(owner):
                return  # set meanwhile by a vCard set, or the user left
            if xml is None or "BINVAL" not in xml:  # no photo: nothing to parse
                self.hashes[owner] = ""
                return
            vcard = self._parsed(xml, owner)
            self.hashes[owner] = photo_hash(vcard) if vcard is not None else ""

        def failed(failure) -> None:
            failure.trap(StoreError)
            store_report(failure.value)  # presence goes out without a hash until the next login

        self.store.get(VCARD_STORE, owner, "vcard").addCallbacks(loaded, failed)

    def _closed(self, session) -> None:
        if not self.router.resources_of(session.jid.bare):
            self.hashes.pop(session.jid.bare, None)

    def _presence(self, session, stanza: domish.Element, kind: str | None) -> None:
        if kind is not None:
            return
        digest = self.hashes.get(session.jid.bare)
        if digest is None:
            return
        for x in stanza.elements(NS_UPDATE, "x"):
            for child in x.elements():
                if child.name == "photo":
                    return  # the client's own (empty: not ready, or none): kept
            x.addElement("photo", content=digest)  # an empty x is overwritten
            return
        stanza.addElement((NS_UPDATE, "x")).addElement("photo", content=digest)

    # -- vCard to PEP ------------------------------------------------------------

    @defer.inlineCallbacks
    def _metadata_id(self, owner: str):
        """Deferred[the image id the current metadata names ("" none)]."""
        node = (yield self.pep.pep.nodes(owner)).get(NS_METADATA)
        last = (yield self.pep.pep.last(owner, node)) if node is not None else None
        if last is None:
            return ""
        try:
            metadata = parse_fragment(last[1], self.item_limits)
        except XMLStreamError:
            return ""
        for info in metadata.elements(NS_METADATA, "info"):
            if not info.getAttribute("url"):
                return info.getAttribute("id", "")
        return ""

    def _vcard_stored(self, owner: str, vcard: domish.Element) -> defer.Deferred:
        photo = vcard_photo(vcard)
        digest = hashlib.sha1(photo[1]).hexdigest() if photo else ""
        if self.router.resources_of(owner):
            self.hashes[owner] = digest
        return self.pep.pep.serial.run(owner, self._to_pep, owner, photo, digest)

    @defer.inlineCallbacks
    def _to_pep(self, owner: str, photo: tuple[str, bytes] | None, digest: str):
        """In the owner's PEP queue: the vCard's PHOTO as the PEP avatar."""
        if (yield self._metadata_id(owner)) == digest:
            return
        metadata = domish.Element((NS_METADATA, "metadata"))
        self._converting.add(owner)
        try:
            if photo is not None:
                mime, image = photo
                data = domish.Element((NS_DATA, "data"))
                data.addContent(base64.b64encode(image).decode("ascii"))
                yield self.pep.publish_item_queued(owner, NS_DATA, digest,
                                                   serialize_fragment(data, _NO_NS), None,
                                                   options_are_preconditions=False)
                info = metadata.addElement("info")
                info["id"] = digest
                info["bytes"] = str(len(image))
                info["type"] = mime
            yield self.pep.publish_item_queued(owner, NS_METADATA, digest or "current",
                                               serialize_fragment(metadata, _NO_NS), None,
                                               options_are_preconditions=False)
        except Exception as e:  # StanzaError (a limit) or StoreError: the vCard stays set
            log.warn("vCard photo of {user} not published as a PEP avatar: {error}", user=owner, error=e)
        finally:
            self._converting.discard(owner)

    # -- PEP to vCard ------------------------------------------------------------

    @defer.inlineCallbacks
    def _pep_avatar(self, owner: str):
        """Deferred[(id, MIME type, base64 text) of the avatar the metadata names, None for none].

        Fails with ValueError (with the reason to log) when it names one that
        cannot be used."""
        nodes = yield self.pep.pep.nodes(owner)
        node = nodes.get(NS_METADATA)
        last = (yield self.pep.pep.last(owner, node)) if node is not None else None
        if last is None:
            return None
        try:
            metadata = parse_fragment(last[1], self.item_limits)
        except XMLStreamError as e:
            raise ValueError(f"metadata unreadable: {e}") from None
        infos = [i for i in metadata.elements(NS_METADATA, "info") if not i.getAttribute("url")]
        if not infos:
            return None
        data_node = nodes.get(NS_DATA)
        for info in infos:
            item_id = info.getAttribute("id", "")
            xml = (yield self.pep.pep.item(owner, data_node, item_id)) if data_node is not None else None
            if xml is None:
                continue
            try:
                data = parse_fragment(xml, self.item_limits)
            except XMLStreamError as e:
                raise ValueError(f"data item {item_id} unreadable: {e}") from None
            text = "".join(c for c in data.children if isinstance(c, str))
            image = _decode(text)
            if not image or hashlib.sha1(image).hexdigest() != item_id.lower():
                raise ValueError(f"data item {item_id} is not an image with that SHA-1")
            return item_id.lower(), info.getAttribute("type") or "image/png", "".join(text.split())
        raise ValueError("no data item for the metadata's ids")

    def _pep_changed(self, owner: str, name: str):
        """In the owner's PEP queue: a Deferred the request waits for, or None."""
        if name != NS_METADATA or owner in self._converting:
            return None
        return self._to_vcard(owner)

    @defer.inlineCallbacks
    def _to_vcard(self, owner: str):
        try:
            avatar = yield self._pep_avatar(owner)
        except ValueError as e:
            log.warn("PEP avatar of {user} not copied to the vCard: {error}", user=owner, error=e)
            return
        yield self.vcard.serial.run(owner, self._set_photo, owner, avatar)

    @defer.inlineCallbacks
    def _set_photo(self, owner: str, avatar: tuple[str, str, str] | None):
        """In the owner's vCard queue: the stored vCard's PHOTO made ``avatar``'s."""
        vcard = yield self._stored_vcard(owner)
        if vcard is None:
            if avatar is None:
                return
            vcard = domish.Element((NS_VCARD, "vCard"))
        if photo_hash(vcard) == (avatar[0] if avatar else ""):
            return
        vcard.children = [c for c in vcard.children
                          if not (isinstance(c, domish.Element) and c.name == "PHOTO")]
        if avatar is not None:
            photo = vcard.addElement("PHOTO")
            photo.addElement("TYPE", content=avatar[1])
            photo.addElement("BINVAL", content=avatar[2])
        try:
            check_size(vcard, self.vcard.max_size, self.vcard.max_elements)
            xml = serialize_fragment(vcard, NS_CLIENT)
            if len(xml.encode("utf-8")) > self.vcard.max_size:
                raise TooLarge("")
        except TooLarge:
            log.warn("PEP avatar of {user} not copied to the vCard: larger than [vcard] max_size "
                     "({size} bytes)", user=owner, size=self.vcard.max_size)
            return
        try:
            yield self.store.put(VCARD_STORE, owner, "vcard", xml)
        except Exception as e:  # the publish stays done
            log.warn("PEP avatar of {user} not copied to the vCard: {error}", user=owner, error=e)
            return
        if self.router.resources_of(owner):
            self.hashes[owner] = avatar[0] if avatar else ""

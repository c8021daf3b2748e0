"""XEP-0359 Unique and Stable Stanza IDs: ``<stanza-id/>`` on messages to local users.

Enabled as ``urn:xmpp:sid:0`` in ``[sm] plugins``.  Every message this
server delivers to one of its accounts (from a local client, a component or
another server) gets ``<stanza-id xmlns='urn:xmpp:sid:0' by='user@host'
id='...'/>``, so that clients can deduplicate what stream management
resends, carbons copy and offline storage replays.  A ``<stanza-id/>`` that
already claims ``by`` the recipient was not made here: it is removed first
(XEP-0359 §3.3), so no sender can forge one.

The plugin wraps :meth:`Router.deliver_unfiltered` (which every message to
a local account passes, after the filter chain); without it the router
pays nothing.  Ids are a random per-process prefix and a counter: unique
for the life of the data, cheaper than a UUID per message.
"""
from __future__ import annotations

import base64
import os
from itertools import count

from twisted.words.xish import domish

from xmppd.plugin import Plugin
from xmppd.stanzas import Prebuilt, escape_attr

NS_SID = "urn:xmpp:sid:0"
HEADS_CACHE = 10_000  # accounts whose <stanza-id/> start is kept


class StanzaIdPlugin(Plugin):
    name = "urn:xmpp:sid:0"
    features = (NS_SID,)
    account_features = (NS_SID,)

    def setup(self) -> None:
        self._prefix = base64.urlsafe_b64encode(os.urandom(9)).decode() + "-"
        self._counter = count(1)
        self.number = 0  # the number in the last id made
        # (message, id, number) of the last recipient stamp: read by the archive
        # (xmppd.handlers.mam) after delivery instead of searching the children.
        self.last: tuple = (None, "", 0)
        # by -> "<stanza-id ... by='...' id='<prefix>": the part of the XML that
        # is the same for every message to one account (bounded).
        self._heads: dict[str, str] = {}
        hosts = self.router.hosts
        inner = self.router.deliver_unfiltered
        stamp = self.stamp

        def deliver_unfiltered(stanza, sender, to, session=None):
            if (stanza.name == "message" and to.user is not None and to.host in hosts
                    and stanza.attributes.get("type") != "error"):
                ident = stamp(stanza, to.bare)
                self.last = (stanza, ident, self.number)
            inner(stanza, sender, to, session)

        self.router.deliver_unfiltered = deliver_unfiltered

    def use_sequence(self, sequence) -> None:
        """Draw the id counter from ``sequence`` (an iterator of increasing ints).

        The archive (:mod:`xmppd.handlers.mam`) passes its time-ordered
        sequence, so that the id a message was delivered with is its
        archive id and points to its archive row (:mod:`xmppd.msglog`).
        """
        self._counter = sequence

    def _head(self, by: str) -> str:
        heads = self._heads
        if len(heads) >= HEADS_CACHE:
            heads.clear()
        head = heads[by] = f"<stanza-id xmlns='{NS_SID}' by='{escape_attr(by)}' id='{self._prefix}"
        return head

    def stamp(self, stanza: domish.Element, by: str) -> str:
        """Remove forged ids claiming ``by``, then add ours; returns our id.

        The number in the id is left in :attr:`number` (the archive's
        ``seq``).  Ours is a :class:`~xmppd.stanzas.Prebuilt` element: its
        XML is made here once, not at every serialisation (its start, the
        same for every message to ``by``, is cached).
        """
        children = stanza.children
        for child in children:
            if (not isinstance(child, str) and child.name == "stanza-id"
                    and child.uri == NS_SID and child.getAttribute("by") == by):
                children[:] = [c for c in children if not (
                    isinstance(c, domish.Element) and c.name == "stanza-id" and c.uri == NS_SID
                    and c.getAttribute("by") == by)]
                break
        self.number = number = next(self._counter)
        tail = f"{number:x}"
        ident = self._prefix + tail
        head = self._heads.get(by) or self._head(by)
        sid = Prebuilt(NS_SID, "stanza-id", {"by": by, "id": ident}, f"{head}{tail}'/>")
        sid.parent = stanza
        children.append(sid)
        return ident

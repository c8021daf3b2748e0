"""XEP-0160 offline messages with XEP-0203 delay stamps.

A chat/normal message to an account with no available resource is stored
(``offline/<bare JID>/<sequence>``) up to a per-user quota; over the quota
the sender gets ``service-unavailable``.  Messages are delivered, oldest
first, right after the session's initial presence, then deleted, at the
pace the client reads them (see :meth:`OfflinePlugin.deliver`).

A message that cannot be stored (disk full, I/O error) is not dropped: the
:class:`~xmppd.storage.StoreError` reaches the router, which bounces it to
the sender with the matching stanza error and logs one line.

Stored messages are re-parsed with the stream's limits before delivery: one
beyond them (written by an older version without those limits) is skipped
with a log line and left in the store, never sent to the client.
"""
from __future__ import annotations

import time

from twisted.internet import defer
from twisted.logger import Logger
from twisted.words.xish import domish

from xmppd.plugin import Plugin
from xmppd.serial import Serial
from xmppd.stanzas import serialize
from xmppd.storage import StoreError
from xmppd.storefail import report
from xmppd.xmlparser import Limits, XMLStreamError, parse_fragment
from xmppd.logfilter import log_observer

log = Logger(observer=log_observer)

STORE = "offline"
NS_DELAY = "urn:xmpp:delay"
# What storing adds to a stanza that passed the parser: the stamped 'from'
# (up to a 3071-byte JID) and the <delay/> element.
STORED_EXTRA_BYTES = 4096


def quota(sec) -> int:
    """``[offline] max_messages``: read here for the plugin and for imports."""
    return sec.int("max_messages", 100, minimum=0)


class OfflinePlugin(Plugin):
    name = "offline"
    features = ("msgoffline",)

    def setup(self) -> None:
        sec = self.server.config.section("offline")
        self.quota = quota(sec)
        sec.reject_unknown()
        c2s = self.server.config.c2s
        self.limits = Limits(c2s.max_stanza_size, c2s.max_depth,
                             c2s.max_stanza_nodes).for_stored(STORED_EXTRA_BYTES)
        self.router.offline_handler = self.store_message
        # One message of a user stored after the other (the sequence number
        # is read, then written).
        self.serial = Serial()
        presence = self.server.plugin("presence")
        if presence is not None:
            presence.on_initial_presence.append(self.deliver)

    def store_message(self, stanza: domish.Element, to) -> defer.Deferred:
        """Deferred[bool]: True once stored (or not worth keeping), False over quota."""
        if not any(
            isinstance(c, domish.Element) and c.name in ("body", "subject") for c in stanza.children
        ):
            return defer.succeed(True)  # chat states and receipts alone are not worth keeping
        return self.serial.run(to.bare, self._store, stanza, to)

    @defer.inlineCallbacks
    def _store(self, stanza: domish.Element, to):
        existing = yield self.store.items(STORE, to.bare)
        if len(existing) >= self.quota:
            log.info("offline quota full for {user}; message bounced", user=to.bare)
            return False
        seq = int(existing[-1][0]) + 1 if existing else 1
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.server.clock.seconds()))
        delay = domish.Element((NS_DELAY, "delay"))
        delay["from"] = to.host
        delay["stamp"] = stamp
        delay.addContent("Offline storage")
        stanza.addChild(delay)
        try:
            yield self.store.put(STORE, to.bare, f"{seq:012d}", serialize(stanza).decode("utf-8"))
        except StoreError:
            stanza.children.remove(delay)  # the bounce carries the message as sent
            raise
        return True

    @defer.inlineCallbacks
    def deliver(self, session):
        """Send the stored messages, as fast as the client reads them.

        A message is deleted once it was handed to the transport.  When the
        transport is full (a slow client, or many large messages) the rest
        waits in the store, not in the session's bounded backlog, and
        follows when the transport has drained; if the session ends first,
        it stays stored for the next login.
        """
        bare = session.jid.bare
        try:
            stored = yield self.store.items(STORE, bare)
        except StoreError as e:
            report(e)  # kept; delivered at a later login
            return
        if not stored:
            return
        delivered = []
        for key, xml in stored:
            if not session.writable:
                session.when_drained(lambda: self.deliver(session))
                break
            try:
                parse_fragment(xml, self.limits)
            except XMLStreamError as e:
                log.warn("offline message {key} of {user} kept in store, not delivered: {error}",
                         key=key, user=bare, error=e)
                continue
            session.send_bytes(xml.encode("utf-8"))
            delivered.append(key)
        if not delivered:
            return
        try:
            yield self.store.delete_many(STORE, bare, delivered)
        except StoreError as e:
            # Delivered but still stored: sent again at the next login, a
            # duplicate rather than a loss.
            report(e)
            return
        log.info("delivered {n} offline messages to {jid}", n=len(delivered), jid=session.jid.full)

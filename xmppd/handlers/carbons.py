"""XEP-0280 Message Carbons: every enabled resource sees the user's conversations.

Enabled as ``urn:xmpp:carbons:2`` in ``[sm] plugins``.  A client turns
copies on for its session with ``<enable xmlns='urn:xmpp:carbons:2'/>`` (off
with ``<disable/>``).  Then, for an *eligible* message (below):

* **received**: delivered to one of the user's resources, a copy wrapped in
  ``<received><forwarded xmlns='urn:xmpp:forward:0'>`` goes to every other
  enabled resource of the user;
* **sent**: sent by one of the user's resources to someone else, a copy
  wrapped in ``<sent>`` goes to every other enabled resource.

A ``<private/>`` is removed from a message before it reaches a local
recipient (XEP-0280 §8).  The wrapper keeps the original's ``type``.

Eligible (XEP-0280 §6): ``chat`` messages; ``normal`` ones with a body, a
delivery receipt (XEP-0184) or a chat marker (XEP-0333).  Never: errors,
groupchat, headlines, MUC private messages (``<x
xmlns='http://jabber.org/protocol/muc#user'/>``: the room's other occupants
are not the user's conversation partners), messages with ``<private
xmlns='urn:xmpp:carbons:2'/>`` or ``<no-copy xmlns='urn:xmpp:hints'/>``,
and carbons themselves.

Copies are made in :meth:`Router.deliver_unfiltered`, i.e. *after* the
filter chain (domain filter, blocking command): a message a filter refused
produces no copy.  The plugin wraps that method, and returns at once for
users with no enabled session, so others pay one dict look-up per message.
"""
from __future__ import annotations

from twisted.words.xish import domish

from xmppd.plugin import Plugin, Request
from xmppd.stanzas import NS_CLIENT, Prebuilt, StanzaError, escape_attr, serialize

NS_CARBONS = "urn:xmpp:carbons:2"
NS_FORWARD = "urn:xmpp:forward:0"
NS_HINTS = "urn:xmpp:hints"
NS_MUC_USER = "http://jabber.org/protocol/muc#user"
NS_RECEIPTS = "urn:xmpp:receipts"
NS_MARKERS = "urn:xmpp:chat-markers:0"
NS_SID = "urn:xmpp:sid:0"


def eligible(stanza: domish.Element, strip_private: bool = False) -> bool:
    """XEP-0280 §6 eligibility (see the module docstring).

    ``strip_private``: the message is about to reach its (local) recipient;
    a ``<private/>`` it carries is removed (XEP-0280 §8: the recipient has no
    use for it).
    """
    kind = stanza.getAttribute("type", "normal")
    if kind != "chat" and kind != "normal":
        return False
    content = kind == "chat"
    refused = False
    for child in stanza.children:
        if not isinstance(child, domish.Element):
            continue
        uri = child.uri
        if uri == NS_CARBONS:
            if child.name == "private" and strip_private:
                stanza.children.remove(child)
                return False
            refused = True  # private, or a carbon already
        elif uri == NS_MUC_USER or (uri == NS_HINTS and child.name == "no-copy"):
            refused = True  # a MUC private message, or the sender asked for no copies
        elif (child.name == "body" and uri == NS_CLIENT) or uri == NS_RECEIPTS or uri == NS_MARKERS:
            content = True
    return content and not refused


class CarbonsPlugin(Plugin):
    name = "urn:xmpp:carbons:2"
    features = (NS_CARBONS,)

    def setup(self) -> None:
        # bare JID -> number of its sessions with carbons enabled
        self.users: dict[str, int] = {}
        self.handle_iq("set", NS_CARBONS, "enable", self.on_enable)
        self.handle_iq("set", NS_CARBONS, "disable", self.on_disable)
        self.router.on_closed.append(self._closed)
        inner = self.router.deliver_unfiltered
        users = self.users
        copies = self.copies

        hosts = self.router.hosts

        def deliver_unfiltered(stanza, sender, to, session=None):
            if users and stanza.name == "message" and (sender.bare in users or to.bare in users):
                # Decided before delivery: delivery to a local user removes <private/>.
                copy = eligible(stanza, to.host in hosts)
                inner(stanza, sender, to, session)
                if copy:
                    copies(stanza, sender, to, session)
                return
            inner(stanza, sender, to, session)

        self.router.deliver_unfiltered = deliver_unfiltered

    # -- enable / disable ----------------------------------------------------

    def _session(self, request: Request):
        if request.session is None or request.to is not None:
            raise StanzaError("bad-request", text="carbons are set by a session for itself")
        return request.session

    def on_enable(self, request: Request):
        session = self._session(request)
        if not session.state.get("carbons"):
            session.state["carbons"] = True
            bare = session.jid.bare
            self.users[bare] = self.users.get(bare, 0) + 1
        return None

    def on_disable(self, request: Request):
        self._drop(self._session(request))
        return None

    def _drop(self, session) -> None:
        if session.state.pop("carbons", None):
            bare = session.jid.bare
            left = self.users.get(bare, 1) - 1
            if left > 0:
                self.users[bare] = left
            else:
                self.users.pop(bare, None)

    def _closed(self, session) -> None:
        self._drop(session)

    # -- copies ------------------------------------------------------------------

    def copies(self, stanza: domish.Element, sender, to, session) -> None:
        """Sent and received copies of an eligible message just delivered."""
        router = self.router
        inner = None
        if session is not None and sender.bare != to.bare and sender.bare in self.users:
            inner = _forwardable(stanza)
            own = router.sent_stanza_id
            sent = _sent_form(stanza, inner, to, own) if own[0] is stanza else inner
            self._send_copies("sent", sent, stanza.getAttribute("type"), sender.bare, {session},
                              router.resources_of(sender.bare))
        if to.user is not None and to.host in router.hosts and to.bare in self.users:
            resources = router.resources_of(to.bare)
            if not resources:
                return
            direct = _direct_recipients(stanza, to, resources)
            if session is not None:
                direct.add(session)  # a message to oneself: the sender has it
            self._send_copies("received", inner or _forwardable(stanza), stanza.getAttribute("type"),
                              to.bare, direct, resources)

    @staticmethod
    def _send_copies(kind: str, inner: bytes, mtype: str | None, bare: str, skip,
                     resources) -> None:
        head = f"<message from='{escape_attr(bare)}' to='".encode()
        # The wrapper keeps the original's type (XEP-0280 §7, §8).
        type_attr = f" type='{escape_attr(mtype)}'" if mtype is not None else ""
        tail = (f"'{type_attr}><{kind} xmlns='{NS_CARBONS}'><forwarded xmlns='{NS_FORWARD}'>"
                ).encode() + inner + f"</forwarded></{kind}></message>".encode()
        for target in resources.values():
            if target not in skip and target.state.get("carbons"):
                target.send_bytes(head + escape_attr(target.jid.full).encode() + tail)


def _forwardable(stanza: domish.Element) -> bytes:
    """The message as a child of ``<forwarded/>`` (its namespace spelled out)."""
    return b"<message xmlns='jabber:client'" + serialize(stanza)[8:]


def _sent_form(stanza: domish.Element, inner: bytes, to, own: tuple) -> bytes:
    """The forwarded message of a sent copy when the sender's archive kept it.

    ``own``: (message, sender's bare JID, id prefix, seq), from the archive
    (:attr:`Router.sent_stanza_id`).  The sender's ``<stanza-id/>`` is only
    here: XEP-0313 §3.5 keeps it out of the message the recipient gets (who
    may not read the sender's archive) and asks for it in the carbon copy,
    so the sender's other clients match the copy with their MAM results.
    For the same reason the recipient's ``<stanza-id/>`` (a local
    recipient's archive id) is replaced by it.
    """
    mine = (f"<stanza-id xmlns='{NS_SID}' by='{escape_attr(own[1])}'"
            f" id='{escape_attr(own[2])}{own[3]:x}'/>").encode()
    if to.user is not None:
        children = stanza.children
        for i in range(len(children) - 1, -1, -1):
            child = children[i]
            if (child.__class__ is Prebuilt and child.name == "stanza-id"
                    and child.attributes.get("by") == to.bare):
                theirs = child.xml.encode()
                if theirs in inner:
                    return inner.replace(theirs, mine, 1)
                break
    if inner.endswith(b"</message>"):
        return inner[:-10] + mine + b"</message>"
    return inner[:-2] + b">" + mine + b"</message>"  # <message .../>


def _direct_recipients(stanza: domish.Element, to, resources) -> set:
    """The sessions the router delivered the message itself to (RFC 6121 §8.5)."""
    if to.resource is not None:
        target = resources.get(to.resource)
        if target is not None:
            return {target}
    best, targets = -129, set()
    for target in resources.values():
        if not target.available or target.priority < 0:
            continue
        if target.priority > best:
            best, targets = target.priority, {target}
        elif target.priority == best:
            targets.add(target)
    return targets

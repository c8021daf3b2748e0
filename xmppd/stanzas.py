"""Building replies and errors for stanzas (RFC 6120 §8.3).

Twisted's ``StanzaError`` knows only the RFC 3920 condition table and crashes
serialising ``policy-violation``; this module carries the RFC 6120 table and
builds error replies in place (swapping ``to``/``from``), the way servers are
expected to bounce stanzas.
"""
from __future__ import annotations

from twisted.words.xish import domish

NS_CLIENT = "jabber:client"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_STREAMS = "http://etherx.jabber.org/streams"
NS_STREAM_ERRORS = "urn:ietf:params:xml:ns:xmpp-streams"

# RFC 6120 §8.3.3: condition -> default error type.
CONDITIONS = {
    "bad-request": "modify",
    "conflict": "cancel",
    "feature-not-implemented": "cancel",
    "forbidden": "auth",
    "gone": "cancel",
    "internal-server-error": "cancel",
    "item-not-found": "cancel",
    "jid-malformed": "modify",
    "not-acceptable": "modify",
    "not-allowed": "cancel",
    "not-authorized": "auth",
    "policy-violation": "modify",
    "recipient-unavailable": "wait",
    "redirect": "modify",
    "registration-required": "auth",
    "remote-server-not-found": "cancel",
    "remote-server-timeout": "wait",
    "resource-constraint": "wait",
    "service-unavailable": "cancel",
    "subscription-required": "auth",
    "undefined-condition": "cancel",
    "unexpected-request": "wait",
}


class StanzaError(Exception):
    """Raised by handlers; the router turns it into an error reply."""

    def __init__(
        self,
        condition: str,
        type: str | None = None,
        text: str | None = None,
        extra: domish.Element | None = None,
        echo: bool = True,
    ) -> None:
        super().__init__(condition if text is None else f"{condition}: {text}")
        self.condition = condition
        self.type = type or CONDITIONS.get(condition, "cancel")
        self.text = text
        self.extra = extra
        # False: the bounce leaves out the offending payload (RFC 6120 §8.3.1
        # makes echoing it optional).  For refusals of oversized requests, so
        # that refusing costs nothing near what the request would have.
        self.echo = echo

    def to_element(self) -> domish.Element:
        error = domish.Element((NS_CLIENT, "error"))
        error["type"] = self.type
        error.addElement((NS_STANZAS, self.condition))
        if self.text:
            error.addElement((NS_STANZAS, "text"), content=self.text)
        if self.extra is not None:
            error.addChild(self.extra)
        return error


def error_reply(stanza: domish.Element, error: StanzaError) -> domish.Element | None:
    """Turn ``stanza`` into its error bounce, or None for errors (never bounce those)."""
    if stanza.getAttribute("type") == "error":
        return None
    sender, recipient = stanza.getAttribute("from"), stanza.getAttribute("to")
    reply = domish.Element((NS_CLIENT, stanza.name))
    if recipient:
        reply["from"] = recipient
    if sender:
        reply["to"] = sender
    if stanza.getAttribute("id"):
        reply["id"] = stanza["id"]
    reply["type"] = "error"
    if stanza.name != "iq":
        # Messages and presence carry their payload back (RFC 6120 §8.3.1).
        for child in stanza.children:
            reply.children.append(child)
    elif error.echo:
        first = stanza.firstChildElement()
        if first is not None:
            reply.children.append(first)
    reply.addChild(error.to_element())
    return reply


def iq_result(iq: domish.Element, payload: domish.Element | None = None) -> domish.Element:
    """The ``result`` reply to ``iq`` (addresses swapped)."""
    reply = domish.Element((NS_CLIENT, "iq"))
    if iq.getAttribute("to"):
        reply["from"] = iq["to"]
    if iq.getAttribute("from"):
        reply["to"] = iq["from"]
    reply["id"] = iq.getAttribute("id", "")
    reply["type"] = "result"
    if payload is not None:
        reply.addChild(payload)
    return reply


_XML_NS = "http://www.w3.org/XML/1998/namespace"


def _escape_text(text: str) -> str:
    if "&" in text:
        text = text.replace("&", "&amp;")
    if "<" in text:
        text = text.replace("<", "&lt;")
    if ">" in text:
        text = text.replace(">", "&gt;")
    return text


def _escape_attr(text: str) -> str:
    text = _escape_text(text)
    if "'" in text:
        text = text.replace("'", "&apos;")
    return text


escape_text = _escape_text
escape_attr = _escape_attr


class Prebuilt(domish.Element):
    """An element whose XML is made once, when it is built (``xml``).

    For an element the server adds to many stanzas on the hot path (the
    XEP-0359 ``<stanza-id/>``): :func:`serialize` writes ``xml`` as it is
    instead of walking the element (measured: 2 of the ~4 elements written
    per archived message, bench/RESULTS.md).  Still a
    :class:`~twisted.words.xish.domish.Element` that code finds and reads
    like any other child; it must not be changed once built (``xml`` would
    be stale).  ``xml`` declares its namespace, so it is right under any
    parent.
    """

    def __init__(self, uri: str, name: str, attributes: dict, xml: str) -> None:
        # What Element.__init__ sets, without its argument handling.
        self.localPrefixes = {}
        self.uri = self.defaultUri = uri
        self.name = name
        self.attributes = attributes
        self.children = []
        self.parent = None
        self.xml = xml


class _Unusual(Exception):
    """The element needs domish's general serializer (prefixes, foreign attributes)."""


def _write(el: domish.Element, parent_uri: str, out: list) -> None:
    uri = el.uri if el.uri is not None else parent_uri
    if el.localPrefixes or (el.defaultUri is not None and el.defaultUri != uri):
        raise _Unusual
    name = el.name
    out.append("<" + name)
    if uri != parent_uri:
        out.append(" xmlns='" + _escape_attr(uri) + "'")
    for key, value in el.attributes.items():
        if key.__class__ is tuple:
            if key[0] != _XML_NS:
                raise _Unusual
            out.append(" xml:" + key[1] + "='" + _escape_attr(value) + "'")
        else:
            out.append(" " + key + "='" + _escape_attr(value) + "'")
    children = el.children
    if not children:
        out.append("/>")
        return
    out.append(">")
    for child in children:
        cls = child.__class__
        if cls is str:
            out.append(_escape_text(child))
        elif cls is domish.SerializedXML:
            out.append(child)  # already XML (cached listings)
        elif cls is Prebuilt:
            out.append(child.xml)
        else:
            _write(child, uri, out)
    out.append("</" + name + ">")


def serialize_fragment(element: domish.Element, parent_uri: str = NS_CLIENT) -> str:
    """XML text of ``element`` as a child of an element in ``parent_uri``.

    For data kept as XML (the vCard store): the same fast writer as
    :func:`serialize`, with domish's serializer as the fallback.
    """
    out: list = []
    try:
        _write(element, parent_uri, out)
    except _Unusual:
        return element.toXml(defaultUri=parent_uri)
    return "".join(out)


class Forwardable(domish.Element):
    """An element that may still be written as the bytes it arrived as.

    :func:`serialize` asks :meth:`wire` first; ``None`` means "serialise
    me".  The one kind is :class:`xmppd.s2s.wire.ReceivedStanza` (messages
    from peer servers); plain elements are not asked anything.
    """

    def wire(self) -> bytes | None:
        return None


_Element = domish.Element


def serialize(element: domish.Element) -> bytes:
    """Bytes for a ``jabber:client`` stream (no redundant default namespace).

    On the hot path: a direct writer for the plain shape of stanzas (default
    namespaces, ``xml:lang``), about twice as fast as domish's general
    serializer, which remains the fallback for prefixed names.  A
    :class:`Forwardable` element that is provably unchanged is its received
    bytes (a plain element pays one class test for this).
    """
    if element.__class__ is not _Element and isinstance(element, Forwardable):
        data = element.wire()
        if data is not None:
            return data
    out: list = []
    try:
        _write(element, NS_CLIENT, out)
    except _Unusual:
        return element.toXml(defaultUri=NS_CLIENT).encode("utf-8")
    return "".join(out).encode("utf-8")

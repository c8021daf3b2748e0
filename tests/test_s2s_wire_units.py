"""The inbound s2s parser (xmppd.s2s.wire), in process: same trees, received bytes only when safe.

* every input gives the plain parser's tree (children built on first use),
  however the bytes are split across reads;
* a plain ``<message/>`` is serialised as the exact bytes it arrived as;
* any namespace or prefix doubt (a declaration on the message, a prefix the
  peer's stream header bound, a ``jabber:server`` declaration inside, a header
  that binds ``jabber:server`` to a prefix) and empty messages are serialised
  from the tree;
* any change to the message (children read, attribute set, name) makes it
  serialised from the tree again.
"""
from __future__ import annotations

from xml.parsers import expat

import pytest

from xmppd.s2s.wire import ReceivedStanza, WireParser
from xmppd.stanzas import serialize
from xmppd.xmlparser import Limits, StreamParser, XMLStreamError

HEADER = (b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'"
          b" xmlns:db='jabber:server:dialback' to='b.test' version='1.0'>")
RENAME = ("jabber:server", "jabber:client")

PLAIN = (b'<message  from="a@x.test/r" to=\'b@b.test\' type="chat" id="p1">'
         b"<body>A&#x42;C &amp; &lt;d&gt;</body>\n<x xmlns='urn:x' k='v'><y>t</y>tail</x>mid<z/>"
         b"</message >")
REFUSED = {
    "declares its namespace": b"<message xmlns='jabber:server' from='a@x' to='b@y'><body>x</body></message>",
    "declares a prefix": b"<message xmlns:q='urn:q' from='a@x' to='b@y'><q:a/></message>",
    "header prefix element": b"<message from='a@x' to='b@y'><db:result/></message>",
    "header prefix attribute": b"<message from='a@x' to='b@y'><body db:a='1'>x</body></message>",
    "header prefix on the message": b"<message from='a@x' to='b@y' db:a='1'><body>x</body></message>",
    "jabber:server redeclared": b"<message from='a@x' to='b@y'><q xmlns='jabber:server'>x</q></message>",
    "jabber:server prefixed": (b"<message from='a@x' to='b@y'><q xmlns:p='jabber:server'>"
                               b"<p:body>x</p:body></q></message>"),
    "empty": b"<message from='a@x' to='b@y'/>",
}
OTHERS = [
    b"<iq from='a@x' to='b@y' type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq>",
    b"<presence from='a@x' to='b@y'><show>away</show></presence>",
    b"<message xmlns='jabber:client' from='a@x' to='b@y'><body>c</body></message>",
    b"<message from='a@x' to='b@y' xml:lang='en'><body xml:lang='de'>x</body><![CDATA[<&>]]></message>",
]


def parse(cls, data: bytes, step: int | None = None, header: bytes = HEADER) -> list:
    out: list = []
    parser = cls(lambda *a: None, out.append, lambda: None, Limits(65536, nodes=50), RENAME)
    parser.feed(header)
    for i in range(0, len(data), step or len(data)):
        parser.feed(data[i:i + (step or len(data))])
    return out


ALL = PLAIN + b"  ".join(REFUSED.values()) + b"\n".join(OTHERS) + PLAIN


@pytest.mark.parametrize("step", [None, 1, 3, 17, 64])
def test_trees_are_the_plain_parsers_however_split(step):
    plain, wire = parse(StreamParser, ALL, step), parse(WireParser, ALL, step)
    assert len(plain) == len(wire) == len(REFUSED) + len(OTHERS) + 2
    sent = [wire[0].wire(), wire[-1].wire()]
    assert sent == [PLAIN, PLAIN]  # the exact received bytes, wherever the reads split
    for a, b in zip(plain, wire):
        assert b.toXml() == a.toXml()  # builds the children
        assert serialize(b) == serialize(a)


def test_an_unchanged_message_is_its_received_bytes():
    (el,) = parse(WireParser, PLAIN)
    assert isinstance(el, ReceivedStanza) and el.uri == "jabber:client"
    assert el.getAttribute("to") == "b@b.test" and el["type"] == "chat"  # no children built
    assert serialize(el) == PLAIN
    assert el._kids is None


@pytest.mark.parametrize("why", sorted(REFUSED))
def test_namespace_or_prefix_doubts_are_serialised_from_the_tree(why):
    (el,) = parse(WireParser, REFUSED[why])
    (ref,) = parse(StreamParser, REFUSED[why])
    assert el.wire() is None
    data = serialize(el)
    assert data == serialize(ref)
    assert b"jabber:server" not in data.replace(b"jabber:server:dialback", b"")
    _client_parses(data)


def test_a_header_binding_jabber_server_to_a_prefix_disables_the_bytes():
    header = HEADER.replace(b"version=", b"xmlns:s='jabber:server' version=")
    els = parse(WireParser, b"<s:message from='a@x' to='b@y'><body>x</body></s:message>" + PLAIN,
                header=header)
    assert [e.wire() for e in els] == [None, None]
    for e in els:
        _client_parses(serialize(e))


@pytest.mark.parametrize("change", [
    lambda el: el.children,  # read: a plugin could have changed what it read
    lambda el: el.addElement(("urn:xmpp:sid:0", "stanza-id")),
    lambda el: el.children.remove(el.firstChildElement()),
    lambda el: el.__setitem__("to", "c@b.test"),
    lambda el: el.attributes.pop("id"),
    lambda el: setattr(el, "children", []),
    lambda el: setattr(el, "name", "iq"),
    lambda el: el.elements(),
    lambda el: str(el),
])
def test_any_change_or_read_of_the_children_serialises_the_tree(change):
    (el,) = parse(WireParser, PLAIN)
    (ref,) = parse(StreamParser, PLAIN)
    change(el)
    change(ref)
    assert el.wire() is None
    assert serialize(el) == serialize(ref) != PLAIN


def test_children_are_counted_against_the_limits():
    deep = b"<message from='a@x' to='b@y'>" + b"<a>" * 60 + b"</a>" * 60 + b"</message>"
    with pytest.raises(XMLStreamError, match="deeper"):
        parse(WireParser, deep)
    wide = b"<message from='a@x' to='b@y'>" + b"<a/>" * 60 + b"</message>"
    with pytest.raises(XMLStreamError, match="more than 50"):
        parse(WireParser, wide)


def _client_parses(data: bytes) -> None:
    """``data`` is well-formed on a client stream (only jabber:client and stream: bound)."""
    p = expat.ParserCreate("UTF-8", " ")
    names = []
    p.StartElementHandler = lambda name, attrs: names.append(name)
    p.Parse(b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
            + data + b"</stream:stream>", True)
    assert names[1] == "jabber:client message"


def test_a_stream_whose_messages_are_all_read_builds_them_at_once(monkeypatch):
    """Where every message's children are read (XEP-0359...), laziness only costs: the
    parser builds them at once for a while, then tries again."""
    from xmppd.s2s import wire

    monkeypatch.setattr(wire, "PROBE", 4)
    monkeypatch.setattr(wire, "EAGER", 3)
    kinds = []
    parser = WireParser(lambda *a: None, lambda el: (kinds.append(type(el).__name__), el.children),
                        lambda: None, Limits(65536), RENAME)
    parser.feed(HEADER)
    parser.feed(PLAIN * 12)
    # 4 lazy (all read) -> the 5th decides: 3 built at once; then lazy again for 4, ...
    assert kinds == ["ReceivedStanza"] * 4 + ["Element"] * 3 + ["ReceivedStanza"] * 4 + ["Element"]
    unread = []
    parser = WireParser(lambda *a: None, unread.append, lambda: None, Limits(65536), RENAME)
    parser.feed(HEADER)
    parser.feed(PLAIN * 12)
    assert all(isinstance(el, ReceivedStanza) and el.wire() == PLAIN for el in unread)

"""Unit tests of the hardened stream parser (no network)."""
from __future__ import annotations

import time

import pytest

from xmppd.xmlparser import StreamParser, XMLStreamError

HEADER = (
    b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'"
    b" to='localhost' version='1.0'>"
)


class Recorder:
    def __init__(self, limit: int = 10_000) -> None:
        self.starts, self.elements, self.ends = [], [], 0
        self.parser = StreamParser(self.start, self.elements.append, self.end, limit)

    def start(self, uri, local, attrs, decls):
        self.starts.append((uri, local, attrs, dict(decls)))

    def end(self):
        self.ends += 1


def test_header_and_stanzas_are_dispatched():
    r = Recorder()
    r.parser.feed(HEADER + b"<message to='a@b'><body>hi &amp; bye</body></message>")
    assert r.starts[0][:2] == ("http://etherx.jabber.org/streams", "stream")
    assert r.starts[0][3] == {"": "jabber:client", "stream": "http://etherx.jabber.org/streams"}
    (msg,) = r.elements
    assert msg.uri == "jabber:client" and msg["to"] == "a@b"
    assert str(msg.body) == "hi & bye"


def test_byte_by_byte_feeding_gives_the_same_tree():
    r = Recorder()
    for b in HEADER + "<message><body>é</body></message>".encode():
        r.parser.feed(bytes([b]))
    assert str(r.elements[0].body) == "é"


@pytest.mark.parametrize("payload", [
    b"<!DOCTYPE x [<!ENTITY a 'aaaa'>]>",
    b"<!-- a comment -->",
    b"<?pi data?>",
])
def test_restricted_xml_in_stream(payload):
    r = Recorder()
    r.parser.feed(HEADER)
    with pytest.raises(XMLStreamError) as e:
        r.parser.feed(payload + b"<message/>")
    assert e.value.condition in ("restricted-xml", "not-well-formed")
    assert not r.elements


def test_doctype_before_root_is_restricted_and_no_entity_bomb():
    bomb = (
        b"<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'>"
        + b"".join(
            b"<!ENTITY lol%d '%s'>" % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
            for i in range(1, 10)
        )
        + b"]>"
    )
    r = Recorder()
    start = time.process_time()
    with pytest.raises(XMLStreamError) as e:
        r.parser.feed(bomb + HEADER + b"<message><body>&lol9;</body></message>")
    assert e.value.condition == "restricted-xml"
    assert time.process_time() - start < 1.0


def test_comment_inside_stanza_is_restricted():
    r = Recorder()
    r.parser.feed(HEADER)
    with pytest.raises(XMLStreamError) as e:
        r.parser.feed(b"<message><!-- x --></message>")
    assert e.value.condition == "restricted-xml"


def test_undefined_entity_is_not_well_formed():
    r = Recorder()
    r.parser.feed(HEADER)
    with pytest.raises(XMLStreamError) as e:
        r.parser.feed(b"<message><body>&foo;</body></message>")
    assert e.value.condition in ("not-well-formed", "restricted-xml")


def test_malformed_xml():
    r = Recorder()
    r.parser.feed(HEADER)
    with pytest.raises(XMLStreamError) as e:
        r.parser.feed(b"<message><body></message>")
    assert e.value.condition == "not-well-formed"


def test_size_limit_holds_when_stanza_arrives_in_one_read():
    r = Recorder(limit=10_000)
    r.parser.feed(HEADER)
    big = b"<message><body>" + b"x" * 60_000 + b"</body></message>"
    with pytest.raises(XMLStreamError) as e:
        r.parser.feed(big)
    assert e.value.condition == "policy-violation"
    assert not r.elements


def test_size_limit_holds_with_small_stanza_in_front():
    r = Recorder(limit=10_000)
    r.parser.feed(HEADER)
    with pytest.raises(XMLStreamError):
        r.parser.feed(b"<presence/>" + b"<message><body>" + b"x" * 60_000 + b"</body></message>")
    assert len(r.elements) == 1


def test_huge_start_tag_is_limited():
    r = Recorder(limit=10_000)
    r.parser.feed(HEADER)
    with pytest.raises(XMLStreamError) as e:
        r.parser.feed(b"<message a='" + b"x" * 50_000)
    assert e.value.condition == "policy-violation"


def test_many_small_stanzas_and_whitespace_pass():
    r = Recorder(limit=2_000)
    r.parser.feed(HEADER)
    r.parser.feed(b" \n".join(b"<presence/>" for _ in range(2000)) + b" " * 5000)
    assert len(r.elements) == 2000


def test_long_text_is_linear():
    r = Recorder(limit=4_000_000)
    r.parser.feed(HEADER)
    start = time.process_time()
    data = b"<message><body>" + b"\n" * 2_000_000 + b"</body></message>"
    for i in range(0, len(data), 1000):
        r.parser.feed(data[i:i + 1000])
    assert len(r.elements) == 1
    assert time.process_time() - start < 2.0


def test_halt_stops_dispatch_of_pipelined_data():
    r = Recorder()
    seen = []

    def on_element(el):
        seen.append(el.name)
        if el.name == "starttls":
            r.parser.halt()

    r.parser._on_element = on_element
    r.parser.feed(HEADER + b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
                  b"<iq type='set'><query/></iq><message/>")
    assert seen == ["starttls"]


def test_stream_end():
    r = Recorder()
    r.parser.feed(HEADER + b"</stream:stream>")
    assert r.ends == 1


@pytest.mark.parametrize("xml", [
    b"<message to='a@b' type='chat' xml:lang='en'><body>x &amp; y &lt; z &gt; w</body>"
    b"<active xmlns='http://jabber.org/protocol/chatstates'/></message>",
    b"<iq type='get' id='1'><query xmlns='jabber:iq:roster'><item jid='x@y' name='a&apos;b'><group>g</group></item></query></iq>",
    b"<presence><x xmlns='urn:a' xmlns:p='urn:p' p:attr='v'><p:child/></x></presence>",
])
def test_serialize_round_trips(xml):
    """The fast serializer gives what the parser reads back identically."""
    from xmppd.stanzas import serialize

    first = Recorder()
    first.parser.feed(HEADER + xml)
    data = serialize(first.elements[0])
    second = Recorder()
    second.parser.feed(HEADER + data)
    assert second.elements[0].toXml() == first.elements[0].toXml()
    assert serialize(second.elements[0]) == data


def test_halted_parser_is_freed_without_the_cycle_collector():
    import gc
    import weakref

    r = Recorder()
    r.parser.feed(HEADER + b"<presence/>")
    ref = weakref.ref(r.parser)
    r.parser.halt()
    gc.disable()
    try:
        r.parser = None
        assert ref() is None
    finally:
        gc.enable()

"""Unit tests of the hardened stream parser (no network)."""
from __future__ import annotations

import time

import pytest

from xmppd.xmlparser import Limits, StreamParser, XMLStreamError, parse_fragment

HEADER = (
    b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'"
    b" to='localhost' version='1.0'>"
)


class Recorder:
    def __init__(self, limit: "int | Limits" = 10_000) -> None:
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


# -- issue 17: depth, node count, stream header --------------------------------


def nested(levels: int, close: bool = True) -> bytes:
    """A message whose tree is ``levels`` deep, the message itself included."""
    inner = levels - 1
    return (b"<message>" + b"<a>" * inner
            + ((b"</a>" * inner + b"</message>") if close else b""))


def test_depth_at_the_limit_passes_and_one_more_is_refused():
    r = Recorder(Limits(100_000, depth=10))
    r.parser.feed(HEADER + nested(10))
    assert len(r.elements) == 1
    with pytest.raises(XMLStreamError) as e:
        r.parser.feed(nested(11))
    assert e.value.condition == "policy-violation"
    assert "deeper than 10" in e.value.text
    assert len(r.elements) == 1


def test_deep_nesting_is_refused_in_the_start_handler_before_any_deeper_tree():
    """1,000 levels (3 KB, the RecursionError of issue 17) never become a tree."""
    r = Recorder(Limits(262_144))  # default depth
    r.parser.feed(HEADER)
    with pytest.raises(XMLStreamError) as e:
        r.parser.feed(nested(1000, close=False))  # refused without any end tag
    assert e.value.condition == "policy-violation"
    # The tree held at the moment of refusal is exactly as deep as allowed.
    depth, el = 1, r.parser._current
    while el.parent is not None:
        depth, el = depth + 1, el.parent
    assert depth == r.parser.limits.depth == 48


def test_node_limit_counts_elements_while_parsing():
    r = Recorder(Limits(262_144, nodes=1500))
    r.parser.feed(HEADER)
    with pytest.raises(XMLStreamError) as e:
        r.parser.feed(b"<message>" + b"<a/>" * 65_000)  # unfinished
    assert e.value.condition == "policy-violation"
    assert "1500 elements and attributes" in e.value.text
    assert len(r.parser._current.children) < 1500


def test_node_limit_counts_attributes_and_namespace_declarations():
    r = Recorder(Limits(262_144, nodes=100))
    r.parser.feed(HEADER + b"<message><x" + b"".join(b" a%d=''" % i for i in range(98)) + b"/></message>")
    assert len(r.elements) == 1  # 2 elements + 98 attributes = 100
    with pytest.raises(XMLStreamError):
        r.parser.feed(b"<message><x" + b"".join(b" a%d=''" % i for i in range(99)) + b"/></message>")
    r = Recorder(Limits(262_144, nodes=100))
    with pytest.raises(XMLStreamError):
        r.parser.feed(HEADER + b"<message><x" + b"".join(b" xmlns:p%d='u'" % i for i in range(99)) + b"/>")


def test_node_count_is_per_stanza():
    r = Recorder(Limits(262_144, nodes=100))
    r.parser.feed(HEADER + (b"<message>" + b"<a/>" * 99 + b"</message>") * 50)
    assert len(r.elements) == 50


def test_memory_of_a_max_size_stanza_is_a_small_multiple_of_its_bytes():
    """The default limits keep any tree within ~4x max_stanza_size."""
    import tracemalloc

    size = 262_144
    worst = {
        "empty children": b"<message>" + b"<a/>" * 65_000,
        "nesting": b"<message>" + (b"<a>" * 40 + b"</a>" * 40) * 2000,
        "attributes": b"<message>" + b"".join(b"<a x='' y='' z=''/>" for _ in range(20_000)),
        "nodes then text": b"<message>" + (b"<a>" * 40 + b"</a>" * 40) * 37 + b"<b>" + b"x" * size,
    }
    for name, data in worst.items():
        r = Recorder(Limits(size))
        r.parser.feed(HEADER)
        tracemalloc.start()
        try:
            with pytest.raises(XMLStreamError):
                r.parser.feed(data[:size])
            held = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        assert held < 4 * size, (name, held)


def test_stream_header_is_bounded_in_attributes_and_bytes():
    r = Recorder(Limits(262_144))
    with pytest.raises(XMLStreamError) as e:
        r.parser.feed(HEADER[:-1] + b"".join(b" a%d='x'" % i for i in range(40)) + b">")
    assert e.value.condition == "policy-violation"
    assert not r.starts
    r = Recorder(Limits(262_144, header_size=4096))
    with pytest.raises(XMLStreamError) as e:
        r.parser.feed(HEADER[:-1] + b" id='" + b"x" * 20_000)
    assert e.value.condition == "policy-violation" and "header" in e.value.text


@pytest.mark.parametrize("unfinished", [False, True])
def test_second_stream_header_is_a_stream_error_at_once(unfinished):
    r = Recorder()
    r.parser.feed(HEADER + b"<presence/>")
    second = HEADER if unfinished else HEADER + b"<message><body>x</body></message>"
    with pytest.raises(XMLStreamError) as e:
        r.parser.feed(second)
    assert e.value.condition == "unsupported-stanza-type"
    assert [el.name for el in r.elements] == ["presence"]


def test_stream_element_deeper_inside_a_stanza_is_just_payload():
    r = Recorder()
    r.parser.feed(HEADER + b"<message><stream:stream/></message>")
    assert len(r.elements) == 1


def test_parse_fragment_applies_the_limits():
    limits = Limits(10_000, depth=10, nodes=50)
    el = parse_fragment("<message to='a@b'><body>hi</body></message>", limits)
    assert el.name == "message" and str(el.body) == "hi"
    for bad in (nested(11).decode(), "<message>" + "<a/>" * 60 + "</message>", "<message>",
                "<message/><message/>"):
        with pytest.raises(XMLStreamError):
            parse_fragment(bad, limits)


def test_serializers_handle_the_deepest_allowed_tree():
    """Every allowed depth serialises, also through domish's fallback."""
    from xmppd.config import MAX_DEPTH
    from xmppd.stanzas import serialize

    r = Recorder(Limits(262_144, depth=MAX_DEPTH))
    inner = b"<a xmlns:p='urn:p' p:x='1'/>"  # a foreign attribute: the fallback
    r.parser.feed(HEADER + b"<message>" + b"<a>" * (MAX_DEPTH - 2) + inner
                  + b"</a>" * (MAX_DEPTH - 2) + b"</message>")
    (msg,) = r.elements
    out = serialize(msg)
    assert out.count(b"<a") == MAX_DEPTH - 1
    r2 = Recorder(Limits(262_144, depth=MAX_DEPTH))
    r2.parser.feed(HEADER + out)
    assert len(r2.elements) == 1


def test_config_caps_max_depth():
    from xmppd.config import ConfigError, from_dict

    with pytest.raises(ConfigError) as e:
        from_dict({"server": {"hosts": ["localhost"]}, "c2s": {"max_depth": 1000}})
    assert "c2s.max_depth" in str(e.value)
    c2s = from_dict({"server": {"hosts": ["localhost"]}}).c2s
    assert (c2s.max_depth, c2s.max_stanza_nodes) == (48, 1500)
    assert (c2s.max_preauth_stanza_size, c2s.max_preauth_stanza_nodes) == (16384, 100)


def test_a_stanza_at_the_limits_is_still_readable_once_stored():
    """Re-serialising declares each prefixed element's namespace: for_stored allows it."""
    from xmppd.stanzas import serialize

    limits = Limits(262_144, depth=10, nodes=200)
    r = Recorder(limits)
    children = b"<p:a/>" * 196  # 196 + message + x + declaration + 1 attribute = 200
    r.parser.feed(HEADER + b"<message><x xmlns:p='urn:p' y=''>" + children + b"</x></message>")
    (msg,) = r.elements
    msg["from"] = "a@b/c"  # what the server stamps
    stored = serialize(msg).decode()
    with pytest.raises(XMLStreamError):
        parse_fragment(stored, limits)
    assert parse_fragment(stored, limits.for_stored(4096)).name == "message"


def test_text_split_by_expat_and_feed_slices_is_one_node():
    """A body longer than expat's text buffer, fed in odd pieces, is one text node.

    domish's ``str(el)`` returns the first text node only: a split body would
    reach handlers (and validation such as roster group names) truncated.
    """
    r = Recorder(limit=200_000)
    r.parser.feed(HEADER)
    body = "".join(f"{i:05d}é" for i in range(10_000))  # 60,000 chars, > 1 KiB buffer
    data = f"<message><body>{body}</body><x>a<y/>b</x></message>".encode()
    for i in range(0, len(data), 777):
        r.parser.feed(data[i:i + 777])
    (msg,) = r.elements
    assert [c for c in msg.body.children] == [body]
    assert str(msg.body) == body
    x = msg.x
    assert [c if isinstance(c, str) else c.name for c in x.children] == ["a", "y", "b"]


def test_prebuilt_element_serializes_like_the_element_it_stands_for():
    """XEP-0359 ids are Prebuilt: written from their cached XML, found like any child."""
    from twisted.words.xish import domish

    from xmppd.stanzas import NS_CLIENT, Prebuilt, serialize

    NS_SID = "urn:xmpp:sid:0"
    plain, fast = domish.Element((NS_CLIENT, "message")), domish.Element((NS_CLIENT, "message"))
    for msg in (plain, fast):
        msg["to"] = "bob@localhost"
        msg.addElement("body", content="hi")
    sid = plain.addElement((NS_SID, "stanza-id"))
    sid["by"], sid["id"] = "bob@localhost", "Ab-12f"
    fast.addChild(Prebuilt(NS_SID, "stanza-id", {"by": "bob@localhost", "id": "Ab-12f"},
                           f"<stanza-id xmlns='{NS_SID}' by='bob@localhost' id='Ab-12f'/>"))
    assert serialize(fast) == serialize(plain)
    assert fast.toXml() == plain.toXml()  # domish's own serializer sees a plain element
    (found,) = [c for c in fast.elements() if c.name == "stanza-id" and c.uri == NS_SID]
    assert found.getAttribute("by") == "bob@localhost" and found["id"] == "Ab-12f"

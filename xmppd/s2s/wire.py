"""Messages from a peer server delivered as the bytes they arrived as, when provably unchanged.

A federated message is parsed, checked and routed on both servers.  On the
receiving server the last step, serialising the tree again for the client
stream, rebuilds bytes that (for an unchanged message) mean exactly what the
peer sent.  Inbound s2s streams parse with :class:`WireParser` instead of the
plain :class:`~xmppd.xmlparser.StreamParser`; for a top-level ``<message/>``
it

* builds the stanza element with its attributes at once (everything the
  stream's address checks, the router and the filters read), as a
  :class:`ReceivedStanza`;
* does *not* build its children: expat still parses every byte (well-formed,
  depth, node and size limits as for any stanza), and the child events are
  recorded; the children are built from that record (by the parser's own
  tree-building code) the first time anything reads ``children``;
* keeps the message's received bytes (expat byte offsets into what was fed).

:func:`xmppd.stanzas.serialize` writes those bytes instead of serialising
only while the message is *provably unchanged*: its children were never
built (so nobody saw or changed them) and its name, namespace, attributes
and namespace declarations are what the parser made.  Any reader of the
children (XEP-0359 stamping, carbons, offline storage, CSI...) makes the
element an ordinary one for good, and it is serialised as before.

The bytes are written only when they mean on the client stream what the
tree means (otherwise the message is serialised from the tree, which the
server checked):

* the message element declares no namespace and no prefix itself (its
  namespace is the s2s stream's default ``jabber:server``, which the parser
  renames to the client stream's ``jabber:client``);
* nothing inside it uses a prefix the peer declared on its stream header
  (which the client stream does not declare): any element or attribute in a
  namespace the header bound to a prefix disqualifies the message, and so
  does a header that binds ``jabber:server`` to a prefix;
* nothing inside it declares ``jabber:server`` (the tree says
  ``jabber:client`` there);
* it is not an empty-element tag (``<message/>``: nothing to save).

Only messages: IQs and presence are read by the server's handlers anyway.
Where messages are read anyway (XEP-0359 stamps every one), recording and
then replaying the children costs more than building them: a stream that
sees more than half of :data:`PROBE` lazy messages read builds the next
:data:`EAGER` at once (plain elements, serialised as before), then tries
again.
"""
from __future__ import annotations

from twisted.words.xish import domish

from xmppd.stanzas import NS_CLIENT, Forwardable
from xmppd.xmlparser import Limits, StreamParser, XMLStreamError

_XML_NS = "http://www.w3.org/XML/1998/namespace"


class ReceivedStanza(Forwardable):
    """A top-level ``<message/>`` from a peer, children built on first use.

    ``children`` is a property: the first read builds the children from the
    events the parser recorded, and from then on the element is an ordinary
    domish element (its received bytes are dropped).
    """

    def __init__(self, qname: tuple[str, str], attribs: dict, events: list,
                 limits: Limits, rename: tuple[str | None, str | None], stats: list) -> None:
        # domish.Element.__init__, minus the children list (a property here).
        self.localPrefixes = {}
        self.uri, self.name = qname
        self.defaultUri = self.uri
        self.attributes = attribs
        self.parent = None
        self._kids: list | None = None
        self._events: list | None = events
        self._limits = limits
        self._rename = rename
        self._wire: bytes | None = None
        self._attrs0: dict | None = None
        self._stats = stats  # the parser's [made, built] (see WireParser._start_message)

    def _set_wire(self, data: bytes) -> None:
        self._wire = data
        self._attrs0 = dict(self.attributes)

    @property
    def children(self) -> list:
        kids = self._kids
        if kids is None:
            kids = self._build()
        return kids

    @children.setter
    def children(self, value: list) -> None:
        self._kids = value
        self._events = self._wire = self._attrs0 = None

    def _build(self) -> list:
        self._stats[1] += 1
        events = self._events
        kids = self._kids = []
        self._events = self._wire = self._attrs0 = None
        if events:
            _Replay(self, self._limits, self._rename).replay(events)
        return kids

    def wire(self) -> bytes | None:
        """The received bytes, if nothing the client would see has changed."""
        data = self._wire
        if (data is not None and self._kids is None and self.attributes == self._attrs0
                and self.name == "message" and self.uri == NS_CLIENT
                and self.defaultUri == NS_CLIENT and not self.localPrefixes):
            return data
        return None

    def __getattr__(self, key: str):
        # domish.Element.__getattr__ finds a child element by name: never
        # for private names (a missing one must not build the children).
        if key.startswith("_"):
            raise AttributeError(key)
        return domish.Element.__getattr__(self, key)


class _Replay(StreamParser):
    """Builds a stanza's children from recorded expat events with the parser's own code.

    It has no expat parser: only the state ``_start``/``_text``/``_end``
    use below the stanza level (the events were checked against the
    stream's limits when they were parsed; they are counted again here).
    """

    def __init__(self, top: domish.Element, limits: Limits, rename) -> None:  # noqa: D107
        self._halted = False
        self._depth = 2
        self._nodes = 0
        self.limits = limits
        self._max_depth = limits.depth + 1
        self._max_nodes = limits.nodes
        self._rename_from, self._rename_to = rename
        self._current = top
        self._run = None
        self._top = top

    def replay(self, events: list) -> None:
        start, text, end = self._start, self._text, self._end
        for ev in events:
            cls = ev.__class__
            if cls is tuple:
                start(*ev)
            elif cls is str:
                text(ev)
            else:
                end(None)
        run = self._run
        if run is not None:  # the stanza's last text (its own end is not replayed)
            self._run = None
            self._top.children.append(run if run.__class__ is str else "".join(run))


_END = 0  # an end-element event
#: Every PROBE lazy messages, the parser looks at how many had their children
#: built anyway (XEP-0359 stamps every message, carbons and offline storage
#: read them): more than half, and the next EAGER messages are built at once
#: like any stanza (recording the events first would only add to the cost).
PROBE = 64
EAGER = 1024
#: Bytes kept between stanzas for a start tag split across reads (a typical
#: message start tag is ~150 bytes; a longer split one is just serialised).
_TAIL = 4096


class WireParser(StreamParser):
    """The stream parser of inbound s2s streams: lazy ``<message/>`` children, received bytes kept.

    Everything else (header, other stanzas, limits, restricted XML) is the
    plain parser's.  See the module docstring for when the bytes are used.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._buf = b""  # received bytes from absolute offset self._base on
        self._base = 0
        self._top: ReceivedStanza | None = None  # the open lazy message
        self._events: list | None = None
        self._top_start = 0
        self._top_safe = False
        self._top_decl = False  # a declaration on the stanza element being started
        self._message = f"{self._rename_from} message" if self._rename_from else None
        self._header_uris: frozenset[str] | None = None  # namespaces bound to prefixes by the header
        self._names_ok: dict[str, bool] = {}  # element name -> _name_ok(name)
        self._stats = [0, 0]  # lazy messages made, of which children were built (see PROBE)
        self._eager_left = 0  # messages still to build at once

    def _make_parser(self):
        p = super()._make_parser()
        p.StartElementHandler = self._wstart
        p.EndElementHandler = self._wend
        p.CharacterDataHandler = self._wtext
        p.StartNamespaceDeclHandler = self._wdecl
        return p

    def feed(self, data: bytes) -> None:
        buf = self._buf
        self._buf = buf + data if buf else data
        try:
            super().feed(data)
        finally:
            # Keep what a later top-level message may start in: the open lazy
            # message, else (between stanzas, where a start tag may still be
            # incomplete) the last _TAIL bytes; nothing inside another stanza.
            # Correctness does not depend on this: a message whose first
            # bytes were dropped gets no received bytes (see _wend).
            end = self._base + len(self._buf)
            if self._top is not None:
                keep = self._top_start
            elif self._depth >= 2:
                keep = end
            else:
                keep = end - _TAIL
            cut = keep - self._base
            if cut > 0:
                self._buf = self._buf[cut:]
                self._base = keep

    def halt(self) -> None:
        super().halt()
        self._buf = b""
        self._top = self._events = None

    # -- expat callbacks -----------------------------------------------------------

    def _wdecl(self, prefix: str | None, uri: str) -> None:
        self._ns_decl(prefix, uri)
        depth = self._depth
        if depth == 1:
            self._top_decl = True  # declared on the stanza element itself
        elif depth > 1 and self._top is not None and uri == self._rename_from:
            self._top_safe = False

    def _wstart(self, name: str, attrs: dict) -> None:
        if self._halted:
            return
        top = self._top
        if top is None:
            if self._depth != 1 or name != self._message or self._eager():
                if self._depth == 1:
                    self._top_decl = False
                return self._start(name, attrs)
            return self._start_message(name, attrs)
        depth = self._depth + 1
        if depth > self._max_depth:
            raise XMLStreamError(
                "policy-violation", f"stanza nested deeper than {self.limits.depth} levels")
        nodes = self._nodes = self._nodes + 1 + len(attrs)
        if nodes > self._max_nodes:
            self._count(0)  # raises the policy-violation
        self._depth = depth
        self._events.append((name, attrs))
        if self._top_safe:
            ok = self._names_ok.get(name)
            if ok is None:
                ok = self._names_ok[name] = self._name_ok(name)
            if not ok:
                self._top_safe = False
            elif attrs:
                for key in attrs:
                    if " " in key and not self._name_ok(key):
                        self._top_safe = False

    def _name_ok(self, name: str) -> bool:
        """Not in a namespace the peer's stream header bound to a prefix."""
        if len(self._names_ok) > 256:
            self._names_ok.clear()  # a peer inventing names: the cache stays small
        return name.rpartition(" ")[0] not in self._header_uris

    def _eager(self) -> bool:
        """Build this message at once (see PROBE)?"""
        if self._eager_left:
            self._eager_left -= 1
            return True
        stats = self._stats
        if stats[0] >= PROBE:
            self._stats = [0, 0]  # messages still out keep counting in the old list
            if 2 * stats[1] > stats[0]:
                self._eager_left = EAGER - 1
                return True
        return False

    def _start_message(self, name: str, attrs: dict) -> None:
        """A top-level ``<message>`` in the stream's default namespace: built lazily."""
        nodes = self._nodes = self._nodes + 1 + len(attrs)
        if nodes > self._max_nodes:
            self._count(0)
        self._depth = 2
        unsafe = self._header_uris
        if unsafe is None:
            unsafe = self._header_uris = frozenset(
                uri for prefix, uri in self._decls.items() if prefix)
        safe = not self._top_decl and self._rename_from not in unsafe
        self._top_decl = False
        plain = attrs  # expat's own fresh dict, used as it is when no name has a namespace
        for key in attrs:
            if " " in key:
                plain = {}
                for key, value in attrs.items():
                    if " " in key:
                        auri, _, aname = key.rpartition(" ")
                        plain[(auri, aname)] = value
                        if auri in unsafe:
                            safe = False
                    else:
                        plain[key] = value
                break
        stats = self._stats
        stats[0] += 1
        events: list = []
        self._events = events
        self._top = ReceivedStanza((self._rename_to, "message"), plain, events, self.limits,
                                   (self._rename_from, self._rename_to), stats)
        self._top_start = self._parser.CurrentByteIndex
        self._top_safe = safe

    def _wend(self, name: str) -> None:
        if self._halted:
            return
        top = self._top
        if top is None:
            return self._end(name)
        depth = self._depth
        self._depth = depth - 1
        if depth > 2:
            self._events.append(_END)
            return
        index = self._parser.CurrentByteIndex
        self._top = self._events = None
        self._nodes = 0
        self._boundary = index
        if self._top_safe and index > self._top_start >= self._base:
            # An end tag starts at index; after an empty-element tag expat
            # reports the offset *after* it (no bytes kept for those).
            buf = self._buf
            end = index - self._base
            if buf.startswith(b"</", end):
                start = self._top_start - self._base
                stop = buf.find(b">", end) + 1
                if stop > 0 and buf.startswith(b"<message", start):
                    top._set_wire(buf[start:stop])
        self._on_element(top)

    def _wtext(self, data: str) -> None:
        if self._halted:
            return
        if self._top is not None:
            self._events.append(data)
        else:
            self._text(data)

"""A hardened incremental parser for XMPP streams (RFC 6120 §11).

Twisted's ``domish`` expat stream has measured holes: entity bombs (no DTD
restriction), quadratic text accumulation, DTDs/comments/PIs accepted, a
stanza size limit checked only between ``parse()`` calls, and no way to stop
dispatching pipelined plaintext after ``<starttls/>``.  This parser closes
each one:

* DOCTYPE, entity declarations, comments and processing instructions raise
  ``restricted-xml`` before expat expands anything;
* ``buffer_text`` makes text accumulation linear;
* input is fed in bounded slices and the bytes since the last complete
  top-level item are checked after every slice, so the size limit holds
  however the bytes arrive;
* :meth:`StreamParser.halt` stops all dispatching immediately, also for
  stanzas still queued in the current slice (STARTTLS / SASL stream resets);
* nesting depth and the number of nodes (elements plus attributes) of a
  stanza are checked in the start handler, before the element that would
  exceed them is built, so neither recursion (serialising) nor memory (about
  0.4-0.55 kB per element, 0.12-0.18 kB per attribute, whatever its bytes)
  can be driven past what :class:`Limits` allows;
* the stream header is bounded in bytes and attributes, and a second
  ``<stream:stream>`` inside the stream is an error at once.

It builds ``domish.Element`` trees so wokkel's parsers and builders work on
them unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable
from xml.parsers import expat

from twisted.words.xish import domish

NS_STREAMS = "http://etherx.jabber.org/streams"
_XML_NS = "http://www.w3.org/XML/1998/namespace"


# [c2s] max_depth: levels a stanza may nest (the stanza itself is level 1).
# The deepest legitimate stanzas known need about a dozen: a MAM result
# wrapping a forwarded carbon wrapping a message with an OMEMO payload is
# message/result/forwarded/message/sent/forwarded/message/encrypted/header/key
# (10 levels); PubSub payloads with XHTML-IM content reach about 15.  48 leaves
# room for further forwarding layers (2-3 levels each) and keeps every
# recursive walk of a tree (one Python frame per level) small.
DEFAULT_MAX_DEPTH = 48
# [c2s] max_stanza_nodes: elements + attributes (+ namespace declarations) of
# one stanza.  Measured with tracemalloc, a parsed element costs 0.40 kB
# (empty sibling) to 0.54 kB (nested), an attribute 0.12-0.18 kB, whatever
# their bytes: 65,000 empty children (260 KB) made a 26 MB tree.  1500 nodes
# cost at most ~0.8 MB, about 3x a 256 KiB stanza (text costs ~1x on top);
# the largest legitimate client stanzas (an OMEMO bundle with 100 pre-keys:
# ~230 nodes; legacy XEP-0048 bookmarks: 5 nodes per room) fit.
DEFAULT_MAX_NODES = 1500
# [c2s] max_preauth_stanza_nodes: before SASL success a stanza is SASL (1-2
# elements) or an in-band registration form (~25-40 nodes).  100 nodes cost
# at most ~55 kB.
DEFAULT_MAX_PREAUTH_NODES = 100
# A stream header needs at most 7 attributes and namespace declarations
# (to, from, id, version, xml:lang, xmlns, xmlns:stream); anything near this
# is not a client.
MAX_HEADER_ATTRIBUTES = 32
# [c2s] max_preauth_stanza_size, also the bound on every stream header: the
# largest SASL element is a SCRAM-PLUS client-final-message with the longest
# legal authzid (3071 bytes) and channel binding data (<= 64 bytes), base64
# inside base64: under 8 KB.  PLAIN with 1023-byte names is under 7 KB.
DEFAULT_MAX_PREAUTH_SIZE = 16384


@dataclass(frozen=True)
class Limits:
    """What one stanza (and the stream header) may cost.

    ``depth`` counts levels from the stanza element (the stanza itself is
    level 1); ``nodes`` counts the stanza's elements plus attributes,
    because those, not bytes, are what the tree costs in memory.
    """

    stanza_size: int
    depth: int = DEFAULT_MAX_DEPTH
    nodes: int = DEFAULT_MAX_NODES
    header_size: int = DEFAULT_MAX_PREAUTH_SIZE

    def for_stored(self, extra_bytes: int) -> "Limits":
        """The limits for re-reading what was stored from a stanza under these.

        Depth is unchanged (what the server adds sits at level 2).  Bytes
        grow by what the server adds (``extra_bytes``); nodes may double,
        because re-serialising declares the namespace on each element a
        client had written with a prefix, and declarations count as nodes.
        """
        return Limits(self.stanza_size + extra_bytes, self.depth, 2 * self.nodes + 8,
                      self.header_size)


class XMLStreamError(Exception):
    """A condition for a stream error (RFC 6120 §4.9.3) plus a log text."""

    def __init__(self, condition: str, text: str = "") -> None:
        super().__init__(f"{condition}: {text}" if text else condition)
        self.condition = condition
        self.text = text


def _split(name: str) -> tuple[str, str]:
    # expat with namespace_separator=' ' gives "uri local" or "local".
    uri, sep, local = name.rpartition(" ")
    return (uri, local) if sep else ("", name)


def _refusal(what: str):
    """An expat handler that ends the stream with ``restricted-xml``."""

    def handler(*_args):
        raise XMLStreamError("restricted-xml", f"{what} not allowed in XMPP")

    return handler


# Shared by every parser (one set per process, not per connection).
_REFUSE_DOCTYPE = _refusal("DOCTYPE")
_REFUSE_ENTITY = _refusal("entity declaration")
_REFUSE_COMMENT = _refusal("comment")
_REFUSE_PI = _refusal("processing instruction")
_REFUSE_ENTITY_REF = _refusal("entity reference")


def harden(parser, comments: bool = False) -> None:
    """Make an expat parser refuse what XMPP forbids before anything is expanded.

    DOCTYPE, entity declarations, references to undeclared entities and
    processing instructions raise :class:`XMLStreamError` (``restricted-xml``);
    so do comments unless ``comments`` (a file an operator may have
    annotated, such as an XEP-0227 export: they are then ignored).  Shared by
    the stream parser and the XEP-0227 reader (:mod:`xmppd.pie`).
    """
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = _REFUSE_DOCTYPE
    parser.EntityDeclHandler = _REFUSE_ENTITY
    parser.CommentHandler = _ignore if comments else _REFUSE_COMMENT
    parser.ProcessingInstructionHandler = _REFUSE_PI
    parser.SkippedEntityHandler = _REFUSE_ENTITY_REF


class StreamParser:
    """Incremental XMPP stream parser with the hardening described above."""

    def __init__(
        self,
        on_stream_start: Callable[[str, str, dict, dict], None],
        on_element: Callable[[domish.Element], None],
        on_stream_end: Callable[[], None],
        limits: Limits | int,
        rename: tuple[str, str] | None = None,
    ) -> None:
        """``rename = (a, b)``: elements in namespace ``a`` are built in ``b``
        (s2s streams: ``jabber:server`` stanzas become ``jabber:client`` ones,
        the namespace every other part of the server works in)."""
        if isinstance(limits, int):
            limits = Limits(limits)
        self._on_stream_start = on_stream_start
        self._on_element = on_element
        self._on_stream_end = on_stream_end
        self.limits = limits
        self.max_stanza_size = limits.stanza_size
        # Stream depth 1 is the header, so a stanza of `depth` levels ends
        # at stream depth depth + 1.
        self._max_depth = limits.depth + 1
        self._max_nodes = limits.nodes
        self._slice = max(1024, min(16384, limits.stanza_size // 4))
        self._fed = 0
        self._boundary = 0
        self._depth = 0
        self._nodes = 0
        self._header_attrs = 0
        self._current: domish.Element | None = None
        self._run: str | list[str] | None = None  # character data of the open element (see _text)
        self._halted = False
        self._decls: dict[str, str] = {}
        self._rename_from, self._rename_to = rename if rename is not None else (None, None)
        self._parser = self._make_parser()

    def _make_parser(self):
        p = expat.ParserCreate("UTF-8", " ", intern=None)
        # Linear text accumulation.  The text buffer is allocated per
        # connection, so it is kept small (idle memory matters): text longer
        # than it is still joined in linear time, in 1 KiB steps.
        p.buffer_size = 1024
        p.buffer_text = True
        p.ordered_attributes = False
        p.StartElementHandler = self._start
        p.EndElementHandler = self._end
        p.CharacterDataHandler = self._text
        harden(p)
        p.StartNamespaceDeclHandler = self._ns_decl
        return p

    # -- feeding -----------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Parse ``data``; raises :class:`XMLStreamError` on any violation."""
        step = self._slice
        for offset in range(0, len(data), step):
            if self._halted:
                return
            chunk = data[offset : offset + step]
            try:
                self._parser.Parse(chunk, False)
            except expat.ExpatError as e:
                raise XMLStreamError("not-well-formed", str(e)) from None
            self._fed += len(chunk)
            if self._depth > 0 and self._fed - self._boundary > self.max_stanza_size:
                raise XMLStreamError(
                    "policy-violation",
                    f"stanza larger than {self.max_stanza_size} bytes",
                )
            if self._depth == 0 and self._fed > self.limits.header_size:
                # An endless stream header (attributes without end).
                raise XMLStreamError("policy-violation", "stream header too large")

    def set_limits(self, limits: Limits) -> None:
        """New limits from the next byte on, for a stream authenticated
        without a restart (s2s dialback, an XEP-0114 handshake), which keeps
        its parser."""
        self.limits = limits
        self.max_stanza_size = limits.stanza_size
        self._max_depth = limits.depth + 1
        self._max_nodes = limits.nodes
        self._slice = max(1024, min(16384, limits.stanza_size // 4))

    def halt(self) -> None:
        """Dispatch nothing more from this parser (before a stream reset).

        Every handler that refers back to this object is cleared, so the
        parser and its ~10 kB of expat buffers are freed by reference counting
        as soon as the stream drops it, not at some later cyclic collection
        (each login restarts the stream twice).
        """
        self._halted = True
        p = self._parser
        p.StartElementHandler = None
        p.EndElementHandler = None
        p.CharacterDataHandler = None
        p.StartNamespaceDeclHandler = None
        self._on_stream_start = self._on_element = self._on_stream_end = None
        self._current = None
        self._run = None

    # -- expat callbacks ----------------------------------------------------

    def _ns_decl(self, prefix: str | None, uri: str) -> None:
        # Called before the start handler of the element that declares it.
        if self._depth == 0:
            self._header_attrs += 1
            if self._header_attrs > MAX_HEADER_ATTRIBUTES:
                raise XMLStreamError("policy-violation", "too many attributes in the stream header")
            self._decls[prefix or ""] = uri
        else:
            self._count(1)  # a declaration costs expat memory like an attribute

    def _count(self, n: int) -> None:
        nodes = self._nodes = self._nodes + n
        if nodes > self._max_nodes:
            raise XMLStreamError(
                "policy-violation",
                f"stanza has more than {self._max_nodes} elements and attributes",
            )

    def _start(self, name: str, attrs: dict) -> None:
        if self._halted:
            return
        depth = self._depth + 1
        if depth == 1:
            if self._header_attrs + len(attrs) > MAX_HEADER_ATTRIBUTES:
                raise XMLStreamError("policy-violation", "too many attributes in the stream header")
            self._depth = 1
            self._boundary = self._parser.CurrentByteIndex
            self._on_stream_start(*_split(name), attrs, self._decls)
            return
        if depth > self._max_depth:
            # Refused before the element exists: nothing deeper is ever
            # built, so nothing downstream recurses deeper either.
            raise XMLStreamError(
                "policy-violation", f"stanza nested deeper than {self.limits.depth} levels"
            )
        # Inline (per element, on the hot path): see _count.
        nodes = self._nodes = self._nodes + 1 + len(attrs)
        if nodes > self._max_nodes:
            self._count(0)  # raises the policy-violation
        self._depth = depth
        uri, local = _split(name)
        if uri == self._rename_from:
            uri = self._rename_to
        if depth == 2 and local == "stream" and uri == NS_STREAMS:
            # A stream header where a stanza belongs: the client thinks it
            # restarted the stream, but only STARTTLS and SASL success restart
            # one (with a fresh parser).  Left alone it would be an open
            # element swallowing every later stanza until the size limit.
            # RFC 6120 §4.9.3.24 unsupported-stanza-type: the XML is
            # well-formed (not not-well-formed), this server does not validate
            # (not invalid-xml), and it is a first-level child of the stream
            # that the server does not support -- the same condition a bound
            # session gets for any other non-stanza element.
            raise XMLStreamError(
                "unsupported-stanza-type", "stream header inside the stream (no restart here)"
            )
        plain = {}
        for key, value in attrs.items():
            if " " in key:
                auri, aname = _split(key)
                plain[(auri, aname)] = value
            else:
                plain[key] = value
        el = domish.Element((uri, local), defaultUri=uri, attribs=plain)
        if depth == 2:
            self._current = el
        else:
            parent = self._current
            run = self._run
            if run is not None:  # the text before this child: one node
                self._run = None
                parent.children.append(run if run.__class__ is str else "".join(run))
            el.parent = parent
            parent.children.append(el)
            self._current = el

    def _end(self, name: str) -> None:
        if self._halted:
            return
        depth = self._depth
        self._depth = depth - 1
        if depth == 1:
            self._on_stream_end()
            return
        el = self._current
        run = self._run
        if run is not None:  # the element's last text: one node (see _text)
            self._run = None
            el.children.append(run if run.__class__ is str else "".join(run))
        if depth == 2:
            self._current = None
            self._nodes = 0
            self._boundary = self._parser.CurrentByteIndex
            self._on_element(el)
        else:
            self._current = el.parent

    def _text(self, data: str) -> None:
        if self._halted:
            return
        if self._depth > 1:
            # One text node per run of character data, however expat split
            # it (at its 1 KiB buffer and at our feed slices): domish's
            # ``str(element)`` and every consumer see only the first node.
            # The run is kept as one str (the common case, no list) or a
            # list of pieces joined once, linearly, when the run ends.
            run = self._run
            if run is None:
                self._run = data
            elif run.__class__ is str:
                self._run = [run, data]
            else:
                run.append(data)
        else:
            # Whitespace keepalives between stanzas: nothing pending.
            self._boundary = self._parser.CurrentByteIndex + len(data.encode())


def _ignore(*_args) -> None:
    pass


def parse_fragment(xml: str, limits: Limits) -> domish.Element:
    """Re-parse one stored element (offline message, vCard) under ``limits``.

    Stored XML is read with the limits of a live stream, so no tree the
    server handles is deeper or larger than one a client could send; data
    beyond them (written by an older version, or by hand) raises
    :class:`XMLStreamError` for the caller to skip and log.
    """
    found: list[domish.Element] = []
    parser = StreamParser(_ignore, found.append, _ignore, limits)
    try:
        parser.feed(b"<s xmlns='jabber:client'>" + xml.encode("utf-8") + b"</s>")
    finally:
        parser.halt()
    if len(found) != 1:
        raise XMLStreamError("not-well-formed", f"{len(found)} elements stored, expected one")
    return found[0]

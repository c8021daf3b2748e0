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
  stanzas still queued in the current slice (STARTTLS / SASL stream resets).

It builds ``domish.Element`` trees so wokkel's parsers and builders work on
them unchanged.
"""
from __future__ import annotations

from typing import Callable
from xml.parsers import expat

from twisted.words.xish import domish

NS_STREAMS = "http://etherx.jabber.org/streams"
_XML_NS = "http://www.w3.org/XML/1998/namespace"


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


class StreamParser:
    """Incremental XMPP stream parser with the hardening described above."""

    def __init__(
        self,
        on_stream_start: Callable[[str, str, dict, dict], None],
        on_element: Callable[[domish.Element], None],
        on_stream_end: Callable[[], None],
        max_stanza_size: int,
    ) -> None:
        self._on_stream_start = on_stream_start
        self._on_element = on_element
        self._on_stream_end = on_stream_end
        self.max_stanza_size = max_stanza_size
        self._slice = max(1024, min(16384, max_stanza_size // 4))
        self._fed = 0
        self._boundary = 0
        self._depth = 0
        self._current: domish.Element | None = None
        self._halted = False
        self._decls: dict[str, str] = {}
        self._parser = self._make_parser()

    def _make_parser(self):
        p = expat.ParserCreate("UTF-8", " ", intern=None)
        # Linear text accumulation.  The text buffer is allocated per
        # connection, so it is kept small (idle memory matters): text longer
        # than it is still joined in linear time, in 1 KiB steps.
        p.buffer_size = 1024
        p.buffer_text = True
        p.ordered_attributes = False
        p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
        p.StartElementHandler = self._start
        p.EndElementHandler = self._end
        p.CharacterDataHandler = self._text
        p.StartDoctypeDeclHandler = _REFUSE_DOCTYPE
        p.EntityDeclHandler = _REFUSE_ENTITY
        p.CommentHandler = _REFUSE_COMMENT
        p.ProcessingInstructionHandler = _REFUSE_PI
        p.StartNamespaceDeclHandler = self._ns_decl
        p.SkippedEntityHandler = _REFUSE_ENTITY_REF
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
            if self._depth == 0 and self._fed > self.max_stanza_size:
                # An endless stream header (attributes without end).
                raise XMLStreamError("policy-violation", "stream header too large")

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

    # -- expat callbacks ----------------------------------------------------

    def _ns_decl(self, prefix: str | None, uri: str) -> None:
        if self._depth == 0:
            self._decls[prefix or ""] = uri

    def _start(self, name: str, attrs: dict) -> None:
        if self._halted:
            return
        depth = self._depth = self._depth + 1
        uri, local = _split(name)
        if depth == 1:
            self._boundary = self._parser.CurrentByteIndex
            self._on_stream_start(uri, local, attrs, self._decls)
            return
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
            el.parent = self._current
            self._current.children.append(el)
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
        if depth == 2:
            self._current = None
            self._boundary = self._parser.CurrentByteIndex
            self._on_element(el)
        else:
            self._current = el.parent

    def _text(self, data: str) -> None:
        if self._halted:
            return
        if self._depth > 1:
            self._current.children.append(data)
        else:
            # Whitespace keepalives between stanzas: nothing pending.
            self._boundary = self._parser.CurrentByteIndex + len(data.encode())

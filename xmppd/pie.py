"""XEP-0227 (Portable Import/Export, "PIE") files: a bounded streaming reader and a writer.

The reader turns a file (and the files it XIncludes) into one
:class:`RawUser` per ``<user/>`` element, as soon as that element ends, so
a file of any size is read in memory proportional to one user.  What a
user may hold is bounded before it is built, by the limits the server
enforces on the same data (:class:`ReadLimits`, filled from the config by
:mod:`xmppd.migrate`):

* each piece of data (a roster item, an offline message, the vCard, a
  privacy list, ...) is built as a tree only while it stays within its byte,
  node and depth budget; beyond it, the rest of that piece is parsed without
  being built and the piece is reported as skipped;
* pieces beyond a count (roster items, offline messages, blocklist items)
  are not built at all and are counted as skipped;
* data the importer does not know (private XML storage, PEP, MAM, ...) is
  skipped unbuilt and named once per user;
* the parser refuses DTDs, entities and processing instructions
  (:func:`xmppd.xmlparser.harden`), and a start tag (an attribute) larger
  than :data:`MAX_TAG_BYTES` is an error, as expat would hold it whole.

Both namespaces in use are read: ``urn:xmpp:pie:0`` (XEP-0227 1.x, written
by Prosody and by :func:`write_user`) and the draft's
``http://www.xmpp.org/extensions/xep-0227.html#ns`` (ejabberd).  XInclude
``<include href='relative'/>`` is followed (ejabberd writes a main file
including one file per host); an href that is absolute, a URL, or leaves
the directory of the first file is refused.

The writer (:func:`write_user`) produces the ``urn:xmpp:pie:0`` form with
SCRAM credentials as ``<scram-credentials xmlns='urn:xmpp:pie:0#scram'/>``.
"""
from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from typing import Iterator
from xml.parsers import expat

from twisted.words.xish import domish

from xmppd.stanzas import NS_CLIENT, escape_attr, escape_text
from xmppd.xmlparser import XMLStreamError, harden

NS_PIE = "urn:xmpp:pie:0"
NS_PIE_DRAFT = "http://www.xmpp.org/extensions/xep-0227.html#ns"
PIE_NAMESPACES = frozenset({NS_PIE, NS_PIE_DRAFT})
NS_SCRAM = "urn:xmpp:pie:0#scram"
NS_XINCLUDE = "http://www.w3.org/2001/XInclude"
NS_ROSTER = "jabber:iq:roster"
NS_VCARD = "vcard-temp"
NS_BLOCKING = "urn:xmpp:blocking"
NS_PRIVACY = "jabber:iq:privacy"

#: Largest start tag (with its attributes) or run of markup between two
#: parser events: expat keeps an unfinished tag whole in memory.
MAX_TAG_BYTES = 1 << 20
#: Files followed through XInclude, nested (main -> host -> user is 2).
MAX_INCLUDE_DEPTH = 4
READ_SIZE = 65536


class PIEError(Exception):
    """The file cannot be read on (not XML, refused XML, not XEP-0227); names file and line."""


@dataclass(frozen=True)
class Budget:
    """What one piece of data may cost while it is built."""

    bytes: int
    nodes: int
    depth: int = 16


@dataclass(frozen=True)
class ReadLimits:
    """Per-user bounds, each taken from the server's own limit for that data."""

    roster_items: int = 2000
    roster_item: Budget = Budget(65536, 80, 4)
    pending: int = 2000
    pending_request: Budget = Budget(4096, 64, 8)
    vcard: Budget = Budget(65536, 2000, 48)
    offline_messages: int = 100
    offline_message: Budget = Budget(262144 + 4096, 1500, 48)
    blocklist_items: int = 5000
    blocklist_item: Budget = Budget(8192, 8, 3)
    privacy_lists: int = 16
    privacy_list: Budget = Budget(5000 * 512, 5000 * 12, 5)
    scram: int = 8
    scram_credentials: Budget = Budget(4096, 16, 3)


@dataclass
class RawUser:
    """One ``<user/>`` as found in the file, within :class:`ReadLimits`; not yet validated."""

    source: str            # "file:line" of the <user/> element
    host: str              # the enclosing <host jid=''/>
    name: str
    password: str | None
    scram: list = field(default_factory=list)         # <scram-credentials/> elements
    roster: list = field(default_factory=list)        # <item/> of jabber:iq:roster
    pending: list = field(default_factory=list)       # <presence type='subscribe'/>
    vcard: domish.Element | None = None
    offline: list = field(default_factory=list)       # <message/>
    blocklist: list = field(default_factory=list)     # <item/> of urn:xmpp:blocking
    privacy: list = field(default_factory=list)       # <list/>, <default/>, <active/>
    skipped: list = field(default_factory=list)       # what was left out, one line each


@dataclass(frozen=True)
class Note:
    """Something outside any user that was not imported (a line for the summary)."""

    source: str
    text: str


@dataclass(frozen=True)
class _Include:
    href: str
    level: str          # "server" or "host": what the included file's root sits in
    host: str | None
    source: str


# What a <user/> child is, by (namespace, name): ("unit", kind) pieces are
# built whole; ("container", kind) hold pieces of that kind.
_USER_CHILDREN = {
    (NS_ROSTER, "query"): ("container", "roster"),
    (NS_BLOCKING, "blocklist"): ("container", "blocklist"),
    (NS_PRIVACY, "query"): ("container", "privacy"),
    (NS_VCARD, "vCard"): ("unit", "vcard"),
    (NS_SCRAM, "scram-credentials"): ("unit", "scram"),
    (NS_CLIENT, "presence"): ("unit", "pending"),
}
_KIND_LABEL = {
    "roster": "roster items", "blocklist": "blocklist items", "privacy": "privacy lists",
    "offline": "offline messages", "pending": "subscription requests",
    "scram": "SCRAM credentials", "vcard": "vCard",
}


def _split(name: str) -> tuple[str, str]:
    uri, sep, local = name.rpartition(" ")
    return (uri, local) if sep else ("", name)


class _Builder:
    """One piece of data being built as a domish tree, within a :class:`Budget`."""

    def __init__(self, kind: str, budget: Budget, uri: str, local: str, attrs: dict,
                 start: int) -> None:
        self.kind = kind
        self.budget = budget
        self.start = start
        self.depth = 1
        self.nodes = 1 + len(attrs)
        self.attrs = attrs       # kept when the tree is dropped (a request's sender)
        self.root = self.current = _element(uri, local, attrs)
        self.too_big: str | None = None
        self._check_nodes()

    def _check_nodes(self) -> None:
        if self.nodes > self.budget.nodes:
            self._drop(f"more than {self.budget.nodes} elements and attributes")

    def _drop(self, why: str) -> None:
        if self.too_big is None:
            self.too_big = why
            self.root = self.current = None

    def check_bytes(self, position: int) -> None:
        if self.too_big is None and position - self.start > self.budget.bytes:
            self._drop(f"larger than {self.budget.bytes} bytes")

    def start_child(self, uri: str, local: str, attrs: dict) -> None:
        self.depth += 1
        if self.too_big is not None:
            return
        if self.depth > self.budget.depth:
            self._drop(f"nested deeper than {self.budget.depth} levels")
            return
        self.nodes += 1 + len(attrs)
        self._check_nodes()
        if self.too_big is not None:
            return
        el = _element(uri, local, attrs)
        el.parent = self.current
        self.current.children.append(el)
        self.current = el

    def end(self) -> bool:
        """Close the current element; True when the piece is complete."""
        self.depth -= 1
        if self.too_big is None and self.depth > 0:
            self.current = self.current.parent
        return self.depth == 0

    def text(self, data: str) -> None:
        if self.too_big is None:
            children = self.current.children
            if children and children[-1].__class__ is str:
                children[-1] += data
            else:
                children.append(data)


def _element(uri: str, local: str, attrs: dict) -> domish.Element:
    plain = {}
    for key, value in attrs.items():
        if " " in key:
            plain[_split(key)] = value
        else:
            plain[key] = value
    return domish.Element((uri, local), defaultUri=uri, attribs=plain)


class _FileReader:
    """The expat state machine for one file; finished users and includes queue up in ``out``."""

    def __init__(self, path: str, level: str | None, host: str | None, limits: ReadLimits) -> None:
        self.path = path
        self.limits = limits
        self.out: list = []
        # Frames above the pieces: (kind, data).  An included file starts
        # inside the level that included it.
        self.stack: list[tuple[str, object]] = []
        self.level = level
        self.host = host
        self.user: RawUser | None = None
        self.counts: dict[str, int] = {}
        self.unknown: dict[str, int] = {}
        self.builder: _Builder | None = None
        self.skip = 0
        self.fed = 0
        self.mark = 0
        p = self.parser = expat.ParserCreate("UTF-8", " ")
        p.buffer_text = True
        p.buffer_size = 65536
        harden(p, comments=True)
        p.StartElementHandler = self._start
        p.EndElementHandler = self._end
        p.CharacterDataHandler = self._text

    # -- feeding ------------------------------------------------------------

    def where(self) -> str:
        return f"{self.path}:{self.parser.CurrentLineNumber}"

    def feed(self, data: bytes, final: bool = False) -> None:
        step = 16384
        chunks = [data[i:i + step] for i in range(0, len(data), step)] or [b""]
        for i, chunk in enumerate(chunks):
            try:
                self.parser.Parse(chunk, final and i == len(chunks) - 1)
            except expat.ExpatError as e:
                raise PIEError(f"{self.path}:{e.lineno}: not well-formed XML: "
                               f"{expat.ErrorString(e.code)}") from None
            except XMLStreamError as e:
                raise PIEError(f"{self.where()}: {e.text}") from None
            self.fed += len(chunk)
            if self.builder is not None:
                self.builder.check_bytes(self.fed)
            if self.fed - self.mark > MAX_TAG_BYTES:
                raise PIEError(f"{self.where()}: a tag or attribute larger than "
                               f"{MAX_TAG_BYTES} bytes")

    # -- expat callbacks ----------------------------------------------------

    def _start(self, name: str, attrs: dict) -> None:
        self.mark = self.parser.CurrentByteIndex
        if self.skip:
            self.skip += 1
            return
        uri, local = _split(name)
        if self.builder is not None:
            self.builder.check_bytes(self.mark)
            self.builder.start_child(uri, local, attrs)
            return
        top = self.stack[-1][0] if self.stack else self.level
        if uri == NS_XINCLUDE and local == "include" and top in ("server", "host"):
            self._include(attrs, top)
            self.skip = 1
        elif top is None:
            self._root(uri, local, attrs)
        elif top == "server":
            if uri in PIE_NAMESPACES and local == "host":
                self.stack.append(("host", self._host_jid(attrs)))
            else:
                self._note_outside(uri, local)
        elif top == "host":
            if uri in PIE_NAMESPACES and local == "user":
                self._user(attrs)
            else:
                self._note_outside(uri, local)
        elif top == "user":
            self._user_child(uri, local, attrs)
        else:  # a container: each child is one piece
            self._piece(top, uri, local, attrs)

    def _root(self, uri: str, local: str, attrs: dict) -> None:
        if uri not in PIE_NAMESPACES:
            raise PIEError(f"{self.where()}: not an XEP-0227 file (root element {local!r} "
                           f"in namespace {uri!r})")
        if local == "server-data":
            self.stack.append(("server", None))
        elif local == "host":
            self.stack.append(("host", self._host_jid(attrs)))
        else:
            raise PIEError(f"{self.where()}: not an XEP-0227 file (root element {local!r})")

    def _host_jid(self, attrs: dict) -> str:
        jid = attrs.get("jid")
        if not jid:
            raise PIEError(f"{self.where()}: <host/> without a jid attribute")
        return jid

    def _current_host(self) -> str | None:
        for kind, data in reversed(self.stack):
            if kind == "host":
                return data
        return self.host

    def _include(self, attrs: dict, level: str) -> None:
        href = attrs.get("href")
        if not href or "parse" in attrs or "xpointer" in attrs:
            self.out.append(Note(self.where(), "an XInclude other than href='relative file' "
                                 "was not followed"))
            return
        host = self._current_host() if level == "host" else None
        self.out.append(_Include(href, level, host, self.where()))

    def _note_outside(self, uri: str, local: str) -> None:
        self.out.append(Note(self.where(), f"<{local} xmlns='{uri}'/> outside any user: "
                                           f"not imported"))
        self.skip = 1

    def _user(self, attrs: dict) -> None:
        name = attrs.get("name")
        if name is None:
            self.out.append(Note(self.where(), "<user/> without a name attribute: not imported"))
            self.skip = 1
            return
        self.user = RawUser(self.where(), self._current_host(), name, attrs.get("password"))
        self.counts = {}
        self.unknown = {}
        self.stack.append(("user", None))

    def _user_child(self, uri: str, local: str, attrs: dict) -> None:
        what = _USER_CHILDREN.get((uri, local))
        if what is None and uri in PIE_NAMESPACES:
            # Prosody writes a pending request without a namespace of its own.
            what = {"offline-messages": ("container", "offline"),
                    "presence": ("unit", "pending")}.get(local)
        if what is None:
            label = f"<{local} xmlns='{uri}'/>"
            self.unknown[label] = self.unknown.get(label, 0) + 1
            self.skip = 1
        elif what[0] == "container":
            self.stack.append(what[::-1])
        else:
            self._piece(what[1], uri, local, attrs)

    def _piece(self, kind: str, uri: str, local: str, attrs: dict) -> None:
        limits = self.limits
        count, budget = {
            "roster": (limits.roster_items, limits.roster_item),
            "pending": (limits.pending, limits.pending_request),
            "vcard": (1, limits.vcard),
            "offline": (limits.offline_messages, limits.offline_message),
            "blocklist": (limits.blocklist_items, limits.blocklist_item),
            "privacy": (limits.privacy_lists, limits.privacy_list),
            "scram": (limits.scram, limits.scram_credentials),
        }[kind]
        n = self.counts[kind] = self.counts.get(kind, 0) + 1
        if n > count:
            self.skip = 1
            return
        self.builder = _Builder(kind, budget, uri, local, attrs, self.parser.CurrentByteIndex)

    def _end(self, name: str) -> None:
        self.mark = self.parser.CurrentByteIndex
        if self.skip:
            self.skip -= 1
            return
        builder = self.builder
        if builder is not None:
            builder.check_bytes(self.mark)
            if builder.end():
                self.builder = None
                self._finished(builder)
            return
        kind, _ = self.stack.pop()
        if kind == "user":
            self._user_done()

    def _finished(self, builder: _Builder) -> None:
        user = self.user
        kind = builder.kind
        if builder.too_big is not None:
            if kind == "pending" and builder.attrs.get("from"):
                # As the server does: a request too large to keep is kept
                # without its content.
                el = _element(NS_CLIENT, "presence", {"type": "subscribe",
                                                      "from": builder.attrs["from"]})
                user.pending.append(el)
                user.skipped.append(f"subscription request from {builder.attrs['from']}: "
                                    f"content dropped ({builder.too_big})")
                return
            user.skipped.append(f"a {_KIND_LABEL[kind].rstrip('s')} element {builder.too_big}: "
                                f"not imported")
            return
        el = builder.root
        if kind == "vcard":
            user.vcard = el
        else:
            getattr(user, kind).append(el)

    def _user_done(self) -> None:
        user = self.user
        limits = self.limits
        over = {
            "roster": limits.roster_items, "pending": limits.pending,
            "offline": limits.offline_messages, "blocklist": limits.blocklist_items,
            "privacy": limits.privacy_lists, "scram": limits.scram, "vcard": 1,
        }
        for kind, n in self.counts.items():
            if n > over[kind]:
                user.skipped.append(f"{n - over[kind]} {_KIND_LABEL[kind]} over the limit of "
                                    f"{over[kind]}: not imported")
        for label, n in self.unknown.items():
            user.skipped.append(f"{label}{f' (x{n})' if n > 1 else ''}: not supported, not imported")
        self.out.append(user)
        self.user = None

    def _text(self, data: str) -> None:
        self.mark = self.parser.CurrentByteIndex
        if self.builder is not None and not self.skip:
            self.builder.text(data)


def read(path: str, limits: ReadLimits) -> Iterator[RawUser | Note]:
    """The users of ``path`` (and the files it includes), one at a time.

    Raises :class:`PIEError` where the file cannot be read on; everything
    yielded before that was complete.
    """
    base = os.path.dirname(os.path.realpath(path))
    yield from _read(path, None, None, limits, base, [os.path.realpath(path)])


def _read(path: str, level: str | None, host: str | None, limits: ReadLimits, base: str,
          chain: list[str]) -> Iterator[RawUser | Note]:
    reader = _FileReader(path, level, host, limits)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise PIEError(f"{path}: {e.strerror}") from None
    with f:
        while True:
            chunk = f.read(READ_SIZE)
            reader.feed(chunk, final=not chunk)
            out, reader.out = reader.out, []
            for item in out:
                if isinstance(item, _Include):
                    yield from _follow(item, path, limits, base, chain)
                else:
                    yield item
            if not chunk:
                break
    if reader.stack:
        raise PIEError(f"{path}: ends inside <{reader.stack[-1][0]}/>")


def _follow(inc: _Include, including: str, limits: ReadLimits, base: str,
            chain: list[str]) -> Iterator[RawUser | Note]:
    href = inc.href
    if "://" in href or href.startswith("/") or ":" in href.split("/", 1)[0]:
        raise PIEError(f"{inc.source}: XInclude href {href!r} is not a relative file name")
    target = os.path.realpath(os.path.join(os.path.dirname(including), href))
    if os.path.commonpath([base, target]) != base:
        raise PIEError(f"{inc.source}: XInclude href {href!r} leaves the export's directory {base}")
    if target in chain:
        raise PIEError(f"{inc.source}: XInclude of {href!r} includes itself")
    if len(chain) > MAX_INCLUDE_DEPTH:
        raise PIEError(f"{inc.source}: XIncludes nested deeper than {MAX_INCLUDE_DEPTH}")
    yield from _read(target, inc.level, inc.host, limits, base, chain + [target])


# -- writing -------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def scram_xml(mechanism: str, salt: bytes, iterations: int, stored_key: bytes,
              server_key: bytes) -> str:
    return (f"<scram-credentials xmlns='{NS_SCRAM}' mechanism='{escape_attr(mechanism)}'>"
            f"<iter-count>{int(iterations)}</iter-count><salt>{b64(salt)}</salt>"
            f"<server-key>{b64(server_key)}</server-key><stored-key>{b64(stored_key)}</stored-key>"
            f"</scram-credentials>")


def file_head() -> str:
    return f"<?xml version='1.0' encoding='UTF-8'?>\n<server-data xmlns='{NS_PIE}'>\n"


def file_tail() -> str:
    return "</server-data>\n"


def host_head(host: str) -> str:
    return f"<host jid='{escape_attr(host)}'>\n"


def host_tail() -> str:
    return "</host>\n"


def user_xml(name: str, parts: list[str]) -> str:
    """One ``<user/>``; ``parts`` are its children as XML text."""
    if not parts:
        return f"<user name='{escape_attr(name)}'/>\n"
    return f"<user name='{escape_attr(name)}'>" + "".join(parts) + "</user>\n"


def text_element(name: str, text: str) -> str:
    return f"<{name}>{escape_text(text)}</{name}>"

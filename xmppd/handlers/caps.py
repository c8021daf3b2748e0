"""XEP-0115 Entity Capabilities: what a client's ``ver`` hash stands for.

Clients put ``<c xmlns='http://jabber.org/protocol/caps' hash node ver/>`` in
their presence.  The server learns the features behind an unknown ``ver``
once, by disco#info to the client (``node#ver``), checks that the answer
hashes to ``ver`` (XEP-0115 §5.1 verification string, §5.4 processing) and
caches ``(hash, ver) -> features`` for everyone who announces the same
``ver``.  PEP uses it for implicit subscriptions (``NODE+notify``); any
other feature may ask :meth:`CapsPlugin.when_known`.

Per-stanza cost: a broadcast presence is scanned for its ``<c/>`` child and
the key is looked up in a dict; no I/O.  Limits (``[caps]``):
``cache_size`` entries in the cache (least recently used go first),
``max_queries`` disco#info queries outstanding at once (others are not sent:
the caps stay unknown until the entity's next presence), ``query_timeout``
seconds per query.  An answer that does not match its hash is not cached
(logged once per ``ver``), nor one of more than :data:`MAX_FEATURES`
features or :data:`MAX_FEATURE_BYTES` bytes of them.  Legacy caps without ``hash`` are ignored.
"""
from __future__ import annotations

import base64
import hashlib
from collections import OrderedDict
from typing import Callable

from twisted.logger import Logger
from twisted.words.xish import domish

from xmppd.jid import JID
from xmppd.logfilter import log_observer
from xmppd.plugin import Plugin
from xmppd.stanzas import NS_CLIENT

log = Logger(observer=log_observer)

NS_CAPS = "http://jabber.org/protocol/caps"
NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"
NS_DATA = "jabber:x:data"
XML_LANG = ("http://www.w3.org/XML/1998/namespace", "lang")

# XEP-0115 hash names (IANA registry names) -> hashlib names.
HASHES = {"sha-1": "sha1", "sha-224": "sha224", "sha-256": "sha256",
          "sha-384": "sha384", "sha-512": "sha512"}

Key = tuple  # (hash name, ver)

# What one cache entry may hold: real clients announce some tens of
# features; an answer beyond these is not cached (the cache's memory is
# bounded by cache_size times these, not by the stanza size limit).
MAX_FEATURES = 1000
MAX_FEATURE_BYTES = 65536


def caps_of(presence: domish.Element) -> tuple[Key, str] | None:
    """``((hash, ver), node)`` of a presence's caps element, or None (none, or legacy)."""
    for child in presence.children:
        if child.__class__ is not str and child.name == "c" and child.uri == NS_CAPS:
            algo, ver, node = child.getAttribute("hash"), child.getAttribute("ver"), child.getAttribute("node")
            if algo in HASHES and ver and node and len(ver) <= 128 and len(node) <= 1024:
                return (algo, ver), node
            return None
    return None


def _text(el: domish.Element) -> str:
    return "".join(c for c in el.children if c.__class__ is str)


def verification_string(query: domish.Element) -> str | None:
    """XEP-0115 §5.1 from a disco#info result; None if it is ill-formed (§5.4)."""
    identities, features, forms = [], [], []
    for el in query.elements():
        if el.uri == NS_DISCO_INFO and el.name == "identity":
            identities.append((el.getAttribute("category", ""), el.getAttribute("type", ""),
                               el.getAttribute(XML_LANG, ""), el.getAttribute("name", "")))
        elif el.uri == NS_DISCO_INFO and el.name == "feature":
            features.append(el.getAttribute("var", ""))
        elif el.uri == NS_DATA and el.name == "x":
            form_type, fields = None, []
            for field in el.elements(NS_DATA, "field"):
                values = sorted(_text(v) for v in field.elements(NS_DATA, "value"))
                if field.getAttribute("var") == "FORM_TYPE":
                    if form_type is not None or len(values) != 1:
                        return None
                    form_type = values[0]
                    continue
                fields.append((field.getAttribute("var", ""), values))
            if form_type is None:
                continue  # §5.4: forms without FORM_TYPE are ignored
            forms.append((form_type, sorted(fields)))
    if len(set(identities)) != len(identities) or len(set(features)) != len(features):
        return None  # §5.4 3.3/3.4
    if len({f[0] for f in forms}) != len(forms):
        return None
    out = []
    for ident in sorted(identities):
        out.append("/".join(ident) + "<")
    for var in sorted(features):
        out.append(var + "<")
    for form_type, fields in sorted(forms):
        out.append(form_type + "<")
        for var, values in fields:
            out.append(var + "<")
            out.extend(v + "<" for v in values)
    return "".join(out)


def ver_of(query: domish.Element, algo: str) -> str | None:
    s = verification_string(query)
    if s is None:
        return None
    return base64.b64encode(hashlib.new(HASHES[algo], s.encode("utf-8")).digest()).decode()


class CapsPlugin(Plugin):
    name = "caps"

    def setup(self) -> None:
        sec = self.server.config.section("caps")
        self.cache_size = sec.int("cache_size", 4096, minimum=16)
        self.max_queries = sec.int("max_queries", 256, minimum=1)
        self.query_timeout = sec.number("query_timeout", 30.0, minimum=1)
        sec.reject_unknown()
        self.cache: OrderedDict[Key, frozenset] = OrderedDict()
        # key -> callbacks waiting for the features (one query per key)
        self.waiting: dict[Key, list[Callable[[frozenset], None]]] = {}
        self.bad: set[Key] = set()  # ver hashes seen to be wrong (bounded with the cache)
        # (session, features) when a session's broadcast caps become known or change.
        self.on_session_caps: list[Callable] = []
        presence = self.server.plugin("presence")
        if presence is None:
            raise self.server.config.section("sm").error(
                "plugins", "caps", "the caps plugin needs the presence plugin before it")
        presence.on_broadcast.append(self._broadcast)

    # -- API -------------------------------------------------------------------

    def lookup(self, key: Key | None) -> frozenset | None:
        if key is None:
            return None
        found = self.cache.get(key)
        if found is not None:
            self.cache.move_to_end(key)
        return found

    def session_features(self, session) -> frozenset | None:
        """The features of a session's last broadcast presence, when known."""
        return self.lookup(session.state.get("caps"))

    def when_known(self, key: Key, node: str, entity: JID, callback: Callable[[frozenset], None]) -> None:
        """Call ``callback(features)`` now if ``key`` is cached, else after resolving it by
        asking ``entity``; never if that fails (caps stay unknown)."""
        found = self.lookup(key)
        if found is not None:
            callback(found)
            return
        if key in self.bad:
            return
        waiters = self.waiting.get(key)
        if waiters is not None:
            if len(waiters) < 64:
                waiters.append(callback)
            return
        if len(self.waiting) >= self.max_queries:
            return
        self.waiting[key] = [callback]
        iq = domish.Element((NS_CLIENT, "iq"))
        iq["type"] = "get"
        iq["from"] = entity.host if entity.host in self.router.hosts else self.server.config.default_host
        iq.addElement((NS_DISCO_INFO, "query"))["node"] = f"{node}#{key[1]}"
        d = self.server.iq_tracker.request(iq, entity, self.query_timeout)
        d.addCallbacks(self._answered, self._failed, (key, entity), None, (key, entity))

    # -- internals ---------------------------------------------------------------

    def _answered(self, result: domish.Element, key: Key, entity: JID) -> None:
        waiters = self.waiting.pop(key, [])
        query = result.firstChildElement()
        if query is None or query.uri != NS_DISCO_INFO or query.name != "query":
            return
        if ver_of(query, key[0]) != key[1]:
            if len(self.bad) < self.cache_size:
                self.bad.add(key)
            log.info("caps ver {ver} announced by {jid} does not match its disco#info: ignored",
                     ver=key[1], jid=entity.full)
            return
        features = frozenset(el.getAttribute("var", "") for el in query.elements(NS_DISCO_INFO, "feature"))
        if len(features) > MAX_FEATURES or sum(map(len, features)) > MAX_FEATURE_BYTES:
            log.info("caps ver {ver} of {jid}: more than {n} features or {b} bytes, not cached",
                     ver=key[1], jid=entity.full, n=MAX_FEATURES, b=MAX_FEATURE_BYTES)
            return
        self.cache[key] = features
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        for callback in waiters:
            try:
                callback(features)
            except Exception:
                log.failure("caps callback failed")

    def _failed(self, failure, key: Key, entity: JID) -> None:
        self.waiting.pop(key, None)

    def _broadcast(self, session, stanza: domish.Element, kind: str | None) -> None:
        state = session.state
        if kind is not None:
            state.pop("caps", None)
            return
        found = caps_of(stanza)
        key = found[0] if found is not None else None
        if state.get("caps") == key and "caps" in state:
            return  # same caps as before: nothing new to learn
        state["caps"] = key
        if key is None or not self.on_session_caps:
            return

        def known(features: frozenset) -> None:
            if session.state.get("caps") == key and session.available:
                for hook in self.on_session_caps:
                    hook(session, features)

        self.when_known(key, found[1], session.jid, known)

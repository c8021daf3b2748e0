"""A small, cheap XMPP client for load generation (asyncio, raw sockets + ssl).

Only what the benchmark needs: TCP, STARTTLS (self-signed certificates accepted),
SASL SCRAM-SHA-1 (scramp's ScramClient), in-band registration (XEP-0077, used to
provision accounts on servers without a bulk admin tool), resource binding,
initial presence, chat messages, roster sets, subscription handshakes,
XEP-0191 block/unblock IQs and XEP-0198 stream management (enable, and an
``<a/>`` for every ``<r/>`` the server sends while counting).

Incoming bytes are never parsed into a DOM.  During stream negotiation a
regular expression runs over a small buffer; once a connection is logged in it
switches to a counting mode that only byte-searches ``<message`` (and error
markers) in each TCP read, optionally pulling latency timestamps out of
``<body>L<ns></body>``.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import re
import ssl
import time

import scramp
import scramp.core

# The client-side PBKDF2 (4096 x HMAC-SHA-1, ~1 ms of C code) is what a real
# client caches (it only depends on password, salt and iteration count).  The
# benchmark logs the same accounts in many times; caching keeps the load
# generator off the critical path.  The *server* side work is unchanged: it
# still verifies the proof of every login.
_hi_uncached = scramp.core.hi
_hi_cache: dict = {}


def _hi_cached(hf, password, salt, iterations):
    key = (getattr(hf, "__name__", hf), password, salt, int(iterations))
    v = _hi_cache.get(key)
    if v is None:
        if len(_hi_cache) > 200_000:
            _hi_cache.clear()
        v = _hi_cache[key] = _hi_uncached(hf, password, salt, iterations)
    return v


# SASLprep of the same few hundred user names and one password: a pure
# function of its argument, cached for the same reason.
if not hasattr(scramp.core.saslprep, "cache_info"):
    scramp.core.saslprep = functools.lru_cache(maxsize=1 << 16)(scramp.core.saslprep)

if not getattr(scramp.core.hi, "_bench_cached", False):
    _hi_cached._bench_cached = True
    scramp.core.hi = _hi_cached

NS_STREAM = b"http://etherx.jabber.org/streams"

RE_FEATURES = re.compile(
    rb"<(?:\w+:)?features\b[^>]*?(?:/>|>(.*?)</(?:\w+:)?features>)", re.S)
RE_STREAM_ERROR = re.compile(rb"<stream:error\b.*?</stream:error>", re.S)
RE_PROCEED = re.compile(rb"<proceed\b[^>]*/?>|<failure\b[^>]*(?:/>|>.*?</failure>)", re.S)
RE_SASL = re.compile(
    rb"<(challenge|success|failure)\b[^>]*?(?:/>|>(.*?)</\1>)", re.S)
RE_MECH = re.compile(rb"<mechanism>([^<]+)</mechanism>")
RE_JID = re.compile(rb"<jid>([^<]+)</jid>")
RE_SESSION = re.compile(rb"<session\b[^>]*?(?:/>|>(.*?)</session>)", re.S)
RE_LATENCY = re.compile(rb"<body>L(\d+)</body>")
RE_SM_ENABLED = re.compile(rb"<enabled\b[^>]*?(?:/>|>.*?</enabled>)|<failed\b[^>]*?(?:/>|>.*?</failed>)",
                           re.S)
RE_PRESENCE_TAG = re.compile(rb"<presence\b([^>]*)>")
RE_ATTR_FROM = re.compile(rb"""\bfrom=(?:'([^']*)'|"([^"]*)")""")
RE_ATTR_TYPE = re.compile(rb"""\btype=(?:'([^']*)'|"([^"]*)")""")


@functools.lru_cache(maxsize=256)
def iq_re(iq_id: str) -> re.Pattern:
    """Match the whole <iq/> answering ``iq_id`` (result or error)."""
    i = re.escape(iq_id.encode())
    return re.compile(
        rb"<iq\b(?=[^>]*\bid=(?:'" + i + rb"'|\"" + i + rb"\"))[^>]*?(?:/>|>.*?</iq>)", re.S)


def xml_escape(s: str) -> str:
    return (s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("'", "&apos;").replace('"', "&quot;"))


def _wake_future(f):
    if not f.done():
        f.set_result(None)


class XMPPError(Exception):
    """Anything that makes a login/registration fail; ``stage`` says where."""

    def __init__(self, stage: str, detail: str = ""):
        super().__init__(f"{stage}: {detail}" if detail else stage)
        self.stage = stage


def client_ssl_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # self-signed benchmark certificates
    return ctx


# Modes of a connection.
NEGOTIATE = 0   # buffer everything; coroutines wait for regexes
COUNT = 1       # logged in: count <message deliveries, nothing else
PRESENCE = 2    # logged in: also parse presence tags (roster provisioning)


class Conn(asyncio.Protocol):
    """One client connection.  Negotiation is driven by coroutines through
    :meth:`expect`; afterwards :meth:`data_received` only counts."""

    def __init__(self, domain: str):
        self.domain = domain
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.mode = NEGOTIATE
        self.closed = False
        self.close_exc = None
        self.jid = ""          # full JID after bind
        self.bare = ""
        self.iterations = 0    # SCRAM iteration count the server announced
        # counting mode
        self.msgs = 0          # <message stanzas received
        self.presences = 0     # <presence stanzas received (counting modes)
        self.consumed_presences = 0  # <presence stanzas seen during negotiation
        self.partner: "Conn | None" = None
        self.idx = 0
        self.roster_items = None
        self.self_presence = None   # did the server reflect our initial presence?
        self.last_consumed = b""
        self.errors = 0        # stanzas with type='error' received
        self.rx_bytes = 0
        self.tail = b""
        self.reply: bytes | None = None  # stanza to send back per received message
        self.reply_on = False
        self.sent = 0          # messages this connection sent
        self.lat: list | None = None     # latency samples (ns) when measuring
        self.ltail = b""
        # presence mode
        self.on_presence = None          # callback(conn, type, from)
        self.on_data = None              # callback(conn, data) in PRESENCE mode
        self.ptail = b""
        # XEP-0198: stanzas handled since <enable/> as counted in the counting
        # modes (never decreasing; it misses the few consumed while negotiating,
        # so our h stays at or below the server's count, as it must)
        self.sm = False
        self.sm_handled = 0

    # -- asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.closed = True
        self.close_exc = exc
        self._wake()

    def eof_received(self):
        self.closed = True
        self._wake()
        return False

    def _wake(self):
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def data_received(self, data: bytes):
        mode = self.mode
        if mode == NEGOTIATE:
            self.buf += data
            self._wake()
            return
        self.rx_bytes += len(data)
        tail = self.tail
        # a match split across reads lies within the last bytes of the previous
        # read + the first bytes of this one
        n = data.count(b"<message")
        if tail:
            n += (tail[-7:] + data[:7]).count(b"<message")
        e = data.count(b"type='error'") + data.count(b'type="error"')
        p = data.count(b"<presence")
        if tail:
            p += (tail + data[:8]).count(b"<presence")
        if p:
            self.presences += p
        self.tail = data[-8:]
        if e:
            self.errors += e
        if n:
            self.msgs += n
            if self.lat is not None:
                self._latency(data)
            if self.reply_on:
                self.transport.write(self.reply * n)
                self.sent += n
        if self.sm:
            self.sm_handled += n + p + data.count(b"<iq ")
            if b"<r xmlns='urn:xmpp:sm:3'/>" in data or b'<r xmlns="urn:xmpp:sm:3"/>' in data:
                self.transport.write(b"<a xmlns='urn:xmpp:sm:3' h='%d'/>"
                                     % (self.sm_handled & 0xFFFFFFFF))
        if mode == PRESENCE:
            if self.on_data is not None:
                self.on_data(self, data)
            self._presences(data)

    def _latency(self, data: bytes):
        now = time.monotonic_ns()
        buf = self.ltail + data
        pos = 0
        lat = self.lat
        for m in RE_LATENCY.finditer(buf):
            lat.append(now - int(m.group(1)))
            pos = m.end()
        self.ltail = buf[pos:][-40:]

    def _presences(self, data: bytes):
        buf = self.ptail + data
        end = 0
        for m in RE_PRESENCE_TAG.finditer(buf):
            attrs = m.group(1)
            t = RE_ATTR_TYPE.search(attrs)
            f = RE_ATTR_FROM.search(attrs)
            ptype = (t.group(1) or t.group(2)).decode() if t else "available"
            pfrom = (f.group(1) or f.group(2)).decode() if f else ""
            self.on_presence(self, ptype, pfrom)
            end = m.end()
        rest = buf[end:]
        cut = rest.rfind(b"<")
        self.ptail = rest[cut:] if cut != -1 and b">" not in rest[cut:] else b""

    # -- negotiation helpers ----------------------------------------------
    def send(self, data: bytes | str):
        if isinstance(data, str):
            data = data.encode()
        if self.closed or self.transport.is_closing():
            return
        self.transport.write(data)

    async def expect(self, regex: re.Pattern, stage: str, timeout: float = 30.0):
        """Wait until ``regex`` matches the buffer; consume through the match."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            snap = bytes(self.buf)  # a copy: the match's groups stay valid
            m = regex.search(snap)
            if m:
                self.consumed_presences += snap.count(b"<presence", 0, m.end())
                self.last_consumed = snap[:m.end()]
                del self.buf[:m.end()]
                return m
            se = RE_STREAM_ERROR.search(self.buf) if b"<stream:error" in self.buf else None
            if se:
                raise XMPPError(stage, "stream error " + se.group(0)[:300].decode("utf-8", "replace"))
            if self.closed:
                raise XMPPError(stage, "connection closed (%r) buffer=%r"
                                % (self.close_exc, bytes(self.buf[-200:])))
            left = deadline - loop.time()
            if left <= 0:
                raise XMPPError(stage, "timeout, buffer=%r" % bytes(self.buf[-300:]))
            w = self.waiter = loop.create_future()
            h = loop.call_later(left, _wake_future, w)
            try:
                await w
            finally:
                h.cancel()
                self.waiter = None

    def stream_header(self):
        self.send("<?xml version='1.0'?><stream:stream to='%s' xmlns='jabber:client' "
                  "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
                  % self.domain)

    def close(self):
        if self.transport is not None and not self.closed:
            try:
                self.transport.write(b"</stream:stream>")
            except Exception:
                pass
            self.transport.close()

    def abort(self):
        if self.transport is not None:
            self.transport.abort()

    def start_counting(self, mode=COUNT):
        # stanzas that arrived while negotiating are not lost to the counters
        self.consumed_presences += self.buf.count(b"<presence")
        self.msgs += self.buf.count(b"<message")
        self.buf.clear()
        self.mode = mode


async def connect_tls(host: str, port: int, domain: str, sslctx: ssl.SSLContext,
                      timeout: float = 30.0) -> tuple[Conn, bytes]:
    """TCP connect, STARTTLS, new stream; returns the connection and the
    post-TLS stream features."""
    loop = asyncio.get_running_loop()
    conn = Conn(domain)
    try:
        await asyncio.wait_for(
            loop.create_connection(lambda: conn, host, port), timeout)
    except (OSError, asyncio.TimeoutError) as e:
        raise XMPPError("connect", repr(e)) from None
    try:
        conn.stream_header()
        m = await conn.expect(RE_FEATURES, "features", timeout)
        if b"urn:ietf:params:xml:ns:xmpp-tls" not in (m.group(1) or b""):
            raise XMPPError("starttls", "not offered")
        conn.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        m = await conn.expect(RE_PROCEED, "starttls", timeout)
        if not m.group(0).startswith(b"<proceed"):
            raise XMPPError("starttls", "refused")
        conn.buf.clear()
        try:
            tr = await asyncio.wait_for(
                loop.start_tls(conn.transport, conn, sslctx, server_hostname=domain),
                timeout)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as e:
            raise XMPPError("tls", repr(e)) from None
        if tr is None:
            raise XMPPError("tls", "closed during handshake")
        conn.transport = tr
        conn.stream_header()
        m = await conn.expect(RE_FEATURES, "features-tls", timeout)
        return conn, (m.group(1) or b"")
    except BaseException:
        conn.abort()
        raise


async def login(host: str, port: int, domain: str, user: str, password: str,
                resource: str, sslctx: ssl.SSLContext, *, presence: bool = True,
                wait: bool = True, roster_get: bool = False, sm: bool = False,
                timeout: float = 30.0) -> Conn:
    """Full login: TCP + STARTTLS + SCRAM-SHA-1 + bind (+ session if required)
    (+ roster get, as clients do before going online; it also makes the session
    "interested" in roster pushes) + initial presence.  With ``wait`` the login
    is complete when the server has answered a ping sent right after the initial
    presence, i.e. when it has processed the presence.  ``sm``: XEP-0198
    ``<enable/>`` right after binding (resumable, as mobile clients ask)."""
    conn, feats = await connect_tls(host, port, domain, sslctx, timeout)
    try:
        mechs = RE_MECH.findall(feats)
        if b"SCRAM-SHA-1" not in mechs:
            raise XMPPError("sasl", "SCRAM-SHA-1 not offered: %r" % mechs)
        sc = scramp.ScramClient(["SCRAM-SHA-1"], user, password)
        first = sc.get_client_first().encode()
        conn.send(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-1'>"
                  + base64.b64encode(first) + b"</auth>")
        m = await conn.expect(RE_SASL, "sasl-challenge", timeout)
        if m.group(1) != b"challenge":
            raise XMPPError("sasl", "unexpected %r" % m.group(0)[:200])
        sc.set_server_first(base64.b64decode(m.group(2) or b"").decode())
        conn.iterations = int(sc.iterations)
        final = sc.get_client_final().encode()
        conn.send(b"<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                  + base64.b64encode(final) + b"</response>")
        m = await conn.expect(RE_SASL, "sasl-final", timeout)
        if m.group(1) == b"challenge":          # server-final in a challenge
            sc.set_server_final(base64.b64decode(m.group(2) or b"").decode())
            conn.send(b"<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
            m = await conn.expect(RE_SASL, "sasl-success", timeout)
            if m.group(1) != b"success":
                raise XMPPError("sasl", "failure %r" % m.group(0)[:200])
        elif m.group(1) == b"success":
            if m.group(2) and m.group(2).strip() not in (b"", b"="):
                sc.set_server_final(base64.b64decode(m.group(2)).decode())
        else:
            raise XMPPError("sasl", "failure %r" % m.group(0)[:200])
        conn.buf.clear()
        conn.stream_header()
        m = await conn.expect(RE_FEATURES, "features-auth", timeout)
        feats = m.group(1) or b""
        if b"urn:ietf:params:xml:ns:xmpp-bind" not in feats:
            raise XMPPError("bind", "not offered")
        conn.send("<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                  "<resource>%s</resource></bind></iq>" % xml_escape(resource))
        m = await conn.expect(iq_re("bind1"), "bind", timeout)
        j = RE_JID.search(m.group(0))
        if j is None:
            raise XMPPError("bind", "no jid in %r" % m.group(0)[:200])
        conn.jid = j.group(1).decode()
        conn.bare = conn.jid.split("/", 1)[0]
        s = RE_SESSION.search(feats)
        if s is not None and b"optional" not in (s.group(1) or b""):
            conn.send(b"<iq type='set' id='sess1'>"
                      b"<session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>")
            await conn.expect(iq_re("sess1"), "session", timeout)
        if sm:
            if b"urn:xmpp:sm:3" not in feats:
                raise XMPPError("sm", "stream management not offered")
            conn.send(b"<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
            m = await conn.expect(RE_SM_ENABLED, "sm-enable", timeout)
            if not m.group(0).startswith(b"<enabled"):
                raise XMPPError("sm", "refused: %r" % m.group(0)[:200])
            conn.sm = True
        if roster_get:
            conn.send(b"<iq type='get' id='roster1'><query xmlns='jabber:iq:roster'/></iq>")
            m = await conn.expect(iq_re("roster1"), "roster-get", timeout)
            conn.roster_items = m.group(0).count(b"<item")
        if presence:
            # The initial presence is followed by a ping to the server: a server
            # handles one stream's stanzas in order, so the ping's answer says the
            # presence (broadcast, probes) has been processed.  This is the login's
            # completion on every target.  Whether the server also reflected the
            # presence to this resource (RFC 6121 4.2.2) is recorded.
            conn.send(b"<presence/><iq type='get' id='png1' to='"
                      + domain.encode() + b"'><ping xmlns='urn:xmpp:ping'/></iq>")
            if wait:
                await conn.expect(iq_re("png1"), "presence+ping", timeout)
                seen = conn.last_consumed + bytes(conn.buf)
                fj = conn.jid.encode()
                conn.self_presence = b"<presence" in seen and (
                    b"from='" + fj + b"'" in seen or b'from="' + fj + b'"' in seen)
        return conn
    except BaseException:
        conn.abort()
        raise


async def register(host: str, port: int, domain: str, users: list[str], password: str,
                   sslctx: ssl.SSLContext, timeout: float = 60.0) -> tuple[int, int]:
    """XEP-0077 in-band registration of ``users`` on one stream (one IQ after the
    other).  Returns (created, already_existing).  Raises XMPPError on the
    first other failure."""
    conn, feats = await connect_tls(host, port, domain, sslctx, timeout)
    created = existed = 0
    try:
        for n, user in enumerate(users):
            rid = "reg%d" % n
            conn.send("<iq type='set' id='%s'><query xmlns='jabber:iq:register'>"
                      "<username>%s</username><password>%s</password></query></iq>"
                      % (rid, xml_escape(user), xml_escape(password)))
            m = await conn.expect(iq_re(rid), "register", timeout)
            stanza = m.group(0)
            if re.search(rb"""type=['"]result['"]""", stanza):
                created += 1
            elif b"<conflict" in stanza:
                existed += 1
            else:
                raise XMPPError("register", "%s: %r" % (user, stanza[:400]))
        return created, existed
    finally:
        conn.close()


async def iq_roundtrip(conn: Conn, iq_id: str, payload: bytes, timeout: float = 60.0) -> bytes:
    """Send an IQ (negotiation mode only) and return the answering stanza."""
    conn.send(payload)
    m = await conn.expect(iq_re(iq_id), "iq " + iq_id, timeout)
    return m.group(0)


def percentile(sorted_vals: list, p: float):
    if not sorted_vals:
        return None
    k = (len(sorted_vals) - 1) * p / 100.0
    f = int(k)
    c = min(f + 1, len(sorted_vals) - 1)
    return sorted_vals[f] + (sorted_vals[c] - sorted_vals[f]) * (k - f)

"""XEP-0313 Message Archive Management: every user's 1:1 history, on every device.

Enabled as ``urn:xmpp:mam:2`` in ``[sm] plugins``, after ``urn:xmpp:sid:0``
(the archive id of a message is the XEP-0359 stanza-id it was delivered
with: one id for offline sync, carbons and the archive, so clients can
deduplicate).  Settings in ``[mam]`` (docs/mam.rst).

Archiving
    The plugin wraps :meth:`Router.deliver_unfiltered`, which runs *after*
    the filter chain: nothing a filter refused (blocked, domain-filtered,
    bounced by a filter) is archived.  A ``chat``/``normal`` message with a
    body (or an XEP-0334 ``<store/>`` hint, and no ``<no-store/>`` or
    ``<no-permanent-store/>``) is archived for its local sender (the id
    in the sender's archive is not put into the message, which the
    recipient gets: XEP-0313 §3.5; only the sender's sent carbon carries
    it, through :attr:`Router.sent_stanza_id`) and for its
    local recipient (the stanza-id the XEP-0359 plugin stamped), each as
    that user's preferences (XEP-0441, :mod:`xmppd.handlers.mam_prefs`)
    allow.  A message for an account without a session is archived once the
    account is known to exist (it then goes to offline storage: archived
    once, whatever offline delivery does later).  Errors, groupchat and
    headlines are not archived.

Write path
    Rows are buffered and written in one transaction per ``flush_interval``
    (:class:`xmppd.msglog.LogWorker`, ``archive.sqlite3``, no fsync on the
    reactor: checkpoints run on a thread; on PostgreSQL
    :class:`xmppd.msglog_pg.AsyncLogWorker`, batches and queries on the
    store's thread pool, :mod:`xmppd.archives` chooses).  Per message the reactor pays a
    dict look-up for the preferences, the sender's archive number and one
    buffer entry for both parties' rows (:meth:`LogWorker.add`, stored by
    SQLite as it is): the delivered bytes are reused, and the archive
    stores them once for both.  Queries and deletes flush
    first, so they see everything archived before them; deletes run in
    chunks of ``delete_chunk`` rows, one per reactor turn.

Queries
    ``urn:xmpp:mam:2`` and ``#extended``: ``with`` (bare or full JID),
    ``start``/``end``, ``before-id``/``after-id``, ``ids``, RSM paging both
    ways, ``<flip-page/>``, metadata.  Pages are capped at ``max_page``.

Retention and privacy
    ``retention`` is applied by a periodic job in bounded chunks on the
    worker thread; ``xmppctl mam purge JID [--before DATE]`` and
    ``xmppctl mam expire`` reach the running server over the admin socket;
    deleting an account deletes its archive; ``max_messages_per_user``
    keeps the newest messages (the oldest are dropped, logged once per user).
"""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import NamedTuple

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.words.xish import domish

from xmppd import archives
from xmppd import jid as jidlib
from xmppd.handlers import mam_prefs
from xmppd.handlers.mam_prefs import Prefs
from xmppd.logfilter import log_observer
from xmppd.msglog import LogQuery, seq_of_id
from xmppd.plugin import Plugin, Request
from xmppd.rsm import NS_RSM, ResultSet
from xmppd.stanzas import NS_CLIENT, StanzaError, escape_attr, iq_result, serialize
from xmppd.wokkel_compat import data_form

log = Logger(observer=log_observer)

NS_MAM = "urn:xmpp:mam:2"
NS_MAM_EXT = "urn:xmpp:mam:2#extended"
NS_FORWARD = "urn:xmpp:forward:0"
NS_DELAY = "urn:xmpp:delay"
NS_HINTS = "urn:xmpp:hints"
NS_SID = "urn:xmpp:sid:0"
NS_DATA = "jabber:x:data"
SID_PLUGIN = "urn:xmpp:sid:0"

FIELDS = ("FORM_TYPE", "with", "start", "end", "before-id", "after-id", "ids")
MAX_QUERYID = 256
PREFS_CACHE = 10_000
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float | None:
    """``"30d"``, ``"12h"``, ``"forever"`` -> seconds (None: forever); ValueError otherwise."""
    text = text.strip().lower()
    if text == "forever":
        return None
    if len(text) < 2 or text[-1] not in _UNITS or not text[:-1].isdigit() or int(text[:-1]) <= 0:
        raise ValueError(text)
    return int(text[:-1]) * _UNITS[text[-1]]


def parse_time(text: str) -> int:
    """An XEP-0082 date or date-time (UTC if no offset for a date) -> microseconds."""
    text = text.strip()
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not an XEP-0082 date-time") from None
    if value.tzinfo is None:
        if "T" in text:
            raise ValueError(f"{text!r} has no time zone")
        value = value.replace(tzinfo=timezone.utc)
    return (value - EPOCH) // timedelta(microseconds=1)


def stamp_of(seq: int) -> str:
    secs, micros = divmod(seq, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{micros:06d}Z"


class Settings(NamedTuple):
    """``[mam]``, read once (also by ``xmppctl``)."""

    default: str
    retention: float | None
    retention_interval: float
    delete_chunk: int
    max_messages_per_user: int
    max_page: int
    max_ids: int
    max_count: int
    max_prefs_items: int
    flush_interval: float
    checkpoint_interval: float
    max_buffer: int
    storage: str


def settings(config) -> Settings:
    sec = config.section("mam")
    retention_text = sec.str("retention", "365d")
    try:
        retention = parse_duration(retention_text)
    except ValueError:
        raise sec.error("retention", retention_text,
                        'must be a duration such as "30d", "12h", "2w" or "forever"') from None
    s = Settings(
        default=sec.choice("default", mam_prefs.DEFAULTS, "always"),
        retention=retention,
        retention_interval=sec.number("retention_interval", 3600.0, minimum=0.1),
        delete_chunk=sec.int("delete_chunk", 2000, minimum=1),
        max_messages_per_user=sec.int("max_messages_per_user", 100_000, minimum=0),
        max_page=sec.int("max_page", 100, minimum=1),
        max_ids=sec.int("max_ids", 100, minimum=1),
        max_count=sec.int("max_count", 10_000, minimum=0),
        max_prefs_items=sec.int("max_prefs_items", 1000, minimum=0),
        flush_interval=sec.number("flush_interval", 0.2, minimum=0),
        checkpoint_interval=sec.number("checkpoint_interval", 1.0, minimum=0.1),
        max_buffer=sec.int("max_buffer", 50_000, minimum=1),
        storage=sec.choice("storage", archives.STORAGES, archives.default_storage(config)),
    )
    sec.reject_unknown()
    return s


def archivable(stanza: domish.Element) -> int:
    """A body or a ``<store/>`` hint, and no ``<no-store/>``/``<no-permanent-store/>``.

    0: no; 1: yes; 2: yes, and the message carries a ``<stanza-id/>`` (one
    that claims the sender's archive is removed: XEP-0359 §3.3).  One pass
    over the children for both questions.
    """
    content = False
    sids = 0
    for child in stanza.children:
        if child.__class__ is str:
            continue
        uri = child.uri
        if uri == NS_HINTS:
            name = child.name
            if name == "no-store" or name == "no-permanent-store":
                return 0
            if name == "store":
                content = True
        elif uri == NS_CLIENT:
            if child.name == "body":
                content = True
        elif uri == NS_SID:
            sids = 1
    return content + sids if content else 0


def _strip_ids(stanza: domish.Element, by: str) -> None:
    """Remove every ``<stanza-id/>`` claiming ``by`` (not made here: XEP-0359 §3.3)."""
    stanza.children[:] = [c for c in stanza.children if not (
        c.__class__ is not str and c.name == "stanza-id" and c.uri == NS_SID
        and c.getAttribute("by") == by)]


def _id_by(stanza: domish.Element, by: str) -> str | None:
    """The id of the ``<stanza-id/>`` with ``by`` (the last one: ours)."""
    children = stanza.children
    for i in range(len(children) - 1, -1, -1):
        child = children[i]
        if (child.__class__ is not str and child.name == "stanza-id" and child.uri == NS_SID
                and child.getAttribute("by") == by):
            return child.getAttribute("id")
    return None


class Plan(NamedTuple):
    """A parsed query, run on the worker thread by :func:`execute`."""

    user: str
    with_jid: str | None
    with_full: bool
    start: int | None
    end: int | None
    after_id: str | None
    before_id: str | None
    ids: tuple
    rsm: ResultSet
    limit: int
    max_count: int


def _resolve(log_, user: str, ids) -> dict:
    """Archive ids -> seq; ``item-not-found`` for one that is not in ``user``'s archive."""
    wanted = {}
    for i in ids:
        seq = seq_of_id(i)
        if seq is None:
            raise StanzaError("item-not-found", text=f"no message {i[:100]!r} in the archive")
        wanted[i] = seq
    found = {r.id: r for r in log_.get(user, list(set(wanted.values())))}
    for i in ids:
        if i not in found:
            raise StanzaError("item-not-found", text=f"no message {i[:100]!r} in the archive")
    return found


def execute(log_, plan: Plan):
    """(rows in archive order, complete, count or None) — on the worker thread."""
    if plan.ids:
        rows = sorted(_resolve(log_, plan.user, plan.ids).values(), key=lambda r: r.seq)
        return rows, True, len(rows)
    lo = plan.start - 1 if plan.start is not None else None
    hi = plan.end + 1 if plan.end is not None else None
    bounds = [i for i in (plan.after_id, plan.before_id, plan.rsm.after, plan.rsm.before) if i]
    seqs = {i: r.seq for i, r in _resolve(log_, plan.user, bounds).items()} if bounds else {}
    if plan.after_id:
        lo = seqs[plan.after_id] if lo is None else max(lo, seqs[plan.after_id])
    if plan.before_id:
        hi = seqs[plan.before_id] if hi is None else min(hi, seqs[plan.before_id])
    base = LogQuery(plan.user, plan.with_jid, plan.with_full, lo, hi, plan.limit)
    # RSM's count is optional: not for a full JID, whose filter reads table
    # rows, where every other count is an index range of at most max_count.
    count = (log_.count(base, plan.max_count) if plan.max_count > 0 and not plan.with_full
             else None)
    rsm = plan.rsm
    if rsm.after:
        a = seqs[rsm.after]
        lo = a if lo is None else max(lo, a)
    reverse = rsm.before is not None
    if rsm.before:
        b = seqs[rsm.before]
        hi = b if hi is None else min(hi, b)
    if plan.limit == 0:
        return [], False, count
    rows = log_.query(base._replace(lo=lo, hi=hi, limit=plan.limit + 1, reverse=reverse))
    complete = len(rows) <= plan.limit
    rows = rows[:plan.limit]
    if reverse:
        rows.reverse()
    return rows, complete, count


class MAMPlugin(Plugin):
    name = "urn:xmpp:mam:2"
    account_features = (NS_MAM, NS_MAM_EXT)

    def setup(self) -> None:
        config = self.server.config
        self.settings = s = settings(config)
        sid = self.server.plugin(SID_PLUGIN)
        if sid is None:
            from xmppd.config import ConfigError

            raise ConfigError(config.path, "sm.plugins", list(config.plugins),
                              f"{self.name} needs {SID_PLUGIN} listed before it "
                              "(archive ids are the XEP-0359 stanza ids)")
        self.sid = sid
        # xmppd.archives: SQLite, PostgreSQL (asynchronous, node slots) or memory.
        self.msglog, self.sequence, self.worker = archives.open_for_server(
            self.server, s, on_trimmed=self._trimmed, on_overflow=self._overflow,
            on_failure=self._write_failed)
        sid.use_sequence(self.sequence)
        self._prefix_len = len(sid._prefix)
        self.default_prefs = Prefs(s.default)
        self._always = self.default_prefs if s.default == "always" else None
        self._prefs: dict[str, Prefs] = {}
        # Preferences on the asynchronous store (mam_prefs.StoredPrefs): who
        # has any, read at start-up; an online user's read at bind.
        self._stored_prefs = mam_prefs.StoredPrefs(self.store, self.default_prefs, self._cache_prefs)
        self.router.on_bound.append(lambda s: self._stored_prefs.preload(s.jid.bare, self._prefs))
        self._trim_logged: set[str] = set()
        self._roster = None
        self.handle_iq("set", NS_MAM, "query", self.on_query)
        self.handle_iq("get", NS_MAM, "query", self.on_fields)
        self.handle_iq("get", NS_MAM, "prefs", self.on_get_prefs)
        self.handle_iq("set", NS_MAM, "prefs", self.on_set_prefs)
        self.handle_iq("get", NS_MAM, "metadata", self.on_metadata)
        self._hook_delivery()
        self._hook_account_removal()
        commands = getattr(self.server, "admin_commands", None)
        if commands is not None:
            commands["mam_purge"] = self.admin_purge
            commands["mam_expire"] = self.admin_expire
        self._expiring = None
        self._job = None
        if s.retention is not None:
            self._job = task.LoopingCall(self.expire)
            self._job.clock = self.server.clock
            self._job.start(s.retention_interval, now=False)

    # -- archiving -----------------------------------------------------------------

    def _hook_delivery(self) -> None:
        router = self.router
        inner = router.deliver_unfiltered
        hosts = router.hosts
        sessions = router.sessions
        wants = self.wants
        # The common case without a call: the user's preferences are the
        # default "always" (cached), so wants() would say yes.
        prefs_of = self._prefs.get
        always = self._always
        sid = self.sid
        sequence = self.sequence
        prefix = sid._prefix
        add = self.worker.add
        self.worker.prefix = prefix
        cut = self._prefix_len

        def deliver_unfiltered(stanza, sender, to, session=None):
            if stanza.name != "message":
                return inner(stanza, sender, to, session)
            kind = stanza.attributes.get("type")
            to_local = to.host in hosts
            if ((kind is not None and kind != "chat" and kind != "normal")
                    or (to_local and to.user is None)):
                return inner(stanza, sender, to, session)
            out_user = (sender.bare if sender.user is not None and sender.host in hosts
                        and sender.bare != to.bare else None)
            in_user = to.bare if to_local else None
            if out_user is None and in_user is None:
                return inner(stanza, sender, to, session)
            content = archivable(stanza)
            if not content:
                return inner(stanza, sender, to, session)
            if out_user is not None and (always is None or prefs_of(out_user) is not always) \
                    and not wants(out_user, to):
                out_user = None
            in_later = False
            if in_user is not None and (always is None or prefs_of(in_user) is not always):
                wanted = wants(in_user, sender)
                if wanted is None:  # not in memory (networked store): decided once read
                    in_later = True
                elif not wanted:
                    in_user = None
            if out_user is None and in_user is None:
                return inner(stanza, sender, to, session)
            if out_user is not None:
                # The sender's archive id is not put into the message: its
                # recipient may not see the sender's archive (XEP-0313 §3.5).
                # Only the sender's own carbon copy of it carries the id
                # (xmppd.handlers.carbons reads router.sent_stanza_id).
                if content == 2:
                    _strip_ids(stanza, out_user)
                out_seq = next(sequence)
                router.sent_stanza_id = (stanza, out_user, prefix, out_seq)
            else:
                out_seq = 0
            inner(stanza, sender, to, session)
            done, data = router.last_serialized
            if done is not stanza:
                data = serialize(stanza)
            # One bytes object for both rows: the archive stores it once.
            data = b"<message xmlns='jabber:client'" + data[8:]
            in_seq = 0
            if in_user is not None:
                stamped, _, in_seq = sid.last
                if stamped is not stanza:
                    in_id = _id_by(stanza, in_user)
                    if in_id is None or not in_id.startswith(prefix):
                        in_user = None
                    else:
                        in_seq = int(in_id[cut:], 16)
                if in_user is None and out_user is None:
                    return
            # One buffer entry for the message's rows (LogWorker.add).
            entry = (out_seq, out_user, to.full, in_seq, in_user, sender.full, data)
            if in_user is None or (not in_later and to.bare in sessions):
                add(entry)
                return
            # Written later: a recipient with no session here is archived once
            # the account is known to exist (a message to nobody bounces and
            # stays out of every archive); one whose preferences (or roster
            # entry, for "roster") are not in memory once they are read.
            checked = (router.user_exists(to) if to.bare not in sessions
                       else defer.succeed(True))
            if in_later:
                def exists(found: bool):
                    if not found:
                        return False
                    if out_user is not None:  # not held back by the recipient's preferences
                        add((out_seq, out_user, to.full, 0, None, "", data))
                    return self.wants_later(in_user, sender)

                entry = (0, None, "", in_seq, in_user, sender.full, data)
                checked.addCallback(exists)
            checked.addCallback(lambda wanted: wanted and add(entry))
            checked.addErrback(lambda f: log.failure("archive: look-up failed", f))

        router.deliver_unfiltered = deliver_unfiltered

    def wants(self, user: str, other) -> bool | None:
        """Archive for ``user`` a message exchanged with ``other``?  None: not known
        without a read (networked store: preferences or the roster entry they
        need are not in memory); :meth:`wants_later` answers then."""
        prefs = self._prefs.get(user)
        if prefs is None:
            prefs = mam_prefs.result_now(self._load_prefs(user))
            if prefs is None:
                return None
        if prefs is self._always:
            return True  # the common case: no lists, default always
        unknown = []

        def in_roster(contact: str) -> bool:
            found = self._in_roster(user, contact)
            if found is None:
                unknown.append(contact)
                return False
            return found

        wanted = prefs.wants(other, in_roster)
        return None if unknown else wanted

    def wants_later(self, user: str, other) -> defer.Deferred:
        """Deferred[bool]: :meth:`wants` after reading what it needs from the store."""
        def decide(prefs: Prefs):
            asked = []
            wanted = prefs.wants(other, lambda contact: asked.append(contact) or False)
            roster = self._roster_plugin()
            if not asked or roster is None:
                return wanted
            # Only the default "roster" asks, and its answer is the entry's existence.
            return roster.rosters.item(user, asked[0]).addCallback(lambda item: item is not None)

        return self._load_prefs(user).addCallback(decide)

    def _load_prefs(self, user: str) -> defer.Deferred:
        """Deferred[Prefs], cached once read (fired at once on an embedded store)."""
        return self._stored_prefs.load(user)

    def _cache_prefs(self, user: str, prefs: Prefs) -> None:
        cache = self._prefs
        if len(cache) >= PREFS_CACHE and user not in cache:
            del cache[next(iter(cache))]  # the oldest entry
        cache[user] = prefs

    def _roster_plugin(self):
        if self._roster is None:
            self._roster = self.server.plugin("roster")
        return self._roster

    def _in_roster(self, user: str, contact: str) -> bool | None:
        """From memory (an online user's roster, an embedded store); None: not read yet."""
        roster = self._roster_plugin()
        if roster is None:
            return False
        done, item = mam_prefs.fired_now(roster.rosters.item(user, contact))
        return item is not None if done else None

    def _trimmed(self, dropped: dict) -> None:
        for user, n in dropped.items():
            if user not in self._trim_logged:
                if len(self._trim_logged) >= PREFS_CACHE:
                    self._trim_logged.clear()
                self._trim_logged.add(user)
                log.info("archive of {user} is full ({max} messages): the oldest are dropped "
                         "as new ones arrive (logged once)", user=user,
                         max=self.settings.max_messages_per_user)

    def _overflow(self, dropped: int) -> None:
        if dropped == 1 or dropped % 10_000 == 0:
            log.warn("archive: write buffer full ({max} rows, the disk does not keep up); "
                     "{n} messages not archived so far", max=self.settings.max_buffer, n=dropped)

    def _write_failed(self, error: Exception, n: int) -> None:
        if n:
            log.error("archive: {n} messages not archived: {error}", n=n, error=error)
        else:
            log.error("archive: checkpoint failed: {error}", error=error)

    # -- queries -------------------------------------------------------------------------

    def _own(self, request: Request) -> str:
        if request.to is not None or request.session is None:
            raise StanzaError("forbidden", text="only your own archive can be queried")
        return request.sender.bare

    def on_fields(self, request: Request):
        self._own(request)
        form = data_form.Form("form", formNamespace=NS_MAM, fields=[
            data_form.Field("jid-single", var="with"),
            data_form.Field("text-single", var="start"),
            data_form.Field("text-single", var="end"),
            data_form.Field("text-single", var="before-id"),
            data_form.Field("text-single", var="after-id"),
            data_form.Field("list-multi", var="ids"),
        ])
        query = domish.Element((NS_MAM, "query"))
        query.addChild(form.toElement())
        return query

    def _plan(self, user: str, query: domish.Element) -> Plan:
        s = self.settings
        fields: dict[str, list] = {}
        rsm_element = None
        for child in query.elements():
            if child.uri == NS_DATA and child.name == "x":
                form = data_form.Form.fromElement(child)
                if len(form.fields) > len(FIELDS):
                    raise StanzaError("policy-violation", text="too many form fields")
                for var, field in form.fields.items():
                    if var not in FIELDS:
                        raise StanzaError("bad-request", text=f"unknown field {var[:64]!r}")
                    fields[var] = [str(v) for v in field.values]
            elif child.uri == NS_RSM and child.name == "set":
                rsm_element = child
        form_type = fields.get("FORM_TYPE")
        if form_type and form_type[0] != NS_MAM:
            raise StanzaError("bad-request", text=f"FORM_TYPE must be {NS_MAM}")

        def one(var: str) -> str | None:
            values = fields.get(var)
            if not values:
                return None
            if len(values) > 1 or not values[0].strip():
                raise StanzaError("bad-request", text=f"{var} takes one value")
            return values[0].strip()

        with_jid, with_full = one("with"), False
        if with_jid is not None:
            try:
                parsed = jidlib.parse(with_jid)
            except jidlib.InvalidJID as e:
                raise StanzaError("jid-malformed", text=f"with: {e}") from None
            with_jid, with_full = parsed.full, parsed.resource is not None
        times = {}
        for var in ("start", "end"):
            text = one(var)
            if text is not None:
                try:
                    times[var] = parse_time(text)
                except ValueError as e:
                    raise StanzaError("bad-request", text=f"{var}: {e}") from None
        ids = tuple(v.strip() for v in fields.get("ids", ()))
        if len(ids) > s.max_ids:
            raise StanzaError("policy-violation", text=f"at most {s.max_ids} ids per query")
        rsm = ResultSet.from_element(rsm_element)
        if rsm.index is not None:
            raise StanzaError("feature-not-implemented", text="RSM <index/> is not supported")
        limit = s.max_page if rsm.max is None else min(rsm.max, s.max_page)
        for text in (one("before-id"), one("after-id"), *ids):
            if text is not None and len(text) > 256:
                raise StanzaError("bad-request", text="archive ids are at most 256 characters")
        return Plan(user, with_jid, with_full, times.get("start"), times.get("end"),
                    one("after-id"), one("before-id"), ids, rsm, limit, s.max_count)

    def on_query(self, request: Request):
        user = self._own(request)
        query = request.payload
        queryid = query.getAttribute("queryid")
        if queryid is not None and len(queryid) > MAX_QUERYID:
            raise StanzaError("bad-request", text=f"queryid is longer than {MAX_QUERYID}")
        flip = any(c.name == "flip-page" and c.uri == NS_MAM for c in query.elements())
        plan = self._plan(user, query)
        d = self.worker.run(lambda log_: execute(log_, plan))
        return d.addCallback(self._answer, request, queryid, flip)

    def _answer(self, result, request: Request, queryid: str | None, flip: bool):
        rows, complete, count = result
        if flip:
            rows = rows[::-1]
        session = request.session
        qid = f" queryid='{escape_attr(queryid)}'" if queryid is not None else ""
        head = (f"<message to='{escape_attr(request.sender.full)}' "
                f"from='{escape_attr(request.sender.bare)}'><result xmlns='{NS_MAM}'{qid} id='")
        for row in rows:
            session.send_bytes(
                (f"{head}{escape_attr(row.id)}'><forwarded xmlns='{NS_FORWARD}'>"
                 f"<delay xmlns='{NS_DELAY}' stamp='{stamp_of(row.seq)}'/>").encode()
                + row.stanza + b"</forwarded></result></message>")
        first = rows[0].id if rows else None
        last = rows[-1].id if rows else None
        done = " complete='true'" if complete else ""
        reply = iq_result(request.stanza)
        reply.addRawXml(f"<fin xmlns='{NS_MAM}'{done}>"
                        f"{ResultSet.answer_xml(first, last, count)}</fin>")
        return reply

    def on_metadata(self, request: Request):
        user = self._own(request)

        def ends(log_):
            return (log_.query(LogQuery(user, limit=1)),
                    log_.query(LogQuery(user, limit=1, reverse=True)))

        def answer(result):
            first, last = result
            reply = iq_result(request.stanza)
            if not first:
                reply.addRawXml(f"<metadata xmlns='{NS_MAM}'/>")
            else:
                a, b = first[0], last[0]
                reply.addRawXml(
                    f"<metadata xmlns='{NS_MAM}'><start id='{escape_attr(a.id)}' "
                    f"timestamp='{stamp_of(a.seq)}'/><end id='{escape_attr(b.id)}' "
                    f"timestamp='{stamp_of(b.seq)}'/></metadata>")
            return reply

        return self.worker.run(ends).addCallback(answer)

    # -- preferences -------------------------------------------------------------------

    def _prefs_reply(self, request: Request, prefs: Prefs):
        reply = iq_result(request.stanza)
        reply.addRawXml(prefs.to_xml(NS_MAM))
        return reply

    def on_get_prefs(self, request: Request):
        user = self._own(request)
        return self._stored_prefs.get(user, self._prefs).addCallback(
            lambda prefs: self._prefs_reply(request, prefs))

    def on_set_prefs(self, request: Request):
        user = self._own(request)
        prefs = Prefs.from_element(request.payload, self.settings.max_prefs_items)
        return self._stored_prefs.put(user, prefs).addCallback(
            lambda _: self._prefs_reply(request, prefs))

    # -- retention, purge, account removal ------------------------------------------

    def _in_chunks(self, delete) -> defer.Deferred:
        """Run ``delete(log, limit)`` until it deletes less than a chunk; Deferred -> total.

        One short transaction per reactor turn: a large purge never holds
        the reactor (or the archive's write lock) for long.
        """
        chunk = self.settings.delete_chunk
        result = defer.Deferred()
        total = [0]
        clock = self.server.clock

        def step() -> None:
            d = self.worker.run(lambda log_: delete(log_, chunk))

            def done(n: int) -> None:
                total[0] += n
                if n >= chunk:
                    clock.callLater(0, step)
                else:
                    result.callback(total[0])

            d.addCallbacks(done, result.errback)

        step()
        return result

    def expire(self):
        """Delete what is past ``retention``; Deferred -> count."""
        if self._expiring is not None:
            return self._expiring  # the previous run is still deleting
        retention = self.settings.retention
        if retention is None:
            return defer.succeed(0)
        cutoff = int((self.server.clock.seconds() - retention) * 1_000_000)

        def done(result):
            self._expiring = None
            if isinstance(result, int) and result:
                log.info("archive retention: deleted {n} messages older than {when}",
                         n=result, when=stamp_of(cutoff))
            return result

        def failed(failure):
            log.error("archive retention failed: {error}", error=failure.getErrorMessage())
            return 0

        d = self._in_chunks(lambda log_, chunk: log_.expire(cutoff, chunk))
        self._expiring = d
        d.addErrback(failed).addBoth(done)
        return d

    def purge(self, user: str, before: int | None = None):
        """Delete ``user``'s archive (older than ``before`` if given); Deferred -> count."""
        return self._in_chunks(lambda log_, chunk: log_.delete_user(user, before, chunk))

    def admin_purge(self, jid: str, before: str | None = None):
        from xmppd.admin import AdminError

        try:
            target = jidlib.parse(jid)
        except (jidlib.InvalidJID, TypeError) as e:
            raise AdminError(f"{jid!r} is not a valid JID: {e}") from None
        if target.user is None or target.host not in self.router.hosts:
            raise AdminError(f"{jid} is not an account of this server")
        cut = None
        if before is not None:
            try:
                cut = parse_time(before)
            except (ValueError, AttributeError) as e:
                raise AdminError(f"--before: {e}") from None
        d = self.purge(target.bare, cut)

        def done(n: int) -> dict:
            log.info("admin: deleted {n} archived messages of {user}{when}", n=n,
                     user=target.bare, when=f" before {before}" if before else "")
            return {"deleted": n}

        return d.addCallback(done)

    def admin_expire(self):
        if self.settings.retention is None:
            return {"deleted": 0, "retention": "forever"}
        return self.expire().addCallback(lambda n: {"deleted": n})

    def _hook_account_removal(self) -> None:
        """Every account removal (in-band, ad-hoc, any connector) deletes the archive.

        Wrapping the connectors' ``remove_user`` covers every path through
        the running server; ``xmppctl deluser`` asks the running server (or
        opens the archive itself when the server is stopped).
        """
        seen = set()
        for connector in self.server.connectors.values():
            if id(connector) in seen:
                continue
            seen.add(id(connector))
            original = connector.remove_user

            def remove_user(username: str, domain: str, _original=original):
                bare = f"{username}@{domain}"
                d = _original(username, domain)

                def forget(result):
                    self._prefs.pop(bare, None)
                    return self._stored_prefs.delete(bare).addCallback(
                        lambda _: self.purge(bare)).addCallback(lambda _: result)

                return d.addCallback(forget)

            connector.remove_user = remove_user

    def close(self) -> None:
        """At stop: the buffered rows are written before the archive is closed."""
        if self._job is not None and self._job.running:
            self._job.stop()
        self.worker.close()


__all__ = ["MAMPlugin", "NS_MAM", "NS_MAM_EXT", "settings", "parse_time", "parse_duration",
           "Settings", "execute", "Plan"]

"""XEP-0441 message archive preferences: what a user wants archived.

``default`` is ``always``, ``never`` or ``roster`` (only contacts in the
user's roster); the ``always`` and ``never`` lists override it for the JIDs
they name (a bare JID covers every resource of it; ``never`` wins over
``always``).  JIDs are prepared (RFC 7622) when set, so a preference set
as ``Bob@Example.COM`` applies to ``bob@example.com``.

Stored in the key-value store (``mam_prefs/<bare JID>/prefs``) and cached
per user in a bounded dict: the archive hook consults it per message
without I/O after the first look-up.

On the server's asynchronous store (:class:`StoredPrefs`): the users who
have stored preferences are read at start-up (everyone else has the
default, no I/O); an online user's are read at bind, in the background;
sets of one user are stored one after another.  With the embedded store
every read is done within the call, as before.  On a networked store, a
message exchanged by a user with stored preferences that are not in memory
yet (no session, not cached, or a login a few milliseconds old) is not
archived for that user: never archived against the user's wish; the read
it starts serves the next one (the same for the roster of a user whose
default is ``roster``).
"""
from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.python.failure import Failure

from twisted.words.xish import domish

from xmppd import jid as jidlib
from xmppd.jid import JID
from xmppd.serial import Serial
from xmppd.stanzas import StanzaError, escape_attr
from xmppd.storage import StoreError
from xmppd.storefail import report as store_report

STORE = "mam_prefs"
DEFAULTS = ("always", "never", "roster")


class Prefs:
    """One user's preferences (immutable)."""

    __slots__ = ("default", "always", "never")

    def __init__(self, default: str, always=(), never=()) -> None:
        self.default = default
        self.always = frozenset(always)
        self.never = frozenset(never)

    def wants(self, other: JID, in_roster: Callable[[str], bool]) -> bool:
        """Archive a message exchanged with ``other``?"""
        never, always = self.never, self.always
        if never and (other.bare in never or other.full in never):
            return False
        if always and (other.bare in always or other.full in always):
            return True
        default = self.default
        if default == "always":
            return True
        if default == "never":
            return False
        return in_roster(other.bare)

    def to_json(self) -> dict:
        return {"default": self.default, "always": sorted(self.always),
                "never": sorted(self.never)}

    @classmethod
    def from_json(cls, value: dict) -> "Prefs":
        return cls(value.get("default", "always"), value.get("always", ()), value.get("never", ()))

    def to_xml(self, ns: str) -> str:
        def jids(items):
            return "".join(f"<jid>{escape_attr(j)}</jid>" for j in sorted(items))

        return (f"<prefs xmlns='{ns}' default='{self.default}'><always>{jids(self.always)}"
                f"</always><never>{jids(self.never)}</never></prefs>")

    @classmethod
    def from_element(cls, prefs: domish.Element, max_items: int) -> "Prefs":
        """Parse a set request; JIDs prepared; ``bad-request`` / ``jid-malformed``
        / ``policy-violation`` (over ``max_items``) before anything is kept."""
        default = prefs.getAttribute("default")
        if default not in DEFAULTS:
            raise StanzaError("bad-request", text="default must be always, never or roster")
        lists: dict[str, set] = {"always": set(), "never": set()}
        seen = 0
        for child in prefs.elements(prefs.uri):
            if child.name not in lists:
                continue
            for item in child.elements(prefs.uri, "jid"):
                seen += 1
                if seen > max_items:
                    raise StanzaError("policy-violation",
                                      text=f"at most {max_items} JIDs in archive preferences")
                try:
                    lists[child.name].add(jidlib.parse(str(item).strip()).full)
                except jidlib.InvalidJID as e:
                    raise StanzaError("jid-malformed", text=f"{str(item)[:100]!r}: {e}") from None
        both = lists["always"] & lists["never"]
        if both:
            raise StanzaError("bad-request", text=f"{sorted(both)[0]} is in both always and never")
        return cls(default, lists["always"], lists["never"])


def result_now(d: defer.Deferred) -> Any:
    """The result of ``d`` if it has fired (an embedded store's read), else None.

    A failure is logged (xmppd.storefail, once per minute) and gives None."""
    return fired_now(d)[1]


def fired_now(d: defer.Deferred) -> tuple[bool, Any]:
    """(True, result) if ``d`` has fired, else (False, None); a failure as :func:`result_now`."""
    box: list = []

    def got(result) -> None:
        box.append(result)

    def failed(failure) -> None:
        box.append(None)
        if failure.check(StoreError):
            store_report(failure.value)
        else:
            failure.raiseException()

    d.addCallbacks(got, failed)
    return (True, box[0]) if box else (False, None)


class StoredPrefs:
    """Preferences in the asynchronous store, for the archive hook's in-memory cache.

    ``cache(user, prefs)`` puts one into the hook's bounded dict.  The set
    of users with stored preferences (names only) lets everyone else get
    the default without I/O.
    """

    def __init__(self, store, default: Prefs, cache: Callable[[str, Prefs], None]) -> None:
        self.store = store
        self.default = default
        self.cache = cache
        self.serial = Serial()  # one user's sets and gets, in arrival order
        self._loading: dict[str, defer.Deferred] = {}
        self.users: set[str] | None = None  # None until read: anyone may have some

        def listed(users) -> None:
            self.users = set(users) | (self.users or set())

        def failed(failure) -> None:
            failure.trap(StoreError)
            store_report(failure.value)  # stays unknown: every user's are read

        store.users(STORE).addCallbacks(listed, failed)

    def load(self, user: str, read: bool = False) -> defer.Deferred:
        """Deferred[Prefs] from the store (the default when the user has none), cached.

        ``read``: from the store even when the user is not in :attr:`users`
        (at bind: another node sharing the store may have stored some)."""
        if not read and self.users is not None and user not in self.users:
            self.cache(user, self.default)
            return defer.succeed(self.default)
        loading = self._loading.get(user)
        if loading is None:
            def stored(value) -> Prefs:
                prefs = self.default if value is None else Prefs.from_json(value)
                if self._loading.get(user) is loading:
                    self.cache(user, prefs)
                    if value is not None and self.users is not None:
                        self.users.add(user)
                return prefs

            def done(result):
                if self._loading.get(user) is loading:
                    del self._loading[user]
                return result

            loading = self._loading[user] = self.store.get(STORE, user, "prefs")
            loading.addCallback(stored).addBoth(done)
            if loading.called:  # an embedded store: read already
                return loading
        # Each caller its own Deferred, so one caller's errback does not touch another's.
        waiter = defer.Deferred()

        def relay(result):
            if isinstance(result, Failure):
                waiter.errback(result)
                return None  # handled by the waiter
            waiter.callback(result)
            return result

        loading.addBoth(relay)
        return waiter

    def preload(self, user: str, cached: dict) -> None:
        """At bind: read ``user``'s preferences into memory (in the background; one row,
        also for a user not in :attr:`users`, which another node may have changed)."""
        if user in cached:
            return

        def failed(failure) -> None:
            failure.trap(StoreError)
            store_report(failure.value)

        self.load(user, read=True).addErrback(failed)

    def get(self, user: str, cached: dict) -> defer.Deferred:
        """Deferred[the user's Prefs] for a get: after every set before it."""
        def step():
            prefs = cached.get(user)
            return defer.succeed(prefs) if prefs is not None else self.load(user)

        return self.serial.run(user, step)

    def put(self, user: str, prefs: Prefs) -> defer.Deferred:
        """Store, then cache (nothing in force that was not stored)."""
        def stored(_) -> None:
            self._loading.pop(user, None)  # a read begun before this set is stale
            if self.users is not None:
                self.users.add(user)
            self.cache(user, prefs)

        return self.serial.run(user, self.store.put, STORE, user, "prefs",
                               prefs.to_json()).addCallback(stored)

    def delete(self, user: str) -> defer.Deferred:
        """The account is gone: its preferences too."""
        self._loading.pop(user, None)

        def deleted(_) -> None:
            if self.users is not None:
                self.users.discard(user)

        return self.store.delete_user(STORE, user).addCallback(deleted)

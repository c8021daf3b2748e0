"""XEP-0441 message archive preferences: what a user wants archived.

``default`` is ``always``, ``never`` or ``roster`` (only contacts in the
user's roster); the ``always`` and ``never`` lists override it for the JIDs
they name (a bare JID covers every resource of it; ``never`` wins over
``always``).  JIDs are prepared (RFC 7622) when set, so a preference set
as ``Bob@Example.COM`` applies to ``bob@example.com``.

Stored in the key-value store (``mam_prefs/<bare JID>/prefs``) and cached
per user in a bounded dict: the archive hook consults it per message
without I/O after the first look-up.
"""
from __future__ import annotations

from typing import Callable

from twisted.words.xish import domish

from xmppd import jid as jidlib
from xmppd.jid import JID
from xmppd.stanzas import StanzaError, escape_attr

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

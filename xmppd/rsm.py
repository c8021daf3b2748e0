"""XEP-0059 Result Set Management: the ``<set/>`` of a paged request and of its answer.

wokkel 18 has no RSM module; this is the small typed part MAM needs.
Values are bounded where they are read (``max`` is capped by the caller,
ids longer than :data:`MAX_ID` are refused), so a request cannot make the
server keep or echo more than it chose to.
"""
from __future__ import annotations

from twisted.words.xish import domish

from xmppd.stanzas import StanzaError, escape_attr

NS_RSM = "http://jabber.org/protocol/rsm"
MAX_ID = 256


def _escape_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class ResultSet:
    """A request's paging: ``max`` (None: the server's default), ``after``,
    ``before`` (``""``: the last page), ``index`` (not supported by MAM)."""

    __slots__ = ("max", "after", "before", "index")

    def __init__(self, max: int | None = None, after: str | None = None,
                 before: str | None = None, index: int | None = None) -> None:
        self.max, self.after, self.before, self.index = max, after, before, index

    @classmethod
    def from_element(cls, element: domish.Element | None) -> "ResultSet":
        """Parse a request's ``<set/>``; ``bad-request`` for values that are not numbers."""
        rs = cls()
        if element is None:
            return rs
        for child in element.elements(NS_RSM):
            text = str(child)
            if child.name in ("after", "before"):
                if len(text) > MAX_ID:
                    raise StanzaError("bad-request", text=f"RSM <{child.name}/> is too long")
                setattr(rs, child.name, text)
            elif child.name in ("max", "index"):
                try:
                    value = int(text.strip())
                except ValueError:
                    raise StanzaError("bad-request", text=f"RSM <{child.name}/> must be a number") from None
                if value < 0:
                    raise StanzaError("bad-request", text=f"RSM <{child.name}/> must not be negative")
                setattr(rs, child.name, value)
        return rs

    @staticmethod
    def answer_xml(first: str | None, last: str | None, count: int | None,
                   first_index: int | None = None) -> str:
        """The ``<set/>`` of an answer: first/last of the page, and the count if known."""
        out = [f"<set xmlns='{NS_RSM}'>"]
        if first is not None:
            index = f" index='{first_index}'" if first_index is not None else ""
            out.append(f"<first{index}>{_escape_text(first)}</first><last>{_escape_text(last)}</last>")
        if count is not None:
            out.append(f"<count>{count}</count>")
        out.append("</set>")
        return "".join(out)


__all__ = ["NS_RSM", "ResultSet", "escape_attr"]

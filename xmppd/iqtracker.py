"""Server-originated IQ requests and their answers.

Some features make the server ask a client or another server something
(XEP-0115 caps resolution sends disco#info to a client).  The answer comes
back as an IQ result or error addressed to the server's domain, which the
router hands to :meth:`IQTracker.response` (``Router.iq_responses``).

Bounded on purpose: at most ``max_outstanding`` requests wait at once (a
further :meth:`IQTracker.request` fails at once with :class:`TooManyRequests`
rather than queue), each waits at most ``timeout`` seconds, and an answer is
taken only from the JID the request went to (anyone else could guess an id).
"""
from __future__ import annotations

import itertools
from typing import Any

from twisted.internet import defer
from twisted.words.xish import domish

from xmppd.jid import JID

#: Default bound on requests waiting at once, across every feature.
MAX_OUTSTANDING = 4096


class TooManyRequests(Exception):
    """``max_outstanding`` requests are already waiting."""


class RequestTimeout(Exception):
    """No answer within the timeout."""


class ErrorResponse(Exception):
    """The peer answered with an IQ error; ``stanza`` is that error."""

    def __init__(self, stanza: domish.Element) -> None:
        super().__init__("IQ error")
        self.stanza = stanza


class IQTracker:
    """Send IQ get/set from the server; a Deferred fires with the result stanza."""

    def __init__(self, router, clock: Any, max_outstanding: int = MAX_OUTSTANDING) -> None:
        self.router = router
        self.clock = clock
        self.max_outstanding = max_outstanding
        # id -> (peer full JID text, Deferred, timer)
        self._pending: dict[str, tuple[str, defer.Deferred, Any]] = {}
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._pending)

    def request(self, iq: domish.Element, to: JID, timeout: float = 30.0) -> defer.Deferred:
        """Send ``iq`` (``type``, ``from`` and payload set by the caller) to ``to``.

        Fires with the result stanza, or fails with :class:`ErrorResponse`,
        :class:`RequestTimeout` or :class:`TooManyRequests`.
        """
        if len(self._pending) >= self.max_outstanding:
            return defer.fail(TooManyRequests(f"{self.max_outstanding} IQ requests outstanding"))
        ident = f"xmppd-{next(self._ids)}"
        iq["id"] = ident
        iq["to"] = to.full
        d = defer.Deferred()
        timer = self.clock.callLater(timeout, self._expire, ident)
        self._pending[ident] = (to.full, d, timer)
        self.router.send_from_server(iq, to)
        return d

    def _expire(self, ident: str) -> None:
        entry = self._pending.pop(ident, None)
        if entry is not None:
            entry[1].errback(RequestTimeout(f"no answer from {entry[0]}"))

    def response(self, stanza: domish.Element, sender: JID) -> bool:
        """An IQ result/error to the server: True when it answered one of ours."""
        ident = stanza.getAttribute("id")
        entry = self._pending.get(ident) if ident else None
        if entry is None or entry[0] != sender.full:
            return False
        del self._pending[ident]
        if entry[2].active():
            entry[2].cancel()
        if stanza.getAttribute("type") == "result":
            entry[1].callback(stanza)
        else:
            entry[1].errback(ErrorResponse(stanza))
        return True

    def cancel_all(self) -> None:
        """At shutdown: no timer left behind."""
        pending, self._pending = self._pending, {}
        for _, d, timer in pending.values():
            if timer.active():
                timer.cancel()
            d.errback(RequestTimeout("server stopping"))

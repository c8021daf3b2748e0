"""xmppd's log level: ``[server] log_level``, changed by a reload.

twistd sends every event to the observers it set up; it has no level
setting.  Every xmppd logger is built with :data:`log_observer` as its
observer, a filter in front of Twisted's global publisher, so the level of
xmppd's own messages can be set at start-up and changed by a reload without
touching twistd's logging (Twisted's own messages are not filtered).
"""
from __future__ import annotations

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)

#: The observer of every xmppd ``Logger``: drops events below the level.
log_observer = FilteringLogObserver(globalLogPublisher, [_predicate])


def set_level(name: str) -> None:
    """Log xmppd's events at ``name`` (``config.LOG_LEVELS``) and above."""
    _predicate.setLogLevelForNamespace(None, LogLevel.levelWithName(name))  # every namespace


def level() -> str:
    """The level in force (for ``xmppctl status``)."""
    return _predicate.logLevelForNamespace(None).name


def literal(text: str) -> str:
    """``text`` as a Twisted log format that has no fields left to fill.

    Twisted formats every event it writes by running ``string.Formatter``
    (pure Python: a parse, then a look-up, conversion and ``format`` per
    field) over its format string.  For the lines logged once per session
    (bound, ended) that is ~40 of the ~120 Python calls of a line.  Building
    the text with an f-string and passing it here leaves Twisted a string
    with no fields; braces from the values (a resource may hold them) are
    doubled so they print as they are.  Pass the values as keyword
    arguments as well: observers that read fields still get them.
    """
    return text.replace("{", "{{").replace("}", "}}")

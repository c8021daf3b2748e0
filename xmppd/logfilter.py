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

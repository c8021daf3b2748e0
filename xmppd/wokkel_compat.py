"""The one place where wokkel is imported.

wokkel 18.0.0 imports ``twisted.python.compat._PY3``, which current Twisted
no longer has.  Setting it before the first wokkel import is the whole shim;
every other module imports wokkel names from here, so nobody else patches
Twisted.  The component support (:mod:`xmppd.components`) and operators'
handler modules need more of wokkel than the plugins do: ``subprotocols``
(the handler contract), ``component`` (the XEP-0114 client and server
pieces), ``generic``, ``ping`` and ``pubsub`` (handlers served unmodified).
"""
import twisted.python.compat as _compat

if not hasattr(_compat, "_PY3"):
    _compat._PY3 = True

from wokkel import (  # noqa: E402
    component, data_form, delay, disco, generic, iwokkel, ping, pubsub, subprotocols,
)

__all__ = ["component", "data_form", "delay", "disco", "generic", "iwokkel", "ping",
           "pubsub", "subprotocols"]

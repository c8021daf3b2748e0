"""The one place where wokkel is imported.

wokkel 18.0.0 imports ``twisted.python.compat._PY3``, which current Twisted
no longer has.  Setting it before the first wokkel import is the whole shim;
every other module imports wokkel names from here, so nobody else patches
Twisted.  The component support (:mod:`xmppd.components`) and operators'
handler modules need more of wokkel than the plugins do: ``subprotocols``
(the handler contract), ``component`` (the XEP-0114 client and server
pieces), ``generic``, ``ping`` and ``pubsub`` (handlers served unmodified).

Each wokkel module is imported on first use (``from xmppd.wokkel_compat
import disco`` imports ``wokkel.disco`` only), not all of them at once: a
server whose configuration uses none of ``pubsub``, ``component`` or
``delay`` does not carry them (``delay`` alone pulls in ``dateutil`` and
``zoneinfo``, ~1.7 MB of resident memory together with the others; issue 20).
"""
from __future__ import annotations

import importlib

import twisted.python.compat as _compat

if not hasattr(_compat, "_PY3"):
    _compat._PY3 = True

__all__ = ["component", "data_form", "delay", "disco", "generic", "iwokkel", "ping",
           "pubsub", "subprotocols"]


def __getattr__(name: str):
    """``wokkel.<name>`` for the names of ``__all__``, imported on first access (PEP 562)."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"wokkel.{name}")
    globals()[name] = module
    return module

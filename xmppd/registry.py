"""Which session-manager plugins exist: the built-in ones and those of installed packages.

The built-ins are listed in code (:data:`xmppd.handlers.BUILTIN_PLUGINS`), so
they work from any checkout without re-installing the package.  Another
package adds plugins through the ``xmppd.plugins`` entry-point group, e.g. in
its ``setup.cfg``::

    [options.entry_points]
    xmppd.plugins =
        motd = xmppd_motd:MotdPlugin

A name is looked up when the server is built, not when the config is read
(the config layer does not know the plugins): an unknown name, or one whose
module does not import, stops start-up with one line naming ``sm.plugins``.
A package cannot replace a built-in plugin by registering its name.
"""
from __future__ import annotations

import importlib

from xmppd.config import ConfigError

ENTRY_POINT_GROUP = "xmppd.plugins"


def known_plugins() -> dict[str, object]:
    """Name -> ``"module:Class"`` (built-in) or an entry point (other packages)."""
    from importlib import metadata

    from xmppd.handlers import BUILTIN_PLUGINS

    known: dict[str, object] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        known[ep.name] = ep
    known.update(BUILTIN_PLUGINS)  # built-ins win
    return known


def load_plugin(name: str, path: str = "<defaults>"):
    """A new instance of the plugin registered as ``name`` (ConfigError naming ``sm.plugins``)."""
    from xmppd.handlers import BUILTIN_PLUGINS

    # A built-in name needs no look-up of installed packages' entry points
    # (importlib.metadata scans every distribution; issue 20): built-ins win anyway.
    target = BUILTIN_PLUGINS.get(name)
    if target is None:
        known = known_plugins()
        target = known.get(name)
    if target is None:
        raise ConfigError(path, "sm.plugins", name,
                          "unknown plugin; known: " + ", ".join(sorted(known)))
    try:
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            cls = getattr(importlib.import_module(module), attr)
        else:
            cls = target.load()
        return cls()
    except Exception as e:  # noqa: BLE001 -- any failure of third-party code
        raise ConfigError(path, "sm.plugins", name,
                          f"cannot load the plugin ({type(e).__name__}: {e})") from None

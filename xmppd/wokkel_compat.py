"""The one place where wokkel is imported.

wokkel 18.0.0 imports ``twisted.python.compat._PY3``, which current Twisted
no longer has.  Setting it before the first wokkel import is the whole shim;
every other module imports wokkel names from here, so nobody else patches
Twisted.
"""
import twisted.python.compat as _compat

if not hasattr(_compat, "_PY3"):
    _compat._PY3 = True

from wokkel import data_form, delay, disco  # noqa: E402

__all__ = ["data_form", "delay", "disco"]

"""TLS key-exchange groups (``[tls] groups``).

The default is the Mozilla "intermediate" profile's list: X25519, P-256,
P-384, in that order of preference.  OpenSSL's own default also offers
X448, P-521 and the finite-field groups, which only add handshake cost and
attack surface for no client that needs them.

pyOpenSSL has no setter for the group list (only ``set_tmp_ecdh`` for one
curve), so the list goes to ``SSL_CTX_set1_groups_list`` (exposed by the
cryptography bindings under its old name ``SSL_CTX_set1_curves_list``).
Names are checked one by one on a scratch context, so a mistake is reported
with the offending name rather than as "the list is wrong".
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL

#: Mozilla "intermediate" (server side TLS, version 5.x): X25519, prime256v1, secp384r1.
DEFAULT_GROUPS = ("X25519", "P-256", "P-384")
#: For error messages: names every OpenSSL 3 knows (aliases such as
#: ``prime256v1``/``secp256r1`` work too).
KNOWN_EXAMPLES = ("X25519", "X448", "P-256", "P-384", "P-521", "ffdhe2048", "ffdhe3072",
                  "ffdhe4096", "ffdhe6144", "ffdhe8192")

_lib = Binding.lib
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class GroupError(ValueError):
    """An unusable ``[tls] groups`` value; ``str()`` names the key and the value."""

    def __init__(self, value: object, reason: str) -> None:
        super().__init__(f"[tls] groups = {value!r}: {reason}")
        self.value, self.reason = value, reason


def _set(ctx: SSL.Context, names: Sequence[str]) -> bool:
    ok = _lib.SSL_CTX_set1_curves_list(ctx._context, ":".join(names).encode("ascii")) == 1
    if not ok:
        _lib.ERR_clear_error()  # do not leave the failure for pyOpenSSL's next call
    return ok


def validate(groups: Sequence[str]) -> tuple[str, ...]:
    """The groups as a tuple, or :class:`GroupError` naming the first bad one."""
    groups = tuple(groups)
    if not groups:
        raise GroupError([], "must name at least one group (leave it out for the default)")
    scratch = SSL.Context(SSL.TLS_SERVER_METHOD)
    for name in groups:
        if not isinstance(name, str) or not _NAME.fullmatch(name) or not _set(scratch, [name]):
            raise GroupError(name, "unknown key-exchange group; OpenSSL knows e.g. "
                             + ", ".join(KNOWN_EXAMPLES))
    if not _set(scratch, groups):
        raise GroupError(list(groups), "OpenSSL refused the list")
    return groups


def apply(ctx: SSL.Context, groups: Sequence[str]) -> None:
    """Restrict ``ctx`` to ``groups`` (already validated), in that preference order."""
    if not _set(ctx, groups):
        raise GroupError(list(groups), "OpenSSL refused the list")

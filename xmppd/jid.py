"""XMPP addresses per RFC 7622 (PRECIS), for input from the wire.

Twisted's ``jid.JID`` implements RFC 3920 stringprep, accepts ``@example.com``
and oversized parts, and its ``internJID`` cache never evicts (a memory leak
fed by clients).  This module prepares each part with the PRECIS profiles of
RFC 7622 (``precis-i18n``), enforces the 1023-byte limit per part, and caches
parses in a bounded LRU so that hot addresses cost a dict look-up.
"""
from __future__ import annotations

import functools
import ipaddress
from typing import NamedTuple

import precis_i18n

_LOCAL = precis_i18n.get_profile("UsernameCaseMapped")
_RESOURCE = precis_i18n.get_profile("OpaqueString")

MAX_PART = 1023
# RFC 7622 §3.3.1: these may not appear in a localpart.
_LOCAL_FORBIDDEN = frozenset("\"&'/:<>@")


class InvalidJID(ValueError):
    """The address is not a valid RFC 7622 JID (maps to ``jid-malformed``)."""


class JID(NamedTuple):
    """A prepared address; ``bare`` and ``full`` are precomputed strings."""

    user: str | None
    host: str
    resource: str | None
    bare: str
    full: str

    @property
    def is_bare(self) -> bool:
        return self.resource is None

    def bare_jid(self) -> "JID":
        if self.resource is None:
            return self
        return JID(self.user, self.host, None, self.bare, self.bare)

    def __str__(self) -> str:
        return self.full


def _prep_domain(domain: str) -> str:
    if not domain:
        raise InvalidJID("empty domainpart")
    if domain.startswith("[") and domain.endswith("]"):
        try:
            return "[" + str(ipaddress.IPv6Address(domain[1:-1])) + "]"
        except ValueError as e:
            raise InvalidJID(f"bad IPv6 domainpart: {e}") from None
    domain = domain.rstrip(".") if domain.endswith(".") and len(domain) > 1 else domain
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError as e:
        raise InvalidJID(f"bad domainpart: {e}") from None
    ascii_domain = ascii_domain.lower()
    for label in ascii_domain.split("."):
        if not label or len(label) > 63:
            raise InvalidJID("bad domain label length")
        if not all(c.isalnum() or c in "-_" for c in label):
            raise InvalidJID(f"bad character in domainpart {domain!r}")
    # Keep the Unicode form as the canonical one (U-label), lower-cased.
    try:
        prepared = ascii_domain.encode("ascii").decode("idna")
    except UnicodeError as e:
        raise InvalidJID(f"bad domainpart: {e}") from None
    if len(prepared.encode()) > MAX_PART:
        raise InvalidJID("domainpart longer than 1023 bytes")
    return prepared


def _prep_local(local: str) -> str:
    try:
        prepared = _LOCAL.enforce(local)
    except UnicodeError as e:
        raise InvalidJID(f"bad localpart: {e.reason}") from None
    if not prepared or len(prepared.encode()) > MAX_PART:
        raise InvalidJID("localpart empty or longer than 1023 bytes")
    if _LOCAL_FORBIDDEN.intersection(prepared):
        raise InvalidJID("forbidden character in localpart")
    return prepared


def _prep_resource(resource: str) -> str:
    try:
        prepared = _RESOURCE.enforce(resource)
    except UnicodeError as e:
        raise InvalidJID(f"bad resourcepart: {e.reason}") from None
    if not prepared or len(prepared.encode()) > MAX_PART:
        raise InvalidJID("resourcepart empty or longer than 1023 bytes")
    return prepared


def prep_localpart(local: str) -> str:
    """Prepare a bare username (for connectors and ``xmppctl``)."""
    return _prep_local(local)


def prep_resource(resource: str) -> str:
    """Prepare a resource chosen by a client at bind time."""
    return _prep_resource(resource)


@functools.lru_cache(maxsize=16384)
def parse(text: str) -> JID:
    """Parse and prepare ``text``; raises :class:`InvalidJID`.

    The cache is bounded, so addresses invented by clients cannot grow memory.
    """
    if len(text) > 3 * MAX_PART + 2:
        raise InvalidJID("address too long")
    slash = text.find("/")
    if slash >= 0:
        rest, resource = text[:slash], _prep_resource(text[slash + 1 :])
    else:
        rest, resource = text, None
    at = rest.find("@")
    if at >= 0:
        user, host = _prep_local(rest[:at]), _prep_domain(rest[at + 1 :])
    else:
        user, host = None, _prep_domain(rest)
    bare = f"{user}@{host}" if user is not None else host
    full = f"{bare}/{resource}" if resource is not None else bare
    return JID(user, host, resource, bare, full)


def make(user: str | None, host: str, resource: str | None = None) -> JID:
    """Build a JID from parts already prepared by this module."""
    bare = f"{user}@{host}" if user is not None else host
    full = f"{bare}/{resource}" if resource is not None else bare
    return JID(user, host, resource, bare, full)

"""What the two directions of a server-to-server stream share.

Both are :class:`xmppd.stream.XMPPStream`\\ s (parser limits, stream errors,
time bounds, flow control) in the ``jabber:server`` namespace, which the
parser renames to ``jabber:client`` as it builds stanzas, so the router and
the plugins see one namespace whatever the stanza's way in.  Stanzas we
write are serialised without a default-namespace declaration and so are
read by the peer in the stream's ``jabber:server``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from OpenSSL import SSL

from xmppd.stanzas import NS_CLIENT, NS_STREAMS
from xmppd.stream import AUTHENTICATED, NS_TLS, XMPPStream  # noqa: F401 (NS_TLS: for inbound/outbound)
from xmppd.xmlparser import Limits

if TYPE_CHECKING:
    from xmppd.s2s.service import S2SService

NS_SERVER = "jabber:server"
NS_DIALBACK = "jabber:server:dialback"
NS_DIALBACK_FEATURE = "urn:xmpp:features:dialback"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
STANZAS = frozenset(("message", "presence", "iq"))


def s2s_limits(cfg) -> tuple[Limits, Limits]:
    """Parser limits (after, before authentication) from ``[s2s]``."""
    header = 16384
    after = Limits(cfg.max_stanza_size, cfg.max_depth, cfg.max_stanza_nodes, header)
    before = Limits(min(cfg.max_stanza_size, 16384), cfg.max_depth, min(cfg.max_stanza_nodes, 100), header)
    return after, before


class ServerStream(XMPPStream):
    """Base of inbound and outbound s2s streams."""

    ESTABLISHED = AUTHENTICATED
    RENAME_NS = (NS_SERVER, NS_CLIENT)

    @property
    def service(self) -> "S2SService":
        return self.factory.service

    @property
    def server(self):
        return self.factory.service.server

    def stream_settings(self):
        return self.service.config

    def parser_limits(self) -> Limits:
        return self.service.limits if self.phase >= AUTHENTICATED else self.service.preauth_limits

    def header_for(self, local: str, remote: str | None, with_id: bool) -> bytes:
        to = f" to='{remote}'" if remote else ""
        ident = f" id='{self.stream_id}'" if with_id else ""
        return (
            "<?xml version='1.0'?>"
            f"<stream:stream xmlns='{NS_SERVER}' xmlns:stream='{NS_STREAMS}'"
            f" xmlns:db='{NS_DIALBACK}' from='{local}'{to}{ident} version='1.0'>"
        ).encode()

    def tls_connection(self) -> SSL.Connection | None:
        if not self.secure:
            return None
        try:
            handle = self.transport.getHandle()
        except Exception:
            return None
        return handle if isinstance(handle, SSL.Connection) else None

    def tls_version(self) -> str:
        conn = self.tls_connection()
        if conn is None:
            return "none"
        try:
            return conn.get_protocol_version_name()
        except Exception:
            return "?"

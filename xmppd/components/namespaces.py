"""Stanzas between the router (``jabber:client``) and components.

On an XEP-0114 stream stanzas are in ``jabber:component:accept``; handlers in
process often build them without a namespace.  Plugins and filters look
children up by ``jabber:client`` names (``<body/>``, ``<priority/>``,
``<error/>``), so what a component sends is moved into ``jabber:client``
before it is routed.  The other way needs nothing: the stream's default
namespace is ``jabber:component:accept``, and the serializer writes
``jabber:client`` elements without an ``xmlns``, so they take the stream's.
"""
from __future__ import annotations

from twisted.words.xish import domish

from xmppd.stanzas import NS_CLIENT

NS_ACCEPT = "jabber:component:accept"


def to_client_namespace(element: domish.Element, stream_uri: str | None) -> None:
    """Move ``element`` and its children from ``stream_uri`` (or no namespace) to jabber:client.

    A child without a namespace has its parent's, as on the wire.
    """
    stack = [(element, NS_CLIENT)]
    while stack:
        el, parent = stack.pop()
        uri = el.uri
        if uri is None:
            uri = parent
        elif uri == stream_uri:
            uri = NS_CLIENT
        el.uri = uri
        if el.defaultUri is None or el.defaultUri == stream_uri:
            el.defaultUri = uri
        for child in el.children:
            if isinstance(child, domish.Element):
                stack.append((child, uri))

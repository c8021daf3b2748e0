"""Federation: server-to-server streams (RFC 6120, XEP-0178, XEP-0220, XEP-0368).

One job per module:

* :mod:`~xmppd.s2s.settings` -- ``[s2s]`` and ``[s2s.routes]``, read once;
* :mod:`~xmppd.s2s.service` -- links, streams, policy; the router's hand-off;
* :mod:`~xmppd.s2s.inbound` -- the receiving side of a stream;
* :mod:`~xmppd.s2s.outbound` -- the initiating side, and the per-pair link
  that queues, connects and bounces;
* :mod:`~xmppd.s2s.queue` -- the bounded (length and time) waiting queue;
* :mod:`~xmppd.s2s.resolve` -- SRV / A / AAAA through twisted.names;
* :mod:`~xmppd.s2s.tls` -- contexts and the peer certificate checks;
* :mod:`~xmppd.s2s.dialback` -- XEP-0185 keys and their secret;
* :mod:`~xmppd.s2s.common` -- what both stream directions share.

Both stream directions build on :class:`xmppd.stream.XMPPStream`, the base
they share with client streams.  docs/s2s.rst is the operator's view.
"""

"""Several xmppd nodes serving the same domains, sharing live state over Redis.

Off unless ``[cluster] redis`` is set (docs/cluster.rst).  One module per job:

* :mod:`~xmppd.cluster.settings`: the ``[cluster]`` table;
* :mod:`~xmppd.cluster.link`: the two Redis connections, outage detection;
* :mod:`~xmppd.cluster.bus`: stanzas and events between nodes (pub/sub);
* :mod:`~xmppd.cluster.remote`: other nodes' sessions as the router sees them;
* :mod:`~xmppd.cluster.registry`: the session registry, heartbeat, dead nodes;
* :mod:`~xmppd.cluster.node`: the wiring into the server.
"""
from __future__ import annotations


def attach(server):
    """The node for ``server``'s config, or None when clustering is off."""
    from xmppd.cluster.settings import settings

    config = settings(server.config)
    if config is None:
        return None
    from xmppd.cluster.node import ClusterNode

    return ClusterNode(server, config)

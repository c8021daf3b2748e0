"""The HTTP side of ``[metrics]`` (``xmppd.metrics``): one page on ``twisted.web``.

A module of its own so that twisted.web is loaded only when metrics are on.
The page is rendered in the reactor thread (see ``xmppd.metrics`` for why).
"""
from __future__ import annotations

from twisted.web import resource
from twisted.web import server as web

PATH = b"/metrics"
# An idle scraper connection is closed after this many seconds.
HTTP_TIMEOUT = 30


class MetricsPage(resource.Resource):
    """``GET /metrics``: the registry in the format the scraper accepts; 404 elsewhere."""

    isLeaf = True

    def __init__(self, registry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request) -> bytes:
        if request.path != PATH:
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"not found: the metrics are at /metrics\n"
        from prometheus_client.exposition import choose_encoder

        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        body = encoder(self.registry)
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        return body


class MetricsSite(web.Site):
    """No access-log line per scrape, no start/stop lines per connection;
    an idle scraper connection is closed after ``HTTP_TIMEOUT`` seconds."""

    noisy = False

    def __init__(self, page: MetricsPage) -> None:
        super().__init__(page, timeout=HTTP_TIMEOUT)

    def log(self, request) -> None:
        pass

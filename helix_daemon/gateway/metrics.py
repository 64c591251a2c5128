"""Prometheus metrics of one gateway (``GET /metrics``), each app with a registry of its own so
that several replicas in one process (the tests) never collide."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                 10.0, 30.0, 60.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class GatewayMetrics:
    """Requests by endpoint and status, open streams, time to first token, tokens sent."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter("helix:gateway_requests", "HTTP requests by endpoint and status.",
                                ["endpoint", "status"], registry=reg)
        self.open_streams = Gauge("helix:gateway_open_streams", "SSE responses in progress.",
                                  registry=reg)
        self.ttft = Histogram("helix:gateway_time_to_first_token_seconds",
                              "Request received to its first token sent.",
                              buckets=_TTFT_BUCKETS, registry=reg)
        self.tokens = Counter("helix:gateway_generation_tokens", "Output tokens sent.",
                              registry=reg)
        self.cancelled = Counter("helix:gateway_client_disconnects",
                                 "Requests cancelled because their client went away.",
                                 registry=reg)

    def render(self) -> bytes:
        return generate_latest(self.registry)

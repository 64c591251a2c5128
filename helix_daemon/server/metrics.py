"""Prometheus metrics of one daemon, named after vLLM's (``vllm:`` becomes ``helix:``).

Every ``DaemonMetrics`` owns a private ``CollectorRegistry`` so tests (and several daemons in one
process) never collide on the global registry.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Bucket edges in seconds: CPU tiny models answer in milliseconds, large GPU models in seconds.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                 60.0, 120.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0,
                600.0, 1800.0)


class DaemonMetrics:
    """Counters, gauges and histograms the daemon updates; scrape them over HTTP."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.ttft = Histogram("helix:time_to_first_token_seconds", "Time to first token.",
                              buckets=_TTFT_BUCKETS, registry=reg)
        self.inter_token = Histogram("helix:inter_token_latency_seconds",
                                     "Time between consecutive output tokens.",
                                     buckets=_ITL_BUCKETS, registry=reg)
        self.e2e = Histogram("helix:e2e_request_latency_seconds",
                             "Enqueue to terminal event.", buckets=_E2E_BUCKETS, registry=reg)
        self.running = Gauge("helix:num_requests_running", "Requests in the running batch.",
                             registry=reg)
        self.waiting = Gauge("helix:num_requests_waiting", "Requests admitted but waiting.",
                             registry=reg)
        self.kv_usage = Gauge("helix:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).",
                              registry=reg)
        self.draft_tokens = Counter("helix:spec_decode_num_draft_tokens",
                                    "Draft tokens proposed.", registry=reg)
        self.accepted_tokens = Counter("helix:spec_decode_num_accepted_tokens",
                                       "Draft tokens accepted.", registry=reg)
        self.generation_tokens = Counter("helix:generation_tokens", "Tokens generated.",
                                         registry=reg)
        self.prompt_tokens = Counter("helix:prompt_tokens", "Prompt tokens prefilled.",
                                     registry=reg)
        # vLLM's names and units: prompt tokens looked up in, and served from, the prefix cache
        self.prefix_queries = Counter("helix:prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache.", registry=reg)
        self.prefix_hits = Counter("helix:prefix_cache_hits",
                                   "Prompt tokens served from the prefix cache.", registry=reg)
        self.request_success = Counter("helix:request_success",
                                       "Finished requests by finish reason or outcome.",
                                       ["finished_reason"], registry=reg)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_inter_token(self, seconds: float) -> None:
        self.inter_token.observe(seconds)

    def observe_e2e(self, seconds: float) -> None:
        self.e2e.observe(seconds)

    def set_running(self, n: int) -> None:
        self.running.set(n)

    def set_waiting(self, n: int) -> None:
        self.waiting.set(n)

    def set_kv_usage(self, fraction: float) -> None:
        self.kv_usage.set(fraction)

    def add_spec_tokens(self, proposed: int, accepted: int) -> None:
        # Counter.inc rejects negatives, which is what we want: a negative count is a bug upstream.
        if proposed:
            self.draft_tokens.inc(proposed)
        if accepted:
            self.accepted_tokens.inc(accepted)

    def add_prefix_cache(self, queried: int, hit: int) -> None:
        if queried:
            self.prefix_queries.inc(queried)
        if hit:
            self.prefix_hits.inc(hit)

    def add_tokens(self, prompt: int, generation: int) -> None:
        if prompt:
            self.prompt_tokens.inc(prompt)
        if generation:
            self.generation_tokens.inc(generation)

    def inc_request(self, outcome: str) -> None:
        """Count one finished request: ``stop``/``length``, ``error``, ``cancelled``..."""
        self.request_success.labels(finished_reason=outcome).inc()

    def start_http(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` on ``port`` from a daemon thread (``0`` = off); returns the port."""
        if port == 0 or self._server is not None:
            return port
        self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        return self._server.server_port

    def stop_http(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            self._thread = None

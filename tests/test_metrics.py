"""Daemon metrics are scrapeable over HTTP with vLLM-style names, and logs carry bound context."""

from __future__ import annotations

import io
import json
import socket
import urllib.request

import structlog

from helix_daemon.logs import configure_logging
from helix_daemon.server.metrics import DaemonMetrics


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_metrics_scraped_over_http() -> None:
    """Every update method shows up under its ``helix:`` name on the HTTP endpoint."""
    metrics = DaemonMetrics()
    port = metrics.start_http(_free_port(), addr="127.0.0.1")
    try:
        metrics.observe_ttft(0.05)
        metrics.observe_ttft(0.2)
        metrics.observe_inter_token(0.01)
        metrics.observe_e2e(1.5)
        metrics.set_running(3)
        metrics.set_waiting(2)
        metrics.set_kv_usage(0.25)
        metrics.add_spec_tokens(proposed=10, accepted=7)
        metrics.add_tokens(prompt=40, generation=12)
        metrics.inc_request("stop")
        metrics.inc_request("stop")
        metrics.inc_request("error")
        s = _scrape(port)
    finally:
        metrics.stop_http()
    assert s["helix:time_to_first_token_seconds_count"] == 2
    assert abs(s["helix:time_to_first_token_seconds_sum"] - 0.25) < 1e-9
    assert s['helix:time_to_first_token_seconds_bucket{le="0.1"}'] == 1
    assert s["helix:inter_token_latency_seconds_count"] == 1
    assert s["helix:e2e_request_latency_seconds_count"] == 1
    assert s["helix:num_requests_running"] == 3
    assert s["helix:num_requests_waiting"] == 2
    assert s["helix:kv_cache_usage_perc"] == 0.25
    assert s["helix:spec_decode_num_draft_tokens_total"] == 10
    assert s["helix:spec_decode_num_accepted_tokens_total"] == 7
    assert s["helix:prompt_tokens_total"] == 40
    assert s["helix:generation_tokens_total"] == 12
    assert s['helix:request_success_total{finished_reason="stop"}'] == 2
    assert s['helix:request_success_total{finished_reason="error"}'] == 1


def test_registries_are_independent_and_port_zero_is_off() -> None:
    """Two DaemonMetrics in one process do not share samples, and port 0 starts no server."""
    a, b = DaemonMetrics(), DaemonMetrics()
    a.add_tokens(prompt=5, generation=1)
    assert a.registry.get_sample_value("helix:prompt_tokens_total") == 5
    assert b.registry.get_sample_value("helix:prompt_tokens_total") == 0
    assert a.start_http(0) == 0


def test_json_logs_include_bound_context(monkeypatch) -> None:
    """In JSON mode each line is one JSON object carrying the contextvars bound for the task."""
    buf = io.StringIO()
    monkeypatch.setattr("sys.stderr", buf)
    configure_logging(json=True, level="INFO")
    structlog.contextvars.clear_contextvars()
    try:
        structlog.contextvars.bind_contextvars(request_id="r-1", daemon_id="d-9")
        structlog.get_logger("test").info("request_started", prompt_tokens=4)
        structlog.get_logger("test").debug("filtered_out")
    finally:
        structlog.contextvars.clear_contextvars()
    lines = [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]
    assert len(lines) == 1
    event = lines[0]
    assert event["event"] == "request_started" and event["level"] == "info"
    assert event["request_id"] == "r-1" and event["daemon_id"] == "d-9"
    assert event["prompt_tokens"] == 4 and "timestamp" in event

"""``GatewayConfig``: the settings of one gateway process, validated once, readable from HELIX_*."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from helix_daemon.client.core import DEFAULT_URL
from helix_daemon.gateway.batch.files import MAX_FILE_BYTES
from helix_daemon.wire.protocol import DEFAULT_PREFIX, MAX_BODY_BYTES, check_request_id


@dataclass(frozen=True)
class GatewayConfig:
    """Settings of one gateway. Every replica on one Redis should be given the same."""

    redis_url: str = DEFAULT_URL  # redis://user:password@host/0 and rediss:// (TLS) work
    prefix: str = DEFAULT_PREFIX
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    # An HTTP body above this is refused (413) before it is parsed; the daemon refuses queue
    # bodies above MAX_BODY_BYTES anyway, so a larger limit buys nothing.
    max_body_bytes: int = MAX_BODY_BYTES
    max_queue_depth: int = 0  # 429 when the queue holds this many entries or more; 0: no bound
    # Extra model names: name -> queue. A route whose queue has no live daemon answers 503.
    routes: Mapping[str, str] = field(default_factory=dict)
    # Chat requests without max_tokens / max_completion_tokens get this many (OpenAI's own
    # default is "up to the context", which Helix refuses when prompt + max_tokens overflow).
    default_max_tokens: int = 256
    max_n: int = 16  # most choices (queue entries) one request may ask for
    route_ttl_s: float = 1.0  # how long the model -> queue table read from heartbeats is reused
    redis_max_connections: int = 4096  # a stream waiting for its first token holds one
    # Batch API: the largest uploaded file (files live in Redis, whole values in memory) and
    # whether this replica works on batches (any replica may; one at a time per batch).
    max_file_bytes: int = MAX_FILE_BYTES
    batch_worker: bool = True
    batch_window: int = 128  # lines of one batch in the queue at once (the rest wait their turn)

    def __post_init__(self) -> None:
        for queue in self.routes.values():
            check_request_id(queue)
        if min(self.max_body_bytes, self.max_n, self.default_max_tokens, self.batch_window) < 1:
            raise ValueError("max_body_bytes, max_n, default_max_tokens and batch_window must "
                             "be >= 1")
        if self.max_queue_depth < 0 or self.route_ttl_s < 0:
            raise ValueError("max_queue_depth and route_ttl_s must be >= 0")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> GatewayConfig:
        """Settings from HELIX_* variables (unparsable values raise ValueError), then overrides.

        ``HELIX_REDIS_URL``, ``HELIX_KEY_PREFIX``, ``HELIX_API_KEYS`` (comma-separated),
        ``HELIX_GATEWAY_MAX_BODY_BYTES``, ``HELIX_GATEWAY_MAX_QUEUE_DEPTH``,
        ``HELIX_GATEWAY_ROUTES`` (``name=queue,...``), ``HELIX_GATEWAY_DEFAULT_MAX_TOKENS``,
        ``HELIX_GATEWAY_MAX_N``, ``HELIX_GATEWAY_MAX_FILE_BYTES``, ``HELIX_GATEWAY_BATCH_WINDOW``.
        """
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        if "HELIX_REDIS_URL" in env:
            values["redis_url"] = env["HELIX_REDIS_URL"]
        if "HELIX_KEY_PREFIX" in env:
            values["prefix"] = env["HELIX_KEY_PREFIX"]
        if env.get("HELIX_API_KEYS"):
            values["api_keys"] = split_list(env["HELIX_API_KEYS"])
        if env.get("HELIX_GATEWAY_ROUTES"):
            values["routes"] = parse_routes(split_list(env["HELIX_GATEWAY_ROUTES"]))
        for name in ("max_body_bytes", "max_queue_depth", "default_max_tokens", "max_n",
                     "max_file_bytes", "batch_window"):
            raw = env.get(f"HELIX_GATEWAY_{name.upper()}")
            if raw is not None:
                try:
                    values[name] = int(raw)
                except ValueError:
                    raise ValueError(f"HELIX_GATEWAY_{name.upper()}: not an integer: {raw!r}")\
                        from None
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]  # values are objects; __post_init__ checks


def split_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def parse_routes(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``["name=queue", ...]`` as a dict; raise ValueError on an item without ``=``."""
    routes = {}
    for item in items:
        name, sep, queue = item.partition("=")
        if not sep or not name.strip() or not queue.strip():
            raise ValueError(f"a route is name=queue, got {item!r}")
        routes[name.strip()] = queue.strip()
    return routes

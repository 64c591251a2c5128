"""``helix serve``: one daemon, its settings from HELIX_* variables overridden by flags."""

from __future__ import annotations

import argparse
import sys

from helix_daemon.client.core import DEFAULT_URL
from helix_daemon.config import DaemonConfig
from helix_daemon.server.run import serve
from helix_daemon.wire.embedded import resolve_redis_url
from helix_daemon.wire.protocol import DEFAULT_PREFIX, DEFAULT_QUEUE


def daemon_config(args: argparse.Namespace, redis_url: str) -> DaemonConfig:
    """``DaemonConfig`` from HELIX_* variables, overridden by the flags given.

    Serve flags default to None so an unset flag leaves its HELIX_* variable in force; the
    shared flags (Redis URL, queue, prefix) override only when they differ from their default.
    """
    given = {
        "model": args.model, "draft": args.draft, "device": args.device, "dtype": args.dtype,
        "kv_cache_memory": args.kv_cache_memory, "metrics_port": args.metrics_port,
        "daemon_id": args.daemon_id, "max_num_seqs": args.max_num_seqs,
        "max_waiting": args.max_waiting,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "num_speculative_tokens": args.num_speculative_tokens,
        "torch_threads": args.torch_threads, "engine_process": args.engine_process,
        "enable_prefix_caching": args.enable_prefix_caching,
        "cpu_linear": args.cpu_linear, "quantization": args.quantization,
        "draft_quantization": args.draft_quantization,
        "model_cache_dir": args.model_cache_dir,
    }
    overrides = {name: value for name, value in given.items() if value is not None}
    shared = {"queue": (args.queue, DEFAULT_QUEUE), "key_prefix": (args.prefix, DEFAULT_PREFIX),
              "redis_url": (redis_url, DEFAULT_URL)}
    overrides |= {name: value for name, (value, default) in shared.items() if value != default}
    config = DaemonConfig.from_env(**overrides)
    if not config.model:
        raise SystemExit("helix serve: give --model or set HELIX_MODEL")
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    url, close = resolve_redis_url(args.redis_url)
    try:
        if url != args.redis_url:
            print(f"helix serve: Redis at {url}", file=sys.stderr, flush=True)
        return serve(daemon_config(args, url))
    finally:
        close()

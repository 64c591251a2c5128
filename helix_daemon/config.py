"""``DaemonConfig``: everything one daemon process needs, validated once, readable from HELIX_*."""

from __future__ import annotations

import dataclasses
import os
import socket
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin, get_type_hints

from helix_daemon.engine.config import (
    CPU_LINEAR_CHOICES,
    DRAFT_QUANTIZATION_CHOICES,
    QUANTIZATION_CHOICES,
    EngineConfig,
)
from helix_daemon.wire.protocol import DEFAULT_PREFIX, DEFAULT_QUEUE, check_request_id

ENV_PREFIX = "HELIX_"


def default_daemon_id(queue: str = DEFAULT_QUEUE, index: int = 0) -> str:
    """A name that survives restarts (so a restarted daemon gets its own pending entries back)."""
    return f"{socket.gethostname()}:{queue}:{index}"


@dataclass(frozen=True)
class DaemonConfig:
    """Settings of one daemon. Durations carry their unit in the name."""

    model: str = ""  # hub id, folder, or .gguf file (dequantized once into model_cache_dir)
    redis_url: str = "redis://127.0.0.1:6379/0"
    queue: str = DEFAULT_QUEUE
    key_prefix: str = DEFAULT_PREFIX
    daemon_id: str = ""  # "" = default_daemon_id(queue, daemon_index)
    daemon_index: int = 0
    draft: str = "none"  # "none" | "ngram" | path (folder or .gguf) of a draft model
    # Dequantized .gguf models, one folder per file content hash ("" = ~/.cache/helix/models)
    model_cache_dir: str = ""
    device: str = "auto"
    dtype: str = "auto"
    # "auto" (the engine's default), a fraction (<= 1) of free device memory, or bytes (> 1)
    kv_cache_memory: str = "auto"
    num_kv_blocks: int | None = None  # overrides kv_cache_memory (tests use tiny pools)
    max_num_seqs: int = 64
    # Requests held beyond max_num_seqs, waiting in the engine: a finished sequence's place is
    # refilled in the next step instead of after an ack, a read and a claim (round trips). With
    # 8, a burst of 128 short requests ran at 0.93-0.96x the in-process engine; 16: 0.97-0.995x.
    max_waiting: int = 16
    max_num_batched_tokens: int = 1024  # tokens per step: bounds a prefill chunk's stall
    num_speculative_tokens: int = 4  # most draft tokens per sequence and step (adaptive below)
    # K chosen per step from measured costs and acceptance; False: always draft
    # num_speculative_tokens (as vLLM does)
    adaptive_speculation: bool = True
    # reuse the KV of prompt blocks seen before (exact: same tokens either way)
    enable_prefix_caching: bool = True
    torch_threads: int | None = None  # CPU threads of torch's kernels; None = torch's default
    cpu_linear: str = "auto"  # one of CPU_LINEAR_CHOICES
    quantization: str = "none"  # one of QUANTIZATION_CHOICES (weight-only)
    draft_quantization: str = "target"  # one of DRAFT_QUANTIZATION_CHOICES (target: the same)
    # Run the engine in a child process, so its Python never waits for the event loop's GIL
    # (False: a thread of the daemon, as when a caller hands the daemon a built engine).
    engine_process: bool = True
    metrics_port: int = 0  # 0 = no HTTP metrics endpoint
    result_ttl_s: int = 3600
    lease_ms: int = 30_000  # an entry idle this long is taken over by another daemon
    reclaim_interval_s: float = 5.0
    heartbeat_interval_s: float = 5.0
    max_attempts: int = 3
    drain_timeout_s: float = 30.0
    kv_high_watermark: float = 0.95  # stop pulling while this fraction of KV blocks is used
    log_json: bool | None = None  # None = JSON when stderr is not a terminal

    def __post_init__(self) -> None:
        if not self.daemon_id:
            object.__setattr__(self, "daemon_id", default_daemon_id(self.queue, self.daemon_index))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on settings the daemon cannot run with."""
        for name in ("queue", "key_prefix", "daemon_id"):
            try:
                check_request_id(getattr(self, name))  # same rule: printable, no braces
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        if self.num_speculative_tokens < 0:
            raise ValueError("num_speculative_tokens must be >= 0")
        if self.max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError("torch_threads must be >= 1")
        _one_of(self, "cpu_linear", CPU_LINEAR_CHOICES)
        _one_of(self, "quantization", QUANTIZATION_CHOICES)
        _one_of(self, "draft_quantization", DRAFT_QUANTIZATION_CHOICES)
        _positive(self, "max_num_seqs", "max_num_batched_tokens", "lease_ms",
                  "reclaim_interval_s", "heartbeat_interval_s", "max_attempts", "result_ttl_s")
        if self.drain_timeout_s < 0:
            raise ValueError("drain_timeout_s must be >= 0")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError("metrics_port must be in 0..65535")
        object.__setattr__(self, "kv_cache_memory", str(self.kv_cache_memory).strip().lower())
        if self.kv_cache_bytes_or_fraction is not None and not self.kv_cache_bytes_or_fraction > 0:
            raise ValueError("kv_cache_memory must be 'auto' or > 0")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be >= 1")
        if not 0 < self.kv_high_watermark <= 1:
            raise ValueError("kv_high_watermark must be in (0, 1]")

    @property
    def kv_cache_bytes_or_fraction(self) -> float | None:
        """``kv_cache_memory`` as the engine takes it; None means the engine's default."""
        if self.kv_cache_memory == "auto":
            return None
        try:
            return float(self.kv_cache_memory)
        except ValueError:
            raise ValueError(f"kv_cache_memory: not 'auto' or a number: "
                             f"{self.kv_cache_memory!r}") from None

    def engine_config(self) -> EngineConfig:
        """What the engine process (or thread) is built from: nothing of Redis or leases."""
        return EngineConfig(model=self.model, draft=self.draft, device=self.device,
                            dtype=self.dtype, kv_cache_memory=self.kv_cache_bytes_or_fraction,
                            num_kv_blocks=self.num_kv_blocks, max_num_seqs=self.max_num_seqs,
                            max_num_batched_tokens=self.max_num_batched_tokens,
                            num_speculative_tokens=self.num_speculative_tokens,
                            adaptive_speculation=self.adaptive_speculation,
                            enable_prefix_caching=self.enable_prefix_caching,
                            cpu_linear=self.cpu_linear, quantization=self.quantization,
                            draft_quantization=self.draft_quantization,
                            torch_threads=self.torch_threads,
                            model_cache_dir=self.model_cache_dir or None)

    @property
    def heartbeat_ttl_ms(self) -> int:
        # Three missed beats before the key expires: one slow beat must not look like a death.
        return int(self.heartbeat_interval_s * 3000)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> DaemonConfig:
        """Read ``HELIX_<FIELD>`` variables (e.g. HELIX_LEASE_MS); raise ValueError on bad ones."""
        env = os.environ if env is None else env
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + field.name.upper())
            if raw is not None:
                values[field.name] = _parse(field.name, raw, hints[field.name])
        values.update(overrides)
        return cls(**values)


def _one_of(config: DaemonConfig, name: str, choices: tuple[str, ...]) -> None:
    if getattr(config, name) not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, "
                         f"got {getattr(config, name)!r}")


def _positive(config: DaemonConfig, *names: str) -> None:
    for name in names:
        if not getattr(config, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(config, name)!r}")


def _parse(name: str, raw: str, hint: Any) -> Any:
    """Convert one environment string to the field's type; never silently fall back."""
    optional = get_origin(hint) in (Union, types.UnionType) and type(None) in get_args(hint)
    if optional:
        if raw.strip().lower() in ("", "none", "null", "auto"):
            return None
        hint = next(a for a in get_args(hint) if a is not type(None))
    try:
        if hint is bool:
            return _parse_bool(raw)
        if hint in (int, float):
            return hint(raw.strip())
        return raw
    except ValueError:
        variable = ENV_PREFIX + name.upper()
        raise ValueError(f"{variable}={raw!r} is not a valid {hint.__name__}") from None


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)

"""What an engine reports: one ``RequestOutput`` per request that changed in a step, ``EngineStats``
after it, and ``EngineInfo`` once loaded.

Kept free of torch: an engine process sends these to its daemon, which unpickles them without
ever loading torch or the model's libraries.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request (the daemon turns it into stream events)."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_draft_proposed: int
    num_draft_accepted: int
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    # set when the request ended as invalid after it was taken (its grammar did not compile):
    # the message of its ``invalid_request`` error
    error: str | None = None


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions: int
    num_steps: int
    num_draft_proposed: int
    num_draft_accepted: int
    peak_kv_blocks_used: int
    kv_slots_allocated: int  # summed over steps: slots held by live blocks
    kv_slots_used: int  # summed over steps: slots holding a token
    # prefix cache, running totals in tokens (vLLM's queries and hits); 0 when it is off
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    kv_blocks_cached: int = 0  # blocks holding reusable content, held or evictable


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What the daemon logs and advertises about its engine, wherever the engine runs."""

    device: str
    kv_blocks: int
    kv_block_size: int
    kv_bytes: int
    linear_form: str | None  # CPU: "onednn" or "blas" (cpu_linear.py); None on other devices
    weight_bytes: int = 0  # the weights in memory, target and draft model
    quantization: str = "none"  # engine/quantized_linear.py

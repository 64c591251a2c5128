"""``EngineConfig``: what it takes to build one engine. Torch-free, so a daemon can build one and
hand it to an engine process without loading the model's libraries itself."""

from __future__ import annotations

from dataclasses import dataclass

# How linear layers run on CPU (engine/cpu_linear.py): measured at load, oneDNN on packed
# weights, or F.linear (the BLAS torch was built with)
CPU_LINEAR_CHOICES = ("auto", "onednn", "blas")
# Weight-only quantization of the linear layers (engine/quantized_linear.py); auto keeps what
# the checkpoint has: a GGUF file's Q4_0/Q4_1 blocks (engine/gguf_blocks.py), else none
QUANTIZATION_CHOICES = ("none", "int8", "int4", "auto")
# A draft model's: "target" = whatever the target is asked for, resolved on the draft's own file
DRAFT_QUANTIZATION_CHOICES = ("target", *QUANTIZATION_CHOICES)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str  # hub id, folder, or .gguf file (dequantized once into model_cache_dir)
    draft: str = "none"  # none | ngram | hub id, folder or .gguf file of a draft model
    device: str = "auto"
    dtype: str = "auto"
    kv_cache_memory: float | None = None  # None: auto; <= 1: fraction of free memory; > 1: bytes
    num_kv_blocks: int | None = None  # overrides kv_cache_memory (tests force tiny pools)
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    num_speculative_tokens: int = 4  # most draft tokens per sequence and step
    adaptive_speculation: bool = True
    # reuse the KV of full prompt blocks seen before (kvpool/prefix_cache.py); exact either way
    enable_prefix_caching: bool = True
    seed: int = 0
    cpu_linear: str = "auto"  # one of CPU_LINEAR_CHOICES
    quantization: str = "none"  # one of QUANTIZATION_CHOICES
    draft_quantization: str = "target"  # one of DRAFT_QUANTIZATION_CHOICES
    # CPU threads of torch's kernels (process-wide); None = torch's default. Fewer than the
    # cores leaves a core to the daemon's event loop and Redis.
    torch_threads: int | None = None
    # Where .gguf models are dequantized to, one folder per file content hash; None: the default
    # of engine/model_files.py (~/.cache/helix/models)
    model_cache_dir: str | None = None

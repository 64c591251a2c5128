"""What every Helix benchmark shares: the model, the workload, and the latency bookkeeping.

The model is a random-weight Llama built from a config with a fixed seed, saved with
``save_pretrained`` and reloaded with ``from_pretrained`` (no hub is reachable), so every method of
a run loads byte-identical weights through the same path as a real checkpoint.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

BLOCK_SIZE = 16  # Helix's KV block size; contiguous caches are converted to 16-token units


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_positions: int = 2048  # the model context a contiguous cache reserves per request
    num_kv_heads: int | None = None  # grouped-query attention; None: as many as query heads

    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        """K and V of every layer for one position."""
        head_dim = self.hidden_size // self.num_heads
        kv_heads = self.num_kv_heads or self.num_heads
        return 2 * self.num_layers * kv_heads * head_dim * dtype_bytes


# ~134M parameters: the benchmark model
FULL_MODEL = ModelSpec("llama-134m", 768, 12, 12, 2048, 32000)
QUICK_MODEL = ModelSpec("llama-tiny", 128, 2, 4, 512, 512)


def real_model(model: str, cache_dir: Path) -> tuple[Path, ModelSpec]:
    """A real model's folder (a ``.gguf`` is dequantized once, as the daemon does) and its
    spec; the contiguous reservation is capped at 2,048 tokens, as for the random model (a
    server reserving the full 8k context would only make paging look better)."""
    from transformers import AutoConfig

    from helix_daemon.engine.model_files import resolve_model

    path = Path(resolve_model(model, cache_dir / "models").path)
    c = AutoConfig.from_pretrained(path)
    spec = ModelSpec(Path(model).stem, c.hidden_size, c.num_hidden_layers,
                     c.num_attention_heads, c.intermediate_size, c.vocab_size,
                     min(2048, c.max_position_embeddings), c.num_key_value_heads)
    return path, spec


def llama_config(spec: ModelSpec) -> LlamaConfig:
    # eos_token_id=None: no method may stop early, so all generate the same token counts
    return LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads, intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_positions, bos_token_id=0, eos_token_id=None,
        pad_token_id=0, tie_word_embeddings=False,
    )


def build_model(spec: ModelSpec, cache_dir: Path, seed: int = 0) -> Path:
    """Save the seeded random model and a tokenizer under ``cache_dir`` once; return the folder."""
    path = Path(cache_dir) / f"{spec.name}-seed{seed}"
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(llama_config(spec))
    # HF's default init (std 0.02) makes a deep random model emit one token forever; a wider
    # init gives varied greedy outputs, so "identical outputs" is a real check
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.08)
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    word_level_tokenizer(spec.vocab_size).save_pretrained(path)
    return path


def word_level_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """One word per id (``t0 t1 ...``): the engine needs a tokenizer, the benchmark sends ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces when decoding
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="t0", pad_token="t0",
                                   unk_token="t1")


def load_hf_model(path: Path, attn: str = "sdpa") -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                attn_implementation=attn).eval()


# -- workload ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BenchRequest:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    arrival_s: float  # offset from the start of the run

    @property
    def num_blocks(self) -> int:
        return math.ceil((len(self.prompt_ids) + self.max_tokens) / BLOCK_SIZE)


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    num_requests: int
    prompt_len: tuple[int, int]  # inclusive range
    max_tokens: tuple[int, int]  # inclusive range
    rate: float  # Poisson arrivals, requests per second
    seed: int = 0


FULL_WORKLOAD = WorkloadSpec(48, (16, 512), (16, 256), rate=4.0)
QUICK_WORKLOAD = WorkloadSpec(16, (16, 128), (16, 64), rate=100.0)
# the workload of the HF baselines in shared/anchors/baselines.md: 16 x 128 tokens, short prompts
REFERENCE_WORKLOAD = WorkloadSpec(16, (24, 40), (128, 128), rate=1000.0)


def make_workload(spec: WorkloadSpec, vocab_size: int) -> list[BenchRequest]:
    """Seeded random prompts and budgets; exponential gaps give Poisson arrivals from t=0."""
    rng = random.Random(spec.seed)
    requests, clock = [], 0.0
    for i in range(spec.num_requests):
        prompt = [rng.randrange(1, vocab_size) for _ in range(rng.randint(*spec.prompt_len))]
        requests.append(BenchRequest(f"req{i:03d}", prompt, rng.randint(*spec.max_tokens), clock))
        clock += rng.expovariate(spec.rate)
    return requests


def wait_until(deadline: float) -> None:
    delay = deadline - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


# -- latency bookkeeping ----------------------------------------------------------------------


@dataclass(slots=True)
class RequestTrace:
    """When one request arrived and when each of its tokens became visible to the caller."""

    arrival: float  # absolute perf_counter time
    token_times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def add(self, new_tokens: Sequence[int], when: float) -> None:
        self.tokens.extend(new_tokens)
        self.token_times.extend([when] * len(new_tokens))

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival

    def inter_token_gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def latency_summary(traces: Iterable[RequestTrace]) -> dict[str, float]:
    """TTFT and inter-token latency percentiles in milliseconds."""
    traces = list(traces)
    ttfts = [t.ttft for t in traces if t.token_times]
    gaps = [g for t in traces for g in t.inter_token_gaps()]
    return {
        "ttft_p50_ms": 1e3 * percentile(ttfts, 50), "ttft_p99_ms": 1e3 * percentile(ttfts, 99),
        "itl_p50_ms": 1e3 * percentile(gaps, 50), "itl_p99_ms": 1e3 * percentile(gaps, 99),
        "itl_mean_ms": 1e3 * statistics.fmean(gaps) if gaps else math.nan,
    }


# -- paged vs contiguous concurrency ------------------------------------------------------------


def paged_concurrency(requests: Sequence[BenchRequest], budget_blocks: int) -> list[int]:
    """For each start index, how many consecutive requests (cycling) fit in the pool at once.

    A request needs ``ceil((prompt + max_tokens) / 16)`` blocks for its whole life. Cycling
    through the workload keeps the count from being capped by the workload's size.
    """
    counts = []
    for start in range(len(requests)):
        used = fitted = 0
        while True:
            need = requests[(start + fitted) % len(requests)].num_blocks
            if used + need > budget_blocks:
                break
            used += need
            fitted += 1
        counts.append(fitted)
    return counts


def concurrency_report(requests: Sequence[BenchRequest], spec: ModelSpec,
                       num_reservations: int) -> dict[str, float]:
    """Requests held at once in a KV budget of ``num_reservations`` max-length reservations."""
    budget_tokens = num_reservations * spec.max_positions
    counts = paged_concurrency(requests, budget_tokens // BLOCK_SIZE)
    mean_blocks = statistics.fmean(r.num_blocks for r in requests)
    return {
        "budget_bytes_fp32": budget_tokens * spec.kv_bytes_per_token(),
        "budget_tokens": budget_tokens,
        "budget_blocks": budget_tokens // BLOCK_SIZE,
        "contiguous_reservation_tokens": spec.max_positions,
        "contiguous_requests": num_reservations,
        "paged_requests_mean": statistics.fmean(counts),
        "paged_requests_min": min(counts),
        "paged_requests_max": max(counts),
        "mean_blocks_per_request": mean_blocks,
        "ratio_mean": statistics.fmean(counts) / num_reservations,
        "ratio_min": min(counts) / num_reservations,
    }

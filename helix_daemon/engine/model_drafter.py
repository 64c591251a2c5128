"""A small draft model that proposes K tokens per sequence in K batched forwards.

Its KV lives in its own paged tensors addressed by the target's block tables, so one allocator
serves both. ``seq.num_draft_computed`` tracks how far the draft's KV is valid; a sequence that
skipped drafting for a while (K = 0) catches up in its next first draft pass.
"""

from __future__ import annotations

import time

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from helix_daemon.engine.model_runner import ModelRunner
from kvpool.attention import SeqSpan, build_metadata
from kvpool.kv_cache import KVCacheSpec
from scheduler.sampling import sample, shape_probs
from scheduler.scheduler import ScheduledSeq, StepPlan


class DraftModelMismatch(ValueError):
    """The draft model cannot propose tokens for this target (different vocabulary)."""


class ModelDrafter:
    def __init__(self, runner: ModelRunner, target_vocab: int, relative_cost: float) -> None:
        self.runner = runner
        self.kv_spec: KVCacheSpec | None = runner.kv_spec
        self.relative_cost = relative_cost
        self.target_vocab = target_vocab
        self.generators: dict[str, torch.Generator | None] = {}  # set by the engine
        self.default_generator: torch.Generator | None = None
        self._probs: dict[int, torch.Tensor] = {}  # id(item) -> q of its drafts [k, vocab]
        self.pass_timings: list[tuple[int, int, float]] = []

    @classmethod
    def load(cls, name: str, target: ModelRunner,
             tokenizer: PreTrainedTokenizerBase) -> ModelDrafter:
        draft_tokenizer = AutoTokenizer.from_pretrained(name)
        if draft_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise DraftModelMismatch(
                f"draft model {name!r} has a different tokenizer vocabulary from the target; "
                "speculative decoding needs the same tokenizer")
        runner = ModelRunner(name, target.dtype, target.device, target.cpu_linear)
        if runner.vocab_size > target.vocab_size:
            raise DraftModelMismatch(
                f"draft vocabulary ({runner.vocab_size}) is larger than the target's "
                f"({target.vocab_size})")
        # decoding is memory-bound: a draft step costs about its share of the weights
        cost = runner.num_params / target.num_params
        return cls(runner, target.vocab_size, cost)

    def allocate_cache(self, num_blocks: int, block_size: int) -> None:
        self.runner.allocate_cache(num_blocks, block_size)
        self.block_size = block_size

    def propose(self, plan: StepPlan) -> None:
        items = [s for s in plan.scheduled if s.num_draft_slots > 0]
        self._probs = {}
        self.pass_timings = []
        if not items:
            return
        # pass 1 feeds every token the draft has not seen (usually 1-2), passes 2..K one each
        feeds = {id(s): s.seq.token_ids[s.seq.num_draft_computed:] for s in items}
        drafts: dict[int, list[torch.Tensor]] = {id(s): [] for s in items}
        for step in range(max(s.num_draft_slots for s in items)):
            active = [s for s in items if s.num_draft_slots > step]
            started = time.perf_counter()
            probs = self._forward(active, feeds)
            tokens = sample(probs, [self.generators.get(s.seq.request_id) for s in active],
                            self.default_generator)
            num_fed = sum(len(feeds[id(s)]) for s in active)
            self.pass_timings.append((len(active), num_fed, time.perf_counter() - started))
            for i, item in enumerate(active):
                item.draft_token_ids.append(int(tokens[i]))
                drafts[id(item)].append(probs[i])
                item.seq.num_draft_computed += len(feeds[id(item)])
                feeds[id(item)] = [int(tokens[i])]
        self._probs = {key: torch.stack(rows) for key, rows in drafts.items()}

    def _forward(self, items: list[ScheduledSeq], feeds: dict[int, list[int]]) -> torch.Tensor:
        ids, positions, spans, rows = [], [], [], []
        for item in items:
            seq, feed = item.seq, feeds[id(item)]
            start = seq.num_draft_computed
            spans.append(SeqSpan(len(ids), len(feed), start + len(feed),
                                 seq.block_table.block_ids))  # type: ignore[union-attr]
            ids += feed
            positions += range(start, start + len(feed))
            rows.append(len(ids) - 1)
        device = self.runner.device
        meta = build_metadata(spans, self.block_size, device)
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        logits = self.runner.forward(as_tensor(ids), as_tensor(positions), meta, as_tensor(rows))
        if logits.shape[-1] < self.target_vocab:
            logits = torch.nn.functional.pad(logits, (0, self.target_vocab - logits.shape[-1]),
                                             value=float("-inf"))
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        return shape_probs(logits.to(dtype), [s.seq.params.sampling for s in items])

    def draft_probs(self, items: list[ScheduledSeq], max_k: int, vocab: int,
                    dtype: torch.dtype) -> torch.Tensor | None:
        q = torch.zeros(len(items), max_k, vocab, dtype=dtype, device=self.runner.device)
        for i, item in enumerate(items):
            probs = self._probs.get(id(item))
            if probs is not None:
                q[i, : probs.shape[0]] = probs.to(dtype)
        return q

"""A small draft model that proposes K tokens per sequence in K batched forwards.

Its KV lives in its own paged tensors addressed by the target's block tables, so one allocator
serves both. ``seq.num_draft_computed`` tracks how far the draft's KV is valid; a sequence that
skipped drafting for a while (K = 0) catches up in its next first draft pass.
"""

from __future__ import annotations

import time

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from helix_daemon.engine.drafting import DraftPass, Drafts
from helix_daemon.engine.generators import RequestGenerators
from helix_daemon.engine.model_files import ResolvedModel
from helix_daemon.engine.model_runner import ModelRunner
from kvpool.attention import SeqSpan, build_metadata
from kvpool.kv_cache import KVCacheSpec
from scheduler.grammar import mask_rows
from scheduler.sampling import sample, shape_probs
from scheduler.scheduler import ScheduledSeq, StepPlan


class DraftModelMismatch(ValueError):
    """The draft model cannot propose tokens for this target (different vocabulary)."""


class ModelDrafter:
    def __init__(self, runner: ModelRunner, target_vocab: int, relative_cost: float,
                 generators: RequestGenerators) -> None:
        self.runner = runner
        self.kv_spec: KVCacheSpec | None = runner.kv_spec
        self.relative_cost = relative_cost
        self.target_vocab = target_vocab
        self.generators = generators  # draft sampling draws from the requests' own streams
        self.block_size = 0  # set with the cache

    @classmethod
    def load(cls, model: ResolvedModel, quantization: str, target: ModelRunner,
             tokenizer: PreTrainedTokenizerBase, generators: RequestGenerators) -> ModelDrafter:
        """The draft model at ``model``, quantized as ``quantization`` (served_quantization's
        answer for this file; independent of the target's), in the target's dtype and device."""
        name = model.path
        draft_tokenizer = AutoTokenizer.from_pretrained(name)
        if draft_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise DraftModelMismatch(
                f"draft model {name!r} has a different tokenizer vocabulary from the target; "
                "speculative decoding needs the same tokenizer")
        runner = ModelRunner(name, target.dtype, target.device, target.cpu_linear,
                             quantization, model.gguf)
        if runner.vocab_size > target.vocab_size:
            raise DraftModelMismatch(
                f"draft vocabulary ({runner.vocab_size}) is larger than the target's "
                f"({target.vocab_size})")
        # decoding is memory-bound: a draft step costs about its share of the weights
        cost = runner.num_params / target.num_params
        return cls(runner, target.vocab_size, cost, generators)

    def allocate_cache(self, num_blocks: int, block_size: int) -> None:
        self.runner.allocate_cache(num_blocks, block_size)
        self.block_size = block_size

    def propose(self, plan: StepPlan) -> Drafts:
        drafting = [_Drafting(s) for s in plan.scheduled if s.num_draft_slots > 0]
        drafts = Drafts(probs={})
        for step in range(max((d.item.num_draft_slots for d in drafting), default=0)):
            active = [d for d in drafting if d.item.num_draft_slots > step]
            started = time.perf_counter()
            probs = self._forward(active)
            tokens = sample(probs, [self.generators.get(d.request_id) for d in active],
                            self.generators.default)
            num_fed = sum(len(d.feed) for d in active)
            drafts.passes.append(DraftPass(len(active), num_fed, time.perf_counter() - started))
            for d, token, q in zip(active, tokens.tolist(), probs):
                d.take(token, q)
        drafts.probs = {d.request_id: torch.stack(d.probs) for d in drafting}
        return drafts

    def _forward(self, active: list[_Drafting]) -> torch.Tensor:
        """q of each sequence's next token, once the draft has been fed its ``feed``."""
        ids: list[int] = []
        positions: list[int] = []
        spans: list[SeqSpan] = []
        rows: list[int] = []
        for d in active:
            seq, feed = d.item.seq, d.feed
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
        # a constrained sequence drafts from its grammar's mask after the drafts so far, so q is
        # the masked distribution rejection sampling needs
        logits = mask_rows([d.item for d in active], logits, with_drafts=False)
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        return shape_probs(logits.to(dtype), [d.item.seq.params.sampling for d in active])


class _Drafting:
    """One sequence's drafting within one ``propose``: what to feed next and q so far."""

    def __init__(self, item: ScheduledSeq) -> None:
        self.item = item
        self.request_id = item.seq.request_id
        # pass 1 feeds every token the draft has not seen (usually 1-2), passes 2..K one each
        self.feed = item.seq.token_ids[item.seq.num_draft_computed:]
        self.probs: list[torch.Tensor] = []  # q of each draft [vocab]

    def take(self, token: int, q: torch.Tensor) -> None:
        """The draft sampled ``token`` from ``q``: propose it and feed it to the next pass."""
        self.item.draft_token_ids.append(token)
        self.probs.append(q)
        self.item.seq.num_draft_computed += len(self.feed)
        self.feed = [token]

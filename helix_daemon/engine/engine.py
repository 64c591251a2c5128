"""The synchronous engine: one call to ``step()`` is one scheduling iteration over every sequence.

schedule -> draft -> one packed target forward -> accept (rejection sampling) -> postprocess.
It runs in one thread; the daemon feeds it requests and drains its outputs between steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import cast

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from helix_daemon.engine.chat import ChatPrompt, render_chat
from helix_daemon.engine.config import EngineConfig
from helix_daemon.engine.device import kv_budget_bytes, resolve_device, resolve_dtype
from helix_daemon.engine.drafting import Drafter, Drafts, NgramDrafter
from helix_daemon.engine.generators import RequestGenerators
from helix_daemon.engine.grammar import GrammarCompiler
from helix_daemon.engine.grammar_waits import GrammarWaits, Waiting
from helix_daemon.engine.model_drafter import ModelDrafter
from helix_daemon.engine.model_files import ResolvedModel, resolve_model
from helix_daemon.engine.model_runner import ModelRunner
from helix_daemon.engine.outputs import EngineInfo, EngineStats, RequestOutput
from helix_daemon.engine.quantized_linear import served_quantization, serving_dtype
from kvpool.allocator import BlockAllocator
from kvpool.attention import SeqSpan, build_metadata
from kvpool.kv_cache import num_blocks_for_budget
from kvpool.prefix_cache import PrefixCache
from scheduler.detokenizer import Decoder, DetokenizedText
from scheduler.errors import InvalidRequestError
from scheduler.grammar import mask_rows, trim_drafts
from scheduler.params import RequestParams
from scheduler.rejection import accept_greedy, rejection_sample
from scheduler.sampling import sample, shape_probs
from scheduler.scheduler import ScheduledSeq, Scheduler, SchedulerConfig, SeqUpdate, StepPlan
from scheduler.speculation import AdaptiveDraftPolicy

log = logging.getLogger(__name__)
_GRAMMAR_WAIT_S = 0.05  # an engine with only compiling grammars to wait for sleeps this long


@dataclass(slots=True)
class _Batch:
    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    spans: list[SeqSpan] = field(default_factory=list)
    logit_rows: list[int] = field(default_factory=list)


class StepTimer:
    """The two spans adaptive K learns from: the whole step, and its verify pass (everything
    after the draft passes: the target forward, accept, rollback and outputs, which all grow
    with the drafts)."""

    def __init__(self) -> None:
        self._started = self._verify_started = time.perf_counter()

    def verify_starts(self) -> None:
        self._verify_started = time.perf_counter()

    def stop(self) -> tuple[float, float]:
        """Seconds of the verify pass and of the whole step, until now."""
        now = time.perf_counter()
        return now - self._verify_started, now - self._started


class Engine:
    def __init__(self, config: EngineConfig, target: ModelRunner,
                 tokenizer: PreTrainedTokenizerBase, generators: RequestGenerators,
                 drafter: Drafter | None = None) -> None:
        self.config = config
        self.target = target
        self.tokenizer = tokenizer
        # an HF tokenizer's decode of a list of ids is a str, as the detokenizer needs
        self._decoder = cast(Decoder, tokenizer)
        self.drafter = drafter
        self.device = target.device
        num_blocks = config.num_kv_blocks or self._blocks_for_budget()
        self.allocator = BlockAllocator(
            num_blocks, PrefixCache() if config.enable_prefix_caching else None)
        target.allocate_cache(num_blocks, config.block_size)
        if drafter is not None:
            drafter.allocate_cache(num_blocks, config.block_size)
        self._policy = AdaptiveDraftPolicy(
            adaptive=config.adaptive_speculation, draft_cost=drafter.relative_cost,
        ) if drafter is not None else None
        eos_ids = _eos_ids(target, tokenizer)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                block_size=config.block_size,
                max_context=target.max_context,
                num_speculative_tokens=config.num_speculative_tokens if drafter else 0,
            ),
            self.allocator,
            eos_token_ids=eos_ids,
            draft_policy=self._policy,
        )
        self._generators = generators  # each request's random stream; a draft model's too
        self._grammars = GrammarCompiler(tokenizer, target.vocab_size, eos_ids)
        self._grammar_waits = GrammarWaits()  # constrained requests until their grammar is ready
        self._ended_early: list[RequestOutput] = []  # waiting requests aborted or refused
        self._num_steps = 0
        self._num_proposed = 0
        self._num_accepted = 0
        self._peak_blocks = 0
        self._slots_allocated = 0
        self._slots_used = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> Engine:
        if config.torch_threads is not None:
            torch.set_num_threads(config.torch_threads)
        # A .gguf file becomes a cached float32 folder first; names, folders, "ngram" pass through.
        model = resolve_model(config.model, config.model_cache_dir)
        draft = resolve_model(config.draft, config.model_cache_dir)
        device = resolve_device(config.device)
        quantization = served_quantization(config.quantization, model.gguf, device)
        quantized_dtype = serving_dtype(quantization, device)  # the target's decides
        dtype = quantized_dtype if config.dtype == "auto" and quantized_dtype \
            else resolve_dtype(config.dtype, device)
        target = ModelRunner(model.path, dtype, device, config.cpu_linear, quantization,
                             model.gguf)
        log.info("weights: %.1f MB in memory (%s, quantization %s)",
                 target.weight_bytes / 1e6, dtype, quantization)
        tokenizer = AutoTokenizer.from_pretrained(model.path)
        generators = RequestGenerators(device, config.seed)
        draft_quantization = config.quantization if config.draft_quantization == "target" \
            else config.draft_quantization  # resolved on the draft's own file
        drafter = _make_drafter(draft, draft_quantization, target, tokenizer, generators)
        return cls(config, target, tokenizer, generators, drafter)

    def info(self) -> EngineInfo:
        return EngineInfo(device=str(self.device), kv_blocks=self.allocator.num_blocks,
                          kv_block_size=self.config.block_size, kv_bytes=self.kv_cache_bytes,
                          linear_form=self.target.linear_form,
                          weight_bytes=self.weight_bytes, quantization=self.target.quantization)

    def _blocks_for_budget(self) -> int:
        specs = [self.target.kv_spec] + ([self.drafter.kv_spec] if self.drafter
                                         and self.drafter.kv_spec else [])
        budget = kv_budget_bytes(self.config.kv_cache_memory, self.device)
        return max(1, num_blocks_for_budget(specs, budget, self.config.block_size))

    # -- requests ------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | Seq[int] | ChatPrompt,
                    params: RequestParams, forced_output_ids: Seq[int] = ()) -> None:
        """Queue a request; raises ``InvalidRequestError`` (the engine keeps serving others)."""
        prompt_ids = self._prompt_ids(prompt)
        vocab = self.target.vocab_size
        if any(not 0 <= t < vocab for t in (*prompt_ids, *forced_output_ids)):
            raise InvalidRequestError(f"token ids must be in [0, {vocab})")
        if request_id in self._grammar_waits:
            raise InvalidRequestError(f"request id {request_id!r} is already in the engine")
        self.scheduler.validate(request_id, prompt_ids, params)
        text = DetokenizedText(self._decoder, prompt_ids, params.stop)
        # replay what an earlier attempt streamed so held-back text (a partial character or a
        # possible stop-string prefix) is in the same state as in an uninterrupted run
        for token_id in forced_output_ids:
            text.push(token_id)
        self._generators.add(request_id, params.sampling.seed)
        if params.constraint is not None:  # joins the scheduler once its grammar is compiled
            self._grammar_waits.add(Waiting(request_id, prompt_ids, params, list(forced_output_ids),
                                            text, self._grammars.compile(params.constraint)))
            return
        self.scheduler.add(request_id, prompt_ids, params, forced_output_ids, text)

    def _prompt_ids(self, prompt: str | Seq[int] | ChatPrompt) -> list[int]:
        if isinstance(prompt, ChatPrompt):
            return render_chat(self.tokenizer, prompt)
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            # as vLLM's completions and HF's own tokenizer call: the special tokens the tokenizer
            # adds by itself (a BOS for Llama-style tokenizers, nothing for GPT-2-style ones)
            return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        return [int(t) for t in prompt]

    def abort(self, request_id: str) -> bool:
        waiting = self._grammar_waits.remove(request_id)
        if waiting is not None:
            self._end_early(waiting, "abort")
            return True
        return self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._grammar_waits or self._ended_early)

    def _admit_compiled(self) -> list[RequestOutput]:
        """Requests whose grammar is ready join the scheduler with their own matcher; those whose
        grammar failed end (``invalid_request``). Outputs of requests that ended here."""
        if self._grammar_waits and not self.scheduler.has_unfinished():
            self._grammar_waits.wait(_GRAMMAR_WAIT_S)
        for w in self._grammar_waits.take_ready():
            try:
                matcher = self._grammars.matcher(w.grammar.result(), w.forced_output_ids)
                self.scheduler.add(w.request_id, w.prompt_ids, w.params, w.forced_output_ids,
                                   w.text, constraint=matcher)
            except InvalidRequestError as e:
                self._end_early(w, None, error=str(e))
        ended, self._ended_early = self._ended_early, []
        return ended

    def _end_early(self, waiting: Waiting, reason: str | None, error: str | None = None) -> None:
        self._generators.drop(waiting.request_id)
        self._ended_early.append(RequestOutput(
            request_id=waiting.request_id, new_token_ids=[], text_delta="", finished=True,
            finish_reason=reason, num_prompt_tokens=len(waiting.prompt_ids),
            num_output_tokens=len(waiting.forced_output_ids), num_draft_proposed=0,
            num_draft_accepted=0, error=error))

    # -- one step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """schedule -> draft -> run the target and accept -> postprocess; then adaptive K
        learns from what the step cost and realised."""
        outputs = self._admit_compiled()
        timer = StepTimer()
        plan = self.scheduler.schedule()
        catch_up = _drafts_a_new_prompt(plan)  # asked before drafting moves the draft's KV on
        drafts = self._draft(plan)
        timer.verify_starts()
        sampled = self._run(plan, drafts)
        self._account_kv()
        updates = self.scheduler.postprocess(plan, sampled)
        outputs += [self._output(u) for u in updates]
        self._teach_policy(plan, sampled, timer, catch_up)
        return outputs

    def _draft(self, plan: StepPlan) -> Drafts:
        """Fill the plan's draft slots; the policy learns what each draft pass cost."""
        if self.drafter is None or not plan.scheduled:
            return Drafts()
        drafts = self.drafter.propose(plan)
        trim_drafts(plan.scheduled)  # drafts a constrained sequence's grammar refuses cannot win
        if self._policy is not None:
            for draft_pass in drafts.passes:
                self._policy.observe_draft_pass(*draft_pass)
        return drafts

    def _run(self, plan: StepPlan, drafts: Drafts) -> list[list[int]]:
        """One packed target forward and acceptance: the tokens each sequence gains."""
        if not plan.scheduled:
            return []
        batch = _pack(plan, self.config.block_size)
        meta = build_metadata(batch.spans, self.config.block_size, self.device)
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        logits = self.target.forward(as_tensor(batch.input_ids), as_tensor(batch.positions), meta,
                                     as_tensor(batch.logit_rows))
        self._num_steps += 1
        return self._accept(plan, logits, drafts)

    def _teach_policy(self, plan: StepPlan, sampled: list[list[int]], timer: StepTimer,
                      catch_up: bool) -> None:
        """What the step cost for its shape, and what the policy's decision realised."""
        if self._policy is None:
            return
        if not plan.scheduled:  # every decoding sequence was preempted: nothing ran to time
            if plan.draft_decision is not None:  # but the kept-plain evidence still fades
                self._policy.observe_outcome(plan.draft_decision, False, 0, 0.0)
            return
        verify_seconds, step_seconds = timer.stop()
        prefill = any(s.num_query_tokens > 1 for s in plan.scheduled)
        num_fed = sum(s.num_query_tokens + len(s.draft_token_ids) for s in plan.scheduled)
        self._policy.observe_target(len(plan.scheduled), num_fed, verify_seconds, prefill)
        if plan.draft_decision is not None:
            drafted = any(s.num_draft_slots for s in plan.scheduled)
            self._policy.observe_outcome(plan.draft_decision, drafted,
                                         sum(len(ids) for ids in sampled), step_seconds,
                                         catch_up=catch_up)

    def _accept(self, plan: StepPlan, logits: torch.Tensor,
                drafts: Drafts) -> list[list[int]]:
        """Sample each sequence's next token(s); with drafts, rejection sampling keeps p exact."""
        sampling = [s for s in plan.scheduled if s.samples]
        logits = mask_rows(sampling, logits, with_drafts=True)  # constrained rows only
        if all(s.seq.params.sampling.is_greedy for s in sampling):
            chosen = iter(self._accept_greedy(sampling, logits))
            return [next(chosen) if s.samples else [] for s in plan.scheduled]
        params = [s.seq.params.sampling
                  for s in sampling for _ in range(len(s.draft_token_ids) + 1)]
        probs = shape_probs(logits, params)
        generators = [self._generators[s.seq.request_id] for s in sampling]
        if not any(s.draft_token_ids for s in sampling):
            tokens = sample(probs, generators, self._generators.default).tolist()
            chosen = iter([[t] for t in tokens])
        else:
            chosen = iter(self._accept_drafts(sampling, probs, generators, drafts))
        return [next(chosen) if s.samples else [] for s in plan.scheduled]

    def _accept_greedy(self, sampling: list[ScheduledSeq],
                       logits: torch.Tensor) -> list[list[int]]:
        """All-greedy steps: the argmax rule, exactly what rejection sampling does for them."""
        argmax = logits.argmax(dim=-1).tolist()  # ties: the lowest index, as in shape_probs
        drafts = [item.draft_token_ids for item in sampling]
        chosen = accept_greedy(argmax, drafts)
        self._num_proposed += sum(len(d) for d in drafts)
        self._num_accepted += sum(len(c) - 1 for c in chosen)
        return chosen

    def _accept_drafts(self, sampling: list[ScheduledSeq], probs: torch.Tensor,
                       generators: list[torch.Generator | None],
                       drafts: Drafts) -> list[list[int]]:
        max_k = max(len(s.draft_token_ids) for s in sampling)
        vocab = probs.shape[-1]
        target = probs.new_zeros(len(sampling), max_k + 1, vocab)
        draft_ids = torch.zeros(len(sampling), max_k, dtype=torch.long)
        num_drafts = torch.tensor([len(s.draft_token_ids) for s in sampling])
        draft_probs = drafts.stacked_probs(sampling, max_k, vocab, probs.dtype, probs.device)
        row = 0
        for i, item in enumerate(sampling):
            k = len(item.draft_token_ids)
            target[i, : k + 1] = probs[row: row + k + 1]
            draft_ids[i, :k] = torch.tensor(item.draft_token_ids, dtype=torch.long)
            row += k + 1
        tokens, accepted = rejection_sample(target, draft_probs, draft_ids.to(probs.device),
                                            num_drafts.to(probs.device), generators,
                                            self._generators.default)
        self._num_proposed += int(num_drafts.sum())
        self._num_accepted += int(accepted.sum())
        return [tokens[i, : int(accepted[i]) + 1].tolist() for i in range(len(sampling))]

    def _output(self, update: SeqUpdate) -> RequestOutput:
        seq = update.seq
        if update.finished:
            self._generators.drop(seq.request_id)
        return RequestOutput(
            request_id=seq.request_id, new_token_ids=update.new_token_ids,
            text_delta=update.text_delta, finished=update.finished,
            finish_reason=update.finish_reason, num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_draft_proposed=seq.num_draft_proposed, num_draft_accepted=seq.num_draft_accepted,
            num_cached_tokens=seq.num_cached_tokens or 0,
        )

    # -- introspection -------------------------------------------------------------------------

    def _account_kv(self) -> None:
        used_blocks = self.allocator.num_used
        self._peak_blocks = max(self._peak_blocks, used_blocks)
        self._slots_allocated += used_blocks * self.config.block_size
        self._slots_used += sum(s.num_tokens for s in self.scheduler.running)

    def stats(self) -> EngineStats:
        s = self.scheduler
        cache = self.allocator.prefix_cache
        return EngineStats(
            num_running=len(s.running), num_waiting=len(s.waiting) + len(self._grammar_waits),
            kv_blocks_used=self.allocator.num_used, kv_blocks_total=self.allocator.num_blocks,
            num_preemptions=s.num_preemptions, num_steps=self._num_steps,
            num_draft_proposed=self._num_proposed, num_draft_accepted=self._num_accepted,
            peak_kv_blocks_used=self._peak_blocks, kv_slots_allocated=self._slots_allocated,
            kv_slots_used=self._slots_used,
            prefix_cache_queries=s.prefix.num_queried_tokens if s.prefix else 0,
            prefix_cache_hits=s.prefix.num_hit_tokens if s.prefix else 0,
            kv_blocks_cached=cache.num_cached if cache is not None else 0,
        )

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights in memory: the target's plus the draft model's, if any."""
        runners = [self.target, getattr(self.drafter, "runner", None)]
        return sum(r.weight_bytes for r in runners if isinstance(r, ModelRunner))

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes held by the KV pool: the target's tensors plus the draft model's, if any."""
        caches = [self.target.cache]
        if self.drafter is not None:
            caches.append(getattr(getattr(self.drafter, "runner", None), "cache", None))
        return sum(c.num_bytes for c in caches if c is not None)

    def check_integrity(self) -> None:
        self.allocator.check_integrity(self.scheduler.block_tables())


def _drafts_a_new_prompt(plan: StepPlan) -> bool:
    """Will a draft model first prefill a new prompt this step? (A one-off cost, not drafting's
    running rate; catching up on tokens skipped during plain steps is, and is charged to it.)"""
    return any(s.num_draft_slots and s.seq.num_draft_computed == 0 for s in plan.scheduled)


def _pack(plan: StepPlan, block_size: int) -> _Batch:
    """Lay every scheduled token of every sequence out as one packed row batch."""
    batch = _Batch()
    for item in plan.scheduled:
        seq = item.seq
        start = seq.num_computed
        tokens = seq.token_ids[start: start + item.num_query_tokens] + item.draft_token_ids
        first_row = len(batch.input_ids)
        batch.input_ids += tokens
        batch.positions += range(start, start + len(tokens))
        assert seq.block_table is not None
        batch.spans.append(SeqSpan(first_row, len(tokens), start + len(tokens),
                                   seq.block_table.block_ids))
        if item.samples:  # logits of the last real token and of every draft token
            last_query = first_row + item.num_query_tokens - 1
            batch.logit_rows += range(last_query, last_query + len(item.draft_token_ids) + 1)
    return batch


def _make_drafter(draft: ResolvedModel, quantization: str, target: ModelRunner,
                  tokenizer: PreTrainedTokenizerBase,
                  generators: RequestGenerators) -> Drafter | None:
    """The drafter ``EngineConfig.draft`` names: none, n-grams or a draft model's path (with
    ``--quantization``'s value for it, resolved on its own file)."""
    if draft.path in ("none", ""):
        return None
    if draft.path == "ngram":
        return NgramDrafter()
    served = served_quantization(quantization, draft.gguf, target.device)
    return ModelDrafter.load(draft, served, target, tokenizer, generators)


def _eos_ids(target: ModelRunner, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    eos = getattr(target.model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list) else {eos}

"""The paged forward pass equals the model's own dense forward (float64, tight tolerance)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from helix_daemon.engine.model_runner import ModelRunner
from kvpool.allocator import BlockAllocator
from kvpool.attention import SeqSpan, build_metadata
from kvpool.block_table import BlockTable
from tests.tiny import tiny_model

CPU = torch.device("cpu")


def _packed_step(runner: ModelRunner, tables: list[BlockTable], seqs: list[torch.Tensor],
                 chunks: dict[int, tuple[int, int]]) -> torch.Tensor:
    """Run the token ranges ``chunks[i] = (start, end)`` of several sequences as one batch."""
    ids, positions, spans, rows = [], [], [], []
    row = 0
    for i, (start, end) in chunks.items():
        tables[i].append(end - start)
        ids.append(seqs[i][start:end])
        positions.append(torch.arange(start, end))
        spans.append(SeqSpan(row, end - start, end, list(tables[i].block_ids)))
        rows.append(torch.arange(row, row + end - start))
        row += end - start
    meta = build_metadata(spans, 16, CPU)
    return runner.forward(torch.cat(ids), torch.cat(positions), meta, torch.cat(rows))


@pytest.mark.parametrize("arch,config", [
    ("llama", {"num_heads": 4, "num_kv_heads": 2}),  # GQA
    ("gpt2", {}),
])
def test_paged_forward_matches_dense(arch: str, config: dict[str, int]) -> None:
    """Prefill chunks and decode tokens packed together give the dense model's logits."""
    path = tiny_model(arch, **config)
    runner = ModelRunner(path, torch.float64, CPU)
    runner.allocate_cache(num_blocks=64, block_size=16)
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64,
                                                 attn_implementation="sdpa").eval()
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 512, (n,), generator=gen) for n in (40, 7, 100, 3, 33)]
    alloc = BlockAllocator(64)
    tables = [BlockTable(alloc, 16) for _ in seqs]
    _packed_step(runner, tables, seqs, {0: (0, 30), 1: (0, 5), 2: (0, 60), 3: (0, 1), 4: (0, 33)})
    # second step mixes a decode token, short continuations and a long prefill chunk
    second = {0: (30, 31), 1: (5, 7), 2: (60, 100), 3: (1, 3)}
    logits = _packed_step(runner, tables, seqs, second)
    row = 0
    for i, (start, end) in second.items():
        with torch.no_grad():
            expected = dense(seqs[i][None, :end]).logits[0, start:end]
        torch.testing.assert_close(logits[row: row + end - start], expected,
                                   rtol=1e-10, atol=1e-10)
        row += end - start

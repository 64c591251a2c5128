"""On CPU, run linear layers through oneDNN on pre-packed weights, where that is measured faster.

``F.linear`` on CPU hands ``x · Wᵀ`` to the BLAS torch was built with (MKL). With few rows (a
decode step, or a step verifying a few draft tokens) that can take slow paths: on an AMD EPYC
host, a 1-row product read the weights at 10 GB/s and 2-5 rows cost 1.5-2.3x one row. oneDNN's
matmul on weights reordered once into its blocked layout (what torch.compile's CPU backend does
when it freezes a model) streamed them 2-4x faster there, nearly flat from 1 to 8 rows, and was
20-25 % faster at 128-1024 rows. Which is faster depends on the CPU and the build, so it is
measured when a model loads, on the model's own weights: enough of them that they stream from
memory, as in a real forward pass. oneDNN takes float32 and bfloat16; its sums equal
``F.linear``'s up to rounding order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from helix_daemon.engine.config import CPU_LINEAR_CHOICES

ROWS_MEASURED = (1, 2, 3, 4, 6, 8, 16, 32, 128)  # decode, verify, batched decode, prefill
SAMPLE_BYTES = 64 * 2**20  # more weight than a CPU cache holds, so timings include the reads
TIMED_PASSES = 2  # per form and row count; the faster pass counts (the machine is shared)
MIN_PASS_S = 0.002  # a timed pass repeats the sample until it lasts about this long
WORST_RATIO = 1.25  # oneDNN must be no more than this much slower at any row count
PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def onednn_available(dtype: torch.dtype) -> bool:
    return (dtype in PACKABLE_DTYPES and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


# torch.compile's own (private) ops for frozen CPU linears; onednn_available checks for them.
def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` reordered into oneDNN's layout (an opaque tensor only ``PackedLinear`` reads)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def packed_linear(x: torch.Tensor, packed: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(torch.nn.Module):
    """A ``torch.nn.Linear`` whose weight lives only in oneDNN's packed layout."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.packed = pack(linear.weight)  # not a parameter: nothing trains or saves it
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.bias)


def choose_linears(model: torch.nn.Module, choice: str = "auto") -> str:
    """Pack ``model``'s linear layers for oneDNN when ``choice`` (or a measurement) says so.

    Returns the form in use: ``onednn`` or ``blas``. Call it on a CPU model after loading; the
    dense weights of packed layers are dropped (a weight tied to an embedding stays there).
    """
    if choice not in CPU_LINEAR_CHOICES:
        raise ValueError(f"cpu linear must be one of {CPU_LINEAR_CHOICES}, got {choice!r}")
    linears = list(_distinct_linears(model))
    if choice == "blas" or not linears or not onednn_available(linears[0].weight.dtype):
        return "blas"
    try:
        if choice == "auto" and not onednn_faster(linears):
            return "blas"
        packed = {name: PackedLinear(module) for name, module in model.named_modules()
                  if type(module) is torch.nn.Linear}
    except RuntimeError:  # private torch ops: a build whose oneDNN refuses falls back
        if choice == "onednn":
            raise
        return "blas"
    for name, module in packed.items():
        model.set_submodule(name, module)
    return "onednn"


def onednn_faster(linears: list[torch.nn.Linear]) -> bool:
    """Time both forms over a sample of ``linears`` at each of ``ROWS_MEASURED``.

    oneDNN wins when the geometric mean of its time ratios is below 1 (each row count counts
    the same, so the large, compute-bound ones do not drown the small decode-sized ones) and it
    is nowhere more than ``WORST_RATIO`` slower: on a tiny model its fixed cost per call made
    1-row products 2.6x slower while larger ones won, which the mean alone would accept.
    """
    sample, total = [], 0
    for linear in linears:
        if total >= SAMPLE_BYTES:
            break
        sample.append(linear)
        total += linear.weight.numel() * linear.weight.element_size()
    packed = {id(linear): pack(linear.weight) for linear in sample}
    with torch.inference_mode():
        ratios = [_time_ratio(sample, packed, rows) for rows in ROWS_MEASURED]
    geomean = math.exp(sum(map(math.log, ratios)) / len(ratios))
    return geomean < 1.0 and max(ratios) < WORST_RATIO


def _time_ratio(sample: list[torch.nn.Linear], packed: dict[int, torch.Tensor],
                rows: int) -> float:
    """oneDNN's time over ``F.linear``'s for one pass of ``rows`` rows through the sample."""
    dtype = sample[0].weight.dtype
    inputs = {n: torch.randn(rows, n, dtype=dtype) for n in {s.in_features for s in sample}}

    def blas() -> None:
        for linear in sample:
            F.linear(inputs[linear.in_features], linear.weight, linear.bias)

    def onednn() -> None:
        for linear in sample:
            packed_linear(inputs[linear.in_features], packed[id(linear)], linear.bias)

    best = {blas: math.inf, onednn: math.inf}
    for form in best:
        form()  # warm-up: first touches, allocator, oneDNN's kernel generation
    # a tiny model's pass takes microseconds: repeat it so that timer noise does not decide
    repeats = max(1, min(100, int(MIN_PASS_S / max(_seconds(blas, 1), 1e-7)) + 1))
    for i in range(TIMED_PASSES):
        # alternate the order so that a drift in the machine's speed favours neither form
        for form in (blas, onednn) if i % 2 == 0 else (onednn, blas):
            best[form] = min(best[form], _seconds(form, repeats))
    return best[onednn] / best[blas]


def _seconds(run: Callable[[], None], repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    return time.perf_counter() - started


def _distinct_linears(model: torch.nn.Module) -> Iterator[torch.nn.Linear]:
    """The model's linear layers in order, each weight once."""
    seen: set[int] = set()
    for module in model.modules():
        if type(module) is torch.nn.Linear and id(module.weight) not in seen:
            seen.add(id(module.weight))
            yield module

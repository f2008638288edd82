"""The engine's pruned linear layers and the measurement that picks a kernel per layer.

Each pruned ``nn.Linear`` becomes an ``EngineLinear``: it keeps the dense weight and packs the
weight for recipec's sparse kernels (``recipec.kernels.native``) in the engine's dtype, as
unstructured CSR and, when the zeros come in 1x4 blocks, as block4. Which one runs is decided
per call size: the first call with a new token count (rounded up to a power of two) asks the
``Planner``, which times dense ``F.linear`` and each packed form on that many random tokens,
interleaved, best of ``rounds`` (on a shared machine other processes only add time), and keeps
the fastest when it beats dense by ``min_speedup``. Decisions are cached per (shape, sparsity
bucket, zero pattern, token bucket), so a BERT-base's 72 layers need three measurements.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recipec.kernels import native

# Layers with fewer zeros stay dense without measuring: at 30% zeros even the int8 block4
# kernel (the fastest per stored weight) cannot beat dense GEMM on these CPUs.
MIN_SPARSITY = 0.3
# A kernel must be this much faster than dense to be used (noise margin of best-of-5 timings).
MIN_SPEEDUP = 1.05
# Sparsities are grouped in buckets of 5 points for the decision cache.
SPARSITY_BUCKET = 0.05
# A layer whose nonzeros fill at least this share of their 1x4 blocks also gets a block4 pack.
BLOCK4_MIN_FILL = 0.5
MIN_BUCKET = 8

Timer = Callable[[str, Callable[[], object]], float]
"""``timer(candidate, fn)``: runs ``fn`` (one call of the candidate form: "dense",
"unstructured" or "block4") once and returns its seconds. Injectable (tests mock it)."""


def _seconds(candidate: str, fn: Callable[[], object]) -> float:
    """Wall time; on one thread the thread's CPU time (a busy machine then adds nothing)."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    start = clock()
    fn()
    return clock() - start


def token_bucket(tokens: int) -> int:
    """Token counts are decided per power of two (at least ``MIN_BUCKET``)."""
    b = MIN_BUCKET
    while b < tokens:
        b *= 2
    return b


def block4_fill(weight: Tensor) -> float:
    """Nonzeros / weights stored by a block4 pack (1.0 when the zeros come in whole blocks)."""
    w = weight.detach()
    out_f, in_f = w.shape
    pad = (-in_f) % 4
    nz = F.pad(w != 0, (0, pad))
    blocks = int(nz.view(out_f, -1, 4).any(dim=2).sum())
    return int(nz.sum()) / (4 * blocks) if blocks else 1.0


@dataclass
class Decision:
    """What the planner chose for one key: ``choice`` is "dense", "unstructured" or "block4"."""

    choice: str
    times: dict[str, float] = field(default_factory=dict)  # best seconds per candidate
    measured: bool = True

    @property
    def speedup(self) -> float:
        """Dense time / chosen time (1.0 when dense or unmeasured)."""
        dense, chosen = self.times.get("dense"), self.times.get(self.choice)
        return dense / chosen if dense and chosen else 1.0


class EngineLinear(nn.Module):
    """A pruned linear layer that runs dense or a sparse kernel, per the planner's decision.

    Args:
        linear: the pruned layer (exact zeros are pruned); its weight is shared, not copied.
        dtype: "fp32" or "int8" (the packed forms' dtype; dense always runs in fp32).
        planner: decides per token bucket; None = always the first packed form (forced).
        quantized: int8: ``(q, scale)`` to pack instead of quantizing the weight here.
    """

    def __init__(
        self,
        linear: nn.Linear,
        dtype: str,
        planner: Planner | None,
        quantized: tuple[Tensor, Tensor] | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight.detach()
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.dtype = dtype
        self.planner = planner
        zeros = int((self.weight == 0).sum())
        self.sparsity = zeros / max(1, self.weight.numel())
        self.fill = block4_fill(self.weight)
        self.pattern = "block4" if self.fill >= 0.9 else "unstructured"
        self.packed: dict[str, native.PackedLinear] = {}
        if self.sparsity >= MIN_SPARSITY:
            structures = ["unstructured"] + (["block4"] if self.fill >= BLOCK4_MIN_FILL else [])
            if self.pattern == "block4":
                structures.reverse()  # the natural form first (what a forced engine runs)
            for st in structures:
                self.packed[st] = native.pack_linear(
                    self.weight, self.bias, structure=st, dtype=dtype, quantized=quantized
                )
        self.choices: dict[int, Decision] = {}

    def key(self, bucket: int) -> tuple:
        """The decision cache key of this layer at a token bucket."""
        s = round(round(self.sparsity / SPARSITY_BUCKET) * SPARSITY_BUCKET, 2)
        return (self.out_features, self.in_features, s, self.pattern, bucket)

    def decide(self, tokens: int) -> Decision:
        """The decision for a call of ``tokens`` rows (measured on first use of its bucket)."""
        bucket = token_bucket(tokens)
        got = self.choices.get(bucket)
        if got is None:
            if not self.packed:
                got = Decision("dense", measured=False)
            elif self.planner is None:
                got = Decision(next(iter(self.packed)), measured=False)
            else:
                got = self.planner.decide(self, bucket)
            self.choices[bucket] = got
        return got

    def run(self, x: Tensor, choice: str) -> Tensor:
        """``x @ W^T + b`` with one of the forms (dense, or a packed structure)."""
        if choice == "dense":
            return F.linear(x, self.weight, self.bias)
        return native.sparse_linear(x, self.packed[choice])

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.numel() // self.in_features if self.in_features else 0
        return self.run(x, self.decide(tokens).choice)

    def extra_repr(self) -> str:
        picked = {b: d.choice for b, d in sorted(self.choices.items())}
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"sparsity={self.sparsity:.3f}, dtype={self.dtype}, choices={picked}"
        )


class Planner:
    """Measures dense vs the packed forms once per key and remembers the fastest.

    Args:
        timer: ``timer(candidate, fn)`` runs ``fn`` once and returns its seconds (default:
            the wall clock, or the thread's CPU time when torch runs one thread).
        rounds: interleaved timed rounds per candidate (best of them is kept).
        min_speedup: a sparse form must beat dense by this factor.
    """

    def __init__(
        self, timer: Timer | None = None, rounds: int = 5, min_speedup: float = MIN_SPEEDUP
    ):
        self.timer = timer or _seconds
        self.rounds = rounds
        self.min_speedup = min_speedup
        self.decisions: dict[tuple, Decision] = {}
        self.measurements = 0

    @torch.inference_mode()
    def measure(self, layer: EngineLinear, tokens: int) -> dict[str, float]:
        """Best-of-``rounds`` seconds of dense and of each packed form on ``tokens`` rows."""
        gen = torch.Generator().manual_seed(tokens)
        x = torch.randn(tokens, layer.in_features, generator=gen)
        names = ["dense", *layer.packed]
        for name in names:  # warm-up: packing buffers, caches, thread pool
            layer.run(x, name)
        best = dict.fromkeys(names, float("inf"))
        for _ in range(self.rounds):
            for name in names:  # interleaved, so a drifting machine hits every form alike
                best[name] = min(best[name], self.timer(name, lambda n=name: layer.run(x, n)))
        self.measurements += 1
        return best

    def decide(self, layer: EngineLinear, bucket: int) -> Decision:
        """The cached decision for the layer's key, measured on this layer when new."""
        key = layer.key(bucket)
        got = self.decisions.get(key)
        if got is None:
            times = self.measure(layer, bucket)
            sparse = min(layer.packed, key=lambda n: times[n])
            fast = times[sparse] * self.min_speedup <= times["dense"]
            got = Decision(sparse if fast else "dense", times)
            self.decisions[key] = got
        return got

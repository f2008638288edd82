"""Latency statistics that know when they cannot be trusted.

A shared machine turns single timings into noise: ``recipec bench`` once printed "ort sparse
1.63x" against the dense twin at batch 1 on a busy machine, where onnxruntime gains nothing from
zeros. So the bench

1. times in **interleaved rounds** (one call per target per round, the order rotating), so that
   a round's calls saw the same machine and can be **paired**;
2. keeps adding rounds, after ``min_rounds``, until every ratio's 95% interval is narrower than
   ``precision`` (relative half-width) or ``budget_s`` / ``max_rounds`` runs out;
3. reports each target's p10/p50/p90 and, for each ratio of p50 latencies, a **bootstrap
   interval over paired rounds** (rounds resampled with replacement, the ratio of medians
   recomputed, a seeded generator so reports are reproducible);
4. marks a ratio whose interval contains 1.0 as **no measurable difference**, and warns, with
   the load average, when the machine was busy (more runnable work than idle cores) or the
   timings were unstable.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

LEVEL = 0.95
BOOTSTRAP = 2000
# A target whose p90 is this many times its p10 had unstable timings.
UNSTABLE_SPREAD = 1.5


def percentiles(times: Sequence[float]) -> tuple[float, float, float]:
    """``(p10, p50, p90)`` of the times (same unit)."""
    arr = np.asarray(times, dtype=float)
    p10, p50, p90 = np.percentile(arr, [10, 50, 90])
    return float(p10), float(p50), float(p90)


def ratio_interval(
    base: Sequence[float],
    other: Sequence[float],
    *,
    level: float = LEVEL,
    n_boot: int = BOOTSTRAP,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(ratio, lo, hi)``: ``median(base) / median(other)`` and its bootstrap interval.

    ``base[i]`` and ``other[i]`` were timed in the same round (paired); rounds are resampled
    together, so a slow round slows both sides of its pair as it did on the machine.
    """
    b = np.asarray(base, dtype=float)
    o = np.asarray(other, dtype=float)
    n = min(len(b), len(o))
    if n == 0:
        return math.nan, math.nan, math.nan
    b, o = b[:n], o[:n]
    ratio = float(np.median(b) / np.median(o))
    if n < 2:
        return ratio, 0.0, math.inf
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    boot = np.median(b[idx], axis=1) / np.median(o[idx], axis=1)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    return ratio, float(lo), float(hi)


def median_interval(times: Sequence[float], **kwargs) -> tuple[float, float, float]:
    """``(median, lo, hi)`` of one target's times (bootstrap over its rounds)."""
    ones = [1.0] * len(times)
    r, lo, hi = ratio_interval(times, ones, **kwargs)
    return r, lo, hi


def relative_halfwidth(value: float, lo: float, hi: float) -> float:
    """Half the interval's width over the value (inf when undefined)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or value <= 0:
        return math.inf
    return (hi - lo) / 2 / value


def no_difference(lo: float, hi: float) -> bool:
    """Whether the interval contains 1.0 (the two sides are not measurably different)."""
    return lo <= 1.0 <= hi


@dataclass
class MachineLoad:
    """The load average around a measurement and whether it means contention."""

    load_start: float | None
    load_end: float | None
    cores: int
    threads: int

    @property
    def others(self) -> float | None:
        """Runnable work besides this benchmark's own threads (worst of start and end)."""
        loads = [x for x in (self.load_start, self.load_end) if x is not None]
        return max(0.0, max(loads) - self.threads) if loads else None

    @property
    def busy(self) -> bool:
        """More runnable work from others than cores left idle by this benchmark (+0.5)."""
        others = self.others
        return others is not None and others > max(0, self.cores - self.threads) + 0.5


def loadavg() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # pragma: no cover - non-Unix
        return None


def usable_cores() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


@dataclass
class Rounds:
    """Per-round times (seconds) of every target, and why timing stopped."""

    times: dict[Hashable, list[float]]
    rounds: int
    stopped: str  # "stable", "budget", "max_rounds"
    elapsed_s: float
    widths: dict[Hashable, float] = field(default_factory=dict)  # last relative half-widths


def _widths(times: dict, pairs: list[tuple[Hashable, Hashable]], singles: list) -> dict:
    out = {}
    for base, other in pairs:
        r, lo, hi = ratio_interval(times[base], times[other], n_boot=400)
        out[other] = relative_halfwidth(r, lo, hi)
    for key in singles:
        m, lo, hi = median_interval(times[key], n_boot=400)
        out[key] = relative_halfwidth(m, lo, hi)
    return out


def run_rounds(
    calls: dict[Hashable, Callable[[int], list[float]]],
    *,
    baseline: Hashable | None = None,
    min_rounds: int = 10,
    max_rounds: int = 100,
    budget_s: float = 30.0,
    precision: float = 0.05,
    now: Callable[[], float] = time.perf_counter,
    log: Callable[[str], None] | None = None,
) -> Rounds:
    """Interleaved rounds until every estimate is stable or the budget runs out.

    Args:
        calls: per target, a function that makes ``n`` timed calls and returns their seconds.
        baseline: the target every other is compared with (its ratio intervals decide); without
            one, each target's median interval decides.
        min_rounds, max_rounds: bounds on the rounds.
        budget_s: stop adding rounds after this many seconds (``now`` clock) once
            ``min_rounds`` are done.
        precision: stop when every relative half-width is at most this.
    """
    log = log or (lambda msg: None)
    keys = list(calls)
    times: dict[Hashable, list[float]] = {k: [] for k in keys}
    pairs = [(baseline, k) for k in keys if baseline is not None and k != baseline]
    singles = [] if pairs else keys
    start = now()
    n, stopped, widths = 0, "max_rounds", {}
    while n < max_rounds:
        order = keys[n % len(keys) :] + keys[: n % len(keys)] if keys else []
        for k in order:
            times[k].extend(calls[k](1))
        n += 1
        if n < min_rounds:
            continue
        widths = _widths(times, pairs, singles)
        if widths and max(widths.values()) <= precision:
            stopped = "stable"
            break
        if now() - start >= budget_s:
            stopped = "budget"
            break
        if n % 10 == 0:
            log(f"  round {n}: widest interval +-{max(widths.values(), default=0):.0%}")
    return Rounds(times, n, stopped, now() - start, widths)


def describe_ratio(ratio: float, lo: float, hi: float) -> str:
    """``"2.51x [2.40, 2.63]"`` or ``"1.03x [0.91, 1.20] no measurable difference"``."""
    text = f"{ratio:.2f}x [{lo:.2f}, {hi:.2f}]"
    if no_difference(lo, hi):
        text += " no measurable difference"
    return text


def busy_warning(load: MachineLoad, unstable: list[str]) -> str | None:
    """The warning line for a busy machine or unstable timings (None when neither)."""
    parts = []
    if load.busy:
        parts.append(
            f"the machine was busy (load average {load.others + load.threads:.1f} on "
            f"{load.cores} cores, {load.threads} thread(s) per runtime)"
        )
    if unstable:
        parts.append(f"timings were unstable (p90/p10 > {UNSTABLE_SPREAD}: {', '.join(unstable)})")
    if not parts:
        return None
    return (
        "warning: "
        + " and ".join(parts)
        + ": latencies and ratios are not trustworthy; ratios whose interval contains 1.0 are "
        "marked 'no measurable difference'. Rerun on a quiet machine, or with --threads 1 "
        "--clock cpu."
    )

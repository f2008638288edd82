"""Bench statistics (``recipec.runtime.stats``): paired bootstrap intervals, adaptive rounds,
"no measurable difference" and the busy-machine warning, driven by artificial timers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recipec.runtime import stats
from recipec.runtime.bench import Target, format_table, measure_targets, speedups


class FakeClock:
    """A clock that advances by what the fake runners "spent"."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class NoisyRunner:
    """A runner whose calls take ``true_s`` times a random factor (a busy machine)."""

    runtime = "fake"

    def __init__(self, true_s: float, noise: float, rng, clock: FakeClock | None = None):
        self.true_s, self.noise, self.rng, self.clock = true_s, noise, rng, clock
        self.calls = 0

    def time(self, n: int, clock: str = "wall") -> list[float]:
        out = [self.true_s * math.exp(self.rng.normal(0.0, self.noise)) for _ in range(n)]
        self.calls += n
        if self.clock is not None:
            self.clock.t += sum(out)
        return out

    def close(self) -> None:
        pass


def test_percentiles_and_ratio_are_exact_values():
    assert stats.percentiles([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]) == (2.0, 6.0, 10.0)
    ratio, lo, hi = stats.ratio_interval([4.0, 2.0, 6.0], [1.0, 3.0, 2.0])
    assert ratio == 2.0  # median 4 / median 2
    assert lo <= ratio <= hi
    # every bootstrap resample of a constant pair gives the same ratio
    assert stats.ratio_interval([3.0] * 5, [1.5] * 5) == (2.0, 2.0, 2.0)
    assert stats.ratio_interval([3.0], [1.0]) == (3.0, 0.0, math.inf)
    assert all(math.isnan(x) for x in stats.ratio_interval([], []))


def test_bootstrap_interval_matches_a_brute_force_resampling():
    rng = np.random.default_rng(5)
    base, other = rng.uniform(1, 2, 9), rng.uniform(1, 2, 9)
    _, lo, hi = stats.ratio_interval(base, other, n_boot=500, seed=3)
    idx = np.random.default_rng(3).integers(0, 9, size=(500, 9))
    boot = sorted(
        float(np.median(base[row]) / np.median(other[row])) for row in idx
    )  # rounds resampled as pairs
    assert lo == pytest.approx(np.quantile(boot, 0.025))
    assert hi == pytest.approx(np.quantile(boot, 0.975))


def test_equal_runtimes_under_heavy_noise_show_no_measurable_difference():
    rng, clock = np.random.default_rng(0), FakeClock()
    a = NoisyRunner(1e-3, 0.6, rng, clock)
    b = NoisyRunner(1e-3, 0.6, rng, clock)
    rounds = stats.run_rounds(
        {"base": a.time, "other": b.time},
        baseline="base",
        min_rounds=10,
        max_rounds=200,
        budget_s=0.05,
        precision=0.05,
        now=clock,
    )
    assert rounds.stopped == "budget" and 10 <= rounds.rounds < 200
    assert rounds.widths["other"] > 0.05  # never reached the precision
    ratio, lo, hi = stats.ratio_interval(rounds.times["base"], rounds.times["other"])
    assert stats.no_difference(lo, hi)
    assert stats.describe_ratio(ratio, lo, hi).endswith("no measurable difference")


def test_a_real_difference_on_a_quiet_timer_stops_when_stable():
    rng, clock = np.random.default_rng(1), FakeClock()
    a = NoisyRunner(2e-3, 0.01, rng, clock)
    b = NoisyRunner(1e-3, 0.01, rng, clock)
    rounds = stats.run_rounds(
        {"base": a.time, "other": b.time}, baseline="base", min_rounds=10, now=clock
    )
    assert rounds.stopped == "stable" and rounds.rounds == 10
    assert a.calls == b.calls == 10
    ratio, lo, hi = stats.ratio_interval(rounds.times["base"], rounds.times["other"])
    assert 1.9 < lo <= ratio <= hi < 2.1
    assert not stats.no_difference(lo, hi)
    assert "no measurable" not in stats.describe_ratio(ratio, lo, hi)


def test_rounds_interleave_and_rotate_the_order():
    order = []
    calls = {k: (lambda n, k=k: order.append(k) or [1.0] * n) for k in "abc"}
    rounds = stats.run_rounds(calls, min_rounds=3, max_rounds=3, budget_s=0)
    assert order == list("abcbcacab") and rounds.rounds == 3


@pytest.mark.parametrize(
    ("load", "cores", "threads", "busy"),
    [
        ((0.4, 1.2), 2, 1, False),  # this bench's own thread and a little else
        ((2.6, 2.7), 2, 1, True),  # others: 1.7 > 1 idle core + 0.5
        ((2.0, 2.4), 2, 1, False),  # others: 1.4, within the margin
        ((2.4, 2.4), 2, 2, False),  # others 0.4, no idle core: within the 0.5 margin
        ((None, None), 2, 1, False),
    ],
)
def test_machine_load_busy(load, cores, threads, busy):
    assert stats.MachineLoad(*load, cores, threads).busy is busy


def _targets(runners: dict[tuple[str, str], NoisyRunner]) -> list[Target]:
    return [Target("m", rt, v, 1, 8, r, 0.0) for (rt, v), r in runners.items()]


def test_noisy_timer_through_the_bench_report_is_marked_and_warned():
    """An artificial noisy timer (equal true latencies) on a busy machine: the table marks the
    ratio "=" (interval contains 1.0) and the report warns with the load average."""
    rng = np.random.default_rng(2)
    runners = {
        ("ort", "dense"): NoisyRunner(1e-3, 0.5, rng),
        ("ort", "sparse"): NoisyRunner(1e-3, 0.5, rng),
        ("engine", "sparse"): NoisyRunner(0.25e-3, 0.02, rng),
    }
    timing = {"min_rounds": 12, "max_rounds": 12, "time_budget_s": 0.0, "precision": 0.05}
    measurements = measure_targets(_targets(runners), 0, "wall", timing, lambda msg: None)
    rows = {s["runtime"]: s for s in speedups(measurements)}
    assert rows["ort"]["vs_dense_ort_no_difference"] is True
    lo, hi = rows["ort"]["vs_dense_ort_ci"]
    assert lo <= 1.0 <= hi
    assert rows["engine"]["vs_dense_ort_no_difference"] is False
    assert rows["engine"]["vs_dense_ort_ci"][0] > 2.0
    results = [m.__dict__ for m in measurements]
    table = format_table({"results": results, "speedups": list(rows.values())})
    ort_line = next(ln for ln in table.splitlines() if " ort " in ln and "sparse" in ln)
    assert ort_line.rstrip().endswith("=") or "]=" in ort_line
    assert "'=': contains 1.0, no measurable difference" in table
    unstable = [f"{m.runtime} {m.variant}" for m in measurements if m.p90_ms / m.p10_ms > 1.5]
    assert set(unstable) == {"ort dense", "ort sparse"}
    warning = stats.busy_warning(stats.MachineLoad(3.6, 3.9, 2, 1), unstable)
    assert warning.startswith("warning: the machine was busy (load average 3.9 on 2 cores")
    assert "timings were unstable" in warning and "ort dense" in warning
    assert stats.busy_warning(stats.MachineLoad(0.5, 0.6, 2, 1), []) is None

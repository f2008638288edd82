"""Schedules as pure functions of the optimizer step (no state, no torch).

All arguments are already resolved to optimizer steps (see :mod:`recipec.plan`).
"""

from __future__ import annotations

import math


def pruning_steps(start: int, end: int, update_every: int | None) -> list[int]:
    """Steps at which masks are recomputed: ``start, start+u, ...`` and always ``end``.

    A window with ``end == start`` is a single (one-shot) pruning step.
    """
    if end < start:
        raise ValueError(f"end ({end}) before start ({start})")
    if end == start or update_every is None:
        return [start] if end == start else [start, end]
    if update_every <= 0:
        raise ValueError("update_every must be positive")
    steps = list(range(start, end + 1, update_every))
    if steps[-1] != end:
        steps.append(end)
    return steps


def interpolate_sparsity(
    step: int, start: int, end: int, init: float, final: float, schedule: str = "cubic"
) -> float:
    r"""Target sparsity at ``step`` within ``[start, end]``.

    Cubic (Zhu & Gupta 2017): :math:`s(t) = s_f + (s_0 - s_f)(1 - \frac{t - t_0}{t_1 - t_0})^3`;
    linear: :math:`s(t) = s_0 + (s_f - s_0)\frac{t - t_0}{t_1 - t_0}`. ``init`` is the sparsity of
    the first pruning step (the paper's large first step), ``final`` that of the last.
    """
    if step <= start or end == start:
        return init if step <= start and end != start else final
    if step >= end:
        return final
    x = (step - start) / (end - start)
    if schedule == "cubic":
        return final + (init - final) * (1.0 - x) ** 3
    if schedule == "linear":
        return init + (final - init) * x
    raise ValueError(f"unknown sparsity schedule {schedule!r}")


def lr_in_window(
    step: int,
    *,
    start: int,
    end: int,
    schedule: str,
    init_lr: float,
    final_lr: float,
    warmup: int = 0,
    cycle: int | None = None,
) -> float:
    r"""Learning rate at ``step`` for a schedule active on ``[start, end)``.

    - warm-up: linear from 0 to ``init_lr`` over the first ``warmup`` steps of the window;
    - constant: ``init_lr``;
    - linear: ``init_lr`` to ``final_lr`` over the rest of the window;
    - cosine: :math:`f + (i - f)\,\tfrac12(1 + \cos \pi x)`;
    - cyclic_linear: cycles of ``cycle`` steps from the window's start (the last one cut
      short by the window's end); within each cycle of :math:`L` steps the LR goes linearly
      from ``init_lr`` on its first step to exactly ``final_lr`` on its last,
      :math:`i + (f - i)\,\tfrac{k}{L - 1}` at its k-th step (``init_lr`` for a
      one-step cycle), and is rewound to ``init_lr`` at the next (align cycles with pruning
      steps). A linear, cosine or constant window instead reaches ``final_lr`` at its end,
      the step after its last.
    """
    local = step - start
    if warmup > 0 and local < warmup:
        return init_lr * (local + 1) / (warmup + 1)
    local -= warmup
    span = max(end - start - warmup, 1)
    if schedule == "constant":
        return init_lr
    if schedule == "linear":
        x = min(max(local / span, 0.0), 1.0)
        return init_lr + (final_lr - init_lr) * x
    if schedule == "cosine":
        x = min(max(local / span, 0.0), 1.0)
        return final_lr + (init_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * x))
    if schedule == "cyclic_linear":
        if not cycle or cycle <= 0:
            raise ValueError("cyclic_linear needs a positive cycle length")
        return _in_cycle(local, span, cycle, init_lr, final_lr)
    raise ValueError(f"unknown LR schedule {schedule!r}")


def _in_cycle(local: int, span: int, cycle: int, init_lr: float, final_lr: float) -> float:
    """cyclic_linear at ``local`` steps into a window of ``span`` steps (see lr_in_window)."""
    first = (local // cycle) * cycle
    length = min(cycle, span - first) if local < span else cycle
    if length <= 1:
        return init_lr
    k = local - first
    if k >= length - 1:
        return final_lr  # exactly, not init + (final - init) * 1.0 rounded
    return init_lr + (final_lr - init_lr) * (k / (length - 1))


def default_lr(step: int, *, total: int, learning_rate: float, warmup: int = 0) -> float:
    """The driver's LR when no ``lr`` modifier is present: warm-up, then linear decay to 0."""
    return lr_in_window(
        step,
        start=0,
        end=max(total, 1),
        schedule="linear",
        init_lr=learning_rate,
        final_lr=0.0,
        warmup=warmup,
    )

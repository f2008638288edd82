"""An independent, minimal model of SparseML's schedules, written from its definitions.

Used by the converter tests (and to print the table in docs/convert.md). Everything is on one
epoch clock; optimizer step ``n`` runs at ``epoch = n / steps_per_epoch``.

- Pruning (GMP / OBS): masks are updated at start, start + update_frequency, ..., and at end,
  to ``y0 + (1 - (1 - x)^3) (y1 - y0)`` (cubic) or ``y0 + x (y1 - y0)`` (linear),
  ``x = (epoch - start) / (end - start)``.
- LearningRateFunctionModifier updates the LR at every step with start <= epoch <= end:
  linear ``init + (epoch - start) / (end - start) * (final - init)``; cosine
  ``cos(x pi + shift) * range / 2 + range / 2 + low`` (shift 0 when decaying, pi when rising);
  cyclic_linear ``init - (k mod C) / (C - 1) * (init - final)`` with ``k`` steps since start and
  ``C`` the cycle in steps (a trailing partial cycle uses its own length).
- SetLearningRateModifier sets the LR once, at its start epoch (-1: at once).
- Modifiers run in SparseML's order (by end epoch, never-ending ones last, then by start), and
  the LR stays where the last modifier left it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Prune:
    start: float
    end: float
    freq: float
    init: float
    final: float
    inter: str = "cubic"


@dataclass(frozen=True)
class LRFunc:
    func: str
    start: float
    end: float
    init: float
    final: float
    cycle: float = 1.0


@dataclass(frozen=True)
class SetLR:
    start: float
    lr: float


def pruning_events(mod: Prune, spe: int) -> list[tuple[int, float]]:
    """(step, target sparsity) at every mask update."""
    epochs, k = [], 0
    while mod.start + k * mod.freq < mod.end - 1e-9:
        epochs.append(mod.start + k * mod.freq)
        k += 1
    epochs.append(mod.end)
    out = []
    for epoch in epochs:
        x = (epoch - mod.start) / (mod.end - mod.start) if mod.end > mod.start else 1.0
        y = x if mod.inter == "linear" else 1 - (1 - x) ** 3
        out.append((round(epoch * spe), mod.init + y * (mod.final - mod.init)))
    return out


def _func_lr(mod: LRFunc, step: int, spe: int) -> float:
    epoch = step / spe
    if mod.func == "linear":
        return mod.init + (epoch - mod.start) / (mod.end - mod.start) * (mod.final - mod.init)
    if mod.func == "cosine":
        x = (epoch - mod.start) / (mod.end - mod.start)
        if mod.final < mod.init:
            low, span, shift = mod.final, mod.init - mod.final, 0.0
        else:
            low, span, shift = mod.init, mod.final - mod.init, math.pi
        return math.cos(x * math.pi + shift) * span / 2 + span / 2 + low
    assert mod.func == "cyclic_linear"
    start_step, end_step = round(mod.start * spe), round(mod.end * spe)
    cycle = round(mod.cycle * spe)
    k = step - start_step
    if k > ((end_step - start_step) // cycle) * cycle:
        cycle = (end_step - start_step) % cycle
    return mod.init - (k % cycle) / (cycle - 1) * (mod.init - mod.final)


def lr_schedule(mods: list[LRFunc | SetLR], total_steps: int, spe: int) -> list[float | None]:
    """The LR at every step (None before any LR modifier has run)."""

    def order(mod):
        end = math.inf if isinstance(mod, SetLR) else mod.end
        return (end, mod.start)

    ordered = sorted(mods, key=order)
    applied: set[int] = set()
    lr: float | None = None
    out: list[float | None] = []
    for step in range(total_steps):
        epoch = step / spe
        for index, mod in enumerate(ordered):
            if isinstance(mod, SetLR):
                if index not in applied and (mod.start < 0 or epoch >= mod.start):
                    lr = mod.lr
                    applied.add(index)
            elif mod.start - 1e-12 <= epoch <= mod.end + 1e-12:
                lr = _func_lr(mod, step, spe)
        out.append(lr)
    return out


def lr_tolerance(mods: list[LRFunc | SetLR], step: int, spe: int) -> float:
    """How far recipec's LR may be from SparseML's at ``step``.

    Both cyclic_linear schedules reach final_lr on the last step of each cycle
    (k / (C - 1)), so whole cycles agree exactly. A trailing partial cycle of R steps is
    converted into a linear window, which reaches final_lr at its end (k / R) where SparseML
    reaches it on its last step (k / (R - 1)): there they differ by at most (init - final) / R.
    Everywhere else they are equal.
    """
    for mod in mods:
        if isinstance(mod, LRFunc) and mod.func == "cyclic_linear":
            start, end = round(mod.start * spe), round(mod.end * spe)
            if start <= step < end:
                cycle = round(mod.cycle * spe)
                full = ((end - start) // cycle) * cycle
                if step - start < full:
                    return 1e-15
                return (mod.init - mod.final) / ((end - start) - full) + 1e-15
    return 1e-15

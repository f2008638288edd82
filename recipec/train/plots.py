"""The run's PNG plots: LR and sparsity, evaluations, per-tensor sparsity.

Each ``*_figure`` function builds a matplotlib figure from the run's records (tests inspect
them); :func:`write_plots` saves them. The x axis is the optimizer step counted across stages.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def stage_offsets(records: list[dict[str, Any]]) -> dict[str, int]:
    """Each stage's first global step: the steps of the stages before it."""
    last: dict[str, int] = {}
    for rec in records:
        stage = rec.get("stage", "main")
        last[stage] = max(last.get(stage, 0), rec.get("step", 0))
    offsets, running = {}, 0
    for stage, steps in last.items():  # dicts keep the order stages first appear in
        offsets[stage] = running
        running += steps
    return offsets


def lr_formatter():
    """One LR tick format for every run (``1.0e-04``), whatever the range of the values."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _: "0" if value == 0 else f"{value:.1e}")


def lr_figure(records: list[dict[str, Any]], offsets: dict[str, int]):
    """The learning rate of every step and the targets' sparsity (training steps and one-shot
    prunings), or None without training records."""
    train = [r for r in records if "loss" in r]
    if not train:
        return None
    fig, ax = _pyplot().subplots(figsize=(8, 3.5))
    ax.plot(
        [offsets[r["stage"]] + r["step"] for r in train], [r["lr"] for r in train], color="tab:blue"
    )
    ax.yaxis.set_major_formatter(lr_formatter())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate", color="tab:blue")
    pruned = [r for r in records if "sparsity" in r and not any(k.startswith("eval_") for k in r)]
    if pruned:
        ax2 = ax.twinx()
        ax2.step(
            [offsets[r["stage"]] + r["step"] for r in pruned],
            [100 * r["sparsity"] for r in pruned],
            where="post",
            color="tab:red",
        )
        ax2.set_ylabel("sparsity of targets (%)", color="tab:red")
        ax2.set_ylim(0, 100)
    ax.set_title("learning rate and sparsity")
    fig.tight_layout()
    return fig


def eval_figure(
    evals: list[dict[str, Any]],
    offsets: dict[str, int],
    primary: str,
    teacher: float | None,
    pruning_steps: list[int],
):
    """The primary metric at each evaluation, the dense teacher's as a dashed line and the
    pruning steps as dotted vertical lines, or None without evaluations."""
    if not evals:
        return None
    fig, ax = _pyplot().subplots(figsize=(8, 3.5))
    for i, step in enumerate(pruning_steps):
        ax.axvline(
            step,
            color="tab:red",
            alpha=0.35,
            linestyle=":",
            label="pruning step" if i == 0 else None,
        )
    xs = [offsets[r["stage"]] + r["step"] for r in evals]
    ax.plot(xs, [r[f"eval_{primary}"] for r in evals], marker="o", label="sparse model")
    if isinstance(teacher, int | float) and math.isfinite(teacher):  # not a cut report value
        ax.axhline(
            teacher, color="tab:green", linestyle="--", label=f"dense teacher ({teacher:.4f})"
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"eval {primary}")
    ax.set_title(f"eval {primary}")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def layer_figure(per_layer: dict[str, float], target: float | None):
    """Each tensor's sparsity, with the recipe's target as a dashed vertical line."""
    if not per_layer:
        return None
    names = list(per_layer)
    fig, ax = _pyplot().subplots(figsize=(8, max(3.0, 0.18 * len(names) + 1.0)))
    ax.barh(range(len(names)), [100 * per_layer[n] for n in names], color="tab:red")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([n.removesuffix(".weight") for n in names], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    if target is not None:
        ax.axvline(100 * target, color="black", linestyle="--", label=f"target {100 * target:.1f}%")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("sparsity (%)")
    ax.set_title("per-tensor sparsity")
    fig.tight_layout()
    return fig


def write_plots(
    out: Path,
    records: list[dict[str, Any]],
    per_layer: dict[str, float],
    primary: str,
    *,
    teacher: float | None = None,
    pruning: list[tuple[str, int]] = (),
    target: float | None = None,
) -> list[str]:
    """Save the plots that have data; returns their file names. ``pruning``: (stage, step)
    of every pruning step; ``target``: the last pruning step's target sparsity."""
    plt = _pyplot()
    offsets = stage_offsets(records)
    evals = [r for r in records if f"eval_{primary}" in r]
    steps = sorted({offsets.get(stage, 0) + step for stage, step in pruning})
    figures = {
        "sparsity_lr.png": lr_figure(records, offsets),
        "eval.png": eval_figure(evals, offsets, primary, teacher, steps),
        "layer_sparsity.png": layer_figure(per_layer, target),
    }
    written = []
    for name, fig in figures.items():
        if fig is None:
            continue
        fig.savefig(out / name, dpi=110, bbox_inches="tight")  # no label cut at the edges
        plt.close(fig)
        written.append(name)
    return written

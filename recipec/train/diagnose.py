"""Why a run's model may have collapsed (see :mod:`recipec.tasks.collapse`): the run's own
numbers for each usual cause, for the console and the report."""

from __future__ import annotations

from typing import Any

import torch

from recipec.architectures import param_components
from recipec.tasks.collapse import collapse_of


def collapse_report(
    info: Any,
    final_eval: dict[str, float],
    *,
    eval_examples: int,
    train_examples: int,
    outcomes: list[Any],
    model: torch.nn.Module,
    masks: dict[str, torch.Tensor],
    targets_sparsity: float,
) -> dict[str, Any] | None:
    """``{"message", "causes"}`` when the final model collapsed, else None."""
    message = collapse_of(info, final_eval, eval_examples)
    if message is None:
        return None
    steps = sum(o.result.steps for o in outcomes)
    epochs = sum(o.result.steps / o.plan.steps_per_epoch for o in outcomes)
    causes = [
        f"a training budget too small: {steps} optimizer steps ({epochs:.3g} epochs) in all; "
        "more epochs (--set training.epochs=N) give the model time to learn and to recover "
        "from each pruning step",
        f"too little data: {train_examples} train examples; use more (a larger --max-train, "
        "or the full data set)",
        _head_cause(model, masks),
        f"too high a sparsity for the budget: {100 * targets_sparsity:.2f}% of the targeted "
        "weights are zero; a lower final_sparsity, or more epochs between pruning steps",
    ]
    return {"message": message, "causes": causes}


def _head_cause(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> str:
    """The task head: pruned by the recipe, all zeros, or (the usual case) simply untrained."""
    components = param_components(model)
    head = {n: p for n, p in model.named_parameters() if components.get(n) == "head"}
    pruned = [n for n in head if n in masks]
    if pruned:
        zeros = sum(int((head[n] == 0).sum()) for n in pruned)
        total = sum(head[n].numel() for n in pruned)
        return (
            f"a pruned task head: {', '.join(pruned)} ({100 * zeros / total:.1f}% zeros); "
            "leave the head out of the recipe's targets"
        )
    weights = [p for n, p in head.items() if p.dim() > 1]
    if weights and all(not bool(p.any()) for p in weights):
        return (
            f"a task head whose weights are all zero ({', '.join(n for n, p in head.items() if p.dim() > 1)}): "
            "it cannot tell the classes apart"
        )
    return (
        "an untrained task head: a head new to this task (initialised for this run) that the "
        "budget was too short to train"
    )

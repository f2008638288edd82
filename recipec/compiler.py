"""Compile a validated recipe stage against a model and optimizer into a :class:`Program`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from recipec import modifiers as registry
from recipec.modifiers.base import CompileContext, CompileError, MaskState
from recipec.modifiers.pruning import target_parameters
from recipec.plan import PlanError, resolve_stage
from recipec.program import Program
from recipec.recipe.schema import PRUNING_TYPES, Recipe


def compile(  # noqa: A001 - the public verb of the package
    recipe: Recipe,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    steps_per_epoch: int,
    *,
    stage: str | int | None = None,
    teacher: nn.Module | str | None = None,
    grad_batches: Callable[[int], Iterator[Mapping[str, torch.Tensor]]] | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Program:
    """Turn one stage of ``recipe`` into training hooks for ``model`` and ``optimizer``.

    Args:
        recipe: A validated recipe (:func:`recipec.load_recipe`).
        model: Any PyTorch model; targets are matched against ``named_parameters()``.
        optimizer: The optimizer that will step ``model`` (needed for LR and mask hygiene).
        steps_per_epoch: Optimizer steps per epoch, to resolve epoch-valued fields.
        stage: Stage name or index; required when the recipe has several stages.
        teacher: Distillation teacher (a model or a path) when the stage has ``distill``.
        grad_batches: ``f(batch_size)`` -> iterator of batches, for oBERT's gradient collection.
        masks: Masks carried over from an earlier stage (True = keep).
        progress: Receives short status lines (pruning steps, Fisher progress).

    Raises:
        CompileError: Targets that match nothing, overlapping pruners, a missing teacher, ...
    """
    stages = recipe.resolved_stages()
    if stage is None:
        if len(stages) > 1:
            raise CompileError(
                f"the recipe has {len(stages)} stages ({', '.join(s.name for s in stages)}): pass stage="
            )
        chosen = stages[0]
    elif isinstance(stage, int):
        chosen = stages[stage]
    else:
        by_name = {s.name: s for s in stages}
        if stage not in by_name:
            raise CompileError(f"no stage {stage!r}; stages: {', '.join(by_name)}")
        chosen = by_name[stage]
    try:
        plan = resolve_stage(recipe, chosen, steps_per_epoch)
    except PlanError as exc:
        raise CompileError(str(exc)) from None

    mask_state = MaskState(dict(model.named_parameters()))
    if masks:
        mask_state.set(masks, optimizer)
    ctx = CompileContext(
        recipe=recipe,
        plan=plan,
        model=model,
        optimizer=optimizer,
        masks=mask_state,
        teacher=teacher,
        grad_batches=grad_batches,
        progress=progress,
    )
    _check_tensor_overlaps(ctx)
    program = Program(plan, ctx, [registry.build(m, ctx) for m in plan.modifiers])
    ctx.loss_fn = program.recompute_loss
    return program


def _check_tensor_overlaps(ctx: CompileContext) -> None:
    pruners = [m for m in ctx.plan.modifiers if m.type in PRUNING_TYPES]
    owned: list[tuple[Any, set[str]]] = []
    for mod in pruners:
        names = set(target_parameters(mod, ctx)) if mod.type != "cram" else set()
        for other, other_names in owned:
            both = names & other_names
            if (
                both
                and mod.window.start <= other.window.end
                and other.window.start <= mod.window.end
            ):
                raise CompileError(
                    f"modifiers [{other.index}] ({other.type}) and [{mod.index}] ({mod.type}) prune the same tensors "
                    f"in overlapping steps ({other.window.start}..{other.window.end} and {mod.window.start}..{mod.window.end}), "
                    f"e.g. {sorted(both)[0]}"
                )
        owned.append((mod, names))

"""Compile a validated recipe stage against a model and optimizer into a :class:`Program`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from recipec import modifiers as registry
from recipec.modifiers.base import CompileContext, CompileError
from recipec.modifiers.pruner import target_parameters
from recipec.plan import PlanError, StagePlan, resolve_stage
from recipec.program import Program
from recipec.recipe.schema import Recipe, StageSpec
from recipec.sparsity.state import MaskState

GradBatches = Callable[[int], Iterator[Mapping[str, torch.Tensor]]]


def compile(  # noqa: A001 - the public verb of the package
    recipe: Recipe,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    steps_per_epoch: int,
    *,
    stage: str | int | None = None,
    teacher: nn.Module | str | None = None,
    grad_batches: GradBatches | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    progress: Callable[[str], None] | None = None,
    own_lr: bool = False,
    sparse_backprop: float | None = None,
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
        own_lr: The Program writes the plan's LR at every step even without ``lr`` modifiers
            (the training section's warm-up and linear decay); otherwise only a stage with
            ``lr`` modifiers sets it and another scheduler (e.g. the HF Trainer's) may own it.
        sparse_backprop: Run pruned linear layers whose sparsity is at least this on sparse CPU
            kernels between mask changes (None: dense kernels).

    Raises:
        CompileError: Targets that match nothing, overlapping pruners, a missing teacher, ...
    """
    chosen = _choose_stage(recipe, stage)
    try:
        plan = resolve_stage(recipe, chosen, steps_per_epoch)
    except PlanError as exc:
        raise CompileError(str(exc)) from None
    return compile_plan(
        plan,
        recipe,
        model,
        optimizer,
        teacher=teacher,
        grad_batches=grad_batches,
        masks=masks,
        progress=progress,
        own_lr=own_lr,
        sparse_backprop=sparse_backprop,
    )


def compile_plan(
    plan: StagePlan,
    recipe: Recipe,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    teacher: nn.Module | str | None = None,
    grad_batches: GradBatches | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    progress: Callable[[str], None] | None = None,
    own_lr: bool = False,
    sparse_backprop: float | None = None,
) -> Program:
    """A :class:`Program` for an already resolved stage (arguments as in :func:`compile`).

    A plan without modifiers gives a Program that only schedules the LR: plain fine-tuning,
    e.g. the dense teacher of ``teacher: auto``.
    """
    masks = prepare_model(plan, model, masks)
    if optimizer is not None and plan.with_trait("changes_architecture"):
        _forget_removed(optimizer, model)
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
    program = Program(
        plan,
        ctx,
        [registry.build(m, ctx) for m in plan.modifiers],
        sets_lr=own_lr or plan.owns_lr,
        sparse_backprop=sparse_backprop,
    )
    ctx.loss_fn = program.recompute_loss
    return program


def prepare_model(
    plan: StagePlan, model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor] | None:
    """Apply the stage's architecture changes (``changes_architecture`` modifiers: ``layers``
    drops encoder layers) before any mask exists; returns ``masks`` renamed to match (masks of
    removed tensors dropped). Idempotent: a stage compiled again changes nothing more."""
    for mod in plan.with_trait("changes_architecture"):
        renamed = registry.BUILDERS[mod.type].prepare(mod.spec, model)
        if masks:
            names = dict(model.named_parameters())
            masks = {renamed.get(n, n): m for n, m in masks.items()}
            masks = {n: m for n, m in masks.items() if n in names}
    return masks


def _forget_removed(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Take the parameters of removed layers out of ``optimizer`` (built before the layers were
    dropped): they would never get a gradient, and a resumed run, which drops the layers first,
    must see the same parameter groups."""
    live = {id(p) for p in model.parameters()}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) in live]
    for p in [p for p in optimizer.state if id(p) not in live]:
        del optimizer.state[p]


def prepare_stages(plans: Sequence[StagePlan], model: nn.Module) -> None:
    """The architecture changes of ``plans`` in order (a run resumed in a stage rebuilds its
    model this way, from the stages up to that one, before loading the checkpoint's weights)."""
    for plan in plans:
        prepare_model(plan, model)


def check_model(
    recipe_path: Any, overrides: Sequence[str], recipe: Recipe, model: nn.Module
) -> None:
    """Check the recipe's structured modifiers against ``model`` with file:line locations (a
    recipe that would remove every head of a layer fails here, before anything trains).

    Raises:
        recipec.recipe.errors.RecipeError: The problems, located in the recipe file.
    """
    if not any(m.structured for s in recipe.resolved_stages() for m in s.modifiers):
        return
    from recipec.recipe.load import load_recipe
    from recipec.sparsity.structured import model_facts

    load_recipe(recipe_path, overrides, model=model_facts(model))


def _choose_stage(recipe: Recipe, stage: str | int | None) -> StageSpec:
    stages = recipe.resolved_stages()
    if stage is None:
        if len(stages) > 1:
            raise CompileError(
                f"the recipe has {len(stages)} stages ({', '.join(s.name for s in stages)}): pass stage="
            )
        return stages[0]
    if isinstance(stage, int):
        return stages[stage]
    by_name = {s.name: s for s in stages}
    if stage not in by_name:
        raise CompileError(f"no stage {stage!r}; stages: {', '.join(by_name)}")
    return by_name[stage]


def _check_tensor_overlaps(ctx: CompileContext) -> None:
    """Two pruning modifiers on the same tensors in overlapping windows: a compile error."""
    owned: list[tuple[Any, set[str]]] = []
    for mod in ctx.plan.with_trait("prunes"):
        # Structured pruners own groups, not tensor selections: they may share tensors with an
        # unstructured pruner (heads/neurons first, then the rest, in one recipe).
        structured = mod.spec.structured is not None
        names = (
            set(target_parameters(mod, ctx)) if mod.spec.sets_masks and not structured else set()
        )
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

"""Resolve a recipe to optimizer steps: the compiled schedule that ``recipec plan`` prints.

Epoch-valued fields are converted once with ``step = round(epoch * steps_per_epoch)``.
Windows default to the whole stage. Pruning masks persist after a pruning window ends.

LR ownership rule: inside a stage that has ``lr`` modifiers, the recipe owns the learning rate
at every step — inside a window from that window's schedule, before the first window at the
first window's starting value, and between/after windows at the value the previous window
ended with. A stage without ``lr`` modifiers uses ``training.learning_rate`` with warm-up and
linear decay to 0. The Program writes this LR into the optimizer at every ``step_start``, so an
external scheduler attached to the same optimizer is overridden (the recipe wins).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from recipec import schedules
from recipec.recipe.checks import (
    interval,
    overlap_problems,
    prune_only_problems,
    stage_quantize_problems,
    to_steps,
    window_problems,
)
from recipec.recipe.schema import (
    LRSpec,
    Recipe,
    StageSpec,
    TrainingSpec,
)


class PlanError(ValueError):
    """A recipe that validates but cannot be scheduled for these steps_per_epoch."""


@dataclass(frozen=True)
class Window:
    start: int
    end: int


@dataclass(frozen=True)
class ResolvedModifier:
    """One modifier with its window (and, for pruning, its pruning steps) in optimizer steps."""

    index: int
    spec: Any
    window: Window
    pruning_steps: tuple[int, ...] = ()
    sparsities: tuple[float, ...] = ()
    update_every: int | None = None
    warmup: int = 0
    cycle: int | None = None
    freeze: int | None = None  # quantize: the step its input observers freeze at

    @property
    def type(self) -> str:
        return self.spec.type

    def describe(self) -> str:
        """This modifier's settings in one line (``recipec plan``)."""
        spec = self.spec
        if spec.sets_lr:
            cycle = f", cycle {self.cycle} steps" if self.cycle else ""
            return f"{spec.schedule} {spec.init_lr:g} -> {spec.final_lr:g}, warm-up {self.warmup}{cycle}"
        if spec.quantizes:
            return spec.describe().replace("the window's end", f"step {self.freeze}")
        return spec.describe()

    def plan_fields(self) -> dict[str, Any]:
        """This modifier's resolved settings (``recipec plan --json``)."""
        spec = self.spec
        fields: dict[str, Any] = {}
        if self.pruning_steps:
            fields["update_every_steps"] = self.update_every
            fields["pruning"] = [
                {"step": s, "sparsity": round(sp, 6)}
                for s, sp in zip(self.pruning_steps, self.sparsities)
            ]
        if spec.sets_lr:
            fields.update(
                schedule=spec.schedule,
                warmup_steps=self.warmup,
                cycle_steps=self.cycle,
                init_lr=spec.init_lr,
                final_lr=spec.final_lr,
            )
        if spec.quantizes:
            fields["freeze_observers_at_step"] = self.freeze
        return {**fields, **spec.plan_fields()}

    def target_sparsity(self, step: int) -> float | None:
        """The sparsity this modifier prunes to at ``step`` (None if not a pruning step)."""
        try:
            return self.sparsities[self.pruning_steps.index(step)]
        except ValueError:
            return None


@dataclass(frozen=True)
class StagePlan:
    name: str
    training: TrainingSpec
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_every: int | None
    modifiers: tuple[ResolvedModifier, ...]
    targets: str | tuple[str, ...]  # the recipe's: "encoder" or regexes (Recipe.targets_of)
    exclude: tuple[str, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def lr_at(self, step: int) -> float:
        """Learning rate at ``step`` (see the module docstring for the ownership rule)."""
        lrs = sorted((m for m in self.modifiers if m.spec.sets_lr), key=lambda m: m.window.start)
        if not lrs:
            return schedules.default_lr(
                step,
                total=self.total_steps,
                learning_rate=self.training.learning_rate,
                warmup=self.warmup_steps,
            )
        previous = None
        for mod in lrs:
            if mod.window.start <= step < mod.window.end:
                return _lr_of(mod, step)
            if step >= mod.window.end:
                previous = mod
        if previous is None:
            return _lr_of(lrs[0], lrs[0].window.start)
        return _lr_of(previous, max(previous.window.end - 1, previous.window.start))

    def pruning_events(self) -> list[tuple[int, int, float]]:
        """``(step, modifier index, target sparsity)`` for every pruning step, in order."""
        events = [
            (step, mod.index, sparsity)
            for mod in self.modifiers
            for step, sparsity in zip(mod.pruning_steps, mod.sparsities)
        ]
        return sorted(events)

    def by_type(self, *types: str) -> list[ResolvedModifier]:
        """The stage's modifiers of the given ``type:`` names (for callers that ask by name)."""
        return [m for m in self.modifiers if m.type in types]

    def with_trait(self, trait: str) -> list[ResolvedModifier]:
        """The stage's modifiers whose spec has ``trait`` (e.g. ``"sets_masks"``)."""
        return [m for m in self.modifiers if getattr(m.spec, trait)]

    @property
    def owns_lr(self) -> bool:
        """Whether the recipe's ``lr`` modifiers shape this stage's learning rate."""
        return bool(self.with_trait("sets_lr"))


def _lr_of(mod: ResolvedModifier, step: int) -> float:
    spec: LRSpec = mod.spec
    return schedules.lr_in_window(
        step,
        start=mod.window.start,
        end=mod.window.end,
        schedule=spec.schedule,
        init_lr=spec.init_lr,
        final_lr=spec.final_lr,
        warmup=mod.warmup,
        cycle=mod.cycle,
    )


def resolve_stage(recipe: Recipe, stage: StageSpec, steps_per_epoch: int) -> StagePlan:
    """Resolve one stage to optimizer steps (every problem found is in the one PlanError)."""
    if steps_per_epoch <= 0:
        raise PlanError("steps_per_epoch must be positive")
    training = recipe.stage_training(stage)
    total = to_steps(training.steps, training.epochs, steps_per_epoch, None)
    assert total is not None  # the schema requires epochs or steps
    if training.prune_only:
        problems = [
            f"stage {stage.name!r} modifiers.{i}.{name}: {message}"
            for i, name, message in prune_only_problems(stage.modifiers)
        ]
        if problems:
            raise PlanError("\n".join(problems))
    else:
        total = max(total, 1)  # epochs that round to 0 steps still train one
    problems: list[str] = []
    for index, message in overlap_problems(stage.modifiers, recipe, steps_per_epoch):
        problems.append(f"modifiers.{index}: {message}")
    for index, name, message in window_problems(stage.modifiers, training, steps_per_epoch):
        problems.append(f"stage {stage.name!r} modifiers.{index}.{name}: {message}")
    for index, name, message in stage_quantize_problems(stage.modifiers, training, steps_per_epoch):
        problems.append(f"stage {stage.name!r} modifiers.{index}.{name}: {message}")
    resolved: list[ResolvedModifier] = []
    for index, spec in enumerate(stage.modifiers):
        where = f"stage {stage.name!r} modifiers.{index} ({spec.type})"
        mod_or_problem = _resolve_modifier(index, spec, steps_per_epoch, total, where)
        if isinstance(mod_or_problem, str):
            problems.append(mod_or_problem)
        else:
            resolved.append(mod_or_problem)
    if problems:
        raise PlanError("\n".join(problems))
    return StagePlan(
        name=stage.name,
        training=training,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=to_steps(training.warmup_steps, training.warmup_epochs, steps_per_epoch, 0)
        or 0,
        eval_every=to_steps(
            training.eval_every_steps, training.eval_every_epochs, steps_per_epoch, None
        ),
        modifiers=tuple(resolved),
        targets=recipe.targets_of()[0],
        exclude=tuple(recipe.exclude),
    )


def _resolve_modifier(
    index: int, spec: Any, steps_per_epoch: int, total: int, where: str
) -> ResolvedModifier | str:
    """One modifier in steps, or the problem (a message) that keeps it from resolving."""
    start = to_steps(spec.start_step, spec.start_epoch, steps_per_epoch, 0)
    end = to_steps(spec.end_step, spec.end_epoch, steps_per_epoch, None)
    assert start is not None
    if spec.schedules_sparsity:
        return _resolve_pruner(index, spec, start, end, steps_per_epoch, total, where)
    end = total if end is None else end
    if spec.quantizes:
        freeze = to_steps(
            spec.freeze_observers_at_step, spec.freeze_observers_at_epoch, steps_per_epoch, end
        )
        return ResolvedModifier(index, spec, Window(start, end), freeze=min(freeze, end))
    if not spec.sets_lr:
        return ResolvedModifier(index, spec, Window(start, end))
    if end <= start:
        return f"{where}: empty window [{start}, {end})"
    warmup = to_steps(spec.warmup_steps, spec.warmup_epochs, steps_per_epoch, 0) or 0
    cycle = interval(spec.cycle_steps, spec.cycle_epochs, steps_per_epoch)
    if spec.schedule == "cyclic_linear" and (cycle is None or cycle < 1):
        return f"{where}: cycle resolves to {cycle} steps; use at least 1"
    return ResolvedModifier(index, spec, Window(start, end), warmup=warmup, cycle=cycle)


def _resolve_pruner(
    index: int, spec: Any, start: int, end: int | None, steps_per_epoch: int, total: int, where: str
) -> ResolvedModifier | str:
    """A pruning schedule's steps and target sparsities (N:M prunes once, at its start)."""
    update = interval(spec.update_every_steps, spec.update_every_epochs, steps_per_epoch)
    if end is None:
        end = start if update is None else total
    if spec.is_nm:
        end = start  # N:M masks are applied once (one-shot) at start
    if end > start and update is None:
        return f"{where}: a window of several steps needs update_every_steps or update_every_epochs"
    if update is not None and update < 1:
        return f"{where}: update_every resolves to {update} steps; use at least 1"
    steps = schedules.pruning_steps(start, end, update)
    sparsities = [
        schedules.interpolate_sparsity(
            s, start, end, spec.init_sparsity, spec.final_sparsity, spec.schedule
        )
        for s in steps
    ]
    return ResolvedModifier(
        index, spec, Window(start, end), tuple(steps), tuple(sparsities), update_every=update
    )


def resolve(recipe: Recipe, steps_per_epoch: int) -> list[StagePlan]:
    """Resolve every stage of a recipe (same steps_per_epoch for all stages)."""
    return [resolve_stage(recipe, stage, steps_per_epoch) for stage in recipe.resolved_stages()]


def plan_to_dict(plans: Sequence[StagePlan], lr_points: int = 200) -> dict[str, Any]:
    """A JSON-ready description of the compiled schedule."""
    out: dict[str, Any] = {"stages": []}
    for plan in plans:
        mods = []
        for mod in plan.modifiers:
            entry: dict[str, Any] = {
                "index": mod.index,
                "type": mod.type,
                "start_step": mod.window.start,
                "end_step": mod.window.end,
                **mod.plan_fields(),
            }
            mods.append(entry)
        stride = max(1, plan.total_steps // lr_points)
        lr_curve = [[s, plan.lr_at(s)] for s in range(0, plan.total_steps, stride)]
        if lr_curve and lr_curve[-1][0] != plan.total_steps - 1:
            lr_curve.append([plan.total_steps - 1, plan.lr_at(plan.total_steps - 1)])
        out["stages"].append(
            {
                "name": plan.name,
                "steps_per_epoch": plan.steps_per_epoch,
                "total_steps": plan.total_steps,
                "prune_only": plan.training.prune_only,
                "warmup_steps": plan.warmup_steps,
                "eval_every_steps": plan.eval_every,
                "modifiers": mods,
                "lr": lr_curve,
            }
        )
    return out

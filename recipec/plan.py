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
from recipec.recipe.schema import (
    PRUNING_TYPES,
    DistillSpec,
    LRSpec,
    Recipe,
    StageSpec,
    TrainingSpec,
)


class PlanError(ValueError):
    """A recipe that validates but cannot be scheduled for these steps_per_epoch."""


def to_steps(
    value_steps: int | None, value_epochs: float | None, steps_per_epoch: int, default: int | None
) -> int | None:
    """Resolve a ``*_step`` / ``*_epoch`` pair to optimizer steps."""
    if value_steps is not None:
        return int(value_steps)
    if value_epochs is not None:
        return int(round(value_epochs * steps_per_epoch))
    return default


def _interval(
    value_steps: int | None, value_epochs: float | None, steps_per_epoch: int
) -> int | None:
    """An interval in steps; epoch intervals shorter than one step are clamped to one step."""
    steps = to_steps(value_steps, value_epochs, steps_per_epoch, None)
    return None if steps is None else max(1, steps)


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

    @property
    def type(self) -> str:
        return self.spec.type

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
    targets: tuple[str, ...]
    exclude: tuple[str, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def lr_at(self, step: int) -> float:
        """Learning rate at ``step`` (see the module docstring for the ownership rule)."""
        lrs = sorted((m for m in self.modifiers if m.type == "lr"), key=lambda m: m.window.start)
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
        return [m for m in self.modifiers if m.type in types]


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


def _window_raw(spec: Any) -> tuple[tuple[float, str | None], tuple[float, str | None]]:
    """Window bounds in their own unit; defaults are unit-free (0 and +inf)."""
    if getattr(spec, "start_step", None) is not None:
        start = (float(spec.start_step), "step")
    elif getattr(spec, "start_epoch", None) is not None:
        start = (float(spec.start_epoch), "epoch")
    else:
        start = (0.0, None)
    if getattr(spec, "end_step", None) is not None:
        end = (float(spec.end_step), "step")
    elif getattr(spec, "end_epoch", None) is not None:
        end = (float(spec.end_epoch), "epoch")
    else:
        end = (float("inf"), None)
    return start, end


def _targets_key(spec: Any, recipe: Recipe) -> tuple[tuple[str, ...], tuple[str, ...]]:
    targets = getattr(spec, "targets", None) or recipe.targets
    exclude = getattr(spec, "exclude", None)
    return tuple(targets), tuple(recipe.exclude if exclude is None else exclude)


def overlap_problems(
    modifiers: Sequence[Any], recipe: Recipe, steps_per_epoch: int | None
) -> list[tuple[int, str]]:
    """Pairs of modifiers that may not share time: pruning on the same targets, or two LRs.

    With ``steps_per_epoch=None`` only windows whose bounds are in the same unit are compared.
    Pruning windows are closed intervals (prune at both ends); LR windows are half-open.
    """
    problems: list[tuple[int, str]] = []
    items = list(enumerate(modifiers))
    for a_pos, (i, a) in enumerate(items):
        for j, b in items[a_pos + 1 :]:
            same_kind_lr = a.type == "lr" and b.type == "lr"
            both_pruning = a.type in PRUNING_TYPES and b.type in PRUNING_TYPES
            both_distill = a.type == "distill" and b.type == "distill"
            if not (same_kind_lr or both_pruning or both_distill):
                continue
            if both_pruning and _targets_key(a, recipe) != _targets_key(b, recipe):
                continue  # different target sets; the compiler checks actual tensors
            (sa, ua), (ea, uea) = _window_raw(a)
            (sb, ub), (eb, ueb) = _window_raw(b)
            if steps_per_epoch is None:
                units = {u for u in (ua, uea, ub, ueb) if u is not None}
                if len(units) > 1:
                    continue
            else:
                sa, ea = _scale(sa, ua, steps_per_epoch), _scale(ea, uea, steps_per_epoch)
                sb, eb = _scale(sb, ub, steps_per_epoch), _scale(eb, ueb, steps_per_epoch)
            if same_kind_lr or both_distill:
                overlap = sa < eb and sb < ea
            else:
                overlap = sa <= eb and sb <= ea
            if overlap:
                what = (
                    "learning-rate"
                    if same_kind_lr
                    else ("distillation" if both_distill else "pruning")
                )
                problems.append(
                    (
                        j,
                        f"overlaps modifier {i} ({a.type}): two {what} modifiers on the same weights and steps",
                    )
                )
    return problems


def lower_target_problems(recipe: Recipe) -> list[tuple[int, int, str]]:
    """``(stage index, modifier index, message)`` for a gmp/obert whose final sparsity is below
    what an earlier one (an earlier stage, or a window that ends before it starts) reaches on
    the same target patterns: pruned weights stay pruned, so it would prune nothing while the
    plan showed it lowering the sparsity. Windows in different units are not compared here."""

    def ranking(spec: Any) -> Any:
        # same weights, ranked the same way: else a lower target can still prune (a layer a
        # global ranking left at 40% reaches 50% under a per-layer one)
        return _targets_key(spec, recipe), spec.scope, spec.structure

    problems: list[tuple[int, int, str]] = []
    earlier: dict[
        Any, tuple[float, str]
    ] = {}  # ranking -> highest final sparsity of earlier stages
    for stage_index, stage in enumerate(recipe.resolved_stages()):
        pruners = [
            (i, m)
            for i, m in enumerate(stage.modifiers)
            if m.type in ("gmp", "obert") and not m.is_nm
        ]
        for i, spec in pruners:
            key = ranking(spec)
            before = [earlier[key]] if key in earlier else []
            (start, unit), _ = _window_raw(spec)
            for j, other in pruners:
                other_end, other_unit = _window_raw(other)[1]
                if (
                    j != i
                    and ranking(other) == key
                    and unit is not None
                    and other_unit == unit
                    and other_end < start
                ):
                    before.append(
                        (other.final_sparsity, f"modifier {j} ({other.type}) of this stage")
                    )
            if before:
                reached, who = max(before)
                if spec.final_sparsity < reached:
                    problems.append(
                        (
                            stage_index,
                            i,
                            f"final_sparsity {spec.final_sparsity:g} is below the {reached:g} "
                            f"that {who} reaches earlier on the same weights: pruned weights "
                            f"stay pruned, so this modifier would prune nothing; raise it to "
                            f"at least {reached:g} or drop it",
                        )
                    )
        for i, spec in pruners:
            key = ranking(spec)
            if key not in earlier or spec.final_sparsity > earlier[key][0]:
                earlier[key] = (
                    spec.final_sparsity,
                    f"stage {stage.name!r} modifier {i} ({spec.type})",
                )
    return problems


TRAINING_ONLY_TYPES = ("lr", "distill", "cram")


def window_problems(
    modifiers: Sequence[Any], training: Any, steps_per_epoch: int | None
) -> list[tuple[int, str, str]]:
    """``(index, field, message)`` for pruning windows (gmp, obert) that outlast their stage.

    A pruning step after the stage's last step never runs, so the final sparsity would be
    missed without notice. With ``steps_per_epoch=None`` only bounds in the unit of the stage's
    length (epochs or steps) are compared; the planner re-checks everything in steps.
    """
    if training.prune_only:
        return []  # prune_only_problems covers these stages
    total = (
        None  # the stage's last step, when steps_per_epoch is known (as resolve_stage counts it)
    )
    if steps_per_epoch is not None:
        total = max(1, to_steps(training.steps, training.epochs, steps_per_epoch, 0) or 0)
    problems: list[tuple[int, str, str]] = []
    for index, spec in enumerate(modifiers):
        if spec.type not in ("gmp", "obert"):
            continue
        for name in ("start",) if spec.is_nm else ("start", "end"):  # N:M prunes once, at its start
            steps, epochs = getattr(spec, f"{name}_step"), getattr(spec, f"{name}_epoch")
            if total is not None:
                value, last, unit = to_steps(steps, epochs, steps_per_epoch, None), total, "step"
                field = f"{name}_step" if steps is not None else f"{name}_epoch"
            elif epochs is not None and training.epochs is not None:
                value, last, unit, field = epochs, training.epochs, "epoch", f"{name}_epoch"
            elif steps is not None and training.steps is not None:
                value, last, unit, field = steps, training.steps, "step", f"{name}_step"
            else:
                continue
            if value is None or last is None or value <= last:
                continue
            what = "starts" if name == "start" else "ends"
            problems.append(
                (
                    index,
                    field,
                    f"{what} at {unit} {value:g}, after the stage's last {unit} {last:g}: "
                    f"pruning steps after it never run, so final_sparsity "
                    f"{spec.final_sparsity:g} would not be reached; end the window by "
                    f"{unit} {last:g} or train longer",
                )
            )
            break
    return problems


def prune_only_problems(modifiers: Sequence[Any]) -> list[tuple[int, str, str]]:
    """``(index, field, message)`` for modifiers a prune-only stage (``steps: 0``) cannot run.

    Such a stage prunes once at step 0 and takes no optimizer step: modifiers that act on
    training steps have nothing to act on, and pruning windows must be at step 0.
    """
    problems: list[tuple[int, str, str]] = []
    for index, spec in enumerate(modifiers):
        if spec.type in TRAINING_ONLY_TYPES:
            problems.append(
                (
                    index,
                    "type",
                    f"a prune-only stage (training.steps: 0) takes no training step for the "
                    f"{spec.type} modifier to act on; put it in a stage that trains",
                )
            )
            continue
        for name in ("start_step", "start_epoch", "end_step", "end_epoch"):
            value = getattr(spec, name, None)
            if value:  # not None and not 0
                problems.append(
                    (
                        index,
                        name,
                        f"a prune-only stage (training.steps: 0) prunes at step 0 only: "
                        f"leave {name} out or set it to 0",
                    )
                )
    return problems


def _scale(value: float, unit: str | None, steps_per_epoch: int) -> float:
    return value * steps_per_epoch if unit == "epoch" else value


def resolve_stage(recipe: Recipe, stage: StageSpec, steps_per_epoch: int) -> StagePlan:
    """Resolve one stage to optimizer steps."""
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
    warmup = to_steps(training.warmup_steps, training.warmup_epochs, steps_per_epoch, 0) or 0
    eval_every = to_steps(
        training.eval_every_steps, training.eval_every_epochs, steps_per_epoch, None
    )
    problems: list[str] = []
    for index, message in overlap_problems(stage.modifiers, recipe, steps_per_epoch):
        problems.append(f"modifiers.{index}: {message}")
    for index, name, message in window_problems(stage.modifiers, training, steps_per_epoch):
        problems.append(f"stage {stage.name!r} modifiers.{index}.{name}: {message}")
    resolved: list[ResolvedModifier] = []
    for index, spec in enumerate(stage.modifiers):
        start = to_steps(spec.start_step, spec.start_epoch, steps_per_epoch, 0)
        end = to_steps(spec.end_step, spec.end_epoch, steps_per_epoch, None)
        assert start is not None
        where = f"stage {stage.name!r} modifiers.{index} ({spec.type})"
        if spec.type in ("gmp", "obert"):
            update = _interval(spec.update_every_steps, spec.update_every_epochs, steps_per_epoch)
            if end is None:
                end = start if update is None else total
            if spec.is_nm:
                end = start  # N:M masks are applied once (one-shot) at start
            if end > start and update is None:
                problems.append(
                    f"{where}: a window of several steps needs update_every_steps or update_every_epochs"
                )
                continue
            if update is not None and update < 1:
                problems.append(f"{where}: update_every resolves to {update} steps; use at least 1")
                continue
            steps = schedules.pruning_steps(start, end, update)
            sparsities = [
                schedules.interpolate_sparsity(
                    s, start, end, spec.init_sparsity, spec.final_sparsity, spec.schedule
                )
                for s in steps
            ]
            resolved.append(
                ResolvedModifier(
                    index,
                    spec,
                    Window(start, end),
                    tuple(steps),
                    tuple(sparsities),
                    update_every=update,
                )
            )
        elif spec.type == "lr":
            end = total if end is None else end
            if end <= start:
                problems.append(f"{where}: empty window [{start}, {end})")
                continue
            lw = to_steps(spec.warmup_steps, spec.warmup_epochs, steps_per_epoch, 0) or 0
            cycle = _interval(spec.cycle_steps, spec.cycle_epochs, steps_per_epoch)
            if spec.schedule == "cyclic_linear" and (cycle is None or cycle < 1):
                problems.append(f"{where}: cycle resolves to {cycle} steps; use at least 1")
                continue
            resolved.append(
                ResolvedModifier(index, spec, Window(start, end), warmup=lw, cycle=cycle)
            )
        else:
            end = total if end is None else end
            resolved.append(ResolvedModifier(index, spec, Window(start, end)))
    if problems:
        raise PlanError("\n".join(problems))
    return StagePlan(
        name=stage.name,
        training=training,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=warmup,
        eval_every=eval_every,
        modifiers=tuple(resolved),
        targets=tuple(recipe.targets),
        exclude=tuple(recipe.exclude),
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
            }
            if mod.pruning_steps:
                entry["update_every_steps"] = mod.update_every
                entry["pruning"] = [
                    {"step": s, "sparsity": round(sp, 6)}
                    for s, sp in zip(mod.pruning_steps, mod.sparsities)
                ]
                entry["structure"] = mod.spec.structure
                entry["scope"] = mod.spec.scope
            if mod.type == "lr":
                entry.update(
                    schedule=mod.spec.schedule,
                    warmup_steps=mod.warmup,
                    cycle_steps=mod.cycle,
                    init_lr=mod.spec.init_lr,
                    final_lr=mod.spec.final_lr,
                )
            if isinstance(mod.spec, DistillSpec):
                entry.update(
                    teacher=mod.spec.teacher,
                    hardness=mod.spec.hardness,
                    temperature=mod.spec.temperature,
                )
            if mod.type == "cram":
                entry.update(
                    variant=mod.spec.variant,
                    rho=mod.spec.rho,
                    sparsities=list(mod.spec.sparsities),
                    structure=mod.spec.structure,
                    scope=mod.spec.scope,
                )
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

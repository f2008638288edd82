"""Recipe checks that need no model: windows in their own units, overlaps, prune-only stages.

These run while a recipe loads (errors then carry file:line) and again in :mod:`recipec.plan`
once ``steps_per_epoch`` is known. No torch import here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from recipec.recipe.schema import Recipe


def to_steps(
    value_steps: int | None, value_epochs: float | None, steps_per_epoch: int, default: int | None
) -> int | None:
    """Resolve a ``*_step`` / ``*_epoch`` pair to optimizer steps."""
    if value_steps is not None:
        return int(value_steps)
    if value_epochs is not None:
        return int(round(value_epochs * steps_per_epoch))
    return default


def interval(
    value_steps: int | None, value_epochs: float | None, steps_per_epoch: int
) -> int | None:
    """An interval in steps; epoch intervals shorter than one step are clamped to one step."""
    steps = to_steps(value_steps, value_epochs, steps_per_epoch, None)
    return None if steps is None else max(1, steps)


def window_raw(spec: Any) -> tuple[tuple[float, str | None], tuple[float, str | None]]:
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


def targets_key(spec: Any, recipe: Recipe) -> tuple[str | tuple[str, ...], tuple[str, ...]]:
    return recipe.targets_of(spec)


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
            kind = a.overlap_kind
            if kind is None or kind != b.overlap_kind:
                continue
            both_pruning = kind == "pruning"
            if both_pruning and targets_key(a, recipe) != targets_key(b, recipe):
                continue  # different target sets; the compiler checks actual tensors
            (sa, ua), (ea, uea) = window_raw(a)
            (sb, ub), (eb, ueb) = window_raw(b)
            if steps_per_epoch is None:
                units = {u for u in (ua, uea, ub, ueb) if u is not None}
                if len(units) > 1:
                    continue
            else:
                sa, ea = scale(sa, ua, steps_per_epoch), scale(ea, uea, steps_per_epoch)
                sb, eb = scale(sb, ub, steps_per_epoch), scale(eb, ueb, steps_per_epoch)
            # pruning windows are closed (a pruning step at both ends), the others half-open
            overlap = (sa <= eb and sb <= ea) if both_pruning else (sa < eb and sb < ea)
            if overlap:
                what = kind
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
        return targets_key(spec, recipe), spec.scope, spec.structure

    problems: list[tuple[int, int, str]] = []
    earlier: dict[
        Any, tuple[float, str]
    ] = {}  # ranking -> highest final sparsity of earlier stages
    for stage_index, stage in enumerate(recipe.resolved_stages()):
        pruners = [
            (i, m) for i, m in enumerate(stage.modifiers) if m.schedules_sparsity and not m.is_nm
        ]
        for i, spec in pruners:
            key = ranking(spec)
            before = [earlier[key]] if key in earlier else []
            (start, unit), _ = window_raw(spec)
            for j, other in pruners:
                other_end, other_unit = window_raw(other)[1]
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
        if not spec.schedules_sparsity:
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
        if spec.training_only:
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


def scale(value: float, unit: str | None, steps_per_epoch: int) -> float:
    return value * steps_per_epoch if unit == "epoch" else value


def _last_pruning(spec: Any) -> tuple[float, str | None]:
    """A pruner's last pruning step in its own unit: its start for N:M or a one-shot window,
    +inf for a window that runs to the stage's end."""
    start, end = window_raw(spec)
    one_shot = spec.update_every_steps is None and spec.update_every_epochs is None
    if spec.is_nm or (end[1] is None and one_shot):
        return start
    return end


def _before(
    a: tuple[float, str | None], b: tuple[float, str | None], steps_per_epoch: int | None
) -> bool | None:
    """``a < b`` when the two can be compared (same unit, a unit-free bound, or known
    ``steps_per_epoch``); None when they cannot be yet."""
    (va, ua), (vb, ub) = a, b
    if ua is not None and ub is not None and ua != ub:
        if steps_per_epoch is None:
            return None
        va, vb = scale(va, ua, steps_per_epoch), scale(vb, ub, steps_per_epoch)
    return va < vb


def _start_field(spec: Any) -> str:
    if spec.start_epoch is not None:
        return "start_epoch"
    return "start_step" if spec.start_step is not None else "type"


def _shown_bound(bound: tuple[float, str | None]) -> str:
    value, unit = bound
    return "the stage's end" if value == float("inf") else f"{unit or 'step'} {value:g}"


def stage_quantize_problems(
    modifiers: Sequence[Any], training: Any, steps_per_epoch: int | None
) -> list[tuple[int, str, str]]:
    """``(index, field, message)`` for the quantize modifiers of one stage: one per stage (two
    windows that overlap, or a second one that would replace the first), no start before the
    stage's last pruning step, and a calibration pass in a prune-only stage (PTQ)."""
    problems: list[tuple[int, str, str]] = []
    first: tuple[int, Any] | None = None
    for index, spec in enumerate(modifiers):
        if not spec.quantizes:
            continue
        start = window_raw(spec)[0]
        if first is not None:
            j, other = first
            overlap = _before(start, window_raw(other)[1], steps_per_epoch)
            what = "overlaps" if overlap else "follows"
            problems.append(
                (
                    index,
                    "type",
                    f"{what} modifier {j} (quantize): a stage takes one quantize window "
                    "(fake-quant stays on to the end of the run once started)",
                )
            )
            continue
        first = (index, spec)
        for j, pruner in enumerate(modifiers):
            if not pruner.schedules_sparsity:
                continue
            last = _last_pruning(pruner)
            if _before(start, last, steps_per_epoch):
                problems.append(
                    (
                        index,
                        _start_field(spec),
                        f"quantization starts at {_shown_bound(start)}, before the last pruning "
                        f"step of modifier {j} ({pruner.type}) at {_shown_bound(last)}: start "
                        "quantize when pruning has ended (masks must be final)",
                    )
                )
        if training.prune_only and spec.calibration_batches == 0:
            problems.append(
                (
                    index,
                    "calibration_batches",
                    "a steps: 0 stage quantizes after training (PTQ): set calibration_batches "
                    "(e.g. 32) so the input ranges are observed on training batches",
                )
            )
    return problems


def later_pruning_problems(recipe: Recipe) -> list[tuple[int, int | None, str]]:
    """``(stage index, modifier index or None, message)`` for the stages after one that
    quantizes: a pruner there would change the masks under the int8 weights, and a stage
    without its own quantize modifier would train on with fake-quant state that a resumed run
    cannot restore (each stage's checkpoint holds its own modifiers' state)."""
    problems: list[tuple[int, int | None, str]] = []
    quantized_in: str | None = None
    for stage_index, stage in enumerate(recipe.resolved_stages()):
        quantizes = any(spec.quantizes for spec in stage.modifiers)
        if quantized_in is not None and not quantizes:
            problems.append(
                (
                    stage_index,
                    None,
                    f"follows stage {quantized_in!r}, which quantizes: give this stage its own "
                    "quantize modifier (fake-quant carries on through the rest of the run) or "
                    "make the quantizing stage the last one",
                )
            )
        for index, spec in enumerate(stage.modifiers):
            if quantized_in is not None and spec.schedules_sparsity:
                problems.append(
                    (
                        stage_index,
                        index,
                        f"prunes after quantization started (stage {quantized_in!r}): prune "
                        "first, then quantize in this stage or a later one",
                    )
                )
        if quantizes:
            quantized_in = stage.name
    return problems

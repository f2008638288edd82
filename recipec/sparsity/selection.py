"""Which parameters a recipe prunes: ``targets`` / ``exclude`` resolved on a model, and the checks
that make a wrong selection fail before any training.

``targets`` is ``"encoder"`` (the default): every encoder linear layer of the model's
architecture, found from its structure by :func:`recipec.architectures.default_target_names`
(Q, K, V or a fused QKV, the attention output, the FFN input or fused GLU input, the FFN output);
or a list of regular expressions matched with ``re.search`` against the full names of
``model.named_parameters()``, exactly as written. ``exclude`` regexes remove parameters from
either. A parameter shared by several modules (ALBERT's layer, run at every depth) has one name:
it is selected, pruned and counted once.

:func:`check_targets` resolves every pruning modifier of a recipe on a model and reports what
``recipec plan --model`` and ``recipec apply`` refuse: targets that select nothing (or
tensors that cannot be pruned as asked), and encoder linear layers of a known family that no
pruning modifier selects and no ``exclude`` names (they would silently stay dense).
:func:`cost_table` is the cost/benefit table of ``recipec plan --model``, built on
:func:`recipec.architectures.component_costs`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from recipec import architectures as arch
from recipec.recipe.schema import ENCODER_TARGETS, Recipe
from recipec.recipe.structure import parse_structure

Targets = str | Sequence[str]


class SelectionError(ValueError):
    """Targets that match nothing, or that match parameters that cannot be pruned as asked."""


def _encoder_names(model: nn.Module) -> set[str]:
    try:
        return set(arch.default_target_names(model))
    except arch.ArchitectureError as exc:
        raise SelectionError(f"targets: {ENCODER_TARGETS}: {exc}") from None


def select_parameters(
    model: nn.Module, targets: Targets, exclude: Sequence[str] = ()
) -> dict[str, nn.Parameter]:
    """Parameters selected by ``targets`` (``"encoder"`` or regexes) and no exclude, in model
    order (each shared parameter once)."""
    if isinstance(targets, str):
        if targets != ENCODER_TARGETS:
            raise SelectionError(f"unknown targets {targets!r}: use {ENCODER_TARGETS!r} or regexes")
        names = _encoder_names(model)
        chosen = {n: p for n, p in model.named_parameters() if n in names}
    else:
        target_res = [re.compile(t) for t in targets]
        chosen = {n: p for n, p in model.named_parameters() if any(r.search(n) for r in target_res)}
    exclude_res = [re.compile(e) for e in exclude]
    return {n: p for n, p in chosen.items() if not any(r.search(n) for r in exclude_res)}


def _describe(targets: Targets) -> str:
    return ENCODER_TARGETS if isinstance(targets, str) else str(list(targets))


def _nothing_message(model: nn.Module, targets: Targets, exclude: Sequence[str], what: str) -> str:
    sample = ", ".join(name for name, _ in list(model.named_parameters())[:6])
    message = (
        f"the {what}'s targets match no parameter of {type(model).__name__} "
        f"(targets: {_describe(targets)}; exclude: {list(exclude)})."
    )
    if isinstance(targets, str) and arch.family_of(model) is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        known = ", ".join(sorted(arch.FAMILIES))
        message += (
            f" Its architecture (model_type {model_type!r}) is not one recipec knows ({known}) "
            "and its encoder blocks do not look like Q, K, V, attention output, FFN in and out: "
            "give targets as regexes over parameter names."
        )
    return f"{message} Parameter names look like: {sample}, ..."


def _regex_hint(targets: Targets) -> str:
    if not isinstance(targets, str) and ENCODER_TARGETS in targets:
        return (
            f" (In a list, {ENCODER_TARGETS!r} is a regex; write `targets: {ENCODER_TARGETS}` "
            "without brackets for every encoder linear layer.)"
        )
    return ""


def require_parameters(
    model: nn.Module,
    targets: Targets,
    exclude: Sequence[str] = (),
    *,
    what: str = "recipe",
    structure: str = "unstructured",
) -> dict[str, nn.Parameter]:
    """Like :func:`select_parameters`, but an empty selection, a 1-D target (bias or norm) or,
    for block and N:M structures, a tensor whose input dimension is not divisible by the
    structure's group is a :class:`SelectionError`."""
    group = parse_structure(structure).group
    selected = select_parameters(model, targets, exclude)
    if not selected:
        raise SelectionError(_nothing_message(model, targets, exclude, what))
    for name, param in selected.items():
        if param.dim() < 2:
            # Biases and LayerNorm vectors: pruning them saves nothing and harms accuracy.
            raise SelectionError(
                f"target {name!r} is a {param.dim()}-D tensor (bias or norm); only weight "
                f"matrices can be pruned. Add it to 'exclude' or narrow 'targets'."
                + _regex_hint(targets)
            )
        if group > 1 and (param.dim() != 2 or param.shape[-1] % group):
            raise SelectionError(
                f"{what}: structure {structure} needs 2-D weights whose input dimension is "
                f"divisible by {group}; {name} has shape {tuple(param.shape)}"
            )
    return selected


def layer_rows(model: nn.Module, names: Iterable[str]) -> dict[str, tuple[torch.Tensor, ...]]:
    """The per-layer ranking units of the fused tensors among ``names``.

    A fused tensor holds several layers: ModernBERT's ``Wqkv`` holds Q, K and V, its GLU input
    ``Wi`` the gate and the up projection, DeBERTa v1's ``in_proj`` Q, K and V interleaved per
    head. ``scope: per_layer`` ranks each of them as the layer it is, as on BERT where they are
    separate tensors. Returns name -> row indices of each layer (``LinearInfo.parts()``); a
    tensor holding one layer is absent. A model whose blocks the family table cannot read gives
    ``{}`` (every tensor one layer).
    """
    try:
        infos = arch.encoder_linears(model)
    except arch.ArchitectureError:
        return {}
    wanted = set(names)
    return {
        info.param_name: tuple(info.parts().values())
        for info in infos
        if info.param_name in wanted and len(info.slices) > 1
    }


# --------------------------------------------------------------------------- recipe checks


@dataclass(frozen=True)
class TargetCheck:
    """What a recipe's pruning modifiers select on one model (see :func:`check_targets`).

    Attributes:
        family: The model's family (``recipec.architectures.family_of``), or None.
        selected: ``(stage name, modifier index)`` -> selected parameter names, for every
            pruning modifier whose targets resolved.
        problems: One message per pruning modifier whose targets cannot be used.
        dense: Encoder linear weights of a known family that no pruning modifier selects and
            no ``exclude`` names: they would silently stay dense.
        excluded: Encoder linear weights left dense on purpose (an ``exclude`` names them).
    """

    family: str | None
    selected: dict[tuple[str, int], list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    dense: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)

    def stage_names(self, stage: str) -> list[str]:
        """Every name the pruning modifiers of ``stage`` select, each once, in first-seen order."""
        names: dict[str, None] = {}
        for (name, _), selected in self.selected.items():
            if name == stage:
                names.update(dict.fromkeys(selected))
        return list(names)

    def error(self) -> str | None:
        """Why the recipe must not run on this model (every problem), or None."""
        lines = list(self.problems)
        if self.dense:
            lines.append(
                f"{len(self.dense)} encoder linear layer(s) of this {self.family} model would stay "
                "dense: no pruning modifier selects them and no exclude names them:"
            )
            lines += [f"  {line}" for line in grouped_names(self.dense)]
            lines.append(
                f"Select them (`targets: {ENCODER_TARGETS}`, the default, is every encoder "
                "linear layer) or name them in `exclude` to keep them dense on purpose."
            )
        return "\n".join(lines) if lines else None


def _where(recipe: Recipe, stage: str, index: int, kind: str) -> str:
    if recipe.stages is None:
        return f"{kind} modifier [{index}]"
    return f"stage {stage!r} {kind} modifier [{index}]"


def check_targets(model: nn.Module, recipe: Recipe) -> TargetCheck:
    """Resolve every pruning modifier's targets of every stage on ``model`` (meta tensors do).

    A recipe without pruning modifiers selects nothing and has nothing to check. Otherwise every
    pruning modifier must select prunable tensors (:func:`require_parameters`, its structure's
    group size included), and on a model of a known family every encoder linear layer must be
    selected by at least one of them or named by one of their ``exclude`` regexes.
    """
    check = TargetCheck(arch.family_of(model))
    chosen: set[str] = set()
    excludes: list[str] = []
    pruners = [
        (stage.name, index, spec)
        for stage in recipe.resolved_stages()
        for index, spec in enumerate(stage.modifiers)
        if spec.prunes
    ]
    for stage, index, spec in pruners:
        targets, exclude = recipe.targets_of(spec)
        excludes += exclude
        what = _where(recipe, stage, index, spec.type)
        try:
            structure = getattr(spec, "structure", "unstructured")
            params = require_parameters(model, targets, exclude, what=what, structure=structure)
        except SelectionError as exc:
            check.problems.append(str(exc))
            continue
        check.selected[(stage, index)] = list(params)
        chosen.update(params)
    if not pruners or check.family is None:
        return check
    try:
        encoder = arch.default_target_names(model)
    except arch.ArchitectureError as exc:
        check.problems.append(f"cannot list the encoder linear layers: {exc}")
        return check
    exclude_res = [re.compile(e) for e in dict.fromkeys(excludes)]
    for name in encoder:
        if name not in chosen:
            named = any(r.search(name) for r in exclude_res)
            (check.excluded if named else check.dense).append(name)
    return check


def dense_encoder_linears(model: nn.Module, pruned: Iterable[str]) -> list[str] | None:
    """Encoder linear weights (``targets: encoder``) not in ``pruned``; None when the model's
    encoder linear layers cannot be found."""
    try:
        encoder = arch.default_target_names(model)
    except arch.ArchitectureError:
        return None
    pruned = set(pruned)
    return [name for name in encoder if name not in pruned] if encoder else None


def _ranges(numbers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2,5``."""
    parts: list[str] = []
    first = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is None or n != prev + 1:
            parts.append(str(first) if first == prev else f"{first}-{prev}")
            first = n
        prev = n
    return ",".join(parts)


def grouped_names(
    names: Iterable[str], shapes: Mapping[str, Sequence[int]] | None = None
) -> list[str]:
    """Names that differ only in their first layer number, one line each (first-seen order):
    ``bert.encoder.layer.{0-5}.attention.self.query.weight``, followed by `` [384, 384]`` when
    ``shapes`` are given (names of different shapes are never grouped)."""
    groups: dict[tuple[str, tuple[int, ...] | None], list[int]] = {}
    for name in names:
        shape = tuple(shapes[name]) if shapes is not None else None
        found = re.search(r"\.(\d+)\.", name)
        if found is None:
            groups[(name, shape)] = []
            continue
        pattern = name[: found.start(1)] + "{}" + name[found.end(1) :]
        groups.setdefault((pattern, shape), []).append(int(found.group(1)))
    lines = []
    for (pattern, shape), layers in groups.items():
        if len(layers) > 1:
            pattern = pattern.replace("{}", "{" + _ranges(sorted(layers)) + "}")
        elif layers:
            pattern = pattern.replace("{}", str(layers[0]))
        lines.append(pattern if shape is None else f"{pattern} {list(shape)}")
    return lines


# --------------------------------------------------------------------------- costs


@dataclass(frozen=True)
class ComponentCost:
    """One row of the cost/benefit table.

    Attributes:
        component: One of ``recipec.architectures.COMPONENTS``.
        params: Parameters (a shared parameter counted once).
        flops: Matrix-product FLOPs per sequence (a shared layer counted per use).
        pruned_params: Parameters of the component among the targets.
    """

    component: str
    params: int
    flops: float
    pruned_params: int

    def row(self, total_params: int, total_flops: float) -> tuple[str, int, float, float, int]:
        return (
            self.component,
            self.params,
            100.0 * self.params / max(total_params, 1),
            100.0 * self.flops / max(total_flops, 1.0),
            self.pruned_params,
        )


def cost_table(model: nn.Module, seq_len: int, targets: Iterable[str] = ()) -> list[ComponentCost]:
    """Parameters, FLOPs and targeted parameters per component at ``seq_len`` tokens.

    The counts are :func:`recipec.architectures.component_costs` (FLOPs per executed layer,
    see there); components with neither parameters nor FLOPs are left out.
    """
    costs = arch.component_costs(model, seq_len)
    components = arch.param_components(model)
    params = dict(model.named_parameters())
    pruned = dict.fromkeys(costs, 0)
    for name in set(targets):
        pruned[components[name]] += params[name].numel()
    return [
        ComponentCost(c.component, c.params, c.flops, pruned[c.component])
        for c in costs.values()
        if c.params or c.flops
    ]


def component_sparsity(model: nn.Module, zeros: Mapping[str, int]) -> dict[str, float]:
    """Fraction of zeros per component (``zeros``: name -> exact zeros, absent = none)."""
    components = arch.param_components(model)
    counts: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        entry = counts.setdefault(components[name], [0, 0])
        entry[0] += param.numel()
        entry[1] += zeros.get(name, 0)
    return {c: (z / n if n else 0.0) for c, (n, z) in counts.items()}


__all__ = [
    "ComponentCost",
    "SelectionError",
    "TargetCheck",
    "check_targets",
    "component_sparsity",
    "cost_table",
    "dense_encoder_linears",
    "grouped_names",
    "layer_rows",
    "require_parameters",
    "select_parameters",
]

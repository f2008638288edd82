"""Physically smaller models: heads, FFN neurons and encoder layers removed from the modules.

transformers 5.24 has no ``prune_heads`` any more and its BERT-family configs take one head
count and one FFN width for every layer, so recipec shrinks the stock modules itself and
records what it did in the model's config under :data:`STRUCTURE_KEY`::

    "recipec_structure": {
      "format": 1,
      "num_attention_heads": 12, "intermediate_size": 1536,   # per layer before shrinking
      "source_num_layers": 6, "source_layers": [0, 2, 5],     # after a layer drop
      "layers": {"0": {"heads": [0, 1, 3, ...], "intermediate_size": 768}, ...}
    }

``layers`` is keyed by the current storage index of each encoder block; ``heads`` are the kept
heads in the numbering of the unshrunk layer (MPNet needs them to pick its rows of the shared
relative-position bias), ``intermediate_size`` the kept FFN width. recipec's loader
(:func:`recipec.models.load_model`) builds the stock model from the config, applies the record
(:func:`apply_record_`) and loads the weights strictly. A stock ``from_pretrained`` of a shrunk
folder raises (every shrunk tensor's shape disagrees with the config), never loads silently.

Per family (what :func:`shrink_` does beyond slicing linears):

- BERT, RoBERTa/XLM-R/CamemBERT, ELECTRA, DistilBERT, ALBERT, ModernBERT: the attention's head
  count attributes are updated (the forward reshapes with ``-1`` heads anyway);
- DeBERTa-v2/v3: ``num_attention_heads`` and ``all_head_size`` must be updated (its reshapes
  read them: left stale the model computes garbage silently); the relative-position projections
  (``share_att_key: false``) lose the rows of removed heads;
- DeBERTa v1: the same, plus its per-head interleaved ``in_proj`` rows and ``q_bias``/``v_bias``;
  talking heads (``talking_head: true``) mix heads and are refused;
- MPNet: one ``(buckets, heads)`` relative-position table feeds every layer, so a forward
  pre-hook on each shrunk attention selects its kept heads' rows of the bias (traced into
  ONNX); the kept head indices are a non-persistent buffer rebuilt from the record on load.

Every layer keeps at least one head and one FFN neuron (DeBERTa and MPNet cannot run a layer
without heads; :func:`keep_from_masks` keeps one zero-output group where all could go, which
changes nothing in the outputs). Layers (:func:`drop_layers_`) are removed from the block list
and the config's layer count (and ModernBERT's ``layer_types``) updated, so the model stays a
stock one of fewer layers.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from recipec.architectures import STRUCTURE_KEY, encoder_blocks, family_of
from recipec.sparsity.structured import (
    KINDS,
    GroupSet,
    StructureError,
    all_group_sets,
    group_sets,
    removable_groups,
)

__all__ = [
    "FORMAT",
    "STRUCTURE_KEY",
    "apply_record_",
    "drop_layers_",
    "keep_from_masks",
    "read_record",
    "shrink_",
    "slice_tensors",
]

FORMAT = 1
_HEAD_ATTRS = ("num_attention_heads", "n_heads", "num_heads")

IndexMap = dict[str, tuple[int, torch.Tensor]]
"""Parameter name -> (axis, kept indices along it), as :func:`shrink_` returns."""


def read_record(model_or_config) -> dict:
    """A copy of the structure record of a model or config (empty when there is none)."""
    config = getattr(model_or_config, "config", model_or_config)
    record = getattr(config, STRUCTURE_KEY, None)
    return copy.deepcopy(record) if isinstance(record, dict) else {}


def _write_record(model: nn.Module, record: dict) -> None:
    setattr(model.config, STRUCTURE_KEY, record)


def _fresh_record(model: nn.Module) -> dict:
    record = read_record(model)
    if not record:
        config = model.config
        record = {"format": FORMAT}
        for kind, attr in (("heads", "num_attention_heads"), ("neurons", "intermediate_size")):
            try:
                sets = group_sets(model, kind)
            except StructureError:
                continue
            record[attr] = sets[0].count if sets else getattr(config, attr, None)
    record.setdefault("layers", {})
    return record


# --------------------------------------------------------------------------- heads, neurons


def keep_from_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The groups that can go: per ``GroupSet.key``, bool ``[count]`` (True = keep).

    A head or neuron is removable when its output-side slice (attention output columns, FFN
    output column) is entirely pruned in ``masks``: it adds nothing to its block's output. Only
    sets with something to remove are returned; a set whose every group is removable keeps its
    first one (zero output).
    """
    keep: dict[str, torch.Tensor] = {}
    for gs in all_group_sets(model):
        removable = removable_groups(gs, masks)
        if not removable.any():
            continue
        kept = ~removable
        if not kept.any():
            kept[0] = True
        keep[gs.key] = kept
    return keep


def _check_family(model: nn.Module) -> None:
    if family_of(model) is None:
        raise StructureError(
            f"model type {getattr(model.config, 'model_type', '?')!r} is not in "
            "recipec.architectures.FAMILY_TABLE: recipec does not know how to shrink it"
        )


def _kept_indices(size: int, removed: set[int]) -> torch.Tensor:
    return torch.tensor([i for i in range(size) if i not in removed], dtype=torch.long)


def _replace_linear(model: nn.Module, name: str, axis: int, kept: torch.Tensor) -> nn.Linear:
    old = model.get_submodule(name)
    weight = old.weight.detach().index_select(axis, kept.to(old.weight.device))
    bias = old.bias
    if bias is not None and axis == 0:
        bias = bias.detach().index_select(0, kept.to(bias.device))
    new = nn.Linear(
        weight.shape[1],
        weight.shape[0],
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias.detach())
    new.weight.requires_grad_(old.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    new.train(old.training)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return new


def _replace_vector(model: nn.Module, param: str, kept: torch.Tensor) -> None:
    owner, _, attr = param.rpartition(".")
    module = model.get_submodule(owner)
    old = getattr(module, attr)
    new = nn.Parameter(old.detach().index_select(0, kept.to(old.device)).clone())
    new.requires_grad_(old.requires_grad)
    setattr(module, attr, new)


def _removed_positions(
    sets: Mapping[str, GroupSet], keep: Mapping[str, torch.Tensor]
) -> dict[tuple[str, str, int], set[int]]:
    removed: dict[tuple[str, str, int], set[int]] = {}
    for key, kept in keep.items():
        if key not in sets:
            raise StructureError(f"{key}: no such heads/neurons in this model")
        gs, kept = sets[key], kept.to(torch.bool).cpu()
        if kept.numel() != gs.count:
            raise StructureError(f"{key}: {kept.numel()} entries for {gs.count} groups")
        if not kept.any():
            raise StructureError(f"{key}: every group would be removed; keep at least one")
        if kept.all():
            continue
        for s in gs.slices:
            positions = removed.setdefault((s.module, s.param, s.axis), set())
            positions.update(s.index[~kept].reshape(-1).tolist())
    return removed


def shrink_(model: nn.Module, keep: Mapping[str, torch.Tensor], *, record: bool = True) -> IndexMap:
    """Remove the heads and FFN neurons that ``keep`` drops, in place.

    Args:
        model: A model of a family in :data:`recipec.architectures.FAMILY_TABLE`.
        keep: ``GroupSet.key`` (``"heads:3"``, ``"neurons:0"``) -> bool ``[count]``, True = keep.
            Sets not named keep everything.
        record: Write what was removed into the config's :data:`STRUCTURE_KEY` record.

    Returns:
        The kept indices of every sliced parameter (:func:`slice_tensors` slices masks with it).

    Raises:
        StructureError: An unknown family or set, a set losing every group, talking heads.
    """
    _check_family(model)
    sets = {gs.key: gs for kind in KINDS for gs in _sets_or_empty(model, kind)}
    params = dict(model.named_parameters())
    index_map: IndexMap = {}
    # The record of the original sizes is read before any module shrinks (group_sets of a half
    # shrunk attention fails or counts the new FFN width).
    rec = _fresh_record(model) if record else None
    for (module, param, axis), removed in _removed_positions(sets, keep).items():
        kept = _kept_indices(params[param].shape[axis], removed)
        if isinstance(model.get_submodule(module), nn.Linear) and param.endswith(".weight"):
            new = _replace_linear(model, module, axis, kept)
            index_map[param] = (axis, kept)
            if axis == 0 and new.bias is not None:
                index_map[module + ".bias"] = (0, kept)
        else:
            _replace_vector(model, param, kept)
            index_map[param] = (0, kept)
    for key, kept in keep.items():
        gs = sets[key]
        kept = kept.to(torch.bool).cpu()
        if gs.kind == "heads":
            _set_heads(model, gs, kept, rec)
        elif rec is not None:
            entry = rec["layers"].setdefault(str(gs.layer), {})
            entry["intermediate_size"] = int(kept.sum())
    if rec is not None:
        _write_record(model, rec)
    return index_map


def _sets_or_empty(model: nn.Module, kind: str) -> list[GroupSet]:
    try:
        return group_sets(model, kind)
    except StructureError as exc:
        if kind == "heads" and "talking heads" in str(exc):
            raise
        return []


def _set_heads(model: nn.Module, gs: GroupSet, kept: torch.Tensor, rec: dict | None) -> None:
    """Head-count attributes, MPNet's bias hook and the record for one shrunk attention."""
    attention = model.get_submodule(gs.attention)
    count = int(kept.sum())
    for attr in _HEAD_ATTRS:
        if isinstance(getattr(attention, attr, None), int):
            setattr(attention, attr, count)
    if isinstance(getattr(attention, "all_head_size", None), int):
        attention.all_head_size = count * gs.width
    previous = getattr(attention, "recipec_kept_heads", None)
    original = torch.nonzero(kept).reshape(-1)
    if previous is not None:  # shrunk before: indices into the unshrunk layer
        original = previous[original]
    if family_of(model) == "mpnet":
        attention.register_buffer("recipec_kept_heads", original.clone(), persistent=False)
        if not getattr(attention, "_recipec_bias_hook", False):
            attention.register_forward_pre_hook(_select_bias_heads)
            attention._recipec_bias_hook = True
    if rec is not None:
        entry = rec["layers"].setdefault(str(gs.layer), {})
        if "heads" in entry:  # compose with an earlier shrink
            original = torch.tensor(entry["heads"], dtype=torch.long)[
                torch.nonzero(kept).reshape(-1)
            ]
        entry["heads"] = [int(h) for h in original]


def _select_bias_heads(module: nn.Module, args: tuple) -> tuple | None:
    """MPNet: keep the shrunk attention's heads of the shared relative-position bias."""
    if len(args) > 2 and args[2] is not None:
        kept = module.recipec_kept_heads.to(args[2].device)
        return (*args[:2], args[2].index_select(1, kept), *args[3:])
    return None


def slice_tensors(
    tensors: Mapping[str, torch.Tensor], index_map: IndexMap
) -> dict[str, torch.Tensor]:
    """Tensors (masks, state) of the unshrunk model, sliced like :func:`shrink_` sliced the
    parameters; names not in ``index_map`` are returned unchanged."""
    out = {}
    for name, t in tensors.items():
        if name in index_map:
            axis, kept = index_map[name]
            t = t.index_select(axis, kept.to(t.device))
        out[name] = t
    return out


def apply_record_(model: nn.Module, record: Mapping | None = None) -> IndexMap:
    """Give a stock model (built from a shrunk model's config) the recorded shapes, so that
    the shrunk weights load strictly. Layer drops are already in the config's layer count."""
    record = read_record(model) if record is None else record
    saved = getattr(model.config, STRUCTURE_KEY, None)
    # The stock model still has every head: its groups are read with no record in the config.
    _write_record(model, {})
    try:
        return _apply_record(model, record)
    finally:
        if saved is None:
            delattr(model.config, STRUCTURE_KEY)
        else:
            _write_record(model, saved)


def _apply_record(model: nn.Module, record: Mapping) -> IndexMap:
    keep: dict[str, torch.Tensor] = {}
    for layer, entry in (record.get("layers") or {}).items():
        for kind, field in (("heads", "heads"), ("neurons", "intermediate_size")):
            if field not in entry:
                continue
            sets = {gs.key: gs for gs in group_sets(model, kind, layers=[int(layer)])}
            gs = sets[f"{kind}:{layer}"]
            if kind == "heads":
                kept = torch.zeros(gs.count, dtype=torch.bool)
                kept[torch.tensor(entry["heads"], dtype=torch.long)] = True
            else:
                kept = torch.arange(gs.count) < int(entry["intermediate_size"])
            keep[gs.key] = kept
    return shrink_(model, keep, record=False) if keep else {}


# --------------------------------------------------------------------------- layers


def _layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    blocks = encoder_blocks(model)
    parents = {b.name.rpartition(".")[0] for b in blocks}
    if len(parents) != 1:
        raise StructureError("layers can be dropped from one list of encoder blocks only")
    name = parents.pop()
    return name, model.get_submodule(name)


def _check_drop(model: nn.Module, positions: list[int], count: int) -> None:
    family = family_of(model)
    if family == "modernbert" and 0 not in positions:
        raise StructureError(
            "ModernBERT's first layer has no attention norm (the others do): keep layer 0"
        )
    encoder = getattr(getattr(model, "base_model", model), "encoder", None)
    if family == "deberta-v2" and getattr(encoder, "conv", None) is not None and 0 not in positions:
        raise StructureError("DeBERTa-v2's convolution runs after the first layer: keep layer 0")
    if len(set(positions)) != len(positions) or not positions:
        raise StructureError(f"layers to keep must be distinct and not empty, got {positions}")
    if any(not 0 <= p < count for p in positions):
        raise StructureError(f"layers to keep {positions} are not all in 0..{count - 1}")


def drop_layers_(model: nn.Module, keep: Sequence[int]) -> dict[str, str]:
    """Keep only the encoder layers ``keep`` (numbered as in the model before any drop), in place.

    Idempotent: the record's ``source_layers`` says which original layers the model still has,
    so asking again for the same set changes nothing, and a subset drops the others.

    Returns:
        Old -> new name of every parameter that moved (renumbered layers).

    Raises:
        StructureError: A layer already dropped, an unsupported family layout (ALBERT with
            several layer groups), or a layer the family needs (see :func:`_check_drop`).
    """
    _check_family(model)
    rec = _fresh_record(model)
    config = model.config
    if family_of(model) == "albert":
        return _drop_albert(model, keep, rec)
    list_name, layers = _layer_list(model)
    source = list(rec.get("source_layers") or range(len(layers)))
    wanted = sorted(set(int(k) for k in keep))
    missing = [k for k in wanted if k not in source]
    if missing:
        raise StructureError(f"layers {missing} are not in the model (it has layers {source})")
    if wanted == source:
        return {}
    positions = [source.index(k) for k in wanted]
    _check_drop(model, positions, len(layers))
    before = {id(p): n for n, p in model.named_parameters()}
    parent, _, child = list_name.rpartition(".")
    setattr(model.get_submodule(parent), child, nn.ModuleList([layers[p] for p in positions]))
    config.num_hidden_layers = len(positions)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[p] for p in positions]
    owner = model.get_submodule(parent)
    if isinstance(getattr(owner, "n_layers", None), int):
        owner.n_layers = len(positions)
    rec.setdefault("source_num_layers", len(source))
    rec["source_layers"] = wanted
    rec["layers"] = {
        str(new): rec["layers"][str(old)]
        for new, old in enumerate(positions)
        if str(old) in rec.get("layers", {})
    }
    _write_record(model, rec)
    return {old: n for n, p in model.named_parameters() if (old := before.get(id(p))) != n}


def _drop_albert(model: nn.Module, keep: Sequence[int], rec: dict) -> dict[str, str]:
    """ALBERT runs one shared layer group ``num_hidden_layers`` times: with one group, keeping
    ``k`` executions is the same whichever ``k``; several groups are refused."""
    config = model.config
    if config.num_hidden_groups != 1:
        raise StructureError("ALBERT with several layer groups: dropping layers is not supported")
    source = list(rec.get("source_layers") or range(config.num_hidden_layers))
    wanted = sorted(set(int(k) for k in keep))
    missing = [k for k in wanted if k not in source]
    if missing or not wanted:
        raise StructureError(f"layers {missing or wanted} are not in the model (it has {source})")
    rec.setdefault("source_num_layers", len(source))
    rec["source_layers"] = wanted
    config.num_hidden_layers = len(wanted)
    _write_record(model, rec)
    return {}

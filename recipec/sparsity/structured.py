"""Structured groups of BERT-family encoders: attention heads and FFN neurons.

A **group** is everything one head (or one FFN neuron) owns, across the tensors of its block:

- a head ``h`` of a block with ``H`` heads of width ``d``: rows ``[h d, (h+1) d)`` of Q, K and V
  (of each part of a fused ``Wqkv``, or of DeBERTa v1's per-head interleaved ``in_proj``, found
  with :meth:`recipec.architectures.LinearInfo.rows`), and columns ``[h d, (h+1) d)`` of the
  attention output. Not masked, but removed with the head when a model is shrunk: the rows of
  the relative-position projections (role ``attn_score``) and DeBERTa v1's ``q_bias``/``v_bias``;
- a neuron ``j`` of an FFN of width ``N``: row ``j`` of the up projection (both halves of a
  fused GLU: ``gate[j]`` and ``up[j]``) and column ``j`` of the down projection.

Masks on groups are whole groups (:func:`group_masks`): every element of a removed head or
neuron is False, in every tensor it spans; a head is never split. A group counts as removed
when all its masked elements are False (:func:`kept_groups`). The output-side slice (attention
output columns, FFN output column) alone decides what the group adds to the block's output,
so a group whose output-side slice is all pruned can be removed exactly
(:func:`removable_groups`), whoever pruned it.

Saliency (higher = more important):

- ``magnitude``: the L2 norm of the group's weights, all its tensors together
  (:func:`magnitude_group_scores`);
- ``fisher``: oBERT's group saliency ``rho_Q = 1/2 w_Q^T ([F^-1]_QQ)^-1 w_Q`` with the
  block-diagonal inverse empirical Fisher of :mod:`recipec.sparsity.fisher`
  (:func:`fisher_group_scores`). ``F^-1`` is block diagonal (per tensor, per Fisher block), so
  ``[F^-1]_QQ`` and its inverse are block diagonal too and the quadratic form is the sum, over
  the Fisher blocks ``b`` the group meets, of ``1/2 w_{Q b}^T ([F^-1]_{Q b, Q b})^-1 w_{Q b}``
  with the principal sub-block on the group's own elements of that block (a Fisher block that
  straddles two groups is split, never inverted whole). Tensors whose groups are columns
  (attention output, FFN output) are flattened column-major for the Fisher, so a Fisher block
  holds weights of one column, i.e. of one group, as rows do for Q/K/V and the up projection.
  Groups that span several tensors sum the terms of every tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from recipec.architectures import LinearInfo, encoder_linears, family_of
from recipec.sparsity.fisher import BlockFisherInverse

__all__ = [
    "KINDS",
    "GroupSet",
    "GroupSlice",
    "StructureError",
    "fisher_group_scores",
    "group_masks",
    "group_sets",
    "kept_groups",
    "magnitude_group_scores",
    "model_facts",
    "removable_groups",
    "removed_weights",
    "select_groups",
]

KINDS = ("heads", "neurons")

_QKV_ROLES = ("q", "k", "v")


class StructureError(ValueError):
    """A model whose heads or neurons cannot be grouped (or a request that cannot be met)."""


@dataclass(frozen=True)
class GroupSlice:
    """The part of one tensor that the groups of a :class:`GroupSet` own.

    Attributes:
        param: Parameter name (``model.named_parameters()``).
        module: Module owning it (the ``nn.Linear``, or the module of a bare parameter).
        axis: 0: rows (output features, or the entries of a 1-D parameter); 1: columns.
        index: ``[groups, width]`` row or column indices of each group.
        target: A target weight: masked by structured pruning and scored by saliencies.
            Non-target slices (``attn_score`` rows, ``q_bias``) are only removed on shrink.
        output: The output-side slice (attention output or FFN output columns).
    """

    param: str
    module: str
    axis: int
    index: torch.Tensor
    target: bool = True
    output: bool = False


@dataclass(frozen=True)
class GroupSet:
    """The heads (or FFN neurons) of one encoder block.

    Attributes:
        kind: ``"heads"`` or ``"neurons"``.
        layer: Storage index of the block (:class:`recipec.architectures.Block`).
        block: Module name of the block.
        count: Groups in the block (heads, or the FFN width).
        width: Head dimension (1 for neurons).
        slices: Every tensor slice the groups own.
        attention: Module name of the attention whose head count changes (heads only).
        uses: Executions of the block per forward (ALBERT's shared layers: several).
    """

    kind: str
    layer: int
    block: str
    count: int
    width: int
    slices: tuple[GroupSlice, ...]
    attention: str = ""
    uses: int = 1

    @property
    def key(self) -> str:
        """``"heads:3"``: kind and storage layer."""
        return f"{self.kind}:{self.layer}"

    def targets(self) -> list[GroupSlice]:
        """The masked slices."""
        return [s for s in self.slices if s.target]


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _head_slices(model: nn.Module, infos: list[LinearInfo]) -> tuple[int, int, list, str]:
    """``(heads, head_dim, slices, attention module)`` of one block."""
    att = [i for i in infos if i.role in (*_QKV_ROLES, "qkv", "attn_out")]
    out = [i for i in att if i.role == "attn_out"]
    if not out or not out[0].heads or not out[0].head_dim:
        raise StructureError(f"{infos[0].module_name}: no attention output with known heads")
    heads, dim = out[0].heads, out[0].head_dim
    grid = torch.arange(heads * dim).view(heads, dim)
    slices: list[GroupSlice] = []
    attention = ""
    for info in infos:
        if info.role in _QKV_ROLES:
            if info.out_features != heads * dim:
                raise StructureError(
                    f"{info.module_name}: {info.out_features} rows, not {heads}x{dim}"
                )
            slices.append(GroupSlice(info.param_name, info.module_name, 0, grid))
            attention = attention or _parent(info.module_name)
        elif info.role == "qkv":
            if not info.slices:
                raise StructureError(
                    f"{info.module_name}: a fused QKV of unknown row layout (family not in "
                    "recipec.architectures.FAMILY_TABLE): its heads cannot be found"
                )
            for part in _QKV_ROLES:
                rows = info.rows(part).view(heads, dim)
                slices.append(GroupSlice(info.param_name, info.module_name, 0, rows))
            attention = _parent(info.module_name)
        elif info.role == "attn_out":
            slices.append(GroupSlice(info.param_name, info.module_name, 1, grid, output=True))
        elif info.role == "attn_score":
            slices.extend(_score_slice(model, info, heads, dim, grid))
    if not attention:
        raise StructureError(f"{out[0].module_name}: no Q/K/V linears found for its heads")
    slices.extend(_bias_vectors(model, attention, heads, dim, grid))
    return heads, dim, slices, attention


def _score_slice(model, info: LinearInfo, heads: int, dim: int, grid) -> list[GroupSlice]:
    """DeBERTa's relative-position projections: head-contiguous rows; talking heads refused."""
    if info.in_features == heads and info.out_features == heads:
        raise StructureError(
            f"{info.module_name}: talking heads (DeBERTa talking_head=True) mix every head "
            "into every other; heads cannot be removed from this model"
        )
    if info.out_features != heads * dim:
        raise StructureError(f"{info.module_name}: {info.out_features} rows, not {heads}x{dim}")
    return [GroupSlice(info.param_name, info.module_name, 0, grid, target=False)]


def _bias_vectors(model, attention: str, heads: int, dim: int, grid) -> list[GroupSlice]:
    """Per-head bias parameters held by the attention module itself (DeBERTa v1)."""
    module = model.get_submodule(attention)
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for attr in ("q_bias", "v_bias"):
        param = getattr(module, attr, None)
        if isinstance(param, nn.Parameter) and param.shape == (heads * dim,):
            out.append(GroupSlice(names[id(param)], attention, 0, grid, target=False))
    return out


def _neuron_slices(infos: list[LinearInfo]) -> tuple[int, list[GroupSlice]]:
    f_out = [i for i in infos if i.role == "ffn_out"]
    f_in = [i for i in infos if i.role in ("ffn_in", "ffn_in_glu")]
    if len(f_out) != 1 or len(f_in) != 1:
        raise StructureError(f"{infos[0].module_name}: no single FFN up/down projection pair")
    width = f_out[0].in_features
    column = torch.arange(width).view(width, 1)
    slices = []
    up = f_in[0]
    if up.role == "ffn_in_glu":
        if not up.slices:
            raise StructureError(f"{up.module_name}: a fused GLU of unknown row layout")
        for part in ("gate", "up"):
            slices.append(
                GroupSlice(up.param_name, up.module_name, 0, up.rows(part).view(width, 1))
            )
    else:
        slices.append(GroupSlice(up.param_name, up.module_name, 0, column))
    out = f_out[0]
    slices.append(GroupSlice(out.param_name, out.module_name, 1, column, output=True))
    return width, slices


def group_sets(model: nn.Module, kind: str, layers: Iterable[int] | None = None) -> list[GroupSet]:
    """The heads or neurons of every encoder block (storage order), or of ``layers`` only.

    Raises:
        StructureError: Unknown ``kind``, a block without the linears the groups need, a
            fused tensor of unknown layout, DeBERTa talking heads, or a layer not in the model.
    """
    if kind not in KINDS:
        raise StructureError(f"unknown group kind {kind!r}; choose from {', '.join(KINDS)}")
    by_layer: dict[int, list[LinearInfo]] = {}
    for info in encoder_linears(model):
        by_layer.setdefault(info.layer, []).append(info)
    if not by_layer:
        raise StructureError(f"{type(model).__name__}: no encoder blocks found")
    chosen = sorted(by_layer) if layers is None else list(layers)
    unknown = [layer for layer in chosen if layer not in by_layer]
    if unknown:
        raise StructureError(
            f"layers {unknown} are not encoder layers of this model (it has {sorted(by_layer)})"
        )
    sets = []
    for layer in chosen:
        infos = by_layer[layer]
        block = _block_name(infos)
        if kind == "heads":
            heads, dim, slices, attention = _head_slices(model, infos)
            sets.append(
                GroupSet(kind, layer, block, heads, dim, tuple(slices), attention, infos[0].uses)
            )
        else:
            width, slices = _neuron_slices(infos)
            sets.append(GroupSet(kind, layer, block, width, 1, tuple(slices), "", infos[0].uses))
    return sets


def _block_name(infos: list[LinearInfo]) -> str:
    """The longest common module prefix of a block's linears (its block module)."""
    parts = [i.module_name.split(".") for i in infos]
    common = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common)


def model_facts(model: nn.Module) -> dict[str, Any]:
    """Pure-data facts for the recipe's model checks (``recipec.recipe.checks.model_problems``):
    ``layers`` (storage indices of the encoder blocks), ``heads`` and ``neurons`` (groups per
    block, in that order; empty when the model's groups cannot be found) and ``executed``
    (encoder layers run per forward: ALBERT runs its shared blocks several times)."""
    by_layer: dict[int, int] = {}
    for info in encoder_linears(model):
        by_layer[info.layer] = info.uses
    facts: dict[str, Any] = {"layers": sorted(by_layer)}
    for kind in KINDS:
        try:
            facts[kind] = [s.count for s in group_sets(model, kind)]
        except StructureError:
            facts[kind] = []
    config = getattr(model, "config", None)
    executed = sum(by_layer.values())
    if family_of(model) == "albert":
        executed = int(getattr(config, "num_hidden_layers", executed))
    facts["executed"] = executed
    return facts


# --------------------------------------------------------------------------- masks


def _removed(index: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return index[~keep.to(torch.bool).cpu()].reshape(-1)


def group_masks(
    sets: Sequence[GroupSet], keep: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Masks (True = keep) of every target tensor of ``sets`` for the kept groups ``keep``
    (``GroupSet.key`` -> bool ``[count]``): removed groups are False in all their elements."""
    masks: dict[str, torch.Tensor] = {}
    for gs in sets:
        kept = keep[gs.key]
        for s in gs.targets():
            p = params[s.param]
            mask = masks.setdefault(s.param, torch.ones(p.shape, dtype=torch.bool, device=p.device))
            idx = _removed(s.index, kept).to(p.device)
            if idx.numel():
                mask.index_fill_(s.axis, idx, False)
    return masks


def _slice_all_false(mask: torch.Tensor, s: GroupSlice) -> torch.Tensor:
    """Per group: True when every element of the group's slice is False in ``mask``."""
    groups, width = s.index.shape
    sel = mask.index_select(s.axis, s.index.reshape(-1).to(mask.device))
    if s.axis == 0:
        sel = sel.reshape(groups, -1)
    else:
        sel = sel.reshape(-1, groups, width).transpose(0, 1).reshape(groups, -1)
    return ~sel.any(dim=1).cpu()


def kept_groups(gs: GroupSet, masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Bool ``[count]``: a group is removed when all its masked (target) elements are False."""
    removed = torch.ones(gs.count, dtype=torch.bool)
    seen = False
    for s in gs.targets():
        if s.param in masks:
            removed &= _slice_all_false(masks[s.param], s)
            seen = True
    return ~removed if seen else torch.ones(gs.count, dtype=torch.bool)


def removable_groups(gs: GroupSet, masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Bool ``[count]``, True = removable exactly: the group's output-side slice is all pruned."""
    out = [s for s in gs.slices if s.output]
    if not out or out[0].param not in masks:
        return torch.zeros(gs.count, dtype=torch.bool)
    return _slice_all_false(masks[out[0].param], out[0])


def all_group_sets(model: nn.Module) -> list[GroupSet]:
    """The head and FFN-neuron group sets of ``model`` (:data:`KINDS` order); a kind its
    structure does not have gives none."""
    sets: list[GroupSet] = []
    for kind in KINDS:
        try:
            sets += group_sets(model, kind)
        except StructureError:
            continue
    return sets


def removed_weights(
    model: nn.Module, masks: Mapping[str, torch.Tensor], names: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Where the removed heads and neurons are: per tensor (of ``names``, default all) that has
    any, a bool tensor True at every element of a removed group (all its masked elements
    False). These weights are gone from the shrunk model; unstructured pruners count their
    sparsity on the other weights (see ``recipec.modifiers.pruner``)."""
    wanted = None if names is None else set(names)
    out: dict[str, torch.Tensor] = {}
    for gs in all_group_sets(model):
        removed = ~kept_groups(gs, masks)
        if not removed.any():
            continue
        for s in gs.targets():
            if wanted is not None and s.param not in wanted:
                continue
            mask = masks[s.param]
            where = out.setdefault(s.param, torch.zeros_like(mask, dtype=torch.bool))
            where.index_fill_(s.axis, s.index[removed].reshape(-1).to(mask.device), True)
    return out


# --------------------------------------------------------------------------- selection


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` lowest scores (stable: among ties the lower index goes first)."""
    out = torch.zeros(scores.numel(), dtype=torch.bool)
    if k > 0:
        order = torch.sort(scores.double(), stable=True).indices[:k]
        out[order] = True
    return out


def select_groups(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    scope: str,
    prev_keep: Mapping[str, torch.Tensor] | None = None,
    min_keep: int = 1,
) -> dict[str, torch.Tensor]:
    """Kept groups (bool per set key) removing ``round(sparsity * groups)`` groups.

    ``per_layer``: each set loses ``round(sparsity * count)`` groups. ``global``: all groups of
    all sets ranked together lose ``round(sparsity * total)``, while the ``min_keep`` highest of
    each set are protected. Removed groups (``prev_keep`` False) stay removed and count first.
    Ties: the lower group index (sets in dict order) is removed first.

    Raises:
        StructureError: A request that would leave a set with fewer than ``min_keep`` groups.
    """
    if scope not in ("global", "per_layer"):
        raise StructureError(f"scope must be 'global' or 'per_layer', got {scope!r}")
    ranked: dict[str, torch.Tensor] = {}
    for key, s in scores.items():
        s = s.detach().double().cpu().clone()
        if torch.isnan(s).any():
            raise StructureError(f"saliency of {key} contains NaN")
        if prev_keep is not None and key in prev_keep:
            s[~prev_keep[key].cpu()] = -math.inf
        ranked[key] = s
    _check_min_keep(ranked, sparsity, scope, min_keep)
    if scope == "per_layer":
        return {k: ~_lowest(s, _count(sparsity, s.numel())) for k, s in ranked.items()}
    protected = {}
    for key, s in ranked.items():
        s = s.clone()
        top = torch.sort(s, descending=True, stable=True).indices[:min_keep]
        s[top] = math.inf
        protected[key] = s
    keys = list(protected)
    flat = torch.cat([protected[k] for k in keys]) if keys else torch.zeros(0)
    prune = _lowest(flat, _count(sparsity, flat.numel()))
    out, offset = {}, 0
    for key in keys:
        n = protected[key].numel()
        out[key] = ~(prune[offset : offset + n] | torch.isneginf(ranked[key]))
        offset += n
    return out


def _count(sparsity: float, total: int) -> int:
    return int(round(float(sparsity) * total))


def _check_min_keep(
    ranked: Mapping[str, torch.Tensor], sparsity: float, scope: str, min_keep: int
) -> None:
    if scope == "per_layer":
        for key, s in ranked.items():
            left = s.numel() - max(_count(sparsity, s.numel()), int(torch.isneginf(s).sum()))
            if left < min_keep:
                raise StructureError(
                    f"{key}: sparsity {sparsity:g} leaves {left} of {s.numel()} groups "
                    f"(at least {min_keep} must stay)"
                )
        return
    total = sum(s.numel() for s in ranked.values())
    if total - _count(sparsity, total) < min_keep * len(ranked):
        raise StructureError(
            f"sparsity {sparsity:g} removes {_count(sparsity, total)} of {total} groups: fewer "
            f"than {min_keep} would stay in each of the {len(ranked)} layers"
        )


# --------------------------------------------------------------------------- saliency


def _slice_values(w: torch.Tensor, s: GroupSlice) -> torch.Tensor:
    """``[groups, elements]``: each group's entries of ``w`` (any layout, consistent per slice)."""
    groups, width = s.index.shape
    sel = w.index_select(s.axis, s.index.reshape(-1).to(w.device))
    if s.axis == 0:
        return sel.reshape(groups, -1)
    return sel.reshape(-1, groups, width).transpose(0, 1).reshape(groups, -1)


@torch.no_grad()
def magnitude_group_scores(
    sets: Sequence[GroupSet], params: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """L2 norm of each group over all its target slices: ``sqrt(sum_{q in Q} w_q^2)``."""
    out = {}
    for gs in sets:
        total = torch.zeros(gs.count, dtype=torch.float64)
        for s in gs.targets():
            values = _slice_values(params[s.param].detach(), s).double().cpu()
            total += (values * values).sum(dim=1)
        out[gs.key] = total.sqrt()
    return out


@dataclass
class _FisherTensor:
    """One target tensor in its Fisher layout, with the global group label of every element."""

    name: str
    columns: bool  # flattened column-major (groups are columns)
    labels: torch.Tensor  # [numel] long, -1 = no group

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return (t.t() if self.columns else t).reshape(-1)


def _fisher_layout(
    sets: Sequence[GroupSet], params: Mapping[str, torch.Tensor]
) -> tuple[dict[str, _FisherTensor], dict[str, int]]:
    """Element labels (global group ids) per target tensor, and each set's first label."""
    offsets, tensors, next_label = {}, {}, 0
    for gs in sets:
        offsets[gs.key] = next_label
        for s in gs.targets():
            p = params[s.param]
            if s.param not in tensors:
                columns = s.axis == 1
                labels = torch.full(p.shape, -1, dtype=torch.long)
                tensors[s.param] = _FisherTensor(s.param, columns, labels)
            labels = tensors[s.param].labels
            group_ids = torch.arange(gs.count).view(-1, 1).expand_as(s.index) + next_label
            if s.axis == 0:
                labels[s.index.reshape(-1)] = group_ids.reshape(-1, 1)
            else:
                labels[:, s.index.reshape(-1)] = group_ids.reshape(1, -1)
        next_label += gs.count
    for t in tensors.values():
        t.labels = t.flat(t.labels)
    return tensors, offsets


def _group_quadratic(
    blocks: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, n_groups: int, chunk: int = 2048
) -> torch.Tensor:
    """``sum over Fisher blocks b of 1/2 w_{Qb}^T ([F^-1]_{Qb,Qb})^-1 w_{Qb}`` per group ``Q``.

    ``blocks`` ``[nb, B, B]`` (the inverse Fisher), ``w`` and ``labels`` ``[numel]``. Entries of
    a block that belong to different groups are dropped before solving, which makes the
    block's matrix block diagonal by group: its solve gives every group's own
    ``([F^-1]_{Qb,Qb})^-1 w_{Qb}`` at once.
    """
    nb, b, _ = blocks.shape
    pad = nb * b - w.numel()
    wb = torch.nn.functional.pad(w.to(blocks.dtype), (0, pad)).view(nb, b)
    lb = torch.nn.functional.pad(labels, (0, pad), value=-1).view(nb, b)
    out = torch.zeros(n_groups, dtype=torch.float64)
    for start in range(0, nb, chunk):
        a = blocks[start : start + chunk]
        lab = lb[start : start + chunk].to(a.device)
        ww = wb[start : start + chunk].to(a.device)
        same = (lab.unsqueeze(2) == lab.unsqueeze(1)) & (lab.unsqueeze(2) >= 0)
        a = torch.where(same, a, torch.zeros((), dtype=a.dtype, device=a.device))
        a = a + torch.diag_embed((lab < 0).to(a.dtype))
        z = torch.linalg.solve(a, ww.unsqueeze(-1)).squeeze(-1)
        e = (0.5 * ww * z).reshape(-1).double().cpu()
        flat = lab.reshape(-1).cpu()
        valid = flat >= 0
        out.index_add_(0, flat[valid], e[valid])
    return out


def _fisher_chunks(sizes: Mapping[str, int], budget: float | None) -> list[list[str]]:
    chunks: list[list[str]] = []
    used = 0
    for name, size in sizes.items():
        if not chunks or (budget is not None and used + size > budget and chunks[-1]):
            chunks.append([])
            used = 0
        chunks[-1].append(name)
        used += size
    return chunks


def fisher_group_scores(
    sets: Sequence[GroupSet],
    params: Mapping[str, torch.Tensor],
    grad_fn: Callable[[], Mapping[str, torch.Tensor]],
    *,
    num_grads: int,
    block_size: int,
    damp: float,
    max_memory_gb: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, torch.Tensor]:
    """oBERT group saliencies (see the module doc) from ``num_grads`` calls of ``grad_fn``.

    Each target tensor gets a :class:`recipec.sparsity.fisher.BlockFisherInverse` of
    ``block_size`` over its Fisher layout; tensors are processed in chunks whose inverses fit
    ``max_memory_gb`` (``num_grads`` calls of ``grad_fn`` per chunk).

    Returns:
        ``GroupSet.key`` -> float64 ``[count]`` saliencies.
    """
    say = progress or (lambda _msg: None)
    tensors, offsets = _fisher_layout(sets, params)
    n_groups = sum(gs.count for gs in sets)
    sizes = {n: BlockFisherInverse.estimate_bytes(params[n].numel(), block_size) for n in tensors}
    budget = None if max_memory_gb is None else float(max_memory_gb) * 2**30
    chunks = _fisher_chunks(sizes, budget)
    say(
        f"structured oBERT: {len(tensors)} tensors, inverse Fisher "
        f"{sum(sizes.values()) / 2**30:.3f} GiB, {len(chunks)} chunk(s), m={num_grads}, "
        f"B={block_size}"
    )
    total = torch.zeros(n_groups, dtype=torch.float64)
    for ci, chunk in enumerate(chunks):
        finvs = {
            n: BlockFisherInverse(params[n].numel(), block_size, damp, num_grads) for n in chunk
        }
        for i in range(num_grads):
            grads = grad_fn()
            for n in chunk:
                finvs[n].update(tensors[n].flat(grads[n]).float().cpu())
            if (i + 1) % max(1, num_grads // 4) == 0:
                say(f"structured oBERT: chunk {ci + 1}/{len(chunks)}: gradient {i + 1}/{num_grads}")
        for n in chunk:
            w = tensors[n].flat(params[n]).float().cpu()
            total += _group_quadratic(finvs[n].blocks, w, tensors[n].labels, n_groups)
        del finvs
    return {gs.key: total[offsets[gs.key] : offsets[gs.key] + gs.count] for gs in sets}


def family_name(model: nn.Module) -> str:
    """The model's family (``recipec.architectures.family_of``) or its model type."""
    return family_of(model) or str(getattr(getattr(model, "config", None), "model_type", "?"))

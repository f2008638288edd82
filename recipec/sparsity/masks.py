"""Masks: exact-count selection, the one way they are applied, the one way sparsity is measured.

Structures (``unstructured``, ``block<K>``, ``N:M``) are parsed by
:func:`recipec.recipe.structure.parse_structure`. Masks are applied with :func:`apply_masks_`
(or :func:`zero_pruned_`, its unchecked core, for per-step hooks) and measured with
:func:`mask_sparsity` (pruned entries of masks) or :func:`weight_sparsity` (zeros in weights),
both built on :func:`count_pruned` / :func:`count_zeros`.

A mask is a ``torch.bool`` tensor of its parameter's shape, **True = keep**. Groups (blocks and
N:M groups) are runs of consecutive weights along the *input* dimension, i.e. the last dim of a
2-D ``nn.Linear.weight``; in row-major order they are runs of consecutive flat elements.

Counting rule: a selection at sparsity ``s`` over ``G`` groups prunes exactly
``k = round(s * G)`` groups (Python ``round``), per tensor (``scope="per_layer"``) or over all
tensors ranked together (``scope="global"``). Groups already pruned in ``prev_masks`` have score
``-inf`` and stay pruned (monotone masks); if there are more of them than ``k``, all of them
stay pruned and the count is exceeded rather than un-pruning anything. Ties are broken
deterministically: among equal scores the group with the smaller index (row-major, tensors in
dict order) is pruned first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from recipec.recipe.structure import Structure, parse_structure

__all__ = [
    "apply_masks_",
    "compute_masks",
    "count_pruned",
    "count_zeros",
    "group_scores",
    "magnitude_scores",
    "mask_sparsity",
    "sparsity_table",
    "weight_sparsity",
    "zero_pruned_",
]


def _check_groupable(t: torch.Tensor, group: int, name: str | None) -> None:
    if group == 1:
        return
    label = f"tensor {name!r}" if name is not None else "tensor"
    if t.dim() == 0:
        raise ValueError(f"{label} is a scalar; it cannot be split into groups of {group}")
    if t.shape[-1] % group != 0:
        raise ValueError(
            f"{label} with shape {tuple(t.shape)}: last dim {t.shape[-1]} is not divisible by "
            f"the group size {group}"
        )


def group_scores(
    scores: torch.Tensor, structure: str | Structure, name: str | None = None
) -> torch.Tensor:
    """Per-group scores: the sum of the element scores of each group.

    For a tensor of shape ``(..., d)`` and groups of ``K`` along the last dim the result has
    shape ``(..., d // K)`` with ``S_Q = sum_{q in Q} s_q``. Unstructured and N:M structures
    return the element scores unchanged (N:M selects elements within each group).

    Args:
        scores: Element scores of one tensor.
        structure: Structure string or value.
        name: Tensor name used in error messages.

    Raises:
        ValueError: If the last dim is not divisible by the group size.
    """
    st = parse_structure(structure)
    _check_groupable(scores, st.group, name)
    if st.kind != "block":
        return scores
    k = st.block
    return scores.reshape(*scores.shape[:-1], scores.shape[-1] // k, k).sum(-1)


def _expand_groups(group_mask: torch.Tensor, group: int) -> torch.Tensor:
    if group == 1:
        return group_mask
    return (
        group_mask.unsqueeze(-1)
        .expand(*group_mask.shape, group)
        .reshape(*group_mask.shape[:-1], group_mask.shape[-1] * group)
    )


def _prune_lowest(g: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean prune-mask of the ``k`` lowest entries of 1-D ``g`` (ties: lowest index first)."""
    n = g.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=g.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=g.device)
    thr = torch.kthvalue(g, k).values
    prune = g < thr
    need = k - int(prune.sum())
    if need > 0:
        eq_idx = torch.nonzero(g == thr).squeeze(1)[:need]
        prune[eq_idx] = True
    return prune


def _count(sparsity: float, total: int) -> int:
    return int(round(sparsity * total))


def _nm_masks(
    scores: Mapping[str, torch.Tensor],
    st: Structure,
    prev: Mapping[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    n_prune = st.m - st.n
    for name, s in scores.items():
        _check_groupable(s, st.m, name)
        flat = s.detach().reshape(-1, st.m).to(torch.promote_types(s.dtype, torch.float32))
        p = None
        if prev is not None and name in prev:
            p = prev[name].reshape(-1, st.m)
            flat = flat.masked_fill(~p, float("-inf"))
        # Stable ascending sort: among ties the earlier weight is pruned first.
        order = torch.sort(flat, dim=1, stable=True).indices[:, :n_prune]
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep.scatter_(1, order, False)
        if p is not None:
            keep &= p
        out[name] = keep.reshape(s.shape)
    return out


def compute_masks(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    structure: str | Structure,
    scope: str = "global",
    prev_masks: Mapping[str, torch.Tensor] | None = None,
    *,
    grouped: bool = False,
    layer_rows: Mapping[str, Sequence[torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Select masks (True = keep) pruning exactly ``round(sparsity * groups)`` groups.

    Per layer, each layer with ``G_l`` groups loses its ``round(s * G_l)`` lowest-scoring
    groups; a layer is a tensor, or a set of rows of a fused tensor given in ``layer_rows``
    (Q, K and V of a fused ``Wqkv``: ``recipec.sparsity.selection.layer_rows``). Globally, all
    groups of all tensors are ranked together and the ``round(s * sum_t G_t)`` lowest are
    pruned (``layer_rows`` changes nothing). For ``"N:M"`` the ``N`` highest-scoring weights
    of each group of ``M`` are kept, ``sparsity`` must equal ``1 - N/M`` and ``scope`` and
    ``layer_rows`` are ignored. Groups run along the last dim within one row, so a group never
    straddles two layers of a fused tensor. Already-pruned weights (``prev_masks`` False) get
    score ``-inf`` and stay pruned; a block with any previously pruned weight counts as pruned.

    Args:
        scores: Element scores per tensor name (higher = more important). With
            ``grouped=True``, group scores of shape ``(..., d // K)`` as from ``group_scores``.
        sparsity: Target fraction of pruned groups in ``[0, 1]``.
        structure: ``"unstructured"``, ``"blockK"``, ``"N:M"`` or a ``Structure``.
        scope: ``"global"`` or ``"per_layer"``.
        prev_masks: Previous masks (True = keep) for some or all tensors; keeps masks monotone.
        grouped: Whether ``scores`` are already per group (block structures only).
        layer_rows: Per-layer scope: tensor name -> row indices (dim 0) of each layer the
            tensor holds; together they must cover every row once. Tensors not named are one
            layer each.

    Returns:
        A bool mask per tensor name, on the scores' device, with the full weight shape.

    Raises:
        ValueError: On a bad sparsity, scope, structure, shape or NaN scores.
    """
    st = parse_structure(structure)
    sparsity = float(sparsity)
    _check_selection(scores, sparsity, st, scope, prev_masks, grouped)
    if st.kind == "nm":
        return _nm_masks(scores, st, prev_masks)
    k = st.group
    gscores, gshapes = _flat_group_scores(scores, st, prev_masks, grouped)
    if scope == "per_layer":
        prune = {
            name: _prune_per_layer(g, gshapes[name], sparsity, (layer_rows or {}).get(name), name)
            for name, g in gscores.items()
        }
    else:
        prune = _prune_globally(gscores, sparsity)

    masks: dict[str, torch.Tensor] = {}
    for name, pr in prune.items():
        # Previously pruned groups are at -inf, so they are among the pruned unless more of
        # them exist than k; either way keep them pruned.
        g = gscores[name]
        pr = pr | torch.isneginf(g)
        keep = _expand_groups((~pr).reshape(gshapes[name]), k)
        if prev_masks is not None and name in prev_masks:
            keep = keep & prev_masks[name].to(keep.device)
        masks[name] = keep.contiguous()
    return masks


def _check_selection(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    st: Structure,
    scope: str,
    prev_masks: Mapping[str, torch.Tensor] | None,
    grouped: bool,
) -> None:
    """The ``ValueError`` checks of :func:`compute_masks`."""
    if not (0.0 <= sparsity <= 1.0) or math.isnan(sparsity):
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if scope not in ("global", "per_layer"):
        raise ValueError(f"scope must be 'global' or 'per_layer', got {scope!r}")
    for name, s in scores.items():
        if s.is_floating_point() and bool(torch.isnan(s).any()):
            raise ValueError(f"scores for tensor {name!r} contain NaN")
    for name, pm in (prev_masks or {}).items():
        if name not in scores:
            continue
        want = scores[name].shape
        if grouped and st.kind == "block":
            want = (*want[:-1], want[-1] * st.block)
        if tuple(pm.shape) != tuple(want):
            raise ValueError(
                f"prev mask for tensor {name!r} has shape {tuple(pm.shape)}, expected {tuple(want)}"
            )
        if pm.dtype != torch.bool:
            raise ValueError(f"prev mask for tensor {name!r} must be torch.bool")
    if st.kind == "nm":
        if grouped:
            raise ValueError("grouped scores are not supported for N:M structures")
        expected = st.nm_sparsity
        if abs(sparsity - expected) > 1e-6:
            raise ValueError(
                f"structure {st} implies sparsity {expected:g} (1 - N/M); got {sparsity:g}"
            )


def _flat_group_scores(
    scores: Mapping[str, torch.Tensor],
    st: Structure,
    prev_masks: Mapping[str, torch.Tensor] | None,
    grouped: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Size]]:
    """Per-tensor 1-D group scores with previously pruned groups at -inf, and their shapes."""
    k = st.group
    gscores: dict[str, torch.Tensor] = {}
    gshapes: dict[str, torch.Size] = {}
    for name, s in scores.items():
        g = s.detach() if grouped else group_scores(s.detach(), st, name)
        gshapes[name] = g.shape
        g = g.reshape(-1)
        if not g.is_floating_point() or g.dtype in (torch.float16, torch.bfloat16):
            g = g.float()
        if prev_masks is not None and name in prev_masks:
            pm = prev_masks[name]
            _check_groupable(pm, k, name)
            if k > 1:
                gk = pm.reshape(-1, k).all(-1)
            else:
                gk = pm.reshape(-1)
            g = g.masked_fill(~gk.to(g.device), float("-inf"))
        gscores[name] = g
    return gscores, gshapes


def _prune_per_layer(
    g: torch.Tensor,
    shape: torch.Size,
    sparsity: float,
    rows: Sequence[torch.Tensor] | None,
    name: str,
) -> torch.Tensor:
    """Prune-mask of one tensor's flat group scores: each layer (a set of rows) on its own."""
    if not rows:
        return _prune_lowest(g, _count(sparsity, g.numel()))
    if len(shape) < 2:
        raise ValueError(f"layer_rows for tensor {name!r}: it has no rows (shape {tuple(shape)})")
    by_row = g.reshape(shape[0], -1)
    covered = torch.sort(torch.cat([r.reshape(-1) for r in rows])).values
    if not torch.equal(covered.cpu(), torch.arange(shape[0])):
        raise ValueError(f"layer_rows for tensor {name!r} must cover its {shape[0]} rows once each")
    prune = torch.zeros_like(by_row, dtype=torch.bool)
    for r in rows:
        r = r.to(g.device)
        part = by_row[r].reshape(-1)
        prune[r] = _prune_lowest(part, _count(sparsity, part.numel())).reshape(len(r), -1)
    return prune.reshape(-1)


def _prune_globally(gscores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Prune-masks of the lowest ``round(sparsity * all groups)`` groups, ranked together."""
    names = list(gscores)
    if not names:
        return {}
    dtype = torch.float32
    for g in gscores.values():
        dtype = torch.promote_types(dtype, g.dtype)
    device = gscores[names[0]].device
    cat = torch.cat([gscores[n].to(device=device, dtype=dtype) for n in names])
    pr = _prune_lowest(cat, _count(sparsity, cat.numel()))
    del cat
    prune: dict[str, torch.Tensor] = {}
    off = 0
    for n in names:
        cnt = gscores[n].numel()
        prune[n] = pr[off : off + cnt].to(gscores[n].device)
        off += cnt
    return prune


def magnitude_scores(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Magnitude scores ``s = |w|`` for each tensor."""
    return {name: p.detach().abs() for name, p in params.items()}


@torch.no_grad()
def zero_pruned_(tensors: Mapping[str, torch.Tensor], pruned: Mapping[str, torch.Tensor]) -> None:
    """Write exact zeros where ``pruned`` is True, in place: the one way masks are applied.

    The unchecked core of :func:`apply_masks_`, for per-step hooks that keep the complements
    of their masks (no allocation): weights, their gradients, optimizer state of their shape.

    Args:
        tensors: Tensors by name (weights, gradients or optimizer state).
        pruned: Bool tensors of the same shapes and devices (True = pruned = ``~mask``).
    """
    for name, where in pruned.items():
        tensors[name].masked_fill_(where, 0)


@torch.no_grad()
def apply_masks_(
    params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
) -> Mapping[str, torch.Tensor]:
    """Zero pruned weights in place: exact zeros (``+0.0``) where the mask is False.

    Args:
        params: Live tensors by name.
        masks: Bool masks (True = keep) for some of those names, on any device.

    Returns:
        ``params`` (modified in place).

    Raises:
        KeyError: If a mask names a tensor not in ``params``.
        ValueError: If a mask's shape does not match its tensor.
    """
    for name, mask in masks.items():
        if name not in params:
            raise KeyError(f"mask for unknown tensor {name!r}")
        p = params[name]
        if tuple(mask.shape) != tuple(p.shape):
            raise ValueError(
                f"mask for tensor {name!r} has shape {tuple(mask.shape)}, "
                f"tensor has {tuple(p.shape)}"
            )
        zero_pruned_({name: p}, {name: ~mask.to(device=p.device, dtype=torch.bool)})
    return params


def count_pruned(mask: torch.Tensor) -> int:
    """Pruned (False) entries of a mask."""
    return mask.numel() - int(mask.sum())


def count_zeros(tensor: torch.Tensor) -> int:
    """Entries of a tensor that are exactly zero (``-0.0`` included)."""
    return int((tensor == 0).sum())


def _fractions(counts: Mapping[str, tuple[int, int]]) -> tuple[float, dict[str, float]]:
    """``(overall, per name)`` fractions from ``{name: (count, numel)}``."""
    per = {name: (c / n if n else 0.0) for name, (c, n) in counts.items()}
    count = sum(c for c, _ in counts.values())
    total = sum(n for _, n in counts.values())
    return (count / total if total else 0.0), per


def mask_sparsity(masks: Mapping[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
    """Fraction of pruned (False) entries, overall and per tensor.

    Returns:
        ``(overall, per_tensor)`` where ``overall = sum_t pruned_t / sum_t numel_t``.
    """
    return _fractions({name: (count_pruned(m), m.numel()) for name, m in masks.items()})


def weight_sparsity(
    params: Mapping[str, torch.Tensor], names: list[str] | None = None
) -> tuple[float, dict[str, float]]:
    """Fraction of exact zeros in the weights, overall and per tensor.

    Args:
        params: Tensors by name.
        names: The tensors to measure (default: all of ``params``).

    Returns:
        ``(overall, per_tensor)`` where ``overall = sum_t zeros_t / sum_t numel_t``.
    """
    names = list(params) if names is None else names
    return _fractions({n: (count_zeros(params[n]), params[n].numel()) for n in names})


def sparsity_table(masks: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    """Per-tensor ``{shape, numel, zeros, sparsity}`` from masks (``zeros``: pruned entries)."""
    table = {}
    for name, mask in masks.items():
        numel, zeros = mask.numel(), count_pruned(mask)
        table[name] = {
            "shape": list(mask.shape),
            "numel": numel,
            "zeros": zeros,
            "sparsity": zeros / numel if numel else 0.0,
        }
    return table

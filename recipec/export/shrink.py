"""Export of structurally pruned checkpoints: the removed heads and neurons taken out.

A checkpoint whose masks prune whole heads or FFN neurons (the ``heads`` / ``neurons``
modifiers; any group whose output-side slice is entirely pruned counts) is shrunk before
export (:func:`recipec.sparsity.shrink.shrink_`): the deployment folder's weights, masks and
ONNX graph have the smaller shapes, and its ``config.json`` records the per-layer heads and
FFN widths, so only recipec's loader reads it back. Before anything is written, the shrunk
model's logits are compared with the masked model's on the parity samples (two shapes, one
padded): they must agree up to float rounding (``|diff| <= 1e-5 (1 + max |logits|)``).
Dropped layers need nothing here: the ``layers`` modifier removed them during training.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch

from recipec.checkpoint import SparseCheckpoint
from recipec.sparsity.shrink import keep_from_masks, read_record, shrink_, slice_tensors

REL_TOL = 1e-5


def _describe(model: torch.nn.Module, keep: dict[str, torch.Tensor]) -> dict:
    """Per layer: heads and FFN neurons kept of how many (for sparsity.json and the log)."""
    layers: dict[str, dict] = {}
    for key, kept in sorted(keep.items()):
        kind, layer = key.split(":")
        entry = layers.setdefault(layer, {})
        entry[kind] = {"kept": int(kept.sum()), "of": kept.numel()}
    return layers


def shrink_checkpoint(
    ckpt: SparseCheckpoint,
    samples: list,
    logits: Callable,
    log: Callable[[str], None],
) -> tuple[SparseCheckpoint, dict | None]:
    """The checkpoint with its removed heads and neurons taken out, verified, and what was
    removed (None, and the checkpoint unchanged, when nothing can be).

    Args:
        ckpt: The masked checkpoint (weights squashed).
        samples: Model inputs (numpy dicts) to compare the two models on.
        logits: ``logits(model, inputs)`` -> numpy logits.
        log: Progress lines.

    Raises:
        recipec.export.onnx.VerificationError: The shrunk model's logits differ.
    """
    from recipec.export.onnx import VerificationError

    keep = keep_from_masks(ckpt.model, ckpt.masks)
    if not keep:
        return ckpt, None
    shrunk = copy.deepcopy(ckpt.model).eval()
    index_map = shrink_(shrunk, keep)
    worst = 0.0
    for inputs in samples:
        ref, got = logits(ckpt.model, inputs), logits(shrunk, inputs)
        diff = float(abs(got - ref).max()) if ref.size else 0.0
        bound = REL_TOL * (1.0 + float(abs(ref).max()))
        if not diff <= bound:
            raise VerificationError(
                f"the shrunk model disagrees with the masked one: max |diff| {diff:.3g} > "
                f"{bound:.3g} on inputs of shape {list(next(iter(inputs.values())).shape)}"
            )
        worst = max(worst, diff)
    before = sum(p.numel() for p in ckpt.model.parameters())
    after = sum(p.numel() for p in shrunk.parameters())
    heads = sum(int((~k).sum()) for key, k in keep.items() if key.startswith("heads"))
    neurons = sum(int((~k).sum()) for key, k in keep.items() if key.startswith("neurons"))
    log(
        f"shrunk: {heads} heads and {neurons} FFN neurons removed, {before:,} -> {after:,} "
        f"parameters; masked vs shrunk max |diff| {worst:.1e}"
    )
    info = {
        "removed_heads": heads,
        "removed_neurons": neurons,
        "params_before": before,
        "params_after": after,
        "masked_vs_shrunk_max_abs_diff": worst,
        "layers": _describe(ckpt.model, keep),
        "record": read_record(shrunk),
    }
    masks = slice_tensors(ckpt.masks, index_map)
    return dataclasses.replace(ckpt, model=shrunk, masks=masks), info

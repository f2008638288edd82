"""What pruning modifiers share: their target tensors, and pruning at planned steps."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from recipec.modifiers.base import CompileContext, CompileError, Modifier
from recipec.plan import ResolvedModifier
from recipec.sparsity.masks import count_pruned
from recipec.sparsity.selection import SelectionError, layer_rows, require_parameters
from recipec.sparsity.structured import removed_weights


def _removes_groups(recipe: Any) -> bool:
    """Whether a recipe has a modifier that removes heads or FFN neurons."""
    return any(
        getattr(m, "structured", None) in ("heads", "neurons")
        for stage in recipe.resolved_stages()
        for m in stage.modifiers
    )


def target_parameters(resolved: ResolvedModifier, ctx: CompileContext) -> dict[str, nn.Parameter]:
    """The tensors a pruning modifier acts on: its own targets/exclude, else the recipe's
    (``encoder`` or regexes, see :mod:`recipec.sparsity.selection`)."""
    spec = resolved.spec
    targets, exclude = ctx.recipe.targets_of(spec)
    try:
        return require_parameters(
            ctx.model,
            targets,
            exclude,
            what=f"{spec.type} modifier [{resolved.index}]",
            structure=getattr(spec, "structure", "unstructured"),
        )
    except SelectionError as exc:
        raise CompileError(str(exc)) from None


class ScheduledPruner(Modifier):
    """Prunes its targets to the planned sparsity at each of its pruning steps."""

    def __init__(self, resolved: ResolvedModifier, ctx: CompileContext):
        super().__init__(resolved, ctx)
        self.targets = self.find_targets()
        # scope per_layer: the Q, K and V of a fused tensor rank as the three layers they are
        self.layer_rows = layer_rows(ctx.model, self.targets)
        self.history: list[dict[str, Any]] = []

    def find_targets(self) -> dict[str, nn.Parameter]:
        """The tensors this pruner masks (its targets / exclude, else the recipe's)."""
        return target_parameters(self.resolved, self.ctx)

    def on_step_start(self, step: int) -> None:
        sparsity = self.resolved.target_sparsity(step)
        if sparsity is None or any(h["step"] == step for h in self.history):
            return
        started = time.perf_counter()
        new_masks = self.compute(step, sparsity)
        self.ctx.masks.set(new_masks, self.ctx.optimizer)
        achieved = self.achieved_sparsity()
        self.history.append(
            {
                "step": step,
                "target": sparsity,
                "achieved": achieved,
                "seconds": time.perf_counter() - started,
            }
        )
        self.ctx.log(
            f"{self.name}: step {step}: pruned to {100 * achieved:.2f}% (target {100 * sparsity:.2f}%)"
        )

    def compute(self, step: int, sparsity: float) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def previous_masks(self) -> dict[str, torch.Tensor]:
        return {
            name: self.ctx.masks.masks[name]
            for name in self.targets
            if name in self.ctx.masks.masks
        }

    def removed_by_structure(self) -> dict[str, torch.Tensor]:
        """Targets holding weights of removed heads / FFN neurons: True at those weights. Only
        in a recipe with ``heads`` / ``neurons`` modifiers: elsewhere a group that unstructured
        pruning happened to empty still counts as pruned weights (the recipe's sparsity)."""
        if not self.ctx.masks.masks or not _removes_groups(self.ctx.recipe):
            return {}
        return removed_weights(self.ctx.model, self.ctx.masks.masks, self.targets)

    def of_original(
        self, sparsity: float, removed: dict[str, torch.Tensor], names: list[str] | None = None
    ) -> float:
        """The fraction of the original weights (of ``names``, default all targets) to prune so
        that ``sparsity`` of the weights left by structured pruning are pruned:
        ``(R + s (T - R)) / T`` with ``T`` weights of which ``R`` are in removed groups.

        Sparsity counting in a recipe that mixes structured and unstructured pruning: a
        ``gmp``/``obert`` ``final_sparsity`` is a fraction of the weights still in the model
        (the shrunk model's weights); removed heads and neurons are not counted. Without
        structured pruning the two counts are the same."""
        names = list(self.targets) if names is None else names
        total = sum(self.targets[n].numel() for n in names)
        gone = sum(int(removed[n].sum()) for n in names if n in removed)
        return (gone + sparsity * (total - gone)) / total if total else sparsity

    def achieved_sparsity(self) -> float:
        """Pruned fraction of the target weights left by structured pruning (all of them
        without structured pruning)."""
        masks = [self.ctx.masks.masks[n] for n in self.targets if n in self.ctx.masks.masks]
        gone = sum(int(r.sum()) for r in self.removed_by_structure().values())
        total = sum(p.numel() for p in self.targets.values()) - gone
        pruned = sum(count_pruned(m) for m in masks) - gone
        return pruned / total if total else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = list(state.get("history", []))

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
        self.targets = target_parameters(resolved, ctx)
        # scope per_layer: the Q, K and V of a fused tensor rank as the three layers they are
        self.layer_rows = layer_rows(ctx.model, self.targets)
        self.history: list[dict[str, Any]] = []

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

    def achieved_sparsity(self) -> float:
        masks = [self.ctx.masks.masks[n] for n in self.targets if n in self.ctx.masks.masks]
        total = sum(p.numel() for p in self.targets.values())
        pruned = sum(count_pruned(m) for m in masks)
        return pruned / total if total else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = list(state.get("history", []))

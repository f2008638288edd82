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
from recipec.sparsity.selection import SelectionError, require_parameters


def target_parameters(resolved: ResolvedModifier, ctx: CompileContext) -> dict[str, nn.Parameter]:
    """The tensors a pruning modifier acts on: its own targets/exclude, else the recipe's."""
    spec = resolved.spec
    targets = spec.targets or ctx.recipe.targets
    exclude = ctx.recipe.exclude if spec.exclude is None else spec.exclude
    try:
        params = require_parameters(
            ctx.model, targets, exclude, what=f"{spec.type} modifier [{resolved.index}]"
        )
    except SelectionError as exc:
        raise CompileError(str(exc)) from None
    group = getattr(spec, "group_size", 1)
    if group > 1:
        for name, param in params.items():
            if param.dim() != 2 or param.shape[-1] % group:
                raise CompileError(
                    f"{spec.type} modifier [{resolved.index}]: structure {spec.structure} needs 2-D weights whose input "
                    f"dimension is divisible by {group}; {name} has shape {tuple(param.shape)}"
                )
    return params


class ScheduledPruner(Modifier):
    """Prunes its targets to the planned sparsity at each of its pruning steps."""

    def __init__(self, resolved: ResolvedModifier, ctx: CompileContext):
        super().__init__(resolved, ctx)
        self.targets = target_parameters(resolved, ctx)
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

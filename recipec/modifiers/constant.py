"""``constant``: keep the current zeros of the targets fixed (sparse transfer learning)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from recipec.modifiers.base import CompileContext, Modifier
from recipec.modifiers.pruner import target_parameters
from recipec.plan import ResolvedModifier


class ConstantModifier(Modifier):
    """Fix the current zero pattern of the targets (sparse transfer learning)."""

    def __init__(self, resolved: ResolvedModifier, ctx: CompileContext):
        super().__init__(resolved, ctx)
        self.targets = target_parameters(resolved, ctx)
        self.started = False

    def on_step_start(self, step: int) -> None:
        if not self.started and step >= self.resolved.window.start:
            with torch.no_grad():
                self.ctx.masks.set(
                    {n: p.detach() != 0 for n, p in self.targets.items()}, self.ctx.optimizer
                )
            self.started = True

    def state_dict(self) -> dict[str, Any]:
        return {"started": self.started}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.started = bool(state.get("started", False))

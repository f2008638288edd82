"""The Program: a compiled recipe stage, exposed as training-loop hooks.

Driver call order for optimizer step ``step`` (0-based, within the stage)::

    program.step_start(step)            # LR, pruning steps (masks set, weights zeroed)
    outputs = model(**batch)
    loss = program.loss(outputs.loss, batch=batch, outputs=outputs)   # e.g. distillation
    loss.backward()
    program.before_optimizer_step(step) # gradients of pruned weights zeroed
    optimizer.step()
    program.after_optimizer_step(step)  # masks re-applied: pruned weights stay exact zeros
    ...
    program.finalize()
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from recipec.modifiers.base import CompileContext, CompileError, MaskState, Modifier
from recipec.plan import StagePlan


class Program:
    """Hooks for one stage of a recipe; ``state_dict`` captures everything needed to resume."""

    def __init__(self, plan: StagePlan, ctx: CompileContext, modifiers: Sequence[Modifier]):
        self.plan = plan
        self.ctx = ctx
        self.modifiers = list(modifiers)
        self.step = 0
        self.finalized = False

    @property
    def masks(self) -> MaskState:
        return self.ctx.masks

    @property
    def owns_lr(self) -> bool:
        """True when the stage's recipe has ``lr`` modifiers (then it sets the LR every step)."""
        return bool(self.plan.by_type("lr"))

    def lr_at(self, step: int) -> float:
        return self.plan.lr_at(step)

    def step_start(self, step: int) -> None:
        self.step = step
        for mod in self.modifiers:
            mod.on_step_start(step)

    def loss(
        self, loss: torch.Tensor, batch: Mapping[str, Any] | None = None, outputs: Any = None
    ) -> torch.Tensor:
        for mod in self.modifiers:
            loss = mod.on_loss(loss, batch, outputs, self.step)
        return loss

    def recompute_loss(
        self, loss: torch.Tensor, batch: Mapping[str, Any] | None = None, outputs: Any = None
    ) -> torch.Tensor:
        """The same transform as :meth:`loss` at the current step, for gradients a modifier
        computes itself (oBERT's collection, CrAM's second pass): nothing is recorded."""
        for mod in self.modifiers:
            loss = mod.transform_loss(loss, batch, outputs, self.step)
        return loss

    def before_optimizer_step(self, step: int) -> None:
        self.ctx.masks.mask_grads_()
        for mod in self.modifiers:
            mod.on_before_optimizer_step(step)

    def after_optimizer_step(self, step: int) -> None:
        self.ctx.masks.apply_()
        for mod in self.modifiers:
            mod.on_after_optimizer_step(step)

    def finalize(self) -> None:
        """Run remaining pruning steps scheduled at the very end, apply masks, finish modifiers."""
        if self.finalized:
            return
        last = self.plan.total_steps
        for mod in self.modifiers:
            if last in getattr(mod.resolved, "pruning_steps", ()):
                mod.on_step_start(last)
        for mod in self.modifiers:
            mod.on_finalize()
        self.ctx.masks.apply_()
        self.finalized = True

    def sparsity(self) -> tuple[float, dict[str, float]]:
        return self.ctx.masks.sparsity()

    def history(self) -> list[dict[str, Any]]:
        """Pruning events so far: step, target and achieved sparsity, seconds."""
        return [dict(h, modifier=m.name) for m in self.modifiers for h in getattr(m, "history", [])]

    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": self.plan.name,
            "step": self.step,
            "finalized": self.finalized,
            "masks": self.ctx.masks.state_dict(),
            "modifiers": [m.state_dict() for m in self.modifiers],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("stage") != self.plan.name:
            raise CompileError(
                f"checkpoint is for stage {state.get('stage')!r}, not {self.plan.name!r}"
            )
        if len(state["modifiers"]) != len(self.modifiers):
            raise CompileError(
                "checkpoint was written by a recipe with a different number of modifiers"
            )
        self.step = int(state["step"])
        self.finalized = bool(state.get("finalized", False))
        self.ctx.masks.load_state_dict(state["masks"])
        for mod, mod_state in zip(self.modifiers, state["modifiers"]):
            mod.load_state_dict(mod_state)

"""Runtime modifiers: the stateful side of a recipe (specs stay pure data).

A modifier is built from a resolved spec (:class:`recipec.plan.ResolvedModifier`) and a
:class:`CompileContext`. Its hooks are no-ops unless overridden; a stateful modifier overrides
``state_dict`` / ``load_state_dict`` so runs resume exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from recipec.plan import ResolvedModifier, StagePlan
from recipec.recipe.schema import Recipe
from recipec.sparsity.state import MaskState


class CompileError(ValueError):
    """A recipe that cannot be compiled against this model/optimizer."""


@dataclass
class CompileContext:
    """What runtime modifiers may use: the model, optimizer, plan and shared mask state."""

    recipe: Recipe
    plan: StagePlan
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    masks: MaskState
    teacher: nn.Module | str | None = None
    # Returns an iterator over fresh mini-batches (dicts of tensors) for gradient collection.
    grad_batches: Callable[[int], Iterator[Mapping[str, torch.Tensor]]] | None = None
    progress: Callable[[str], None] | None = None
    # Set by compile(): the stage's loss transform at the current step (Program.recompute_loss),
    # for modifiers that compute gradients themselves (obert's collection, cram's second pass).
    loss_fn: Callable[..., torch.Tensor] | None = None

    def log(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)


class Modifier:
    """Base runtime modifier: every hook is a no-op."""

    def __init__(self, resolved: ResolvedModifier, ctx: CompileContext):
        self.resolved = resolved
        self.spec = resolved.spec
        self.ctx = ctx

    @property
    def name(self) -> str:
        return f"{self.spec.type}[{self.resolved.index}]"

    def active(self, step: int) -> bool:
        """True inside the modifier's window ``[start, end)`` (pruners: until the stage ends)."""
        return (
            self.resolved.window.start
            <= step
            < max(self.resolved.window.end, self.resolved.window.start + 1)
        )

    def on_step_start(self, step: int) -> None:
        """Before the forward pass of optimizer step ``step``."""

    def transform_loss(
        self, loss: torch.Tensor, batch: Mapping[str, Any] | None, outputs: Any, step: int
    ) -> torch.Tensor:
        """The loss to backpropagate at ``step`` (e.g. with distillation); pure, no side effects."""
        return loss

    def on_loss(
        self, loss: torch.Tensor, batch: Mapping[str, Any] | None, outputs: Any, step: int
    ) -> torch.Tensor:
        """The driver's loss of ``step``: ``transform_loss``, plus whatever a modifier records."""
        return self.transform_loss(loss, batch, outputs, step)

    def on_before_optimizer_step(self, step: int) -> None:
        """After backward, before ``optimizer.step()``."""

    def on_after_optimizer_step(self, step: int) -> None:
        """After ``optimizer.step()``."""

    def on_finalize(self) -> None:
        """After the last step of the stage."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise CompileError(f"{self.name} has no state but the checkpoint holds {sorted(state)}")

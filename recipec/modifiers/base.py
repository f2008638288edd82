"""Runtime modifiers: the stateful side of a recipe (specs stay pure data).

A modifier is built from a resolved spec (:class:`recipec.plan.ResolvedModifier`) and a
:class:`CompileContext`. Its hooks are no-ops unless overridden; a stateful modifier overrides
``state_dict`` / ``load_state_dict`` so runs resume exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from recipec.plan import ResolvedModifier, StagePlan
from recipec.recipe.schema import Recipe


class CompileError(ValueError):
    """A recipe that cannot be compiled against this model/optimizer."""


class MaskState:
    """The masks of every pruned tensor (True = keep), shared by all pruning modifiers.

    Contract: a pruned weight is a dense tensor with exact zeros where its mask is False.
    Masks are applied to weights after every optimizer step, to gradients before it, and the
    optimizer's per-parameter state (Adam moments) is zeroed at pruned positions whenever a
    mask changes, so nothing pruned is ever resurrected.
    """

    def __init__(self, params: Mapping[str, nn.Parameter]):
        self.params = dict(params)  # every parameter of the model, by name
        self.masks: dict[str, torch.Tensor] = {}
        # ~mask per tensor, kept so the per-step hooks allocate nothing (they run every step).
        self._pruned: dict[str, torch.Tensor] = {}
        # Bumped whenever masks are installed or loaded: lets a driver notice pruning steps
        # (e.g. to check that every rank of a distributed run holds the same masks).
        self.version = 0

    def set(
        self, new_masks: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer | None
    ) -> None:
        """Install masks (AND-ed with existing ones), zero the weights and optimizer state."""
        for name, mask in new_masks.items():
            mask = mask.to(device=self.params[name].device, dtype=torch.bool)
            if name in self.masks:
                mask = mask & self.masks[name]
            self.masks[name] = mask
            self._pruned[name] = ~mask
        self.version += 1
        self.apply_(names=new_masks.keys())
        if optimizer is not None:
            self.zero_optimizer_state_(optimizer, names=new_masks.keys())

    @torch.no_grad()
    def apply_(self, names: Any = None) -> None:
        """Zero pruned weights in place (exact zeros)."""
        for name in self.masks if names is None else names:
            self.params[name].masked_fill_(self._pruned[name], 0)

    @torch.no_grad()
    def mask_grads_(self) -> None:
        """Zero the gradients of pruned weights."""
        for name, pruned in self._pruned.items():
            grad = self.params[name].grad
            if grad is not None:
                grad.masked_fill_(pruned, 0)

    @torch.no_grad()
    def zero_optimizer_state_(self, optimizer: torch.optim.Optimizer, names: Any = None) -> None:
        """Zero every per-parameter state tensor of the optimizer at pruned positions."""
        for name in self.masks if names is None else names:
            param = self.params[name]
            state = optimizer.state.get(param)
            if not state:
                continue
            for value in state.values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    value.masked_fill_(self._pruned[name], 0)

    def sparsity(self) -> tuple[float, dict[str, float]]:
        """Overall and per-tensor fraction of zeros in the masked tensors."""
        per = {name: 1.0 - mask.float().mean().item() for name, mask in self.masks.items()}
        total = sum(mask.numel() for mask in self.masks.values())
        pruned = sum(mask.numel() - int(mask.sum()) for mask in self.masks.values())
        return (pruned / total if total else 0.0), per

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: mask.detach().cpu().clone() for name, mask in self.masks.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        unknown = sorted(set(state) - set(self.params))
        if unknown:
            raise CompileError(
                f"saved masks name tensors this model does not have: {', '.join(unknown[:5])}"
            )
        self.masks = {
            name: mask.to(device=self.params[name].device, dtype=torch.bool)
            for name, mask in state.items()
        }
        self._pruned = {name: ~mask for name, mask in self.masks.items()}
        self.version += 1
        self.apply_()


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
    extra: dict[str, Any] = field(default_factory=dict)

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

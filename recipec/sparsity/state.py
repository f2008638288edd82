"""The masks of a run: which weights are kept, applied to weights, gradients and optimizer state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from recipec.sparsity.masks import mask_sparsity, zero_pruned_


class MaskStateError(ValueError):
    """Saved masks that do not fit the model (e.g. a checkpoint of another architecture)."""


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
        chosen = self.masks if names is None else names
        zero_pruned_(self.params, {name: self._pruned[name] for name in chosen})

    @torch.no_grad()
    def mask_grads_(self) -> None:
        """Zero the gradients of pruned weights."""
        grads = {name: self.params[name].grad for name in self._pruned}
        zero_pruned_(grads, {n: w for n, w in self._pruned.items() if grads[n] is not None})

    @torch.no_grad()
    def zero_optimizer_state_(self, optimizer: torch.optim.Optimizer, names: Any = None) -> None:
        """Zero every per-parameter state tensor of the optimizer at pruned positions."""
        for name in self.masks if names is None else names:
            param = self.params[name]
            state = optimizer.state.get(param)
            if not state:
                continue
            shaped = {
                k: v for k, v in state.items() if torch.is_tensor(v) and v.shape == param.shape
            }
            zero_pruned_(shaped, dict.fromkeys(shaped, self._pruned[name]))

    def sparsity(self) -> tuple[float, dict[str, float]]:
        """Overall and per-tensor fraction of zeros in the masked tensors."""
        return mask_sparsity(self.masks)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: mask.detach().cpu().clone() for name, mask in self.masks.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        unknown = sorted(set(state) - set(self.params))
        if unknown:
            raise MaskStateError(
                f"saved masks name tensors this model does not have: {', '.join(unknown[:5])}"
            )
        self.masks = {
            name: mask.to(device=self.params[name].device, dtype=torch.bool)
            for name, mask in state.items()
        }
        self._pruned = {name: ~mask for name, mask in self.masks.items()}
        self.version += 1
        self.apply_()

"""``gmp``: gradual magnitude pruning (Zhu & Gupta 2017) on the planned schedule."""

from __future__ import annotations

import torch

from recipec.modifiers.pruner import ScheduledPruner
from recipec.sparsity.masks import compute_masks, magnitude_scores


class GMPModifier(ScheduledPruner):
    """Gradual magnitude pruning: rank |w| (globally or per layer) at each pruning step."""

    @torch.no_grad()
    def compute(self, step: int, sparsity: float) -> dict[str, torch.Tensor]:
        spec = self.spec
        scores, prev = magnitude_scores(self.targets), self.previous_masks()
        removed = self.removed_by_structure()  # sparsity counts the weights left (see pruner)
        if not removed or spec.scope == "global":
            sparsity = self.of_original(sparsity, removed) if removed else sparsity
            return compute_masks(
                scores,
                sparsity,
                spec.structure,
                spec.scope,
                prev_masks=prev,
                layer_rows=self.layer_rows,
            )
        masks = {}
        for name, score in scores.items():
            masks.update(
                compute_masks(
                    {name: score},
                    self.of_original(sparsity, removed, [name]),
                    spec.structure,
                    "per_layer",
                    prev_masks={name: prev[name]} if name in prev else None,
                    layer_rows={name: self.layer_rows[name]} if name in self.layer_rows else None,
                )
            )
        return masks

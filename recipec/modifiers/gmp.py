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
        return compute_masks(
            magnitude_scores(self.targets),
            sparsity,
            spec.structure,
            spec.scope,
            prev_masks=self.previous_masks(),
            layer_rows=self.layer_rows,
        )

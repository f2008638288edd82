"""What the structured pruners (``heads``, ``neurons``) share: groups, saliency, selection.

A structured pruner acts on the GMP schedule (:class:`recipec.modifiers.pruner.ScheduledPruner`)
but its unit is a whole group (:mod:`recipec.sparsity.structured`): at each pruning step it
scores the groups of its layers, keeps the best ``1 - sparsity`` of them (per layer, or ranked
globally with ``min_per_layer`` protected in every layer) and installs whole-group masks in the
shared :class:`recipec.sparsity.state.MaskState`. Removed groups stay removed. The masked model
computes exactly what the model shrunk at export computes (:mod:`recipec.sparsity.shrink`).

It ignores the recipe's ``targets`` regexes: its tensors are the target-role weights of the
heads (or neurons) of its ``layers``, found per family by :mod:`recipec.architectures`.
"""

from __future__ import annotations

import torch
from torch import nn

from recipec.modifiers.base import CompileError
from recipec.modifiers.pruner import ScheduledPruner
from recipec.recipe.checks import group_count_problem
from recipec.sparsity.structured import (
    StructureError,
    fisher_group_scores,
    group_masks,
    group_sets,
    kept_groups,
    magnitude_group_scores,
    select_groups,
)


class StructuredPruner(ScheduledPruner):
    """Prunes whole heads or FFN neurons (``spec.structured``) at the planned steps."""

    def __init__(self, resolved, ctx):
        spec = resolved.spec
        try:
            self.sets = group_sets(ctx.model, spec.structured, layers=spec.layers)
        except StructureError as exc:
            raise CompileError(f"{spec.type} modifier [{resolved.index}]: {exc}") from None
        problem = group_count_problem(spec, {gs.layer: gs.count for gs in self.sets})
        if problem:
            raise CompileError(
                f"stage {ctx.plan.name!r} modifiers.{resolved.index}.final_sparsity "
                f"({spec.type}): {problem}"
            )
        if spec.needs_grad_batches and ctx.grad_batches is None:
            raise CompileError(
                f"{spec.type} modifier [{resolved.index}] with saliency: fisher needs gradient "
                "batches: pass grad_batches= to compile() (recipec apply does this for you)"
            )
        super().__init__(resolved, ctx)

    def find_targets(self) -> dict[str, nn.Parameter]:
        params = dict(self.ctx.model.named_parameters())
        return {s.param: params[s.param] for gs in self.sets for s in gs.targets()}

    def previous_keep(self) -> dict[str, torch.Tensor]:
        """Kept groups per set under the current masks (all of them before the first step)."""
        return {gs.key: kept_groups(gs, self.ctx.masks.masks) for gs in self.sets}

    def scores(self) -> dict[str, torch.Tensor]:
        spec = self.spec
        if spec.saliency == "magnitude":
            return magnitude_group_scores(self.sets, self.targets)
        from recipec.modifiers.obert import gradient_fn

        model = self.ctx.model
        was_training = model.training
        model.eval()
        try:
            return fisher_group_scores(
                self.sets,
                self.targets,
                gradient_fn(self.ctx, self.targets, spec.grad_batch_size),
                num_grads=spec.num_grads,
                block_size=spec.fisher_block_size,
                damp=spec.damp,
                max_memory_gb=spec.max_memory_gb,
                progress=self.ctx.progress,
            )
        finally:
            model.train(was_training)

    @torch.no_grad()
    def compute(self, step: int, sparsity: float) -> dict[str, torch.Tensor]:
        spec = self.spec
        try:
            keep = select_groups(
                self.scores(), sparsity, spec.scope, self.previous_keep(), spec.min_per_layer
            )
        except StructureError as exc:
            raise CompileError(f"{self.name}: step {step}: {exc}") from None
        return group_masks(self.sets, keep, self.targets)

    def achieved_sparsity(self) -> float:
        """Fraction of this pruner's groups removed."""
        keep = self.previous_keep()
        total = sum(k.numel() for k in keep.values())
        return sum(int((~k).sum()) for k in keep.values()) / total if total else 0.0

    def kept_counts(self) -> dict[int, int]:
        """Storage layer -> groups kept (for logs and reports)."""
        return {gs.layer: int(kept_groups(gs, self.ctx.masks.masks).sum()) for gs in self.sets}

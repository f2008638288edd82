"""Pruning modifiers: gmp (magnitude), obert (second order), constant (fixed zeros)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from recipec import distributed as dist_utils
from recipec.modifiers.base import CompileContext, CompileError, Modifier
from recipec.plan import ResolvedModifier
from recipec.sparsity.masks import compute_masks, magnitude_scores
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


class _ScheduledPruner(Modifier):
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
        pruned = sum(m.numel() - int(m.sum()) for m in masks)
        return pruned / total if total else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = list(state.get("history", []))


class GMPModifier(_ScheduledPruner):
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
        )


class OBertModifier(_ScheduledPruner):
    """oBERT: masks and weight updates from the block-diagonal inverse empirical Fisher.

    Gradients are collected with the model in eval mode from ``ctx.grad_batches`` (mini-batches
    of ``grad_batch_size``) using the task loss — or the distillation loss when the stage
    distils. ``recomputations`` splits each pruning step into sub-steps between the previous and
    the target sparsity, re-estimating the Fisher in between.

    ``ctx.extra["obert_grad_batch"] = k`` (e.g. ``program.ctx.extra[...]`` after compiling;
    default 1) buffers ``k`` gradients per rank-k Woodbury update of the inverse Fisher: the
    same Fisher up to float rounding, several times faster per gradient at B=50
    (``benchmarks/obert_cost.py``), for ``k * numel * 4`` more bytes of buffered gradients.
    The default is the exact rank-1 recursion.

    Distributed runs (see docs/distributed.md): every one of the ``m`` gradients is all-reduced,
    so every rank builds the same Fisher from the same global mini-batches and takes the same,
    deterministic decision (masks and OBS weight updates). Each rank computes the gradient of
    its shard of a mini-batch, scaled by its share ``n_rank / n_global`` (the ``weight`` of a
    :class:`recipec.distributed.ShardBatch`), and the sum over ranks is the gradient of
    the whole mini-batch's mean loss; plain batches (no ``weight``) are averaged instead. We
    chose this over "rank 0 computes and broadcasts" because the ``m`` forward/backward passes
    (the larger part of a pruning step) are split across ranks, no rank idles for minutes
    inside a collective (which would race the process-group timeout), and the Fisher code runs
    unchanged. The price is that every rank holds the inverse Fisher (``max_memory_gb`` is per
    rank) and does the same Woodbury updates; the driver verifies with a checksum that all
    ranks ended with bit-identical masks and weights.
    """

    def __init__(self, resolved: ResolvedModifier, ctx: CompileContext):
        super().__init__(resolved, ctx)
        if ctx.grad_batches is None:
            raise CompileError(
                f"obert modifier [{resolved.index}] needs gradient batches: pass grad_batches= to compile() "
                "(recipec apply does this for you)"
            )

    def _grad_fn(self):
        spec = self.spec
        model = self.ctx.model
        names = list(self.targets)
        loss_fn = self.ctx.loss_fn
        batches = self.ctx.grad_batches(spec.grad_batch_size)
        distributed = dist_utils.is_distributed()

        def grad() -> dict[str, torch.Tensor]:
            nonlocal batches
            try:
                batch = next(batches)
            except StopIteration:
                batches = self.ctx.grad_batches(spec.grad_batch_size)
                batch = next(batches)
            weight = getattr(batch, "weight", None)
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                outputs = model(**batch)
                loss = outputs.loss
                if loss_fn is not None:
                    loss = loss_fn(loss, batch=batch, outputs=outputs)
                if distributed and weight is not None:
                    loss = loss * weight  # this rank's share of the global mini-batch mean
                loss.backward()
            out = {n: self.targets[n].grad.detach().float().clone() for n in names}
            model.zero_grad(set_to_none=True)
            if distributed:
                out = dist_utils.all_reduce_dict(
                    out, mean=weight is None, what="oBERT gradient all-reduce"
                )
            return out

        return grad

    def compute(self, step: int, sparsity: float) -> dict[str, torch.Tensor]:
        from recipec.sparsity.obs import obert_prune_step

        spec = self.spec
        model = self.ctx.model
        was_training = model.training
        model.eval()
        previous = self.achieved_sparsity()
        masks = self.previous_masks() or None
        try:
            for r in range(1, spec.recomputations + 1):
                sub_target = previous + (sparsity - previous) * r / spec.recomputations
                masks = obert_prune_step(
                    {n: p.data for n, p in self.targets.items()},
                    masks,
                    self._grad_fn(),
                    sparsity=sub_target,
                    structure=spec.structure,
                    scope=spec.scope,
                    num_grads=spec.num_grads,
                    block_size=spec.fisher_block_size,
                    damp=spec.damp,
                    fisher=spec.fisher,
                    max_memory_gb=spec.max_memory_gb,
                    progress=self.ctx.progress,
                    # Opt-in rank-k Woodbury (see the class docstring); default: exact rank-1.
                    grad_batch=int(self.ctx.extra.get("obert_grad_batch", 1)),
                )
        finally:
            model.train(was_training)
        return masks


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

"""``obert``: second-order pruning with the block-diagonal empirical Fisher (Kurtic et al. 2022)."""

from __future__ import annotations

import torch

from recipec import distributed as dist_utils
from recipec.modifiers.base import CompileContext, CompileError
from recipec.modifiers.pruner import ScheduledPruner
from recipec.plan import ResolvedModifier


class OBertModifier(ScheduledPruner):
    """oBERT: masks and weight updates from the block-diagonal inverse empirical Fisher.

    Gradients are collected with the model in eval mode from ``ctx.grad_batches`` (mini-batches
    of ``grad_batch_size``) using the task loss — or the distillation loss when the stage
    distils. ``recomputations`` splits each pruning step into sub-steps between the previous and
    the target sparsity, re-estimating the Fisher in between.

    ``woodbury_batch: k`` (spec field, default 1) buffers ``k`` gradients per rank-k Woodbury
    update of the inverse Fisher: the same Fisher up to float rounding, several times faster
    per gradient at B=50 (``benchmarks/obert_cost.py``), for ``k * numel * 4`` more bytes of
    buffered gradients. The default is the exact rank-1 recursion.

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
                    grad_batch=spec.woodbury_batch,
                    layer_rows=self.layer_rows,
                )
        finally:
            model.train(was_training)
        return masks

"""CrAM: compression-aware training, so that the trained dense model prunes one-shot.

CrAM / CrAM+ (Peste et al., ICLR 2023). At every optimizer step inside the modifier's window,
after the ordinary backward pass has left the gradient ``g`` of the loss at the weights ``w``:

1. ``w' = w + rho * g`` (every parameter that has a gradient: a sharpness-style ascent step); with
   ``normalize: true``, ``w' = w + rho * g / ||g||`` (L2 norm over all those gradients, as in SAM), so
   the step has length ``rho`` whatever the gradient's scale (the log gives the mean ``||g||`` either way);
2. a sparsity ``k`` is drawn from ``sparsities`` (uniformly; a pure function of the stage seed,
   the modifier's index and the step, so a resumed run draws the same ones);
3. ``w~ = TopK_k(w')`` on the modifier's targets: magnitude masks of ``structure`` and ``scope``
   at sparsity ``k`` (other parameters stay at ``w'``);
4. ``g~`` = the gradient of the same loss (``Program.recompute_loss`` at this step: with
   distillation when a ``distill`` modifier is active) on the same mini-batch(es) at ``w~``, masked to the
   weights kept in step 3; the second forward draws its own dropout masks;
5. the weights go back to ``w`` and the optimizer steps with ``g~`` (``cram``) or ``g~ + g``
   (``cram_plus``, the default: it also keeps the dense model accurate).

It costs one more forward and backward pass per step, and one copy of the weights and of the
gradients. CrAM sets no masks: the model stays dense, and masks set before (an earlier stage)
stay applied (their gradients are zeroed again after step 5). Prune it afterwards one-shot, e.g.
with a ``gmp`` or ``obert`` modifier in a later prune-only stage (``training.steps: 0``; the
bundled ``cram_plus.yaml``). In float32 or bf16 (no loss scaling). Distributed (``recipec apply``
under torchrun): the perturbation uses the all-reduced gradient, so every rank compresses to the
same point; each rank weights its shard's second-pass loss by its share of the global batch and
the gradients are summed over ranks. The same holds under the HF Trainer with torchrun (its DDP;
the ranks' shards have equal sizes there, so the second-pass gradients are averaged); the Trainer
refuses it with ``torch.nn.DataParallel`` (several GPUs in one process).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch

from recipec import distributed as dist_utils
from recipec.modifiers.base import CompileContext, Modifier
from recipec.modifiers.pruner import target_parameters
from recipec.plan import ResolvedModifier
from recipec.sparsity.masks import compute_masks
from recipec.sparsity.selection import layer_rows


def sampled_sparsity(sparsities: list[float], seed: int, index: int, step: int) -> float:
    """The sparsity CrAM compresses to at ``step``: uniform over ``sparsities``, reproducible."""
    return random.Random(f"cram:{seed}:{index}:{step}").choice(list(sparsities))


def gradient_norm(grads) -> float:
    """The L2 norm of all the gradients together (accumulated in float64)."""
    total = sum(
        (g.detach().double().pow(2).sum() for g in grads), torch.zeros((), dtype=torch.float64)
    )
    return float(total.sqrt())


class CrAMModifier(Modifier):
    """Replaces each step's gradient by CrAM's (see the module docstring)."""

    def __init__(self, resolved: ResolvedModifier, ctx: CompileContext):
        super().__init__(resolved, ctx)
        self.targets = target_parameters(resolved, ctx)
        self.layer_rows = layer_rows(ctx.model, self.targets)  # fused Q/K/V: layers of their own
        self.seed = int(ctx.plan.training.seed)
        self._batches: list[Mapping[str, Any]] = []
        self.counts: dict[float, int] = {}  # how often each sparsity was drawn (for the log)
        self.grad_norm_sum = 0.0  # sum of ||g|| over the CrAM steps (for the log)
        self._announced = False

    def sparsity_at(self, step: int) -> float:
        return sampled_sparsity(self.spec.sparsities, self.seed, self.resolved.index, step)

    def on_loss(
        self, loss: torch.Tensor, batch: Mapping[str, Any] | None, outputs: Any, step: int
    ) -> torch.Tensor:
        if self.active(step):
            if batch is None:
                raise ValueError(
                    "cram needs the mini-batch: call Program.loss(loss, batch=..., outputs=...)"
                )
            self._batches.append(batch)  # gradient accumulation: every micro-batch of the step
        return loss

    def on_before_optimizer_step(self, step: int) -> None:
        batches, self._batches = self._batches, []
        if not self.active(step) or not batches:
            return
        if not self._announced:
            self._announced = True
            self.ctx.log(
                f"{self.name}: {self.spec.variant} from step {self.resolved.window.start} to "
                f"{self.resolved.window.end}, rho {self.spec.rho:g}{' (normalized)' if self.spec.normalize else ''}, sparsities "
                f"{', '.join(f'{s:g}' for s in self.spec.sparsities)} ({self.spec.scope}, {self.spec.structure})"
            )
        model = self.ctx.model
        params = {
            n: p for n, p in model.named_parameters() if p.requires_grad and p.grad is not None
        }
        moved = {**params, **self.targets}
        sparsity = self.sparsity_at(step)
        with torch.no_grad():
            saved = {n: p.detach().clone() for n, p in moved.items()}
            dense_grads = {n: p.grad.detach().clone() for n, p in params.items()}
            grad_norm = gradient_norm(dense_grads.values())
        try:
            keep = self._compressed_gradients(
                model, params, dense_grads, self.ascent_scale(grad_norm), sparsity, batches
            )
        except BaseException:
            for n, p in params.items():  # leave the step as the ordinary one: gradient g
                p.grad = dense_grads[n]
            raise
        finally:
            with torch.no_grad():  # the weights go back to w either way
                for n, p in moved.items():
                    p.copy_(saved[n])
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n not in params:
                    p.grad = None  # no gradient in the ordinary pass: none now either
            for n, p in params.items():
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                if n in keep:
                    grad.mul_(keep[n])
                if self.spec.variant == "cram_plus":
                    grad.add_(dense_grads[n])
                p.grad = grad
        self.counts[sparsity] = self.counts.get(sparsity, 0) + 1
        self.grad_norm_sum += grad_norm
        self.ctx.masks.mask_grads_()

    def ascent_scale(self, grad_norm: float) -> float:
        """The factor on ``g`` in ``w' = w + scale * g``: rho, or rho / ||g|| when normalized."""
        if not self.spec.normalize:
            return self.spec.rho
        return self.spec.rho / grad_norm if grad_norm > 0.0 else 0.0  # a zero gradient: no ascent

    def _compressed_gradients(
        self, model, params, dense_grads, scale, sparsity, batches
    ) -> dict[str, torch.Tensor]:
        """Move the weights to ``w~`` and leave the gradient there in ``.grad``; returns the top-k masks."""
        with torch.no_grad():
            for n, p in params.items():
                p.add_(dense_grads[n], alpha=scale)
            keep = compute_masks(
                {n: p.detach().abs() for n, p in self.targets.items()},
                sparsity,
                self.spec.structure,
                self.spec.scope,
                layer_rows=self.layer_rows,
            )
            for n, p in self.targets.items():
                p.mul_(keep[n])
        loss_fn = self.ctx.loss_fn
        distributed = dist_utils.is_distributed()
        weights = [getattr(batch, "weight", None) for batch in batches]
        shares = distributed and all(w is not None for w in weights)
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            for batch, weight in zip(batches, weights):
                outputs = model(
                    **batch
                )  # the bare model: DDP's hooks only wait for its own forward's backward
                loss = outputs.loss
                if loss is None:
                    raise ValueError(
                        f"{self.name}: the model returned no loss for the stored batch "
                        "(CrAM needs the labels in it)"
                    )
                if loss_fn is not None:
                    loss = loss_fn(loss, batch=batch, outputs=outputs)
                # this rank's share of the global mini-batch mean, summed over ranks below; else the mean
                (loss * weight if shares else loss / len(batches)).backward()
        if distributed:
            grads = {
                n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in params.items()
            }
            reduced = dist_utils.all_reduce_dict(
                grads, mean=not shares, what=f"{self.name} gradient all-reduce"
            )
            for n, p in params.items():
                p.grad = reduced[n]
        return keep

    def on_finalize(self) -> None:
        if self.counts:
            steps = sum(self.counts.values())
            drawn = ", ".join(f"{s:g}: {c}" for s, c in sorted(self.counts.items()))
            self.ctx.log(
                f"{self.name}: {steps} CrAM steps (sparsity drawn: {drawn}; mean gradient norm "
                f"{self.grad_norm_sum / steps:.3g})"
            )

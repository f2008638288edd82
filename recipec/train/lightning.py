"""PyTorch Lightning integration: the Program's hooks as a Lightning callback.

Install with ``pip install 'recipec[lightning]'`` (Lightning 2.x, the ``lightning`` package).
Usage::

    import lightning as L
    from recipec.train.lightning import RecipecCallback, RecipecLossMixin

    class Module(RecipecLossMixin, L.LightningModule):
        def __init__(self, model, optimizer):
            super().__init__()
            self.model, self.optimizer = model, optimizer

        def training_step(self, batch, batch_idx):
            outputs = self.model(**batch)
            return self.recipec_loss(outputs.loss, batch=batch, outputs=outputs)  # distillation

        def configure_optimizers(self):
            return self.optimizer            # the optimizer the recipe was compiled with

    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    steps_per_epoch = math.ceil(len(loader) / accumulate_grad_batches)
    program = recipec.compile(recipe, model, optimizer, steps_per_epoch=steps_per_epoch)
    trainer = L.Trainer(max_epochs=..., accumulate_grad_batches=accumulate_grad_batches,
                        gradient_clip_val=1.0, callbacks=[RecipecCallback(program)])
    trainer.fit(Module(model, optimizer), loader)

Event mapping in Lightning 2.x (automatic optimization), for optimizer step ``k``
(``trainer.global_step == k`` until that optimizer step has completed)::

    on_train_batch_start, first micro-batch of step k   program.step_start(k)   LR, pruning steps
    training_step (each micro-batch):
        self.recipec_loss(loss, batch, outputs)         program.loss(...)       e.g. distillation
        backward (Lightning divides the loss by accumulate_grad_batches)
    on_before_optimizer_step (last micro-batch)         program.before_optimizer_step(k)
    clip to gradient_clip_val                           (Lightning, after the hook: the norm
                                                        covers only the kept weights)
    optimizer.step(); the scheduler's "step" interval
    on_train_batch_end, once global_step is k + 1       program.after_optimizer_step(k)
                                                        (masks re-applied; under DDP compared
                                                        across ranks when they changed)
    ModelCheckpoint saves                               (checkpoint callbacks run last)
    ...
    on_train_end                                        program.finalize()
    on_exception, teardown, on_train_end                program.close()

With gradient accumulation ``on_train_batch_start`` fires for every micro-batch; the callback
starts step ``k`` on the first one whose ``trainer.global_step`` is ``k``, so the Program
counts optimizer steps exactly. Lightning also steps on the last batch of an epoch when the
accumulation group is short: ``steps_per_epoch = ceil(batches / accumulate_grad_batches)``.

Learning rate: as with the HF Trainer. When the stage has ``lr`` modifiers (or was compiled
with ``own_lr=True``) the Program writes :meth:`recipec.plan.StagePlan.lr_at` into every
parameter group at every ``step_start``; a scheduler from ``configure_optimizers`` still
steps, but its value is overwritten before the next forward: **the recipe wins**. Without
them the Program never touches the LR. (``LearningRateMonitor`` logs in
``on_train_batch_start``: list ``RecipecCallback`` first to log the recipe's LR.)

Loss: a Lightning callback cannot change the loss. A stage with ``distill`` or ``cram``
(``needs_loss_inputs``) needs ``program.loss`` in ``training_step``: mix in
:class:`RecipecLossMixin` and return ``self.recipec_loss(loss, batch=batch, outputs=outputs)``
(or call :meth:`RecipecCallback.loss`). The callback refuses the first backward of such a
stage whose loss did not go through it. Outside training (``validation_step``) the loss is
returned unchanged.

Checkpoints: the callback is stateful. Every Lightning checkpoint holds
:meth:`recipec.program.Program.state_dict` (masks, modifier state) under
``checkpoint["callbacks"][callback.state_key]``, and ``trainer.fit(module, ckpt_path=...)``
loads it back, so the schedule and the masks continue. Resuming at a step > 0 from a
checkpoint without it is refused (pruned weights would grow back). Lightning restores the
data position only at epoch ends or with a resumable dataloader, and keeps no RNG state.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError as exc:  # the optional extra is not installed
    raise ImportError(
        "recipec.train.lightning needs PyTorch Lightning 2.x: pip install 'recipec[lightning]' "
        f"(or pip install lightning); importing it failed with: {exc}"
    ) from None

from recipec import distributed as dist_utils
from recipec.program import Program

__all__ = ["RecipecCallback", "RecipecLossMixin"]

_SHARDING_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel")


class RecipecCallback(pl.Callback):
    """Calls a compiled :class:`~recipec.program.Program`'s hooks from Lightning's events.

    Args:
        program: The compiled stage. Its model must be (inside) the LightningModule and its
            optimizer the one ``configure_optimizers`` returns.
    """

    def __init__(self, program: Program):
        self.program = program
        self._started: int | None = None  # the step whose step_start ran
        self._done: int | None = None  # the step whose after_optimizer_step ran
        self._loss_seen = False  # program.loss ran in this micro-batch
        self._loaded = False  # load_state_dict ran since the last fit ended
        self._checked_version = program.masks.version

    @property
    def state_key(self) -> str:
        return self._generate_state_key(stage=self.program.plan.name)

    # -- the loss -------------------------------------------------------------------------

    def loss(
        self, loss: torch.Tensor, batch: Mapping[str, Any] | None = None, outputs: Any = None
    ) -> torch.Tensor:
        """``program.loss(loss, batch=batch, outputs=outputs)`` in training; ``loss`` otherwise."""
        if not self.program.ctx.model.training:
            return loss
        self._loss_seen = True
        return self.program.loss(loss, batch=batch, outputs=outputs)

    # -- checks at the start --------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        program = self.program
        if not pl_module.automatic_optimization:
            raise ValueError(
                "RecipecCallback follows Lightning's automatic optimization; with "
                "automatic_optimization = False call the Program's hooks in training_step "
                "yourself, in the plain loop's order (docs/frameworks.md)"
            )
        if not any(m is program.ctx.model for m in pl_module.modules()):
            raise ValueError(
                "the LightningModule does not hold the model the recipe was compiled for"
            )
        optimizers = list(trainer.optimizers)
        if program.ctx.optimizer is not None and (
            len(optimizers) != 1 or optimizers[0] is not program.ctx.optimizer
        ):
            raise ValueError(
                "configure_optimizers must return the one optimizer the recipe was compiled with "
                "(compile the recipe with it, then return it from configure_optimizers)"
            )
        if program.plan.training.prune_only:
            raise ValueError(
                f"stage {program.plan.name!r} is prune-only (training.steps: 0): it takes no "
                "optimizer step; instead of trainer.fit(), run program.step_start(0) then "
                "program.finalize() (oBERT needs grad_batches= in recipec.compile)"
            )
        if program.plan.with_trait("second_pass"):
            _check_second_pass(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step  # restored from the checkpoint by now
        if step > 0 and not self._loaded and self._done != step - 1:
            raise RuntimeError(
                f"resuming at step {step} from a checkpoint without this Program's state "
                f"(checkpoint['callbacks'][{self.state_key!r}]): without the saved masks pruned "
                "weights would grow back. Save checkpoints with RecipecCallback in the Trainer's "
                "callbacks, or call callback.load_state_dict(state) before fit()"
            )
        self._started = None
        self._check_masks(f"start (step {step})")
        planned = self.program.plan.total_steps
        estimated = trainer.estimated_stepping_batches
        if math.isfinite(estimated) and int(estimated) != planned:
            warnings.warn(
                f"the Trainer will run {int(estimated)} optimizer steps but the recipe stage "
                f"{self.program.plan.name!r} is planned for {planned} "
                f"(steps_per_epoch={self.program.plan.steps_per_epoch}); pruning and LR follow the "
                "plan's steps",
                stacklevel=2,
            )

    # -- every optimizer step -------------------------------------------------------------

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._loss_seen = False
        step = trainer.global_step
        if self._started != step:  # the first micro-batch of optimizer step `step`
            self._started = step
            self.program.step_start(step)

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if not self._loss_seen and self.program.plan.with_trait("needs_loss_inputs"):
            raise ValueError(
                f"stage {self.program.plan.name!r} distils or uses CrAM, which needs the loss "
                "and its mini-batch: return self.recipec_loss(loss, batch=batch, "
                "outputs=outputs) from training_step (RecipecLossMixin), or "
                "callback.loss(...)"
            )

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self.program.before_optimizer_step(trainer.global_step)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = self._started
        if step is None or trainer.global_step != step + 1 or self._done == step:
            return  # a micro-batch that only accumulated gradients
        self._done = step
        self.program.after_optimizer_step(step)
        if self.program.masks.version != self._checked_version:
            self._check_masks(f"step {step} (after pruning)")

    # -- the end, however it comes --------------------------------------------------------

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.program.close()
        self.program.finalize()
        self._check_masks("end (after finalize)")
        self._loaded = False

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.program.close()
        self._loaded = False

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.program.close()

    # -- state in Lightning checkpoints ---------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return self.program.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.program.load_state_dict(state_dict)
        self._loaded = True

    def _check_masks(self, where: str) -> None:
        """Under DDP: masks and masked weights bit-identical on every rank (nothing in one
        process)."""
        masks = self.program.masks
        dist_utils.verify_identical(
            masks.masks, masks.params, f"stage {self.program.plan.name!r} {where}"
        )
        self._checked_version = masks.version


class RecipecLossMixin:
    """A ``LightningModule`` mixin: ``self.recipec_loss(loss, batch=..., outputs=...)`` applies
    the Program's loss transform (distillation, CrAM's batches) through the Trainer's
    :class:`RecipecCallback`."""

    def recipec_loss(
        self, loss: torch.Tensor, batch: Mapping[str, Any] | None = None, outputs: Any = None
    ) -> torch.Tensor:
        found = [c for c in self.trainer.callbacks if isinstance(c, RecipecCallback)]
        if len(found) != 1:
            raise RuntimeError(
                f"recipec_loss needs exactly one RecipecCallback in the Trainer's callbacks, "
                f"found {len(found)}"
            )
        return found[0].loss(loss, batch=batch, outputs=outputs)


def _check_second_pass(trainer: pl.Trainer) -> None:
    """CrAM's second forward/backward: not loss-scaled, and on the bare, whole model."""
    if str(trainer.precision).startswith("16"):
        raise ValueError(
            "a cram modifier runs a second forward/backward pass that is not loss-scaled: train "
            "it with precision 32 or bf16"
        )
    strategy = type(trainer.strategy).__name__
    if any(name in strategy for name in _SHARDING_STRATEGIES):
        raise ValueError(
            f"a cram modifier runs its second pass on the bare model with whole parameters and "
            f"gradients, which {strategy} shards: use the DDP strategy"
        )

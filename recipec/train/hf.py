"""Hugging Face ``Trainer`` integration: the Program's hooks as a callback, its loss in a Trainer.

Usage::

    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    program = recipec.compile(recipe, model, optimizer, steps_per_epoch=len(train_loader))
    trainer = RecipecTrainer(model=model, args=args, train_dataset=train, program=program)
    trainer.train()      # the optimizer the program was compiled with is used

Event mapping in transformers 5.x (``Trainer._inner_training_loop``), for optimizer step ``k``
(``state.global_step == k`` from ``on_step_begin`` to ``on_optimizer_step``; it becomes
``k + 1`` just before ``on_step_end``)::

    on_step_begin                 program.step_start(k)            LR written, pruning steps run
    training_step (each micro-batch, RecipecTrainer only):
        compute_loss              program.loss(loss, batch, outputs)   e.g. distillation
        backward, then            program.masks.mask_grads_()      before clipping sees them
        (last micro-batch)        program.before_optimizer_step(k) instead: masks, CrAM's gradient
    clip to args.max_grad_norm    (the Trainer; gradients of pruned weights already zero)
    on_pre_optimizer_step         program.before_optimizer_step(k) unless RecipecTrainer ran it
    optimizer.step()
    on_optimizer_step             program.after_optimizer_step(k)  masks re-applied (and, under
                                  torchrun, compared across ranks when they changed)
    lr_scheduler.step(); global_step = k + 1; on_step_end
    ...
    on_train_end                  program.finalize()

With gradient accumulation ``on_step_begin`` fires once per optimizer step, before the first
micro-batch, so the Program counts optimizer steps exactly as in the plain loop.

Learning rate: when the stage has ``lr`` modifiers the Program writes the recipe's LR
(:meth:`recipec.plan.StagePlan.lr_at`) into every parameter group at every ``step_start``.
The Trainer still builds and steps its own scheduler (linear decay by default), but its value
is overwritten at the next step start, before the optimizer uses it: **the recipe wins**, and
the logged ``learning_rate`` (read before the scheduler steps) is the recipe's. Without ``lr``
modifiers the Program never touches the LR and the Trainer's scheduler owns it.

Gradient clipping: the Trainer clips *before* ``on_pre_optimizer_step``. ``RecipecTrainer``
zeroes pruned weights' gradients right after backward, so the clipping norm covers only the
kept weights, as in the plain loop (mask, clip, step). With a plain ``Trainer`` and only the
callback, the norm also counts the (discarded) gradients of pruned weights, so steps are
slightly smaller; masks hold either way.

Loss: callbacks cannot change the loss, so a stage with ``distill`` needs ``RecipecTrainer``
(the callback refuses to start without it). The Program's loss applies in training only;
evaluation reports the model's own task loss. ``RecipecTrainer`` computes a per-batch mean
loss (``num_items_in_batch`` is not passed to the model) and lets the Trainer divide it by
the number of accumulation steps, so the task and distillation terms share one scale.

Checkpoints: on every Trainer save the callback writes ``recipec_program.json`` and
``recipec_program.safetensors`` (:meth:`recipec.program.Program.state_dict`: masks, modifier
state; the format of :mod:`recipec.train.resume`, never a pickle) into the checkpoint folder, and
on ``trainer.train(resume_from_checkpoint=...)`` it loads them back from
``<output_dir>/checkpoint-<global_step>`` (or call
``callback.load_state_dict(read_program_state(folder))`` yourself before training when the
checkpoint lives elsewhere). A ``recipec_program.pt`` of an older recipec is refused, not
unpickled.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from recipec.program import Program
from recipec.train.resume import read_state, write_state

__all__ = ["PROGRAM_STATE_NAME", "RecipecCallback", "RecipecTrainer", "read_program_state"]

_PROGRAM_STEM = "recipec_program"
PROGRAM_STATE_NAME = f"{_PROGRAM_STEM}.json"
"""File written into each Trainer checkpoint folder with the Program's state (its tensors go
into ``recipec_program.safetensors`` beside it)."""


def read_program_state(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The Program state the callback saved in a Trainer checkpoint folder (checked: format,
    sizes and SHA-256 of its files); ``recipec.train.resume.CheckpointStateError`` naming the
    file when it is missing, damaged, foreign or an older recipec's pickle."""
    return read_state(Path(folder), _PROGRAM_STEM)


_CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR


def _unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or the argument)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


class RecipecCallback(TrainerCallback):
    """Calls a compiled :class:`~recipec.program.Program`'s hooks from ``Trainer`` events.

    Args:
        program: The compiled stage. Its model and optimizer must be the Trainer's.
        sparse_backprop: A minimum layer sparsity (e.g. 0.9) to run pruned linear layers on
            recipec's sparse CPU kernels between mask changes (:mod:`recipec.kernels.sparse_backprop`;
            CPU, one process, not with ``cram``); None (default) keeps the dense kernels.
            ``RecipecTrainer.train`` removes them however training ends; with a plain
            ``Trainer``, call ``callback.remove_sparse_kernels()`` after a ``train()`` that raised.
    """

    def __init__(self, program: Program, sparse_backprop: float | None = None):
        if sparse_backprop is not None and not 0.0 <= sparse_backprop <= 1.0:
            raise ValueError(
                f"sparse_backprop is a minimum layer sparsity in [0, 1], got {sparse_backprop}"
            )
        self.program = program
        self.sparse_backprop = sparse_backprop
        self.loss_hooked = False  # set by RecipecTrainer, which applies program.loss
        self._loaded = False
        self._before_done: int | None = None  # the step whose before_optimizer_step already ran
        self._checked_version = (
            program.masks.version
        )  # masks last checked across ranks at this version

    def before_optimizer_step(self, step: int) -> None:
        """``program.before_optimizer_step(step)`` once per optimizer step (whichever comes first:
        RecipecTrainer after the last micro-batch's backward, or ``on_pre_optimizer_step``)."""
        if self._before_done != step:
            self._before_done = step
            self.program.before_optimizer_step(step)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ):
        program = self.program
        model = kwargs.get("model")
        if model is not None and model is not program.ctx.model:
            raise ValueError("the Trainer's model is not the model the recipe was compiled for")
        optimizer = _unwrap_optimizer(kwargs.get("optimizer"))
        if program.ctx.optimizer is not None and optimizer is not program.ctx.optimizer:
            raise ValueError(
                "the Trainer uses a different optimizer than the one the recipe was compiled with: pass "
                "optimizers=(optimizer, None) to the Trainer (RecipecTrainer does this for you)"
            )
        if program.plan.with_trait("needs_loss_inputs") and not self.loss_hooked:
            raise ValueError(
                "this recipe distils or uses CrAM, which needs the loss and its mini-batch; a callback "
                "cannot see them: use recipec.train.hf.RecipecTrainer(program=...) instead of Trainer + "
                "RecipecCallback"
            )
        if program.plan.training.prune_only:
            raise ValueError(
                f"stage {program.plan.name!r} is prune-only (training.steps: 0): it takes no Trainer step; "
                "instead of trainer.train(), run its one-shot pruning with program.step_start(0) then "
                "program.finalize() (oBERT needs grad_batches= in recipec.compile)"
            )
        if program.plan.with_trait("second_pass"):
            if args.fp16:
                raise ValueError(
                    "a cram modifier runs a second forward/backward pass that is not loss-scaled: train it "
                    "in float32 or bf16"
                )
            if args.n_gpu > 1:
                raise ValueError(
                    "a cram modifier runs its second pass on the bare model, outside torch.nn.DataParallel: "
                    "launch one process per GPU (torchrun) instead"
                )
            if getattr(args, "fsdp", None) or getattr(args, "deepspeed", None):
                raise ValueError(
                    "a cram modifier runs its second pass on the bare model with whole parameters and "
                    "gradients, which FSDP and DeepSpeed shard: use plain DDP (torchrun without them)"
                )
        self._before_done = None
        if self.sparse_backprop is not None:
            program.use_sparse_backprop(self.sparse_backprop, resumed=state.global_step > 0)
        if state.global_step > 0 and not self._loaded:
            self._resume(args, state)
        self._check_masks(f"start (step {state.global_step})")
        if state.max_steps != program.plan.total_steps:
            warnings.warn(
                f"the Trainer will run {state.max_steps} optimizer steps but the recipe stage "
                f"{program.plan.name!r} is planned for {program.plan.total_steps} "
                f"(steps_per_epoch={program.plan.steps_per_epoch}); pruning and LR follow the plan's steps",
                stacklevel=2,
            )

    def remove_sparse_kernels(self) -> None:
        """Every layer back on its dense forward (done at the end of training)."""
        self.program.close()

    def sparse_backprop_record(self) -> dict[str, Any] | None:
        """``{"min_sparsity", "from_step", "layers"}`` (and ``"resumed": True`` after a resume) of
        the last training, or None."""
        return self.program.sparse_backprop_record()

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ):
        self._before_done = None
        self.program.step_start(state.global_step)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ):
        self.before_optimizer_step(state.global_step)

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ):
        self.program.after_optimizer_step(state.global_step)
        if self.program.masks.version != self._checked_version:
            self._check_masks(f"step {state.global_step} (after pruning)")

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ):
        self.remove_sparse_kernels()
        self.program.finalize()
        self._check_masks("end (after finalize)")

    def _check_masks(self, where: str) -> None:
        """Under torchrun: masks and masked weights bit-identical on every rank (one all-gather of
        checksums; raises RankMismatchError naming the tensor). Nothing in a single process."""
        from recipec import distributed as dist_utils

        masks = self.program.masks
        dist_utils.verify_identical(
            masks.masks, masks.params, f"stage {self.program.plan.name!r} {where}"
        )
        self._checked_version = masks.version

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ):
        folder = os.path.join(args.output_dir, f"{_CHECKPOINT_PREFIX}-{state.global_step}")
        if args.should_save and os.path.isdir(folder):
            write_state(Path(folder), _PROGRAM_STEM, self.state_dict())

    def _resume(self, args: TrainingArguments, state: TrainerState) -> None:
        folder = Path(args.output_dir) / f"{_CHECKPOINT_PREFIX}-{state.global_step}"
        path = folder / PROGRAM_STATE_NAME
        if not path.is_file() and not (folder / f"{_PROGRAM_STEM}.pt").exists():
            if self.program.step == state.global_step - 1:
                return  # the caller loaded the program's state already
            raise FileNotFoundError(
                f"resuming at step {state.global_step} but {path} is missing: without the saved masks pruned "
                "weights would grow back. Load it with callback.load_state_dict(read_program_state(...)) "
                "before train()"
            )
        self.load_state_dict(read_program_state(folder))

    def state_dict(self) -> dict[str, Any]:
        return self.program.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.program.load_state_dict(state)
        self._loaded = True


class RecipecTrainer(Trainer):
    """A ``Trainer`` that runs a compiled recipe stage, loss transforms (distillation) included.

    Adds a :class:`RecipecCallback` for ``program``, uses the optimizer the program was
    compiled with (unless ``optimizers=`` names it already), applies ``program.loss`` to the
    training loss in :meth:`compute_loss`, and zeroes pruned weights' gradients right after
    backward so gradient clipping ignores them. See the module docstring for the event order
    and the learning-rate rule (the recipe's ``lr`` modifiers win over the Trainer's scheduler).

    Args:
        *args: Passed to ``transformers.Trainer``.
        program: The compiled stage (:func:`recipec.compile`).
        sparse_backprop: See :class:`RecipecCallback` (recipec's sparse CPU kernels between mask
            changes, for layers with at least this sparsity; None: dense kernels).
        **kwargs: Passed to ``transformers.Trainer``.
    """

    # compute_loss returns a per-batch mean; the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self, *args: Any, program: Program, sparse_backprop: float | None = None, **kwargs: Any
    ):
        optimizers = kwargs.get("optimizers", (None, None))
        if program.ctx.optimizer is not None:
            given = optimizers[0]
            if given is None:
                kwargs["optimizers"] = (program.ctx.optimizer, optimizers[1])
            elif given is not program.ctx.optimizer:
                raise ValueError("optimizers[0] is not the optimizer the recipe was compiled with")
        callbacks = list(kwargs.get("callbacks") or [])
        callback = next((c for c in callbacks if isinstance(c, RecipecCallback)), None)
        if callback is None:
            callback = RecipecCallback(program, sparse_backprop=sparse_backprop)
            callbacks.append(callback)
        elif callback.program is not program:
            raise ValueError("callbacks already hold a RecipecCallback for another program")
        elif sparse_backprop is not None:
            callback.sparse_backprop = sparse_backprop
        callback.loss_hooked = True
        kwargs["callbacks"] = callbacks
        self.program = program
        self.recipec_callback = callback
        super().__init__(*args, **kwargs)

    def train(self, *args: Any, **kwargs: Any):
        """``Trainer.train``; the sparse kernels (``sparse_backprop``) are removed however it ends."""
        try:
            return super().train(*args, **kwargs)
        finally:
            self.recipec_callback.remove_sparse_kernels()

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The model's loss, transformed by ``program.loss`` in training (e.g. distillation)."""
        # num_items_in_batch is dropped on purpose: BERT-family heads return batch means, and
        # the distillation term is a batch mean too (see loss_is_scaled_for_ga).
        batch = dict(
            inputs
        )  # as given: the Trainer may pop "labels" (label smoothing); cram reuses it
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=None
        )
        if model.training:
            loss = self.program.loss(loss, batch=batch, outputs=outputs)
        return (loss, outputs) if return_outputs else loss

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            # The optimizer step's last micro-batch: its hooks run now, before the Trainer clips,
            # in the plain loop's order (masked gradients; CrAM's replaced gradient is clipped).
            self.recipec_callback.before_optimizer_step(self.state.global_step)
        else:
            # Before the Trainer clips: the clipping norm must not count pruned weights.
            self.program.masks.mask_grads_()
        return loss

"""The Program: a compiled recipe stage, exposed as training-loop hooks.

Driver call order for optimizer step ``step`` (0-based, within the stage)::

    program.step_start(step)            # LR written, pruning steps (masks set, weights zeroed)
    outputs = model(**batch)
    loss = program.loss(outputs.loss, batch=batch, outputs=outputs)   # e.g. distillation
    loss.backward()
    program.before_optimizer_step(step) # gradients of pruned weights zeroed
    optimizer.step()
    program.after_optimizer_step(step)  # masks re-applied: pruned weights stay exact zeros
    ...
    program.finalize()
    program.close()                     # always (in a ``finally``): sparse kernels removed

The Program is the one owner of the learning rate when it sets it (``sets_lr``): at every
``step_start`` it writes :meth:`recipec.plan.StagePlan.lr_at` into the optimizer. With
``sparse_backprop`` it also swaps pruned linear layers onto sparse CPU kernels between mask
changes (:mod:`recipec.kernels.sparse_backprop`); drivers do nothing special for either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from recipec.modifiers.base import CompileContext, CompileError, Modifier
from recipec.plan import StagePlan
from recipec.sparsity.state import MaskState, MaskStateError


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write ``lr`` into every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


class Program:
    """Hooks for one stage of a recipe; ``state_dict`` captures everything needed to resume.

    Args:
        plan: The stage resolved to optimizer steps.
        ctx: What the modifiers share (model, optimizer, masks, teacher, ...).
        modifiers: The stage's runtime modifiers (none for a plain fine-tuning run, e.g. the
            dense teacher).
        sets_lr: Write ``plan.lr_at(step)`` into the optimizer at every step start.
        sparse_backprop: A minimum layer sparsity for sparse CPU kernels between mask changes
            (None: dense kernels).
    """

    def __init__(
        self,
        plan: StagePlan,
        ctx: CompileContext,
        modifiers: Sequence[Modifier],
        *,
        sets_lr: bool = False,
        sparse_backprop: float | None = None,
    ):
        self.plan = plan
        self.ctx = ctx
        self.modifiers = list(modifiers)
        # quantizers after the pruners at a step: they calibrate on the step's final masks
        self._start_order = sorted(self.modifiers, key=lambda m: bool(m.spec.quantizes))
        self.sets_lr = sets_lr and ctx.optimizer is not None
        self.step = 0
        self.finalized = False
        self.kernels = _SparseKernels.for_stage(self, sparse_backprop)

    def use_sparse_backprop(self, min_sparsity: float | None, resumed: bool = False) -> None:
        """Turn the sparse kernels on (or off, with None) for the rest of the stage, as
        ``compile(..., sparse_backprop=...)`` does; ``resumed``: the stage started earlier."""
        self.close()
        self.kernels = _SparseKernels.for_stage(self, min_sparsity)
        if self.kernels is not None:
            self.kernels.resumed = resumed

    @property
    def masks(self) -> MaskState:
        return self.ctx.masks

    def lr_at(self, step: int) -> float:
        return self.plan.lr_at(step)

    def step_start(self, step: int) -> None:
        self.step = step
        if self.sets_lr:
            set_lr(self.ctx.optimizer, self.plan.lr_at(step))
        if self.kernels is not None:
            self.kernels.before_step(step)  # pruners (and oBERT's gradients) see dense layers
        for mod in self._start_order:
            mod.on_step_start(step)
        if self.kernels is not None:
            self.kernels.after_step(step)

    def loss(
        self, loss: torch.Tensor, batch: Mapping[str, Any] | None = None, outputs: Any = None
    ) -> torch.Tensor:
        for mod in self.modifiers:
            loss = mod.on_loss(loss, batch, outputs, self.step)
        return loss

    def recompute_loss(
        self, loss: torch.Tensor, batch: Mapping[str, Any] | None = None, outputs: Any = None
    ) -> torch.Tensor:
        """The same transform as :meth:`loss` at the current step, for gradients a modifier
        computes itself (oBERT's collection, CrAM's second pass): nothing is recorded."""
        for mod in self.modifiers:
            loss = mod.transform_loss(loss, batch, outputs, self.step)
        return loss

    def before_optimizer_step(self, step: int) -> None:
        self.ctx.masks.mask_grads_()
        for mod in self.modifiers:
            mod.on_before_optimizer_step(step)

    def after_optimizer_step(self, step: int) -> None:
        self.ctx.masks.apply_()
        for mod in self.modifiers:
            mod.on_after_optimizer_step(step)

    def finalize(self) -> None:
        """Run remaining pruning steps scheduled at the very end, apply masks, finish modifiers."""
        if self.finalized:
            return
        self.close()
        last = self.plan.total_steps
        for mod in self.modifiers:
            if last in mod.resolved.pruning_steps:
                mod.on_step_start(last)
        for mod in self.modifiers:
            mod.on_finalize()
        self.ctx.masks.apply_()
        self.finalized = True

    def close(self) -> None:
        """Every layer back on its dense kernel. Idempotent; drivers call it however the stage
        ends (the next ``step_start`` would put the sparse kernels back)."""
        if self.kernels is not None:
            self.kernels.remove()

    def sparsity(self) -> tuple[float, dict[str, float]]:
        return self.ctx.masks.sparsity()

    def history(self) -> list[dict[str, Any]]:
        """Pruning events so far: step, target and achieved sparsity, seconds."""
        return [dict(h, modifier=m.name) for m in self.modifiers for h in getattr(m, "history", [])]

    def sparse_backprop_record(self) -> dict[str, Any] | None:
        """What the report says of the sparse kernels (None when the stage had none)."""
        return self.kernels.record() if self.kernels is not None else None

    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": self.plan.name,
            "step": self.step,
            "finalized": self.finalized,
            "masks": self.ctx.masks.state_dict(),
            "modifiers": [m.state_dict() for m in self.modifiers],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("stage") != self.plan.name:
            raise CompileError(
                f"checkpoint is for stage {state.get('stage')!r}, not {self.plan.name!r}"
            )
        if len(state["modifiers"]) != len(self.modifiers):
            raise CompileError(
                "checkpoint was written by a recipe with a different number of modifiers"
            )
        self.step = int(state["step"])
        self.finalized = bool(state.get("finalized", False))
        try:
            self.ctx.masks.load_state_dict(state["masks"])
        except MaskStateError as exc:
            raise CompileError(str(exc)) from None
        for mod, mod_state in zip(self.modifiers, state["modifiers"]):
            mod.load_state_dict(mod_state)
        if self.kernels is not None:
            self.kernels.resumed = True


class _SparseKernels:
    """A stage's sparse-backprop kernels, rebuilt around the steps that may change masks."""

    def __init__(self, program: Program, kernels: Any, change_steps: frozenset[int]):
        self.program = program
        self.kernels = kernels  # recipec.kernels.sparse_backprop.SparseBackprop
        self.change_steps = change_steps  # steps whose step_start may change masks
        self.from_step: int | None = None  # the first step (this session) on the kernels
        self.layers = 0  # layers on the kernels after the last rebuild
        self.resumed = False  # the stage started in an earlier session

    @classmethod
    def for_stage(cls, program: Program, min_sparsity: float | None) -> _SparseKernels | None:
        """None when not asked for, for a prune-only stage (no step to speed up), or (with a
        log line) for a stage with a modifier that runs a second pass on dense weights."""
        plan = program.plan
        if min_sparsity is None or plan.total_steps == 0:
            return None
        if plan.with_trait("second_pass") or plan.with_trait("quantizes"):
            mods = plan.with_trait("second_pass") + plan.with_trait("quantizes")
            names = ", ".join(sorted({m.type for m in mods}))
            program.ctx.log(
                f"stage {plan.name!r}: sparse backprop off: a {names} modifier changes what "
                "the dense weights compute"
            )
            return None
        from recipec.kernels.sparse_backprop import SparseBackprop, slow_reason

        steps: set[int] = set()
        for mod in plan.with_trait("sets_masks"):
            steps.update(mod.pruning_steps)
            if not mod.pruning_steps:  # constant: fixes the masks at its window's start
                steps.add(mod.window.start)
        kernels = SparseBackprop(program.ctx.model, min_sparsity)  # builds them if need be
        slow = slow_reason()
        if slow is not None:  # the pure-torch fallback: same results, no faster
            if program.ctx.progress is not None:
                program.ctx.log(f"stage {plan.name!r}: {slow}")
            else:
                import warnings

                warnings.warn(slow, RuntimeWarning, stacklevel=2)
        return cls(program, kernels, frozenset(steps))

    def before_step(self, step: int) -> None:
        if step in self.change_steps:
            self.kernels.remove()

    def after_step(self, step: int) -> None:
        """Rebuild the kernels if the masks changed, with a log line when the number of sparse
        layers does."""
        masks = self.program.masks
        if not self.kernels.refresh(masks.masks, masks.version):
            return
        count = len(self.kernels.layers)
        if count and self.from_step is None:
            self.from_step = step
        if count != self.layers:
            self.program.ctx.log(
                f"stage {self.program.plan.name!r}: step {step}: "
                + self.kernels.describe(len(masks.masks))
            )
        self.layers = count

    def remove(self) -> None:
        self.kernels.remove()

    def record(self) -> dict[str, Any]:
        """``min_sparsity``, ``from_step``, ``layers`` (and ``resumed``, and ``fallback`` when
        the layers ran the pure-torch fallback, recipec's kernels being unavailable)."""
        record = {
            "min_sparsity": self.kernels.min_sparsity,
            "from_step": self.from_step,
            "layers": self.layers,
        }
        from recipec.kernels.sparse_backprop import FAST_BACKEND

        if self.kernels.backend != FAST_BACKEND:
            record["fallback"] = True
        return dict(record, resumed=True) if self.resumed else record

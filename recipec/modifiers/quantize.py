"""``quantize``: INT8 fake quantization of linear layers (QAT, or PTQ in a steps: 0 stage).

From the window's start to the end of the run the target linears compute with int8
quantize-dequantized weights (per output channel) and inputs (per tensor) — see
:mod:`recipec.quant.fake`. Their input ranges are observed (on ``calibration_batches`` training
batches first, when set, then on the training batches) until the freeze step, then fixed; the
stage's end freezes them in any case, so the saved model has its final scales. The fake-quant
stays installed on the model after the stage (later stages train quantized, the final
evaluation and ``model/quantization.json`` are the quantized model's).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from recipec.modifiers.base import CompileContext, CompileError, Modifier
from recipec.modifiers.distill import MODEL_INPUTS
from recipec.modifiers.pruner import target_parameters
from recipec.plan import ResolvedModifier
from recipec.quant.fake import QuantError, install


class QuantizeModifier(Modifier):
    """Fake-quant of its targets (default: the recipe's targets, the linears the pruners prune)."""

    def __init__(self, resolved: ResolvedModifier, ctx: CompileContext):
        super().__init__(resolved, ctx)
        if resolved.spec.calibration_batches and ctx.grad_batches is None:
            raise CompileError(
                f"quantize modifier [{resolved.index}] calibrates on training batches: pass "
                "grad_batches= to compile()"
            )
        names = list(target_parameters(resolved, ctx))
        try:
            self.quant = install(ctx.model, names)
        except QuantError as exc:
            raise CompileError(f"quantize modifier [{resolved.index}]: {exc}") from None
        self.started = False
        self.calibrated = False

    def on_step_start(self, step: int) -> None:
        window = self.resolved.window
        if not self.started and step >= window.start:
            self.quant.enable()
            self.started = True
            self.ctx.log(
                f"{self.name}: step {step}: int8 fake-quant on {len(self.quant.layers)} linears"
            )
        if self.started and not self.calibrated:
            self.calibrate()
            self.calibrated = True
        if self.started and step >= self.resolved.freeze and not self.quant.frozen:
            self.freeze(step)

    def freeze(self, step: int) -> None:
        """Fix the input ranges: under torchrun first merged over the ranks (each observed its
        own batches), so every rank computes with the same scales from here on."""
        self.sync_ranges()
        self.quant.freeze()
        self.ctx.log(f"{self.name}: step {step}: input ranges frozen")

    def sync_ranges(self) -> None:
        """Every rank's observed ranges, merged (min of lo, max of hi, sum of seen)."""
        from recipec import distributed as dist_utils

        if not dist_utils.is_distributed():
            return
        mine = {n: (q.lo, q.hi, q.seen) for n, q in self.quant.layers.items()}
        gathered = dist_utils.all_gather_object(mine, what="merging the quantize input ranges")
        for name, layer in self.quant.layers.items():
            seen = [r[name] for r in gathered if r[name][2] > 0]
            if seen:
                layer.lo = min(lo for lo, _, _ in seen)
                layer.hi = max(hi for _, hi, _ in seen)
                layer.seen = sum(n for _, _, n in seen)

    @torch.no_grad()
    def calibrate(self) -> None:
        """Observe the inputs on ``calibration_batches`` training batches (eval mode)."""
        count = self.spec.calibration_batches
        if not count:
            return
        model = self.ctx.model
        was_training = model.training
        model.eval()
        seen = 0
        try:
            for batch in self.ctx.grad_batches(self.ctx.plan.training.batch_size):
                if getattr(batch, "weight", 1.0) == 0:  # a rank's placeholder (no examples)
                    continue
                model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS})
                seen += 1
                if seen >= count:
                    break
        finally:
            model.train(was_training)
        self.ctx.log(f"{self.name}: calibrated the input ranges on {seen} training batches")

    def on_finalize(self) -> None:
        if not self.started:  # a window that starts at the stage's very end
            self.on_step_start(self.resolved.window.start)
        if not self.quant.frozen:
            self.freeze(self.ctx.plan.total_steps)

    def state_dict(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "calibrated": self.calibrated,
            "layers": self.quant.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.started = bool(state.get("started", False))
        self.calibrated = bool(state.get("calibrated", False))
        try:
            self.quant.load_state_dict(state.get("layers", {}))
        except QuantError as exc:
            raise CompileError(f"{self.name}: {exc}") from None

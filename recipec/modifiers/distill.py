"""``distill``: knowledge distillation from a dense teacher (loss transform)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recipec.modifiers.base import CompileContext, CompileError, Modifier
from recipec.plan import ResolvedModifier

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    r"""Batch-mean :math:`T^2 \, KL(softmax(t/T) \,\|\, softmax(s/T))` over the last dimension."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)
    return (t * t) * kl.mean()


def distillation_loss(
    task_loss: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    hardness: float,
    temperature: float,
) -> torch.Tensor:
    r"""(1 - h) * task + h * T^2 * KL(softmax(t/T) || softmax(s/T)); regression heads use MSE."""
    if student_logits.shape[-1] == 1 and student_logits.dim() == 2:  # regression head
        soft = F.mse_loss(student_logits.float(), teacher_logits.float())
    else:
        soft = kd_loss(student_logits, teacher_logits, temperature)
    if hardness == 1.0:
        return soft
    if hardness == 0.0:
        return task_loss
    return (1.0 - hardness) * task_loss + hardness * soft


class DistillModifier(Modifier):
    """Knowledge distillation from a dense teacher (eval mode, no_grad, on the student's device)."""

    def __init__(self, resolved: ResolvedModifier, ctx: CompileContext):
        super().__init__(resolved, ctx)
        teacher = ctx.teacher
        if teacher is None or (isinstance(teacher, str) and teacher == "auto"):
            raise CompileError(
                f"distill modifier [{resolved.index}] needs a teacher model: pass teacher= to compile() "
                "(a model or a path); 'teacher: auto' is resolved by recipec apply"
            )
        if isinstance(teacher, str):
            teacher = _load_teacher(teacher, ctx.model)
        else:
            _check_teacher(teacher, ctx.model)
        device = next(ctx.model.parameters()).device
        self.teacher = teacher.to(device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def teacher_logits(self, batch: Mapping[str, Any]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
        self.teacher.eval()
        with torch.no_grad():
            return self.teacher(**inputs).logits

    def transform_loss(
        self, loss: torch.Tensor, batch: Mapping[str, Any] | None, outputs: Any, step: int
    ) -> torch.Tensor:
        if not self.active(step):
            return loss
        if batch is None or outputs is None:
            raise ValueError("distillation needs Program.loss(loss, batch=..., outputs=...)")
        if self.spec.hardness == 0.0:
            return loss  # the task loss alone: no teacher forward to pay for
        student = outputs.logits if hasattr(outputs, "logits") else outputs
        teacher = self.teacher_logits(batch)
        if teacher.shape != student.shape:
            raise ValueError(
                f"teacher logits {tuple(teacher.shape)} do not match student logits {tuple(student.shape)}"
            )
        return distillation_loss(loss, student, teacher, self.spec.hardness, self.spec.temperature)


def _load_teacher(path: str, student: nn.Module) -> nn.Module:
    """The teacher at ``path`` through the one model loader, with the student's head kind;
    checked against the student (labels, task kind, tokenizer) by ``models.load_teacher``."""
    from recipec.models import ModelLoadError, load_teacher

    try:
        return load_teacher(path, student)
    except ModelLoadError as exc:
        raise CompileError(str(exc)) from None


def _check_teacher(teacher: nn.Module, student: nn.Module) -> None:
    """A teacher given as a model: its outputs and vocabulary must fit the student's (models
    without a Hugging Face config are taken as they are)."""
    from recipec.models import ModelLoadError, check_teacher

    if not hasattr(teacher, "config") or not hasattr(student, "config"):
        return
    try:
        check_teacher(teacher, student)
    except ModelLoadError as exc:
        raise CompileError(str(exc)) from None

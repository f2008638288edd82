"""Knowledge distillation: the loss formula by hand, and how the teacher is run."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from transformers import BertConfig, BertForMultipleChoice, BertForSequenceClassification

import recipec
from recipec.modifiers.base import CompileError
from recipec.modifiers.distill import distillation_loss, kd_loss
from recipec.recipe.load import load_recipe_text

STUDENT = [[1.0, 2.0, 0.5], [0.3, -1.2, 2.2]]
TEACHER = [[0.5, 1.5, 1.0], [2.0, 0.1, -0.3]]


def _softmax(row: list[float], t: float) -> list[float]:
    exps = [math.exp(v / t) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def _hand_kd(student: list[list[float]], teacher: list[list[float]], t: float) -> float:
    """T^2 * mean over the batch of sum_c p_t(c) * (log p_t(c) - log p_s(c))."""
    kls = []
    for s_row, t_row in zip(student, teacher):
        p_s = _softmax(s_row, t)
        p_t = _softmax(t_row, t)
        kls.append(sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s)))
    return t * t * sum(kls) / len(kls)


def test_distillation_loss_matches_a_hand_computation():
    task = torch.tensor(0.7, dtype=torch.float64)
    s = torch.tensor(STUDENT)
    t = torch.tensor(TEACHER)
    kd = _hand_kd(STUDENT, TEACHER, 2.0)
    assert kd > 0.1  # a real difference, not a degenerate example
    got = distillation_loss(task, s, t, hardness=0.5, temperature=2.0)
    assert got.item() == pytest.approx(0.5 * 0.7 + 0.5 * kd, abs=1e-6)
    assert kd_loss(s, t, 2.0).item() == pytest.approx(kd, abs=1e-6)
    assert distillation_loss(task, s, t, hardness=1.0, temperature=2.0).item() == pytest.approx(
        kd, abs=1e-6
    )
    # Temperature matters: T = 5.5 is a different number (and also matches by hand).
    kd55 = _hand_kd(STUDENT, TEACHER, 5.5)
    assert distillation_loss(task, s, t, 1.0, 5.5).item() == pytest.approx(kd55, abs=1e-6)
    assert abs(kd55 - kd) > 1e-3


def test_hardness_zero_is_exactly_the_task_loss():
    task = torch.tensor(0.123456789)
    out = distillation_loss(
        task, torch.tensor(STUDENT), torch.tensor(TEACHER), hardness=0.0, temperature=2.0
    )
    assert torch.equal(out, task)


def test_kd_is_zero_when_student_equals_teacher_and_gradient_flows_to_student_only():
    s = torch.tensor(STUDENT, requires_grad=True)
    t = torch.tensor(TEACHER, requires_grad=True)
    assert kd_loss(torch.tensor(TEACHER), torch.tensor(TEACHER), 2.0).item() == pytest.approx(
        0.0, abs=1e-7
    )
    distillation_loss(torch.tensor(0.0), s, t.detach(), 1.0, 2.0).backward()
    assert s.grad is not None and bool((s.grad != 0).any())


def test_multiple_choice_logits_batch_by_choices():
    # [batch=2, choices=3]: the softmax runs over the choices.
    s = torch.tensor(STUDENT)
    t = torch.tensor(TEACHER)
    assert distillation_loss(torch.tensor(0.0), s, t, 1.0, 2.0).item() == pytest.approx(
        _hand_kd(STUDENT, TEACHER, 2.0), abs=1e-6
    )


def test_regression_head_uses_mse():
    s = torch.tensor([[0.5], [1.5]])
    t = torch.tensor([[1.0], [1.0]])
    assert distillation_loss(torch.tensor(9.0), s, t, 1.0, 2.0).item() == pytest.approx(0.25)


# -- the teacher inside a Program --------------------------------------------------------------


def _config(dropout: float = 0.0, num_labels: int = 2) -> BertConfig:
    return BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=num_labels,
    )


def _distill_recipe(**spec):
    data = {
        "training": {"steps": 4},
        "modifiers": [
            {"type": "distill", "teacher": "given", "hardness": 0.5, "temperature": 2.0, **spec}
        ],
    }
    return load_recipe_text(yaml.safe_dump(data))


def _batch(n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "input_ids": torch.randint(0, 64, (n, 10), generator=g),
        "attention_mask": torch.ones(n, 10, dtype=torch.long),
        "labels": torch.randint(0, 2, (n,), generator=g),
    }


def test_teacher_runs_in_eval_mode_without_grad_on_the_students_device():
    torch.manual_seed(0)
    student = BertForSequenceClassification(_config())
    teacher = BertForSequenceClassification(
        _config(dropout=0.5)
    )  # dropout would make logits random
    teacher.train()
    seen = []
    teacher.register_forward_hook(
        lambda mod, inp, out: seen.append((torch.is_grad_enabled(), mod.training))
    )
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    program = recipec.compile(
        _distill_recipe(), student, optimizer, steps_per_epoch=4, teacher=teacher
    )
    (distill,) = program.modifiers
    assert distill.teacher is teacher
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert {p.device for p in teacher.parameters()} == {next(student.parameters()).device}

    teacher.train()  # a user switching it back does not matter: logits are taken in eval mode
    batch = _batch()
    student.train()
    program.step_start(0)
    out = student(**batch)
    loss1 = program.loss(out.loss, batch=batch, outputs=out)
    loss2 = program.loss(out.loss, batch=batch, outputs=out)
    assert seen == [(False, False), (False, False)]  # no_grad, eval
    assert torch.equal(loss1, loss2)  # dropout off
    with torch.no_grad():
        teacher.eval()
        t_logits = teacher(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    expected = distillation_loss(out.loss, out.logits, t_logits, 0.5, 2.0)
    assert loss1.item() == pytest.approx(expected.item(), abs=1e-6)
    assert abs(loss1.item() - out.loss.item()) > 1e-4  # distillation did change the loss
    loss1.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and bool((p.grad != 0).any()) for p in student.parameters())


def test_hardness_zero_does_not_run_the_teacher():
    torch.manual_seed(0)
    student = BertForSequenceClassification(_config())
    teacher = BertForSequenceClassification(_config())
    calls = []
    teacher.register_forward_hook(lambda mod, inp, out: calls.append(1))
    program = recipec.compile(
        _distill_recipe(hardness=0.0), student, None, steps_per_epoch=4, teacher=teacher
    )
    batch = _batch()
    out = student(**batch)
    program.step_start(0)
    assert program.loss(out.loss, batch=batch, outputs=out) is out.loss
    assert calls == []


def test_distill_window_and_missing_batch():
    torch.manual_seed(0)
    student = BertForSequenceClassification(_config())
    teacher = BertForSequenceClassification(_config())
    program = recipec.compile(
        _distill_recipe(start_step=2), student, None, steps_per_epoch=4, teacher=teacher
    )
    batch = _batch()
    out = student(**batch)
    program.step_start(0)
    assert program.loss(out.loss, batch=batch, outputs=out) is out.loss  # before its window
    program.step_start(2)
    assert program.loss(out.loss, batch=batch, outputs=out) is not out.loss
    with pytest.raises(ValueError, match="batch=..., outputs="):
        program.loss(out.loss)


def test_teacher_with_other_labels_is_refused_at_compile_time():
    """#22: a mismatched teacher is a clear error when the stage is compiled, not a traceback
    at the first loss; a teacher without a Hugging Face config is still checked at loss time."""
    torch.manual_seed(0)
    student = BertForSequenceClassification(_config())
    teacher = BertForSequenceClassification(_config(num_labels=3))
    with pytest.raises(CompileError, match="it has 3 labels, the task 2"):
        recipec.compile(_distill_recipe(), student, None, steps_per_epoch=4, teacher=teacher)
    regression = BertForSequenceClassification(_config(num_labels=1))
    with pytest.raises(CompileError, match="it is a regression model"):
        recipec.compile(_distill_recipe(), student, None, steps_per_epoch=4, teacher=regression)

    class Bare(torch.nn.Module):  # no config: only its logits' shape can be checked
        def __init__(self):
            super().__init__()
            self.inner = teacher

        def forward(self, **inputs):
            return self.inner(**inputs)

    program = recipec.compile(_distill_recipe(), student, None, steps_per_epoch=4, teacher=Bare())
    batch = _batch()
    out = student(**batch)
    program.step_start(0)
    with pytest.raises(
        ValueError, match=r"teacher logits \(4, 3\) do not match student logits \(4, 2\)"
    ):
        program.loss(out.loss, batch=batch, outputs=out)


def test_multiple_choice_student_and_teacher_through_the_program():
    torch.manual_seed(0)
    student = BertForMultipleChoice(_config())
    teacher = BertForMultipleChoice(_config())
    program = recipec.compile(
        _distill_recipe(hardness=1.0), student, None, steps_per_epoch=4, teacher=teacher
    )
    g = torch.Generator().manual_seed(3)
    batch = {
        "input_ids": torch.randint(0, 64, (2, 5, 8), generator=g),
        "attention_mask": torch.ones(2, 5, 8, dtype=torch.long),
        "labels": torch.tensor([1, 4]),
    }
    out = student(**batch)
    assert out.logits.shape == (2, 5)
    program.step_start(0)
    loss = program.loss(out.loss, batch=batch, outputs=out)
    with torch.no_grad():
        t_logits = teacher(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    hand = _hand_kd(out.logits.tolist(), t_logits.tolist(), 2.0)
    assert loss.item() == pytest.approx(hand, abs=1e-6)
    loss.backward()

"""The lr modifier: the plan's learning rate written into every group at each step start."""

from __future__ import annotations

import pytest
import torch
from modifier_helpers import batch_at, make_recipe, train_step, two_linear

import recipec


def test_lr_modifier_writes_the_plan_lr_into_every_group_at_each_step_start():
    model = two_linear()
    optimizer = torch.optim.AdamW(
        [
            {"params": [model.a.weight, model.a.bias], "lr": 0.5},
            {"params": [model.b.weight, model.b.bias], "lr": 0.25, "weight_decay": 0.0},
        ]
    )
    lrs = [
        {"type": "lr", "schedule": "linear", "init_lr": 1e-3, "final_lr": 1e-4, "end_step": 10},
        {
            "type": "lr",
            "schedule": "cyclic_linear",
            "init_lr": 8e-4,
            "final_lr": 8e-5,
            "start_step": 10,
            "end_step": 20,
            "cycle_steps": 5,
        },
    ]
    program = recipec.compile(make_recipe(lrs, steps=24), model, optimizer, steps_per_epoch=24)
    # An external scheduler on the same optimizer: the recipe still wins at every step start.
    external = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 100.0 + s)
    hand = {
        0: 1e-3,
        5: 1e-3 + (1e-4 - 1e-3) * 5 / 10,
        9: 1e-3 + (1e-4 - 1e-3) * 9 / 10,
        10: 8e-4,
        12: 8e-4 + (8e-5 - 8e-4) * 2 / 4,  # 5-step cycles: final_lr on the 5th step
        14: 8e-5,
        15: 8e-4,
        19: 8e-5,
        20: 8e-5,  # after the last window: held at its last value
        23: 8e-5,
    }
    for step in range(24):
        program.step_start(step)
        expected = program.plan.lr_at(step)
        assert [g["lr"] for g in optimizer.param_groups] == [expected, expected], step
        if step in hand:
            assert expected == pytest.approx(hand[step], rel=1e-12), step
        x = batch_at(step)
        (model(x) - x).pow(2).mean().backward()
        program.before_optimizer_step(step)
        optimizer.step()
        program.after_optimizer_step(step)
        external.step()
        optimizer.zero_grad()
        assert optimizer.param_groups[0]["lr"] >= 100.0 * 0.5  # the scheduler did overwrite it


def test_no_lr_modifier_leaves_the_lr_alone():
    model = two_linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.123)
    spec = {"type": "gmp", "final_sparsity": 0.5, "start_step": 1, "end_step": 1}
    program = recipec.compile(make_recipe([spec], steps=3), model, optimizer, steps_per_epoch=3)
    assert not program.sets_lr
    for step in range(3):
        train_step(program, model, optimizer, step)
        assert optimizer.param_groups[0]["lr"] == 0.123

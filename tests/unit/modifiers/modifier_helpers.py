"""Tiny hand-made layers and a plain training step shared by the modifier tests."""

from __future__ import annotations

import torch
import yaml
from torch import nn

import recipec
from recipec.recipe.load import load_recipe_text

TARGETS = [r"^a\.weight$", r"^b\.weight$"]


class TwoLinear(nn.Module):
    """x -> a (16 x 32) -> relu -> b (32 x 16): 512 + 512 target weights."""

    def __init__(self, d_in: int = 32, d_hidden: int = 16):
        super().__init__()
        self.a = nn.Linear(d_in, d_hidden)
        self.b = nn.Linear(d_hidden, d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def make_recipe(modifiers, steps: int = 20, targets=TARGETS):
    return load_recipe_text(
        yaml.safe_dump({"training": {"steps": steps}, "targets": targets, "modifiers": modifiers})
    )


def two_linear(seed: int = 0) -> TwoLinear:
    torch.manual_seed(seed)
    return TwoLinear()


def batch_at(step: int, d: int = 32) -> torch.Tensor:
    return torch.randn(8, d, generator=torch.Generator().manual_seed(1000 + step))


def train_step(program, model, optimizer, step: int) -> None:
    """One optimizer step in the contract's hook order (the plain loop)."""
    program.step_start(step)
    x = batch_at(step, model.a.in_features)
    loss = program.loss((model(x) - x.flip(-1)).pow(2).mean(), batch={"x": x}, outputs=None)
    loss.backward()
    program.before_optimizer_step(step)
    optimizer.step()
    program.after_optimizer_step(step)
    optimizer.zero_grad(set_to_none=True)


def count_zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


# -- GMP schedule: the exact sparsity at each step is the plan's ----------------------------


def cubic_sparsity(t, t0, t1, s0, sf):
    return sf + (s0 - sf) * (1 - (t - t0) / (t1 - t0)) ** 3


def one_layer(weight: torch.Tensor) -> nn.Module:
    model = nn.Module()
    model.a = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        model.a.weight.copy_(weight)
    return model


# -- state_dict / resume ----------------------------------------------------------------------


RESUME_RECIPE = [
    {
        "type": "gmp",
        "init_sparsity": 0.2,
        "final_sparsity": 0.85,
        "start_step": 1,
        "end_step": 13,
        "update_every_steps": 3,
    },
    {
        "type": "lr",
        "schedule": "cyclic_linear",
        "init_lr": 2e-2,
        "final_lr": 2e-3,
        "cycle_steps": 3,
    },
]


def fresh_program(seed: int = 0):
    model = two_linear(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=0.05)
    program = recipec.compile(
        make_recipe(RESUME_RECIPE, steps=16), model, optimizer, steps_per_epoch=16
    )
    return model, optimizer, program

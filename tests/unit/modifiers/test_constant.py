"""The constant modifier: an existing zero pattern kept from its window's start."""

from __future__ import annotations

import torch
from modifier_helpers import make_recipe, train_step, two_linear

import recipec


def test_constant_keeps_an_existing_zero_pattern():
    model = two_linear()
    g = torch.Generator().manual_seed(3)
    zero = {
        n: torch.rand(p.shape, generator=g) < 0.6
        for n, p in (("a.weight", model.a.weight), ("b.weight", model.b.weight))
    }
    with torch.no_grad():
        model.a.weight[zero["a.weight"]] = 0
        model.b.weight[zero["b.weight"]] = 0
    start = {
        "a.weight": model.a.weight.detach().clone(),
        "b.weight": model.b.weight.detach().clone(),
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-2, weight_decay=0.1)
    program = recipec.compile(
        make_recipe([{"type": "constant"}], steps=30), model, optimizer, steps_per_epoch=30
    )
    for step in range(30):
        train_step(program, model, optimizer, step)
    for name, p in (("a.weight", model.a.weight), ("b.weight", model.b.weight)):
        assert torch.equal(program.masks.masks[name], ~zero[name])
        assert torch.equal(p.detach() == 0, zero[name])  # same zeros, no new ones
        assert not torch.allclose(
            p.detach()[~zero[name]], start[name][~zero[name]]
        )  # the rest trained
    assert set(program.masks.masks) == {"a.weight", "b.weight"}


def test_constant_starts_at_its_window():
    model = two_linear()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-2)
    with torch.no_grad():
        model.a.weight[:, :4] = 0
    program = recipec.compile(
        make_recipe([{"type": "constant", "start_step": 3}], steps=6),
        model,
        optimizer,
        steps_per_epoch=6,
    )
    for step in range(3):
        train_step(program, model, optimizer, step)
    assert program.masks.masks == {}
    assert bool((model.a.weight[:, :4] != 0).any())  # not frozen yet: zeros moved
    train_step(program, model, optimizer, 3)
    frozen = model.a.weight.detach() == 0
    for step in range(4, 6):
        train_step(program, model, optimizer, step)
    assert torch.equal(model.a.weight.detach() == 0, frozen)


# -- learning rate --------------------------------------------------------------------------

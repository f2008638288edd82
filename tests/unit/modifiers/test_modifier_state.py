"""Modifier runtime state: state_dict round trips resume with identical masks; another stage
or recipe is refused."""

from __future__ import annotations

import io

import pytest
import torch
from modifier_helpers import RESUME_RECIPE, fresh_program, make_recipe, train_step, two_linear

import recipec
from recipec.modifiers.base import CompileError


def test_state_dict_round_trip_resumes_with_identical_masks():
    model, optimizer, program = fresh_program()
    checkpoint = None
    for step in range(16):
        if step == 6:  # between pruning steps 4 and 7, after 2 pruning events
            buffer = io.BytesIO()
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "program": program.state_dict(),
                },
                buffer,
            )
            checkpoint = buffer.getvalue()
        train_step(program, model, optimizer, step)
    program.finalize()
    reference_masks = {n: m.clone() for n, m in program.masks.masks.items()}
    reference_weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    model2, optimizer2, program2 = fresh_program(
        seed=123
    )  # different init: everything must come from the checkpoint
    state = torch.load(io.BytesIO(checkpoint), weights_only=True)
    model2.load_state_dict(state["model"])
    optimizer2.load_state_dict(state["optimizer"])
    program2.load_state_dict(state["program"])
    assert program2.step == 5
    assert [h["step"] for h in program2.history()] == [1, 4]
    saved_masks = state["program"]["masks"]
    assert set(saved_masks) == {"a.weight", "b.weight"}
    for name, mask in saved_masks.items():
        assert torch.equal(program2.masks.masks[name], mask)
        assert not bool((dict(model2.named_parameters())[name].detach()[~mask] != 0).any())
    for step in range(6, 16):
        train_step(program2, model2, optimizer2, step)
    program2.finalize()
    assert set(program2.masks.masks) == set(reference_masks)
    for name, mask in reference_masks.items():
        assert torch.equal(program2.masks.masks[name], mask), name
    for name, p in model2.named_parameters():
        assert torch.equal(p.detach(), reference_weights[name]), name
    assert [h["step"] for h in program2.history()] == [1, 4, 7, 10, 13]


def test_load_state_dict_rejects_another_stage_or_recipe():
    _, _, program = fresh_program()
    state = program.state_dict()
    model, optimizer = two_linear(), None
    other = recipec.compile(
        make_recipe(RESUME_RECIPE[:1], steps=16), model, optimizer, steps_per_epoch=16
    )
    with pytest.raises(CompileError, match="different number of modifiers"):
        other.load_state_dict(state)
    with pytest.raises(CompileError, match="stage"):
        program.load_state_dict({**state, "stage": "finetune"})
    with pytest.raises(CompileError, match="does not have"):
        program.load_state_dict(
            {**state, "masks": {"c.weight": torch.ones(2, 2, dtype=torch.bool)}}
        )


# -- oBERT runtime ----------------------------------------------------------------------------

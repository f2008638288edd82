"""Runtime modifiers on tiny hand-made layers: exact sparsities, patterns, mask hygiene, LR, resume."""

from __future__ import annotations

import io

import pytest
import torch
import yaml
from torch import nn

import recipec
from recipec.modifiers.base import CompileError
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


def _recipe(modifiers, steps: int = 20, targets=TARGETS):
    return load_recipe_text(
        yaml.safe_dump({"training": {"steps": steps}, "targets": targets, "modifiers": modifiers})
    )


def _model(seed: int = 0) -> TwoLinear:
    torch.manual_seed(seed)
    return TwoLinear()


def _batch(step: int, d: int = 32) -> torch.Tensor:
    return torch.randn(8, d, generator=torch.Generator().manual_seed(1000 + step))


def _train_step(program, model, optimizer, step: int) -> None:
    """One optimizer step in the contract's hook order (the plain loop)."""
    program.step_start(step)
    x = _batch(step, model.a.in_features)
    loss = program.loss((model(x) - x.flip(-1)).pow(2).mean(), batch={"x": x}, outputs=None)
    loss.backward()
    program.before_optimizer_step(step)
    optimizer.step()
    program.after_optimizer_step(step)
    optimizer.zero_grad(set_to_none=True)


def _zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


# -- GMP schedule: the exact sparsity at each step is the plan's ----------------------------


def _cubic(t, t0, t1, s0, sf):
    return sf + (s0 - sf) * (1 - (t - t0) / (t1 - t0)) ** 3


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_gmp_exact_sparsity_at_every_step_matches_the_plan(scope):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    spec = {
        "type": "gmp",
        "init_sparsity": 0.3,
        "final_sparsity": 0.9,
        "start_step": 2,
        "end_step": 11,
        "update_every_steps": 3,
        "scope": scope,
    }
    program = recipec.compile(_recipe([spec], steps=14), model, optimizer, steps_per_epoch=14)
    events = program.plan.pruning_events()
    # The plan itself, against the cubic formula written out.
    assert [(s, i) for s, i, _ in events] == [(2, 0), (5, 0), (8, 0), (11, 0)]
    for step, _, sparsity in events:
        assert sparsity == pytest.approx(_cubic(step, 2, 11, 0.3, 0.9), abs=1e-12)
    assert events[0][2] == pytest.approx(0.3) and events[-1][2] == pytest.approx(0.9)

    params = {"a.weight": model.a.weight, "b.weight": model.b.weight}
    total = sum(p.numel() for p in params.values())
    target = 0.0
    previous = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
    for step in range(14):
        program.step_start(step)
        target = dict((s, sp) for s, _, sp in events).get(step, target)
        if scope == "global":
            assert sum(_zeros(p) for p in params.values()) == round(target * total), step
        else:
            for name, p in params.items():
                assert _zeros(p) == round(target * p.numel()), (step, name)
        masks = program.masks.masks
        for name in masks:
            assert not bool((~previous[name] & masks[name]).any()), "a pruned weight came back"
            previous[name] = masks[name].clone()
        # Forward, backward, step (weights move, masks hold).
        x = _batch(step)
        (model(x) - x.flip(-1)).pow(2).mean().backward()
        program.before_optimizer_step(step)
        optimizer.step()
        program.after_optimizer_step(step)
        optimizer.zero_grad()
        if scope == "global":
            assert sum(_zeros(p) for p in params.values()) == round(target * total), step
    program.finalize()
    history = program.history()
    assert [h["step"] for h in history] == [2, 5, 8, 11]
    assert [h["target"] for h in history] == [e[2] for e in events]
    assert history[-1]["achieved"] == pytest.approx(round(0.9 * total) / total)


def test_pruning_step_at_the_stage_end_runs_in_finalize():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    spec = {
        "type": "gmp",
        "init_sparsity": 0.2,
        "final_sparsity": 0.6,
        "start_step": 0,
        "end_step": 4,
        "update_every_steps": 2,
    }
    program = recipec.compile(_recipe([spec], steps=4), model, optimizer, steps_per_epoch=4)
    for step in range(4):
        _train_step(program, model, optimizer, step)
    assert program.sparsity()[0] == pytest.approx(
        round(_cubic(2, 0, 4, 0.2, 0.6) * 1024) / 1024
    )  # step 2
    program.finalize()
    assert program.sparsity()[0] == pytest.approx(round(0.6 * 1024) / 1024)
    program.finalize()  # idempotent
    assert [h["step"] for h in program.history()] == [0, 2, 4]


def test_global_and_per_layer_rank_differently():
    # a holds small weights, b large ones: global magnitude prunes a first and harder.
    def build():
        model = TwoLinear(d_in=4, d_hidden=2)  # a: 2 x 4, b: 4 x 2
        with torch.no_grad():
            model.a.weight.copy_(
                torch.tensor([[0.01, -0.02, 0.03, -0.04], [0.05, -0.06, 0.07, -0.08]])
            )
            model.b.weight.copy_(torch.tensor([[1.0, -2.0], [3.0, -4.0], [5.0, -6.0], [7.0, -8.0]]))
        return model

    one_shot = {"type": "gmp", "final_sparsity": 0.5, "start_step": 0, "end_step": 0}
    results = {}
    for scope in ("global", "per_layer"):
        model = build()
        program = recipec.compile(
            _recipe([{**one_shot, "scope": scope}], steps=1), model, None, steps_per_epoch=1
        )
        program.step_start(0)
        results[scope] = (model.a.weight.detach().clone(), model.b.weight.detach().clone())
    a_global, b_global = results["global"]
    a_layer, b_layer = results["per_layer"]
    # Global: the 8 smallest of 16 are exactly all of a.
    assert torch.equal(a_global, torch.zeros(2, 4))
    assert torch.equal(b_global, torch.tensor([[1.0, -2.0], [3.0, -4.0], [5.0, -6.0], [7.0, -8.0]]))
    # Per layer: the 4 smallest of each tensor.
    assert torch.equal(a_layer, torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.05, -0.06, 0.07, -0.08]]))
    assert torch.equal(b_layer, torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, -6.0], [7.0, -8.0]]))


# -- structures, element by element ----------------------------------------------------------


def _one_layer(weight: torch.Tensor) -> nn.Module:
    model = nn.Module()
    model.a = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        model.a.weight.copy_(weight)
    return model


def test_block4_prunes_whole_groups_of_four_along_the_input_dim():
    w = torch.tensor(
        [
            [1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 10.0],  # group scores |w| sums: 10, 40
            [5.0, -5.0, 5.0, 5.0, 0.1, -0.2, 0.3, -0.4],  # 20, 1.0
            [-9.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.5],  # 9, 8.5
        ]
    )
    model = _one_layer(w)
    spec = {
        "type": "gmp",
        "final_sparsity": 0.5,
        "start_step": 0,
        "end_step": 0,
        "structure": "block4",
        "scope": "per_layer",
    }
    program = recipec.compile(
        _recipe([spec], steps=1, targets=[r"^a\.weight$"]), model, None, steps_per_epoch=1
    )
    program.step_start(0)
    # 6 groups, prune round(0.5 * 6) = 3 with the lowest sums: 1.0 (row 1, g1), 8.5 (row 2, g1), 9 (row 2, g0).
    keep = torch.tensor(
        [
            [1, 1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(program.masks.masks["a.weight"], keep)
    assert torch.equal(model.a.weight.detach(), w * keep)
    for i in range(3):
        for j in range(8):
            assert (model.a.weight[i, j].item() == 0.0) == (not keep[i, j].item()) or w[
                i, j
            ] == 0, (i, j)


def test_two_four_keeps_the_two_largest_of_each_group_of_four():
    w = torch.tensor(
        [
            [1.0, -4.0, 3.0, 2.0, 0.5, 0.1, -0.9, 0.3],
            [
                2.0,
                2.0,
                2.0,
                2.0,
                -7.0,
                6.0,
                0.0,
                1.0,
            ],  # a tie: the earlier weights are pruned first
        ]
    )
    model = _one_layer(w)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    spec = {"type": "gmp", "final_sparsity": 0.5, "start_step": 0, "structure": "2:4"}
    program = recipec.compile(
        _recipe([spec], steps=5, targets=[r"^a\.weight$"]), model, optimizer, steps_per_epoch=5
    )
    assert [e[0] for e in program.plan.pruning_events()] == [0]  # N:M is one-shot at its start
    program.step_start(0)
    keep = torch.tensor(
        [
            [0, 1, 1, 0, 1, 0, 1, 0],
            [0, 0, 1, 1, 1, 1, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(program.masks.masks["a.weight"], keep)
    assert torch.equal(model.a.weight.detach(), w * keep)
    # Training keeps the pattern: at most 2 non-zeros in every group of 4, exactly where kept.
    for step in range(5):
        program.step_start(step)
        x = _batch(step, 8)
        model.a(x).pow(2).sum().backward()
        program.before_optimizer_step(step)
        optimizer.step()
        program.after_optimizer_step(step)
        optimizer.zero_grad()
        groups = (model.a.weight.detach() != 0).reshape(-1, 4)
        assert int(groups.sum(-1).max()) <= 2
        assert not bool((model.a.weight.detach()[~keep] != 0).any())


# -- mask hygiene under AdamW -----------------------------------------------------------------


def test_masks_survive_100_adamw_steps_with_weight_decay():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-2, weight_decay=0.1)
    # Masks change while Adam's moments are non-zero (dense steps first, then gradual pruning).
    spec = {
        "type": "gmp",
        "init_sparsity": 0.3,
        "final_sparsity": 0.8,
        "start_step": 5,
        "end_step": 50,
        "update_every_steps": 5,
    }
    program = recipec.compile(_recipe([spec], steps=100), model, optimizer, steps_per_epoch=100)
    params = {"a.weight": model.a.weight, "b.weight": model.b.weight}
    start = {n: p.detach().clone() for n, p in params.items()}
    checked = 0
    for step in range(100):
        program.step_start(step)
        x = _batch(step)
        (model(x) - x.flip(-1)).pow(2).mean().backward()
        program.before_optimizer_step(step)
        optimizer.step()
        masks = program.masks.masks
        for name, mask in masks.items():
            state = optimizer.state[params[name]]
            # Before masks are re-applied: zero moments at pruned positions keep pruned weights at 0.
            assert not bool((params[name].detach()[~mask] != 0).any()), (step, name)
            assert not bool((state["exp_avg"][~mask] != 0).any()), (step, name)
            assert not bool((state["exp_avg_sq"][~mask] != 0).any()), (step, name)
            checked += 1
        program.after_optimizer_step(step)
        optimizer.zero_grad()
        for name, mask in masks.items():
            assert not bool((params[name].detach()[~mask] != 0).any()), (step, name)
    assert checked == 2 * 95
    assert program.sparsity()[0] == pytest.approx(round(0.8 * 1024) / 1024)
    for name, p in params.items():  # kept weights did train
        kept = program.masks.masks[name]
        assert not torch.allclose(p.detach()[kept], start[name][kept])


def test_gradients_of_pruned_weights_are_zero_before_the_optimizer_step():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    spec = {"type": "gmp", "final_sparsity": 0.6, "start_step": 0, "end_step": 0}
    program = recipec.compile(_recipe([spec], steps=3), model, optimizer, steps_per_epoch=3)
    program.step_start(0)
    x = _batch(0)
    (model(x) - x).pow(2).mean().backward()
    pruned_a = ~program.masks.masks["a.weight"]
    # Backward does produce gradients at pruned positions (this test can fail) ...
    assert bool((model.a.weight.grad[pruned_a] != 0).any())
    program.before_optimizer_step(0)
    # ... and the hook zeroes exactly those.
    for name, p in (("a.weight", model.a.weight), ("b.weight", model.b.weight)):
        mask = program.masks.masks[name]
        assert not bool((p.grad[~mask] != 0).any())
        assert bool((p.grad[mask] != 0).any())
    assert bool((model.a.bias.grad != 0).any())  # non-targets untouched


def test_constant_keeps_an_existing_zero_pattern():
    model = _model()
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
        _recipe([{"type": "constant"}], steps=30), model, optimizer, steps_per_epoch=30
    )
    for step in range(30):
        _train_step(program, model, optimizer, step)
    for name, p in (("a.weight", model.a.weight), ("b.weight", model.b.weight)):
        assert torch.equal(program.masks.masks[name], ~zero[name])
        assert torch.equal(p.detach() == 0, zero[name])  # same zeros, no new ones
        assert not torch.allclose(
            p.detach()[~zero[name]], start[name][~zero[name]]
        )  # the rest trained
    assert set(program.masks.masks) == {"a.weight", "b.weight"}


def test_constant_starts_at_its_window():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-2)
    with torch.no_grad():
        model.a.weight[:, :4] = 0
    program = recipec.compile(
        _recipe([{"type": "constant", "start_step": 3}], steps=6),
        model,
        optimizer,
        steps_per_epoch=6,
    )
    for step in range(3):
        _train_step(program, model, optimizer, step)
    assert program.masks.masks == {}
    assert bool((model.a.weight[:, :4] != 0).any())  # not frozen yet: zeros moved
    _train_step(program, model, optimizer, 3)
    frozen = model.a.weight.detach() == 0
    for step in range(4, 6):
        _train_step(program, model, optimizer, step)
    assert torch.equal(model.a.weight.detach() == 0, frozen)


# -- learning rate --------------------------------------------------------------------------


def test_lr_modifier_writes_the_plan_lr_into_every_group_at_each_step_start():
    model = _model()
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
    program = recipec.compile(_recipe(lrs, steps=24), model, optimizer, steps_per_epoch=24)
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
        x = _batch(step)
        (model(x) - x).pow(2).mean().backward()
        program.before_optimizer_step(step)
        optimizer.step()
        program.after_optimizer_step(step)
        external.step()
        optimizer.zero_grad()
        assert optimizer.param_groups[0]["lr"] >= 100.0 * 0.5  # the scheduler did overwrite it


def test_no_lr_modifier_leaves_the_lr_alone():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.123)
    spec = {"type": "gmp", "final_sparsity": 0.5, "start_step": 1, "end_step": 1}
    program = recipec.compile(_recipe([spec], steps=3), model, optimizer, steps_per_epoch=3)
    assert not program.sets_lr
    for step in range(3):
        _train_step(program, model, optimizer, step)
        assert optimizer.param_groups[0]["lr"] == 0.123


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


def _fresh(seed: int = 0):
    model = _model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=0.05)
    program = recipec.compile(
        _recipe(RESUME_RECIPE, steps=16), model, optimizer, steps_per_epoch=16
    )
    return model, optimizer, program


def test_state_dict_round_trip_resumes_with_identical_masks():
    model, optimizer, program = _fresh()
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
        _train_step(program, model, optimizer, step)
    program.finalize()
    reference_masks = {n: m.clone() for n, m in program.masks.masks.items()}
    reference_weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    model2, optimizer2, program2 = _fresh(
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
        _train_step(program2, model2, optimizer2, step)
    program2.finalize()
    assert set(program2.masks.masks) == set(reference_masks)
    for name, mask in reference_masks.items():
        assert torch.equal(program2.masks.masks[name], mask), name
    for name, p in model2.named_parameters():
        assert torch.equal(p.detach(), reference_weights[name]), name
    assert [h["step"] for h in program2.history()] == [1, 4, 7, 10, 13]


def test_load_state_dict_rejects_another_stage_or_recipe():
    _, _, program = _fresh()
    state = program.state_dict()
    model, optimizer = _model(), None
    other = recipec.compile(
        _recipe(RESUME_RECIPE[:1], steps=16), model, optimizer, steps_per_epoch=16
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


def test_obert_modifier_reaches_the_planned_sparsity_at_each_step():
    pytest.importorskip(
        "recipec.sparsity.obs", reason="oBERT's obert_prune_step is not importable yet"
    )
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    calls = []

    def grad_batches(batch_size: int):
        g = torch.Generator().manual_seed(len(calls))
        calls.append(batch_size)
        while True:
            yield {
                "input_ids": torch.randint(0, 64, (batch_size, 12), generator=g),
                "labels": torch.randint(0, 2, (batch_size,), generator=g),
            }

    spec = {
        "type": "obert",
        "init_sparsity": 0.3,
        "final_sparsity": 0.6,
        "start_step": 0,
        "end_step": 4,
        "update_every_steps": 2,
        "num_grads": 4,
        "fisher_block_size": 16,
        "grad_batch_size": 3,
        "damp": 1e-4,
        "targets": None,
    }
    recipe = load_recipe_text(yaml.safe_dump({"training": {"steps": 6}, "modifiers": [spec]}))
    program = recipec.compile(
        recipe, model, optimizer, steps_per_epoch=6, grad_batches=grad_batches
    )
    (obert,) = program.modifiers
    total = sum(p.numel() for p in obert.targets.values())
    assert total == 2 * (4 * 32 * 32 + 2 * 32 * 64)
    targets = dict((s, sp) for s, _, sp in program.plan.pruning_events())
    current = 0.0
    for step in range(6):
        program.step_start(step)
        current = targets.get(step, current)
        zeros = sum(_zeros(p) for p in obert.targets.values())
        assert zeros == round(current * total), step
        batch = {"input_ids": torch.randint(0, 64, (4, 12)), "labels": torch.randint(0, 2, (4,))}
        model.train()
        out = model(**batch)
        program.loss(out.loss, batch=batch, outputs=out).backward()
        program.before_optimizer_step(step)
        optimizer.step()
        program.after_optimizer_step(step)
        optimizer.zero_grad()
    program.finalize()
    assert sum(_zeros(p) for p in obert.targets.values()) == round(0.6 * total)
    assert [h["step"] for h in program.history()] == [0, 2, 4]
    assert calls and set(calls) == {3}  # gradient batches of grad_batch_size
    assert model.training  # restored after the eval-mode gradient collection
    for p in model.parameters():
        assert p.grad is None  # the collected gradients do not leak into training

"""The ``quantize`` modifier: fake-quant against an independent reference, masks kept exactly,
recipe errors with file:line, state for resume, and PTQ in a steps: 0 stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recipec import compile, load_recipe_text
from recipec.quant.fake import fake_quant_act, fake_quant_weight, quant_of
from recipec.recipe.errors import RecipeError


def ref_weight(w: np.ndarray) -> np.ndarray:
    """Quantize-dequantize per output row, written from the scheme's definition in float64
    (then rounded like float32 would: the scale is taken in float32)."""
    out = np.zeros_like(w)
    for o in range(w.shape[0]):
        amax = np.float32(np.max(np.abs(w[o])))
        scale = np.float32(amax / np.float32(127))
        if scale == 0:
            continue
        q = np.clip(np.rint(w[o] / scale), -127, 127)
        out[o] = (q.astype(np.float32) * scale).astype(np.float32)
    return out


def ref_act(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scale = np.float32(max(abs(lo), abs(hi)) / 127)
    q = np.clip(np.rint(x / scale), -128, 127)
    return (q.astype(np.float32) * scale).astype(np.float32)


def test_weight_fake_quant_equals_the_reference_and_keeps_zeros():
    torch.manual_seed(0)
    w = torch.randn(16, 40)
    w[w.abs() < 0.8] = 0.0  # pruned
    w[3] = 0.0  # a fully pruned row (scale 0)
    got = fake_quant_weight(w)
    assert torch.equal(got, torch.from_numpy(ref_weight(w.numpy())))
    assert bool((got[w == 0] == 0).all())  # pruned stays exactly zero
    assert not torch.equal(got, w)  # and the kept weights did move to the int8 grid
    # at most 127 distinct magnitudes per row, the row's max kept exactly
    assert torch.allclose(got.abs().amax(dim=1), w.abs().amax(dim=1))


def test_act_fake_quant_equals_the_reference_and_clips_out_of_range():
    torch.manual_seed(1)
    x = torch.randn(4, 8, 40) * 3
    lo, hi = -2.0, 2.5  # x goes beyond: clipped to -128 / 127 steps
    scale = torch.tensor(max(abs(lo), abs(hi)) / 127, dtype=torch.float32)
    got = fake_quant_act(x, scale)
    assert torch.equal(got, torch.from_numpy(ref_act(x.numpy(), lo, hi)))
    assert float(got.max()) == pytest.approx(127 * float(scale))
    assert float(got.min()) == pytest.approx(-128 * float(scale))


def test_straight_through_gradient():
    w = torch.randn(4, 6, requires_grad=True)
    x = torch.randn(3, 6, requires_grad=True)
    (fake_quant_weight(w).sum() + fake_quant_act(x, torch.tensor(0.01)).sum()).backward()
    assert torch.equal(w.grad, torch.ones_like(w)) and torch.equal(x.grad, torch.ones_like(x))


QAT = """\
training: {steps: 12, batch_size: 4, learning_rate: 1.0e-3, max_seq_length: 16}
stages:
  - name: prune
    training: {steps: 4}
    modifiers:
      - {type: gmp, init_sparsity: 0.5, final_sparsity: 0.7, start_step: 0, end_step: 2, update_every_steps: 2}
  - name: qat
    modifiers:
      - {type: constant}
      - {type: quantize, start_step: 2, freeze_observers_at_step: 5, calibration_batches: 2}
"""


def _batches(n, seed=0, batch=4, seq=16):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(0, 1000, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
            "labels": torch.randint(0, 2, (batch,), generator=g),
        }
        for _ in range(n)
    ]


def _grad_batches(batch_size):
    return iter(_batches(8, seed=7, batch=batch_size))


def _run(program, model, optimizer, steps, start=0):
    for step, batch in zip(range(start, steps), _batches(steps, seed=3)[start:]):
        program.step_start(step)
        loss = program.loss(model(**batch).loss)
        loss.backward()
        program.before_optimizer_step(step)
        optimizer.step()
        optimizer.zero_grad()
        program.after_optimizer_step(step)


def _stage(recipe, model, stage, masks=None):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    program = compile(
        recipe, model, optimizer, 4, stage=stage, masks=masks, grad_batches=_grad_batches
    )
    return program, optimizer


def test_qat_keeps_masks_exact_and_quantized_weights_zero(tiny_bert):
    recipe = load_recipe_text(QAT)
    model = tiny_bert.train()
    program, opt = _stage(recipe, model, "prune")
    _run(program, model, opt, 4)
    program.finalize()
    masks = {n: m.clone() for n, m in program.masks.masks.items()}
    assert masks and all(float((~m).float().mean()) > 0.6 for m in masks.values())

    program, opt = _stage(recipe, model, "qat", masks=masks)
    quant = quant_of(model)
    assert set(quant.layers) == set(masks)  # default targets: the pruned linears
    _run(program, model, opt, 12)
    program.finalize()
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.equal(program.masks.masks[name], mask), name  # masks identical
        assert bool((params[name][~mask] == 0).all()), name  # pruned weights exactly zero
        fq = fake_quant_weight(params[name].detach())
        assert bool((fq[~mask] == 0).all()), name  # ... and after fake-quant
        assert torch.equal(fq, torch.from_numpy(ref_weight(params[name].detach().numpy())))
    layer = next(iter(quant.layers.values()))
    assert layer.enabled and not layer.observing and layer.seen > 2
    assert quant.frozen


def test_a_quantized_linear_computes_the_reference(tiny_bert):
    recipe = load_recipe_text(QAT)
    model = tiny_bert.eval()
    program, _ = _stage(recipe, model, "qat")
    program.step_start(2)  # enable, calibrate
    name, layer = next(iter(quant_of(model).layers.items()))
    x = torch.randn(2, 5, layer.module.in_features)
    layer.observing = False
    got = layer.module(x)
    w = ref_weight(layer.module.weight.detach().numpy())
    want = ref_act(x.numpy(), layer.lo, layer.hi) @ w.T + layer.module.bias.detach().numpy()
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=0, atol=1e-5)


def test_observers_freeze_at_the_step_and_state_resumes(tiny_bert, make_tiny_bert):
    recipe = load_recipe_text(QAT)
    model = tiny_bert.train()
    program, opt = _stage(recipe, model, "qat")
    _run(program, model, opt, 5)  # steps 0..4: observing (calibrated at step 2)
    layer = next(iter(quant_of(model).layers.values()))
    assert layer.observing and layer.seen == 2 + 3
    _run(program, model, opt, 6, start=5)  # step 5 freezes
    frozen = (layer.lo, layer.hi, layer.seen)
    assert not layer.observing
    _run(program, model, opt, 8, start=6)
    assert (layer.lo, layer.hi, layer.seen) == frozen
    state = program.state_dict()

    other = make_tiny_bert(seed=0).train()
    other.load_state_dict(model.state_dict())
    resumed, _ = _stage(recipe, other, "qat")
    resumed.load_state_dict(state)
    again = quant_of(other).layers[layer.name]
    assert (again.lo, again.hi, again.seen, again.observing, again.enabled) == (
        *frozen,
        False,
        True,
    )
    batch = _batches(1, seed=11)[0]
    model.eval(), other.eval()
    assert torch.equal(model(**batch).logits, other(**batch).logits)


PTQ = """\
training: {steps: 4, batch_size: 4, learning_rate: 1.0e-3, max_seq_length: 16}
stages:
  - name: ptq
    training: {steps: 0}
    modifiers:
      - {type: gmp, final_sparsity: 0.6}
      - {type: quantize, calibration_batches: 3}
"""


def test_ptq_prunes_then_calibrates_at_step_0(tiny_bert):
    recipe = load_recipe_text(PTQ)
    model = tiny_bert.eval()
    program, _ = _stage(recipe, model, "ptq")
    seen = []
    layer = next(iter(quant_of(model).layers.values()))
    layer.module.register_forward_pre_hook(
        lambda m, a: seen.append(float((m.weight == 0).float().mean()))
    )
    program.step_start(0)
    program.finalize()
    assert len(seen) == 3 and min(seen) > 0.5  # calibrated on the pruned weights
    assert layer.seen == 3 and not layer.observing and layer.enabled


def _error(text: str) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe_text(text, source="r.yaml")
    return str(info.value)


def test_quantize_before_pruning_ends_is_a_recipe_error_with_its_line():
    message = _error(
        "training: {steps: 10}\n"
        "modifiers:\n"
        "  - {type: gmp, final_sparsity: 0.5, start_step: 0, end_step: 6, update_every_steps: 2}\n"
        "  - {type: quantize, start_step: 4}\n"
    )
    assert "r.yaml:4" in message and "before the last pruning step" in message
    assert "step 6" in message


def test_quantize_with_the_default_window_and_a_pruning_ramp_is_an_error():
    message = _error(
        "training: {epochs: 2}\n"
        "modifiers:\n"
        "  - {type: gmp, final_sparsity: 0.5, start_epoch: 0, end_epoch: 1, update_every_epochs: 0.5}\n"
        "  - {type: quantize}\n"
    )
    assert "r.yaml:4" in message and "modifiers.1" in message


def test_overlapping_quantize_windows_are_an_error_with_their_line():
    message = _error(
        "training: {steps: 10}\n"
        "modifiers:\n"
        "  - {type: quantize, start_step: 2}\n"
        "  - {type: quantize, start_step: 4, end_step: 8}\n"
    )
    assert "r.yaml:4" in message and "overlaps modifier 0 (quantize)" in message


def test_pruning_after_a_quantize_stage_is_an_error():
    message = _error(
        "training: {steps: 10}\n"
        "stages:\n"
        "  - name: q\n"
        "    modifiers: [{type: quantize}]\n"
        "  - name: p\n"
        "    modifiers:\n"
        "      - {type: gmp, final_sparsity: 0.5}\n"
    )
    assert "r.yaml:7" in message and "prunes after quantization started" in message
    assert "r.yaml:5" in message and "give this stage its own quantize modifier" in message


def test_ptq_needs_calibration_batches_and_freeze_inside_the_window():
    message = _error(
        "training: {steps: 0}\nmodifiers:\n  - {type: gmp, final_sparsity: 0.5}\n"
        "  - {type: quantize}\n"
    )
    assert "r.yaml:4" in message and "calibration_batches" in message
    message = _error(
        "training: {steps: 10}\nmodifiers:\n"
        "  - {type: quantize, start_step: 4, freeze_observers_at_step: 2}\n"
    )
    assert "r.yaml:3" in message and "before start_step" in message
    message = _error("training: {steps: 10}\nmodifiers:\n  - {type: quantize, bits: 4}\n")
    assert "r.yaml:3" in message and "bits" in message


def test_quantize_after_pruning_ends_loads_and_plans():
    from recipec.plan import plan_to_dict, resolve

    recipe = load_recipe_text(
        "training: {steps: 10}\n"
        "modifiers:\n"
        "  - {type: gmp, final_sparsity: 0.5, start_step: 0, end_step: 6, update_every_steps: 2}\n"
        "  - {type: quantize, start_step: 6, freeze_observers_at_step: 8}\n"
    )
    (entry,) = [
        m
        for m in plan_to_dict(resolve(recipe, 5))["stages"][0]["modifiers"]
        if m["type"] == "quantize"
    ]
    assert (entry["start_step"], entry["end_step"], entry["freeze_observers_at_step"]) == (6, 10, 8)


def test_a_target_that_is_not_a_linear_weight_is_a_compile_error(tiny_bert):
    from recipec.modifiers.base import CompileError

    recipe = load_recipe_text(
        "training: {steps: 4}\nmodifiers:\n  - {type: quantize, targets: ['word_embeddings']}\n"
    )
    with pytest.raises(CompileError, match="not the weight of an nn.Linear"):
        compile(recipe, tiny_bert, None, 4)
    assert quant_of(tiny_bert) is None


def test_freezing_merges_the_ranks_ranges(tiny_bert, monkeypatch):
    """Under torchrun each rank observed its own batches: the freeze takes the widest range
    over the ranks (a rank that saw nothing does not count), identical on every rank."""
    from recipec import distributed as dist_utils

    recipe = load_recipe_text(QAT)
    program, _ = _stage(recipe, tiny_bert.eval(), "qat")
    program.step_start(2)  # enable + calibrate (this rank: 2 batches)
    (mod,) = [m for m in program.modifiers if m.spec.type == "quantize"]
    layers = quant_of(tiny_bert).layers
    mine = {n: (q.lo, q.hi, q.seen) for n, q in layers.items()}
    name = next(iter(layers))
    other = dict(mine, **{name: (mine[name][0] - 5.0, mine[name][1] + 1.0, 3)})
    empty = {n: (0.0, 0.0, 0) for n in layers}
    monkeypatch.setattr(dist_utils, "is_distributed", lambda: True)
    monkeypatch.setattr(dist_utils, "all_gather_object", lambda obj, what="": [obj, other, empty])
    mod.freeze(5)
    layer = layers[name]
    assert (layer.lo, layer.hi, layer.seen) == (mine[name][0] - 5.0, mine[name][1] + 1.0, 5)
    second = list(layers)[1]
    assert (layers[second].lo, layers[second].hi) == mine[second][:2]
    assert layers[second].seen == 2 * mine[second][2]
    assert quant_of(tiny_bert).frozen

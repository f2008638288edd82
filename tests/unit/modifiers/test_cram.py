"""CrAM / CrAM+ against a float64 brute-force reference of the update on a tiny classifier."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import recipec
from recipec.modifiers.cram import sampled_sparsity
from recipec.recipe.load import load_recipe_text

TARGETS = [r"^a\.weight$", r"^b\.weight$"]


class TinyClassifier(nn.Module):
    """HF-like: forward(**batch) returns an object with .loss and .logits."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 12)
        self.b = nn.Linear(12, 3)

    def forward(self, input_ids, labels=None):
        logits = self.b(torch.tanh(self.a(input_ids)))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SimpleNamespace(loss=loss, logits=logits)


def _setup(cram: dict, seed: int = 0, steps: int = 10, extra: list | None = None, teacher=None):
    torch.manual_seed(seed)
    model = TinyClassifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    recipe = load_recipe_text(
        yaml.safe_dump(
            {
                "training": {"steps": steps, "seed": 3},
                "targets": TARGETS,
                "modifiers": [{"type": "cram", **cram}] + (extra or []),
            }
        )
    )
    program = recipec.compile(recipe, model, opt, steps_per_epoch=steps, teacher=teacher)
    return model, opt, program, _batch(seed + 1)


def _batch(seed: int, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randn(n, 8, generator=g),
        "labels": torch.randint(0, 3, (n,), generator=g),
    }


def _grads_through_program(model, program, batch, step, micro_batches: int = 1):
    """The driver's step; with ``micro_batches`` > 1 the batch is split and the loss averaged
    (gradient accumulation)."""
    program.step_start(step)
    n = len(batch["labels"]) // micro_batches
    for i in range(micro_batches):
        micro = {k: v[i * n : (i + 1) * n] for k, v in batch.items()}
        out = model(**micro)
        loss = program.loss(out.loss, batch=micro, outputs=out)
        (loss / micro_batches).backward()
    program.before_optimizer_step(step)
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _keep_lowest_pruned(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Brute force: sort |w| and prune the round(s * n) smallest."""
    flat = w.abs().flatten()
    order = sorted(range(flat.numel()), key=lambda i: float(flat[i]))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    for i in order[: round(sparsity * flat.numel())]:
        keep[i] = False
    return keep.view_as(w)


def _reference(
    model, batch, rho, sparsity, variant, scope="per_layer", loss_fn=None, normalize=False
):
    ref = copy.deepcopy(model).double()
    batch = {"input_ids": batch["input_ids"].double(), "labels": batch["labels"]}
    loss_fn = loss_fn or (lambda out, b: out.loss)
    params = dict(ref.named_parameters())
    dense = torch.autograd.grad(loss_fn(ref(**batch), batch), list(params.values()))
    dense = dict(zip(params, dense))
    norm = math.sqrt(sum(float((g * g).sum()) for g in dense.values()))  # over every parameter
    with torch.no_grad():
        for n, p in params.items():
            p.add_((rho / norm if normalize else rho) * dense[n])
        names = ("a.weight", "b.weight")
        if scope == "global":
            both = _keep_lowest_pruned(torch.cat([params[n].flatten() for n in names]), sparsity)
            keep = dict(zip(names, (both[:96].view(12, 8), both[96:].view(3, 12))))
        else:
            keep = {n: _keep_lowest_pruned(params[n], sparsity) for n in names}
        for n in names:
            params[n].mul_(keep[n])
    compressed = dict(
        zip(params, torch.autograd.grad(loss_fn(ref(**batch), batch), list(params.values())))
    )
    out = {}
    for n in params:
        g = compressed[n] * keep[n] if n in keep else compressed[n]
        out[n] = g + dense[n] if variant == "cram_plus" else g
    return out


@pytest.mark.parametrize("variant", ["cram", "cram_plus"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_update_equals_the_brute_force_reference(variant, sparsity):
    model, _, program, batch = _setup({"variant": variant, "sparsities": [sparsity], "rho": 0.3})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = _grads_through_program(model, program, batch, step=0)
    want = _reference(model, batch, 0.3, sparsity, variant)
    for n in want:
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-4, atol=1e-6, msg=n)
    # The weights are back where they were: CrAM only changes the gradient.
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    # And it is not the ordinary gradient (the test can tell the two apart).
    plain = copy.deepcopy(model)
    plain_grads = torch.autograd.grad(plain(**batch).loss, list(plain.parameters()))
    assert not torch.allclose(got["a.weight"], plain_grads[0])


@pytest.mark.parametrize("variant", ["cram", "cram_plus"])
def test_normalized_ascent_equals_the_brute_force_reference(variant):
    model, _, program, batch = _setup(
        {"variant": variant, "sparsities": [0.5], "rho": 0.3, "normalize": True}
    )
    got = _grads_through_program(model, program, batch, step=0)
    want = _reference(model, batch, 0.3, 0.5, variant, normalize=True)
    for n in want:
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-4, atol=1e-6, msg=n)
    # The gradient norm here is far from 1, so the unnormalized step is a different point.
    unnormalized = _reference(model, batch, 0.3, 0.5, variant)
    assert not torch.allclose(want["a.weight"], unnormalized["a.weight"])


@pytest.mark.parametrize("normalize", [True, False])
def test_normalized_step_has_length_rho_whatever_the_loss_scale(normalize):
    """The driver's loss scaled by 100 scales g by 100. Normalized, the ascent point w' stays put, so
    the CrAM gradient (of the model's own loss at the compressed point) is the same; unnormalized,
    w' moves 100 times further and the gradient changes."""
    grads = []
    for scale in (1.0, 100.0):
        model, _, program, batch = _setup(
            {"variant": "cram", "sparsities": [0.5], "rho": 0.3, "normalize": normalize}
        )
        program.step_start(0)
        out = model(**batch)
        program.loss(out.loss * scale, batch=batch, outputs=out).backward()
        norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters()))
        mod = program.modifiers[0]
        assert mod.ascent_scale(norm) * norm == pytest.approx(0.3 if normalize else 0.3 * norm)
        program.before_optimizer_step(0)
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    same = all(torch.allclose(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6) for n in grads[0])
    assert same == normalize
    assert mod.ascent_scale(0.0) == (
        0.0 if normalize else 0.3
    )  # a zero gradient: no ascent, no division by zero


def test_global_scope_equals_the_brute_force_reference():
    model, _, program, batch = _setup(
        {"variant": "cram", "sparsities": [0.75], "scope": "global", "rho": 0.3}
    )
    got = _grads_through_program(model, program, batch, step=0)
    want = _reference(model, batch, 0.3, 0.75, "cram", scope="global")
    for n in want:
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-4, atol=1e-6, msg=n)
    # Globally the layers end at different sparsities (per layer both would be 75%).
    per_layer = _reference(model, batch, 0.3, 0.75, "cram")
    assert not torch.allclose(want["b.weight"], per_layer["b.weight"])


def test_outside_its_window_the_gradient_is_the_ordinary_one():
    model, _, program, batch = _setup({"sparsities": [0.5], "start_step": 5})
    got = _grads_through_program(model, program, batch, step=2)
    plain = torch.autograd.grad(model(**batch).loss, list(model.parameters()))
    for (n, g), want in zip(got.items(), plain):
        torch.testing.assert_close(g, want, msg=n)


def test_sampled_sparsities_are_reproducible_and_cover_the_set():
    draws = [sampled_sparsity([0.5, 0.7, 0.9], seed=3, index=0, step=s) for s in range(300)]
    assert draws == [sampled_sparsity([0.5, 0.7, 0.9], seed=3, index=0, step=s) for s in range(300)]
    counts = {s: draws.count(s) for s in (0.5, 0.7, 0.9)}
    assert all(70 <= c <= 130 for c in counts.values()), counts
    assert draws != [sampled_sparsity([0.5, 0.7, 0.9], seed=4, index=0, step=s) for s in range(300)]


def test_masks_set_by_other_modifiers_keep_zero_gradients():
    model, _, program, batch = _setup(
        {"sparsities": [0.5], "end_step": 10},
        extra=[
            {
                "type": "gmp",
                "init_sparsity": 0.4,
                "final_sparsity": 0.4,
                "start_step": 0,
                "end_step": 0,
                "targets": [r"^b\.weight$"],
            }
        ],
    )
    got = _grads_through_program(model, program, batch, step=0)
    pruned = ~program.masks.masks["b.weight"]
    assert int(pruned.sum()) == round(0.4 * 36)
    assert torch.all(got["b.weight"][pruned] == 0)


def test_training_with_cram_runs_and_changes_the_weights():
    model, opt, program, batch = _setup({"sparsities": [0.5, 0.7]}, steps=4)
    start = model.a.weight.detach().clone()
    for step in range(4):
        _grads_through_program(model, program, batch, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        program.after_optimizer_step(step)
    program.finalize()
    assert not torch.equal(model.a.weight, start)
    assert float((model.a.weight == 0).float().mean()) == 0.0  # CrAM leaves the model dense


CRAM_THEN_ONESHOT = """\
training: {batch_size: 16, learning_rate: 1e-3, max_seq_length: 32, seed: 1}
stages:
  - name: cram
    training: {epochs: 2}
    modifiers:
      - {type: cram, sparsities: [0.5, 0.7], rho: 0.05}
      - {type: distill, teacher: %s, hardness: 0.5, temperature: 2.0}
  - name: oneshot
    training: {steps: 1, learning_rate: 1e-9}
    modifiers:
      - {type: gmp, init_sparsity: 0.7, final_sparsity: 0.7, start_step: 0, end_step: 0}
"""


def test_apply_trains_with_cram_then_prunes_one_shot(tiny_model_dir, tmp_path):
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from recipec.cli import main

    recipe = tmp_path / "cram.yaml"
    recipe.write_text(CRAM_THEN_ONESHOT % tiny_model_dir)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        [
            "apply",
            str(recipe),
            "--model",
            str(tiny_model_dir),
            "--max-train",
            "64",
            "--max-eval",
            "32",
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "cram[0]: cram_plus from step 0 to 8" in result.output
    assert "cram[0]: 8 CrAM steps" in result.output
    masks = load_file(str(out / "model" / "masks.safetensors"))
    pruned = sum(int((~m.bool()).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert pruned == round(0.7 * total)


def test_an_nm_structure_allows_only_its_own_sparsity():
    from recipec.recipe.errors import RecipeError

    text = yaml.safe_dump(
        {
            "training": {"steps": 4},
            "modifiers": [{"type": "cram", "structure": "2:4", "sparsities": [0.5, 0.7]}],
        }
    )
    with pytest.raises(RecipeError, match=r"2:4 prunes exactly 0.5"):
        load_recipe_text(text)
    ok = yaml.safe_dump(
        {
            "training": {"steps": 4},
            "modifiers": [{"type": "cram", "structure": "2:4", "sparsities": [0.5]}],
        }
    )
    assert load_recipe_text(ok).modifiers[0].sparsities == [0.5]


def test_gradient_accumulation_recomputes_every_micro_batch():
    """Two micro-batches of 8 with averaged losses equal one batch of 16 (mean losses)."""
    model, _, program, batch = _setup({"variant": "cram_plus", "sparsities": [0.7], "rho": 0.3})
    got = _grads_through_program(model, program, batch, step=0, micro_batches=2)
    want = _reference(model, batch, 0.3, 0.7, "cram_plus")
    for n in want:
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_the_second_pass_uses_the_programs_loss_at_that_step():
    """With distillation active, both passes distil; after the distill window, neither does."""
    from recipec.modifiers.distill import distillation_loss

    torch.manual_seed(7)
    teacher = TinyClassifier()
    distill = {
        "type": "distill",
        "teacher": "given",
        "hardness": 0.7,
        "temperature": 2.0,
        "end_step": 2,
    }
    model, _, program, batch = _setup(
        {"variant": "cram_plus", "sparsities": [0.5], "rho": 0.3}, extra=[distill], teacher=teacher
    )
    ref_teacher = copy.deepcopy(teacher).double()

    def distilled(out, b):
        return distillation_loss(
            out.loss, out.logits, ref_teacher(input_ids=b["input_ids"]).logits, 0.7, 2.0
        )

    for step, loss_fn in ((0, distilled), (5, None)):
        got = _grads_through_program(model, program, batch, step=step)
        want = _reference(model, batch, 0.3, 0.5, "cram_plus", loss_fn=loss_fn)
        for n in want:
            torch.testing.assert_close(
                got[n].double(), want[n], rtol=1e-4, atol=1e-6, msg=f"step {step} {n}"
            )
        model.zero_grad(set_to_none=True)


def test_a_failing_second_pass_leaves_the_ordinary_step():
    model, _, program, batch = _setup({"sparsities": [0.5]})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    program.step_start(0)
    out = model(**batch)
    program.loss(out.loss, batch=batch, outputs=out).backward()
    ordinary = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    program.modifiers[0]._batches[0] = {"input_ids": batch["input_ids"]}  # no labels: no loss
    with pytest.raises(ValueError, match="returned no loss"):
        program.before_optimizer_step(0)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
        assert torch.equal(p.grad, ordinary[n]), n


def test_repeated_sparsities_are_refused():
    from recipec.recipe.errors import RecipeError

    with pytest.raises(RecipeError, match="must not repeat"):
        load_recipe_text(
            yaml.safe_dump(
                {
                    "training": {"steps": 4},
                    "modifiers": [{"type": "cram", "sparsities": [0.5, 0.5, 0.9]}],
                }
            )
        )

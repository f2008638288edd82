"""The ``obert`` modifier compiled from a recipe on a tiny BERT, and the one-shot benchmark path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import recipec
from recipec.modifiers.base import CompileError
from recipec.modifiers.obert import OBertModifier
from recipec.recipe.load import load_recipe_text

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def _one_thread_small_vocab(tiny_bert_config):
    """Tiny models run ~10x faster single-threaded on a busy 2-core machine; a 1,000-token
    vocabulary keeps the embedding gradient (computed, as SparseML does, but not pruned) small."""
    tiny_bert_config.vocab_size = 1000
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _recipe(
    structure: str = "unstructured", recomputations: int = 1, block: int = 16, extra: str = ""
):
    return load_recipe_text(
        f"""
version: 1
training: {{steps: 10, batch_size: 4}}
modifiers:
  - type: obert
    init_sparsity: 0.3
    final_sparsity: 0.8
    start_step: 2
    end_step: 8
    update_every_steps: 2
    scope: global
    structure: {structure}
    num_grads: 6
    fisher_block_size: {block}
    damp: 1e-4
    grad_batch_size: 4
    recomputations: {recomputations}{extra}
""",
        "<test>",
    )


class _Batches:
    """``grad_batches(batch_size)``: a fresh iterator over seeded random token batches."""

    def __init__(self, n: int = 6, seq: int = 10):
        self.calls = 0
        self.n, self.seq = n, seq

    def __call__(self, batch_size: int):
        self.calls += 1
        g = torch.Generator().manual_seed(1234)
        for _ in range(self.n):
            yield {
                "input_ids": torch.randint(0, 1000, (batch_size, self.seq), generator=g),
                "attention_mask": torch.ones(batch_size, self.seq, dtype=torch.long),
                "labels": torch.randint(0, 2, (batch_size,), generator=g),
            }


def _train(model, program, optimizer):
    """The driver's hook order with real optimizer steps; returns the modifier and, per pruning
    step, ``(step, target sparsity, pruned groups, groups)``."""
    (mod,) = [m for m in program.modifiers if isinstance(m, OBertModifier)]
    group = mod.spec.group_size
    total_groups = sum(p.numel() for p in mod.targets.values()) // group
    seen = []
    train_batches = _Batches(n=program.plan.total_steps)(4)
    for step in range(program.plan.total_steps):
        program.step_start(step)
        target = mod.resolved.target_sparsity(step)
        if target is not None:
            pruned = sum(int((~program.masks.masks[n]).sum()) for n in mod.targets) // group
            seen.append((step, target, pruned, total_groups))
        batch = next(train_batches)
        out = model(**batch)
        loss = program.loss(out.loss, batch=batch, outputs=out)
        loss.backward()
        program.before_optimizer_step(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        program.after_optimizer_step(step)
    program.finalize()
    return mod, seen


@pytest.mark.parametrize("structure, block", [("unstructured", 16), ("block4", 16)])
def test_exact_planned_sparsity_at_each_pruning_step(make_tiny_bert, structure, block):
    model = make_tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = _Batches()
    program = recipec.compile(
        _recipe(structure, block=block), model, optimizer, steps_per_epoch=10, grad_batches=batches
    )
    mod, seen = _train(model, program, optimizer)

    planned = list(zip(mod.resolved.pruning_steps, mod.resolved.sparsities))
    assert [(s, t) for s, t, _, _ in seen] == planned
    assert planned[0][1] == pytest.approx(0.3) and planned[-1][1] == pytest.approx(0.8)
    for _, target, pruned, total in seen:
        assert pruned == round(target * total)  # exact count of pruned groups, global ranking
    assert [h["step"] for h in mod.history] == [s for s, _ in planned]
    assert mod.history[-1]["achieved"] == pytest.approx(round(0.8 * seen[-1][3]) / seen[-1][3])
    assert len(mod.targets) == 12  # 2 layers x (Q, K, V, attention output, FFN in, FFN out)
    for name, p in mod.targets.items():
        mask = program.masks.masks[name]
        assert torch.all(p.detach()[~mask] == 0)  # dense with exact zeros, after optimizer steps
        if structure == "block4":
            groups = mask.reshape(*mask.shape[:-1], -1, 4)
            assert torch.all(groups.all(-1) | ~groups.any(-1))  # all-or-nothing blocks of 4
    # Only the targets are masked; embeddings, pooler and head have no zeros from pruning.
    assert set(program.masks.masks) == set(mod.targets)
    assert batches.calls == len(planned)  # one fresh gradient iterator per pruning step


def test_obs_update_moves_kept_weights(make_tiny_bert):
    """oBERT is not magnitude masking: the kept weights of a pruned block are updated."""
    model = make_tiny_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    recipe = load_recipe_text(
        """
version: 1
training: {steps: 1}
modifiers:
  - {type: obert, init_sparsity: 0.5, final_sparsity: 0.5, start_step: 0, end_step: 0,
     num_grads: 6, fisher_block_size: 16, damp: 1e-12, grad_batch_size: 4}
""",
        "<test>",
    )
    # damp far below g g^T (the random model's gradients are ~1e-7) so the Fisher matters
    program = recipec.compile(recipe, model, None, 1, grad_batches=_Batches())
    program.step_start(0)
    (mod,) = program.modifiers
    for name, p in mod.targets.items():
        kept = program.masks.masks[name]
        moved = (p.detach()[kept] - before[name][kept]).abs()
        assert moved.max() > 1e-4 * before[name].abs().max()  # the OBS update, not just a mask
        assert torch.all(p.detach()[~kept] == 0)


def test_recomputations_reach_the_same_final_sparsity(make_tiny_bert):
    results = {}
    for r in (1, 3):
        model = make_tiny_bert()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        batches = _Batches()
        program = recipec.compile(
            _recipe(recomputations=r), model, optimizer, 10, grad_batches=batches
        )
        mod, seen = _train(model, program, optimizer)
        results[r] = [pruned for _, _, pruned, _ in seen]
        # The Fisher is re-estimated for every sub-step: one fresh gradient iterator each.
        assert batches.calls == r * len(mod.resolved.pruning_steps)
        assert mod.history[-1]["achieved"] == pytest.approx(round(0.8 * seen[-1][3]) / seen[-1][3])
    assert results[1] == results[3]


def test_rank_k_grad_batch_matches_rank_1(make_tiny_bert):
    masks = {}
    for k in (1, 4):
        model = make_tiny_bert()
        recipe = load_recipe_text(
            f"""
version: 1
training: {{steps: 1}}
modifiers:
  - {{type: obert, init_sparsity: 0.6, final_sparsity: 0.6, start_step: 0, end_step: 0,
     num_grads: 8, fisher_block_size: 16, damp: 1e-3, grad_batch_size: 4, woodbury_batch: {k}}}
""",
            "<test>",
        )
        program = recipec.compile(recipe, model, None, 1, grad_batches=_Batches())
        program.step_start(0)
        masks[k] = program.masks.state_dict()
    differ = sum(int((masks[1][n] != masks[4][n]).sum()) for n in masks[1])
    total = sum(m.numel() for m in masks[1].values())
    assert differ <= total * 1e-3  # equal up to float rounding near the threshold


def test_missing_grad_batches_is_a_compile_error(make_tiny_bert):
    model = make_tiny_bert()
    with pytest.raises(CompileError, match="gradient batches"):
        recipec.compile(_recipe(), model, torch.optim.AdamW(model.parameters()), 10)


def test_block4_needs_a_divisible_fisher_block():
    with pytest.raises(Exception, match="divisible"):
        _recipe("block4", block=50)


# ------------------------------------------------------------------------------- integration


@pytest.mark.integration
def test_oneshot_benchmark_end_to_end_on_a_tiny_slice(shared_data_dir, tmp_path, load_benchmark):
    sst2 = shared_data_dir / "sst2"
    if not (sst2 / "train.tsv").is_file() or not (sst2 / "dev.tsv").is_file():
        pytest.skip(f"SST-2 is absent: expected {sst2}/train.tsv and dev.tsv")
    from recipec.models import ModelLoadError, embedded_model_dir

    try:
        embedded_model_dir()
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    oneshot = load_benchmark("oneshot")
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = [
        "--data",
        str(sst2),
        "--train-examples",
        "48",
        "--tune-examples",
        "16",
        "--steps",
        "3",
        "--batch-size",
        "16",
        "--num-grads",
        "4",
        "--grad-batch-size",
        "4",
        "--grad-batch",
        "2",
        "--damps",
        "1e-5",
        "1e-4",
        "--max-eval",
        "24",
        "--sparsities",
        "0.5",
        "0.7",
        "--out",
        str(out),
        "--cache",
        str(cache),
        "--quiet",
    ]
    assert oneshot.main(argv) == 0
    report = json.loads((out / "oneshot.json").read_text())
    assert (out / "oneshot.md").read_text().startswith("# One-shot pruning on SST-2")
    assert report["dev_examples"] == 24 and report["tune_examples"] == 16
    rows = report["rows"]
    assert {(r["method"], r["sparsity"]) for r in rows} == {
        (m, s) for m in ("magnitude", "obert") for s in (0.5, 0.7)
    }
    for r in rows:
        assert r["achieved_sparsity"] == pytest.approx(r["sparsity"], abs=1e-6)
        assert r["pruned_tensors"] == 36
        assert 0.0 <= r["dev"] <= 1.0
    for s in (0.5, 0.7):
        assert sum(r.get("chosen", False) for r in rows if r["sparsity"] == s) == 1
    # The fine-tuned dense model is cached (outside the repo) and reused by a rerun.
    (dense_json,) = cache.glob("*/dense.json")
    assert (dense_json.parent / "model" / "config.json").is_file()
    dense = json.loads(dense_json.read_text())
    assert dense["steps"] == 3 and dense["train_examples"] == 48


@pytest.mark.parametrize("name", ["obert_80", "obert_90", "obert_block4_80", "obert_block4_90"])
def test_bundled_obert_recipes_compile_and_take_their_first_step(make_tiny_bert, name):
    import copy

    from recipec.recipe.load import load_recipe

    model = make_tiny_bert()
    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml", ["num_grads=6"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    program = recipec.compile(
        recipe,
        model,
        optimizer,
        steps_per_epoch=2,
        teacher=copy.deepcopy(model),
        grad_batches=_Batches(),
    )
    (mod,) = [m for m in program.modifiers if isinstance(m, OBertModifier)]
    assert (mod.spec.num_grads, mod.spec.damp, mod.spec.grad_batch_size) == (6, 1e-7, 16)
    assert mod.spec.fisher_block_size == (32 if "block4" in name else 50)
    first = mod.resolved.pruning_steps[0]
    assert first == 4  # after 2 dense epochs
    for step in range(first + 1):
        program.step_start(step)
    assert mod.history[-1]["achieved"] == pytest.approx(0.7, abs=1e-3)
    assert program.lr_at(first) == pytest.approx(5e-5)  # rewound at the pruning step


def test_target_sparsity_rescales_the_obert_recipes():
    from recipec.plan import resolve
    from recipec.recipe.load import load_recipe

    path = REPO / "recipes" / "obert_90.yaml"
    plans = [resolve(load_recipe(path, [f"target_sparsity={t}"]), 10)[0] for t in (0.8, 0.9, 0.97)]
    steps = [len(p.by_type("obert")[0].pruning_steps) for p in plans]
    assert steps == [6, 7, 8]
    assert [p.total_steps for p in plans] == [260, 300, 340]  # 26, 30 (published), 34 epochs
    sparsities = plans[1].by_type("obert")[0].sparsities
    assert [round(100 * s, 1) for s in sparsities] == [70.0, 78.4, 84.1, 87.5, 89.3, 89.9, 90.0]


def test_gradients_are_collected_with_the_stage_loss_at_that_step(make_tiny_bert):
    """Inside the distill window the collected gradient is the distillation loss's; after it,
    the task loss's (the same transform the driver's loss gets at that step)."""
    from recipec.modifiers.distill import distillation_loss

    model, teacher = make_tiny_bert(seed=0), make_tiny_bert(seed=1)
    recipe = load_recipe_text(
        """
training: {steps: 10, batch_size: 4}
modifiers:
  - {type: obert, init_sparsity: 0.3, final_sparsity: 0.8, start_step: 2, end_step: 8, update_every_steps: 2,
     num_grads: 2, fisher_block_size: 16, grad_batch_size: 4}
  - {type: distill, teacher: given, hardness: 0.6, temperature: 2.0, end_step: 4}
""",
        "<test>",
    )
    program = recipec.compile(
        recipe, model, None, steps_per_epoch=10, grad_batches=_Batches(), teacher=teacher
    )
    (mod,) = [m for m in program.modifiers if isinstance(m, OBertModifier)]
    batch = next(_Batches()(4))
    model.eval()

    def by_hand(distil: bool) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        loss = out.loss
        if distil:
            with torch.no_grad():
                t = teacher(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
            loss = distillation_loss(loss, out.logits, t, 0.6, 2.0)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in mod.targets.values()])

    for step, distil in ((2, True), (6, False)):
        program.step = step
        grads = mod._grad_fn()()
        got = torch.cat([grads[n].flatten() for n in mod.targets])
        want = by_hand(distil)
        torch.testing.assert_close(
            got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()), msg=f"step {step}"
        )
    with_kd, without = by_hand(True), by_hand(False)
    assert float((with_kd - without).abs().max()) > 0.1 * float(
        without.abs().max()
    )  # the two losses differ

"""`recipec apply --device cuda` end to end on a tiny BERT (marked gpu; skipped without CUDA).

CI has no GPU: these run on a machine that has one (`python -m pytest -m gpu`), and the default
suite reports them as skipped with the reason. They cover what a CUDA run adds over CPU:
masks, Fisher blocks and the teacher living on the device, and an exact sparsity after it.
"""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from recipec.cli import main

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA device (run with -m gpu on a GPU machine)",
    ),
]

RECIPE = """\
training: {epochs: 3, batch_size: 16, learning_rate: 1e-3, max_seq_length: 32, seed: 1, eval_every_epochs: 1}
modifiers:
  - {type: %(pruner)s, init_sparsity: 0.3, final_sparsity: 0.8, start_epoch: 1, end_epoch: 2, update_every_steps: 2%(extra)s}
  - {type: lr, schedule: cyclic_linear, init_lr: 1e-3, final_lr: 1e-4, cycle_steps: 2, start_epoch: 1, end_epoch: 2}
  - {type: lr, schedule: linear, init_lr: 1e-3, final_lr: 0, start_epoch: 2}
  - {type: distill, teacher: %(teacher)s, hardness: 1.0, temperature: 2.0}
"""

PRUNERS = {
    "gmp": "",
    "obert": ", num_grads: 8, grad_batch_size: 4, fisher_block_size: 16, damp: 1e-5",
    "obert-block4": ", num_grads: 8, grad_batch_size: 4, fisher_block_size: 16, damp: 1e-5, structure: block4",
    "obert-mfac": ", num_grads: 8, grad_batch_size: 4, fisher: mfac, fisher_block_size: 32, damp: 1e-5",
}


@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_apply_on_cuda_prunes_exactly_and_keeps_the_masks(name, tiny_model_dir, tmp_path):
    pruner = name.split("-")[0]
    extra = PRUNERS[name]
    recipe = tmp_path / "gpu.yaml"
    recipe.write_text(RECIPE % {"pruner": pruner, "extra": extra, "teacher": tiny_model_dir})
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        [
            "apply",
            str(recipe),
            "--model",
            str(tiny_model_dir),
            "--device",
            "cuda",
            "--max-train",
            "160",
            "--max-eval",
            "64",
            "--output",
            str(out),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    masks = load_file(str(out / "model" / "masks.safetensors"))
    weights = load_file(str(out / "model" / "model.safetensors"))
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    group = 4 if name.endswith("block4") else 1  # block4 prunes whole groups of 4 weights
    assert total - kept == group * round(0.8 * total / group)
    for tensor_name, mask in masks.items():
        assert torch.equal(weights[tensor_name] == 0, mask == 0), tensor_name
    report = json.loads((out / "report.json").read_text())
    assert 0.0 <= report["final_eval"]["accuracy"] <= 1.0


CRAM_THEN_ONE_SHOT = """\
training: {batch_size: 16, learning_rate: 1e-3, max_seq_length: 32, seed: 1}
stages:
  - name: cram
    training: {epochs: 1}
    modifiers:
      - {type: cram, sparsities: [0.5, 0.7], rho: 0.05, scope: global}
  - name: prune
    training: {steps: 0}
    modifiers:
      - {type: obert, init_sparsity: 0.7, final_sparsity: 0.7, num_grads: 8, grad_batch_size: 4,
         fisher_block_size: 16, damp: 1e-5}
"""


def test_cram_then_a_prune_only_stage_on_cuda(tiny_model_dir, tmp_path):
    recipe = tmp_path / "cram.yaml"
    recipe.write_text(CRAM_THEN_ONE_SHOT)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        [
            "apply",
            str(recipe),
            "--model",
            str(tiny_model_dir),
            "--device",
            "cuda",
            "--max-train",
            "160",
            "--max-eval",
            "64",
            "--output",
            str(out),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    masks = load_file(str(out / "model" / "masks.safetensors"))
    total = sum(m.numel() for m in masks.values())
    assert total - sum(int(m.sum()) for m in masks.values()) == round(0.7 * total)
    report = json.loads((out / "report.json").read_text())
    assert [s["steps"] for s in report["stages"]] == [10, 0] and report["stages"][1]["prune_only"]


# -- precision (issue 21): bf16 autocast + TF32 against fp32 on the device ----------------------

BF16_RECIPE = """\
training: {epochs: 3, batch_size: 32, learning_rate: 5e-5, max_seq_length: 64, seed: 3, eval_every_epochs: 1}
modifiers:
  - {type: gmp, init_sparsity: 0.3, final_sparsity: 0.8, start_epoch: 1, end_epoch: 2, update_every_steps: 5}
  - {type: lr, schedule: linear, init_lr: 5e-5, final_lr: 0, start_epoch: 0}
"""


def _apply_precision(recipe, out, precision):
    result = CliRunner().invoke(
        main,
        [
            "apply",
            str(recipe),
            "--device",
            "cuda",
            "--precision",
            precision,
            "--max-train",
            "640",
            "--max-eval",
            "256",
            "--output",
            str(out),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text())


def test_bf16_matches_fp32_on_cuda(tmp_path):
    """The embedded MiniLM on the built-in task, 60 steps: bf16 (auto) and fp32 reach the same
    sparsity with exact zeros, and accuracies within noise of each other (256 eval examples:
    one standard deviation is about 0.03)."""
    from recipec.models import ModelLoadError, embedded_model_dir

    try:
        embedded_model_dir()
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    recipe = tmp_path / "bf16.yaml"
    recipe.write_text(BF16_RECIPE)
    reports = {p: _apply_precision(recipe, tmp_path / p, p) for p in ("fp32", "auto")}
    assert reports["auto"]["precision"]["used"] == "bf16" and reports["auto"]["precision"]["tf32"]
    assert reports["fp32"]["precision"]["used"] == "fp32"
    for p in reports:
        masks = load_file(str(tmp_path / p / "model" / "masks.safetensors"))
        weights = load_file(str(tmp_path / p / "model" / "model.safetensors"))
        for name, mask in masks.items():
            assert bool((weights[name][mask == 0] == 0.0).all()), (p, name)
    assert reports["auto"]["sparsity"]["targets"] == reports["fp32"]["sparsity"]["targets"]
    acc = {p: r["final_eval"]["accuracy"] for p, r in reports.items()}
    print(f"\naccuracy fp32 {acc['fp32']:.4f}  bf16 {acc['auto']:.4f}")
    assert abs(acc["auto"] - acc["fp32"]) <= 0.08, acc
    assert min(acc.values()) > 0.6, acc  # both learnt the task


def _step_seconds(model, batch, precision, steps=30, warmup=5):
    """Mean seconds per fwd+bwd+fused AdamW step, synchronised."""
    import time

    from recipec.train.loop import make_optimizer

    opt = make_optimizer(model, 1e-5, 0.0, "cuda")
    with precision.matmuls():
        for i in range(warmup + steps):
            if i == warmup:
                torch.cuda.synchronize()
                start = time.perf_counter()
            with precision.forward():
                loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def test_bf16_over_fp32_step_time_is_measured():
    """Prints the bf16 (autocast + TF32) / fp32 step-time ratio of MiniLM-L6 training steps at
    the plan's shapes; a small model at batch 32 is launch-bound, so the ratio may be near 1."""
    import os

    from transformers import AutoModelForSequenceClassification

    from recipec.models import ModelLoadError, embedded_model_dir
    from recipec.train.loop import Precision, resolve_precision

    try:
        folder = embedded_model_dir()
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).cuda()
    model.train()
    bf16, fp32 = resolve_precision("auto", "cuda"), Precision("fp32", "cuda")
    lines, rows = [], []
    for batch_size, seq in ((32, 32), (32, 128), (160, 64)):  # SST-2-like, padded, CSQA-like
        g = torch.Generator().manual_seed(0)
        batch = {
            "input_ids": torch.randint(1000, 20000, (batch_size, seq), generator=g).cuda(),
            "attention_mask": torch.ones(batch_size, seq, dtype=torch.long).cuda(),
            "labels": torch.randint(0, 2, (batch_size,), generator=g).cuda(),
        }
        t32 = _step_seconds(model, batch, fp32)
        t16 = _step_seconds(model, batch, bf16)
        rows.append({"batch": batch_size, "seq": seq, "fp32_ms": 1e3 * t32, "bf16_ms": 1e3 * t16})
        lines.append(
            f"batch {batch_size} x {seq}: fp32 {1e3 * t32:.2f} ms/step, bf16 {1e3 * t16:.2f} "
            f"ms/step, bf16/fp32 = {t16 / t32:.3f}"
        )
    print("\n" + "\n".join(lines))
    if os.environ.get("RECIPEC_GPU_TIMINGS"):  # the device plan brings these back
        with open(os.environ["RECIPEC_GPU_TIMINGS"], "a") as fh:
            fh.write(json.dumps({"step_time": rows}) + "\n")
    assert all(r["bf16_ms"] > 0 and r["fp32_ms"] > 0 for r in rows)


def test_fused_adamw_and_pinned_batches_on_cuda(embedded_tokenizer):
    from recipec.tasks.data import make_dataloader
    from recipec.tasks.load import Example, TaskInfo
    from recipec.train.loop import make_optimizer

    model = torch.nn.Linear(4, 2).cuda()
    opt = make_optimizer(model, 1e-3, 0.0, "cuda")
    assert all(g["fused"] for g in opt.param_groups)
    model(torch.ones(3, 4, device="cuda")).sum().backward()
    opt.step()
    info = TaskInfo("t", "classification", 2)
    examples = [Example("a b c", None, 0), Example("d e", None, 1)]
    (batch,) = list(
        make_dataloader(examples, embedded_tokenizer, info, batch_size=2, pin_memory=True)
    )
    assert all(t.is_pinned() for t in batch.values())

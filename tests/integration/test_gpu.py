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

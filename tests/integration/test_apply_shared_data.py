"""`recipec apply` on the real shared data (SST-2, CommonsenseQA): load, train a few steps, evaluate."""

import json

import pytest
from click.testing import CliRunner

from recipec.cli import main

RECIPE = """\
training: {steps: 4, batch_size: 4, learning_rate: 5e-5, max_seq_length: 64}
modifiers:
  - {type: gmp, init_sparsity: 0.3, final_sparsity: 0.5, start_step: 1, end_step: 3, update_every_steps: 1}
"""


@pytest.mark.integration
@pytest.mark.parametrize(
    ("folder", "kind"), [("sst2", "classification"), ("csqa", "multiple_choice")]
)
def test_apply_on_shared_data(shared_data_dir, tmp_path, folder, kind):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        [
            "apply",
            str(recipe),
            "--data",
            str(shared_data_dir / folder),
            "--max-train",
            "16",
            "--max-eval",
            "8",
            "--output",
            str(out),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["task"]["kind"] == kind
    assert report["train_examples"] == 16 and report["eval_examples"] == 8
    assert report["sparsity"]["targets"] == pytest.approx(0.5, abs=1e-6)
    assert 0.0 <= report["final_eval"]["accuracy"] <= 1.0


SPARSE_RECIPE = """\
training: {steps: 6, batch_size: 8, learning_rate: 5e-5, max_seq_length: 64, seed: 3}
modifiers:
  - {type: gmp, init_sparsity: 0.92, final_sparsity: 0.95, start_step: 0, end_step: 4, update_every_steps: 2, scope: per_layer}
"""


@pytest.mark.integration
@pytest.mark.parametrize("folder", ["sst2", "csqa"])
def test_sparse_backprop_on_the_embedded_model_matches_dense_kernels(
    shared_data_dir, tmp_path, folder
):
    """--sparse-backprop on the real MiniLM shapes (384/1536) and a multiple-choice head: the
    same masks and, up to rounding, the same weights and accuracy as the dense kernels."""
    import torch
    from safetensors.torch import load_file

    from recipec.kernels import sparse_backprop as sbp

    recipe = tmp_path / "r.yaml"
    recipe.write_text(SPARSE_RECIPE)
    runs = {}
    for name, extra in (("dense", []), ("sparse", ["--sparse-backprop"])):
        out = tmp_path / name
        result = CliRunner().invoke(
            main,
            [
                "apply",
                str(recipe),
                "--data",
                str(shared_data_dir / folder),
                "--max-train",
                "48",
                "--max-eval",
                "32",
                "--output",
                str(out),
                "--quiet",
                *extra,
            ],
        )
        assert result.exit_code == 0, result.output
        runs[name] = (
            json.loads((out / "report.json").read_text()),
            load_file(str(out / "model" / "model.safetensors")),
            load_file(str(out / "model" / "masks.safetensors")),
        )
    (report_d, weights_d, masks_d), (report_s, weights_s, masks_s) = runs["dense"], runs["sparse"]
    expected = {"min_sparsity": sbp.DEFAULT_MIN_SPARSITY, "from_step": 0, "layers": 36}
    if sbp.backend() != sbp.FAST_BACKEND:  # no compiled kernels here: the fallback, same results
        expected["fallback"] = True
    assert report_s["stages"][0]["sparse_backprop"] == expected
    assert len(masks_d) == 36 and all(torch.equal(masks_d[k], masks_s[k]) for k in masks_d)
    # Adam turns rounding-level gradient differences on near-zero gradients into steps of up to
    # the learning rate (5e-5): a wrong gradient would move weights by about lr on every one of
    # the 6 steps, rounding stays under one step.
    worst = max(float((weights_d[k] - weights_s[k]).abs().max()) for k in weights_d)
    assert worst < 5e-5, worst
    losses = [
        [
            json.loads(line)["loss"]
            for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line
        ]
        for name in ("dense", "sparse")
    ]
    assert len(losses[0]) == 6 and max(abs(a - b) for a, b in zip(*losses)) < 1e-4, losses
    assert report_s["final_eval"]["accuracy"] == report_d["final_eval"]["accuracy"]

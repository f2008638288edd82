"""Sparse + INT8 through the CLI on a tiny BERT: prune, then QAT with distillation (plain loop),
or PTQ in a steps: 0 stage; then ``recipec export --onnx`` writes a verified INT8 folder, and
``recipec plan`` shows the quantization window."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from run_helpers import apply, assert_clean

from recipec.cli import main

QAT_KD = """\
training: {steps: 10, batch_size: 8, learning_rate: 1.0e-3, max_seq_length: 16, seed: 1}
stages:
  - name: prune
    training: {steps: 6}
    modifiers:
      - {type: gmp, init_sparsity: 0.5, final_sparsity: 0.8, start_step: 0, end_step: 4, update_every_steps: 2}
  - name: qat
    modifiers:
      - {type: constant}
      - {type: quantize, freeze_observers_at_step: 5, calibration_batches: 2}
      - {type: distill, teacher: auto, hardness: 0.5, temperature: 2.0, teacher_epochs: 1}
"""

PTQ = """\
training: {steps: 6, batch_size: 8, learning_rate: 1.0e-3, max_seq_length: 16, seed: 1}
stages:
  - name: prune
    modifiers:
      - {type: gmp, init_sparsity: 0.5, final_sparsity: 0.7, start_step: 0, end_step: 4, update_every_steps: 2}
  - name: ptq
    training: {steps: 0}
    modifiers:
      - {type: quantize, calibration_batches: 3}
"""


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _masks(folder):
    from safetensors.torch import load_file

    return {k: v.bool() for k, v in load_file(str(folder / "masks.safetensors")).items()}


@pytest.mark.parametrize("text", [QAT_KD, PTQ], ids=["qat-kd", "ptq"])
def test_prune_quantize_export(text, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RECIPEC_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    run = tmp_path / "run"
    result = apply(recipe, tiny_model_dir, run)
    assert_clean(result, 0)
    assert "int8 fake-quant on 12 linears" in result.output
    assert "input ranges frozen" in result.output
    report = json.loads((run / "report.json").read_text())
    assert report["quantization"]["layers"] == 12
    record = json.loads((run / "model" / "quantization.json").read_text())
    assert all(hi > lo for lo, hi in (v["input_range"] for v in record["layers"].values()))

    result = _cli("export", run, "--onnx")
    assert_clean(result, 0)
    assert "INT8 (QDQ): 12 linears" in result.output
    info = json.loads((run / "onnx" / "sparsity.json").read_text())
    assert info["verification"]["ort_vs_torch_max_abs_diff"] <= info["verification"]["atol"]
    import onnx
    from onnx import numpy_helper

    arrays = {
        i.name: numpy_helper.to_array(i)
        for i in onnx.load(str(run / "onnx" / "model.onnx")).graph.initializer
    }
    masks = _masks(run / "model")
    assert len(masks) == 12
    for name, mask in masks.items():
        entry = info["tensors"][name]
        values = arrays[entry["onnx_initializer"]]
        values = values.T if entry["transposed"] else values
        assert values.dtype == np.int8 and not values[~mask.numpy()].any()


def test_plan_shows_the_quantization_window(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(QAT_KD)
    result = _cli("plan", recipe, "--steps-per-epoch", "4")
    assert_clean(result, 0)
    line = next(x for x in result.output.splitlines() if "quantize" in x)
    assert "steps 0..10" in line and "observers frozen at step 5" in line
    result = _cli("plan", recipe, "--steps-per-epoch", "4", "--json")
    assert_clean(result, 0)
    stage = json.loads(result.output)["stages"][1]
    (mod,) = [m for m in stage["modifiers"] if m["type"] == "quantize"]
    assert (mod["start_step"], mod["end_step"], mod["freeze_observers_at_step"]) == (0, 10, 5)


QAT_ONE_STAGE = """\
training: {steps: 8, batch_size: 8, learning_rate: 1.0e-3, max_seq_length: 16, seed: 1}
modifiers:
  - {type: gmp, init_sparsity: 0.3, final_sparsity: 0.6, start_step: 0, end_step: 2, update_every_steps: 2}
  - {type: quantize, start_step: 3, freeze_observers_at_step: 7, calibration_batches: 1}
"""


def test_resume_inside_qat_restores_the_observers_exactly(tiny_model_dir, tmp_path):
    """Checkpoints at steps 6 and 8 (observers still observing at 6, frozen at 7): resuming
    from step 6 ends with the same weights and the same input ranges as the run that did not
    stop."""
    import shutil

    from run_helpers import NEWEST, checkpoint_dir, copy_run, same_weights

    recipe = tmp_path / "r.yaml"
    recipe.write_text(QAT_ONE_STAGE)
    run = tmp_path / "run"
    assert_clean(apply(recipe, tiny_model_dir, run, quiet=True), 0)
    again = copy_run(run, tmp_path / "again")
    shutil.rmtree(checkpoint_dir(again) / NEWEST)
    (again / "model" / "quantization.json").unlink()
    result = apply(recipe, tiny_model_dir, again, "--resume")
    assert_clean(result, 0)
    assert "continuing from" in result.output and "input ranges frozen" in result.output
    assert "calibrated" not in result.output  # done before step 6, restored with the state
    assert same_weights(run, again)
    first = json.loads((run / "model" / "quantization.json").read_text())
    assert json.loads((again / "model" / "quantization.json").read_text()) == first

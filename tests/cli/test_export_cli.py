"""``recipec export``: success output, user errors (exit 2), verification failures (exit 1)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from recipec.checkpoint import magnitude_masks, write_checkpoint  # noqa: E402
from recipec.cli import main  # noqa: E402


def tiny_run(root: Path, cls_name: str = "BertForSequenceClassification", sparsity=0.9) -> Path:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=200,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    model = getattr(transformers, cls_name)(cfg).eval()
    write_checkpoint(model, root / "model", magnitude_masks(model, sparsity), None, "name: t\n")
    return root


@pytest.fixture
def runner():
    return CliRunner()


def test_export_writes_verified_folder(tmp_path, runner):
    run = tiny_run(tmp_path / "run")
    res = runner.invoke(main, ["export", str(run), "--onnx"])
    assert res.exit_code == 0, res.output
    assert "verified: zeros of 12 tensors (12 pruned) match the masks" in res.output
    assert re.search(r"sparsity of masked tensors: (89\.9\d|90\.0\d)%", res.output)
    folder = run / "onnx"
    info = json.loads((folder / "sparsity.json").read_text())
    assert info["opset"] == 17 and info["task"] == "sequence-classification"
    assert (folder / "recipe.yaml").read_text() == "name: t\n"


def test_export_multiple_choice_with_output_and_opset(tmp_path, runner):
    run = tiny_run(tmp_path / "mc", "BertForMultipleChoice")
    out = tmp_path / "deploy"
    res = runner.invoke(
        main,
        [
            "export",
            str(run / "model"),
            "--onnx",
            "-o",
            str(out),
            "--opset",
            "18",
            "--no-torch-weights",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "(multiple-choice)" in res.output
    assert (out / "model.onnx").is_file() and not (out / "model.safetensors").exists()
    import onnx

    assert onnx.load(str(out / "model.onnx")).opset_import[0].version == 18


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "pass --onnx"),
        (["--onnx", "--opset", "3"], "opset 3 is not supported"),
        (["--onnx", "--task", "multiple-choice"], "cannot load as multiple-choice"),
    ],
)
def test_export_user_errors_exit_2(tmp_path, runner, args, message):
    run = tiny_run(tmp_path / "run")
    res = runner.invoke(main, ["export", str(run), *args])
    assert res.exit_code == 2
    assert message in res.output
    assert "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_export_missing_path_and_existing_output(tmp_path, runner):
    res = runner.invoke(main, ["export", str(tmp_path / "nope"), "--onnx"])
    assert res.exit_code == 2 and "no such file" in res.output
    run = tiny_run(tmp_path / "run")
    assert runner.invoke(main, ["export", str(run), "--onnx"]).exit_code == 0
    res = runner.invoke(main, ["export", str(run), "--onnx"])
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert runner.invoke(main, ["export", str(run), "--onnx", "--overwrite"]).exit_code == 0


def test_export_overwrite_never_deletes_its_source_or_a_foreign_folder(tmp_path, runner):
    run = tiny_run(tmp_path / "run")
    (run / "report.json").write_text("{}")
    for source in (run, run / "model"):  # the run itself as --output: it holds the checkpoint
        res = runner.invoke(main, ["export", str(source), "--onnx", "-o", str(run), "--overwrite"])
        assert res.exit_code == 2 and "is inside" in res.output, res.output
    assert (run / "report.json").is_file() and (run / "model" / "config.json").is_file()
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("data")
    res = runner.invoke(main, ["export", str(run), "--onnx", "-o", str(foreign), "--overwrite"])
    assert res.exit_code == 2 and "not a recipec export" in res.output, res.output
    assert (foreign / "thesis.txt").read_text() == "data"


def test_export_verification_failure_exits_1_and_names_tensor(tmp_path, runner, monkeypatch):
    import recipec.export.onnx as ox

    real = ox.verify_zeros

    def tampering_verify(onnx_model, weights, masks):
        from onnx import numpy_helper

        name = sorted(masks)[0]
        table = real(onnx_model, weights, masks)  # find its initializer, then break one zero
        init_name = table[name]["onnx_initializer"]
        for init in onnx_model.graph.initializer:
            if init.name == init_name:
                arr = numpy_helper.to_array(init).copy()
                arr.flat[int((arr.ravel() == 0).argmax())] = 1.0
                init.CopyFrom(numpy_helper.from_array(arr, init.name))
        return real(onnx_model, weights, masks)

    monkeypatch.setattr(ox, "verify_zeros", tampering_verify)
    run = tiny_run(tmp_path / "run")
    res = runner.invoke(main, ["export", str(run), "--onnx"])
    assert res.exit_code == 1
    assert "verification failed" in res.output
    assert "bert.encoder.layer.0.attention.output.dense.weight" in res.output
    assert not (run / "onnx").exists()


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_the_model_and_onnx_folders_get_the_umasks_modes(tmp_path, runner, mask):
    """Not mkdtemp's 0700 nor safetensors' 0600: a deployment folder is shared like any other."""
    previous = os.umask(mask)
    try:
        run = tiny_run(tmp_path / "run")
        res = runner.invoke(main, ["export", str(run), "--onnx"])
    finally:
        os.umask(previous)
    assert res.exit_code == 0, res.output
    for folder in (run / "model", run / "onnx"):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~mask, folder
        files = sorted(folder.iterdir())
        assert {"model.safetensors", "masks.safetensors"} <= {f.name for f in files}
        for f in files:
            assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f


def test_export_overwrite_goes_through_the_same_rule_as_apply(tmp_path, runner):
    """An export folder is recipec's by its sparsity.json format marker, and holds only what
    export writes (recipec.outputs.EXPORT_FOLDER); anything else there refuses --overwrite."""
    from recipec.outputs import EXPORT, foreign_entries

    run = tiny_run(tmp_path / "run")
    assert runner.invoke(main, ["export", str(run), "--onnx"]).exit_code == 0
    onnx = run / "onnx"
    assert foreign_entries(onnx, EXPORT.rule) == []  # the rule lists everything export writes
    (onnx / "latency.csv").write_text("mine")
    res = runner.invoke(main, ["export", str(run), "--onnx", "--overwrite"])
    assert res.exit_code == 2 and "latency.csv" in res.output, res.output
    assert (onnx / "latency.csv").read_text() == "mine"
    (onnx / "latency.csv").unlink()
    (onnx / "sparsity.json").write_text("{}")  # not recipec's marker any more
    res = runner.invoke(main, ["export", str(run), "--onnx", "--overwrite"])
    assert res.exit_code == 2 and "not a recipec export" in res.output, res.output

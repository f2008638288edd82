"""``recipec bench``: table, JSON/plot outputs, runtime selection and user errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from recipec.cli import main  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    import torch
    import transformers

    from recipec.checkpoint import magnitude_masks, write_checkpoint
    from recipec.export.onnx import export

    root = tmp_path_factory.mktemp("bench")
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
    model = transformers.BertForSequenceClassification(cfg).eval()
    write_checkpoint(model, root / "run" / "model", magnitude_masks(model, 0.9))
    return export(root / "run").output_dir


def test_bench_ort_and_torch_csr_with_dense_baseline(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("RECIPEC_DEEPSPARSE_PYTHON", str(tmp_path / "no-python"))
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    res = CliRunner().invoke(
        main,
        [
            "bench",
            str(folder),
            "--runtime",
            "ort,torch-csr",
            "--batch-sizes",
            "1,2",
            "--seq-len",
            "8",
            "--dense-baseline",
            "--warmup",
            "1",
            "--repeats",
            "2",
            "--time-budget",
            "0",  # exactly --repeats rounds
            "--json",
            str(out),
            "--plot",
            str(png),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "p50 ms" in res.output and "vs dense ort" in res.output
    assert "speedup vs dense onnxruntime, batch 1: torch-csr" in res.output
    report = json.loads(out.read_text())
    keys = {(r["runtime"], r["variant"], r["batch"]) for r in report["results"]}
    assert keys == {
        (rt, v, b) for rt in ("ort", "torch-csr") for v in ("sparse", "dense") for b in (1, 2)
    }
    assert all(r["calls"] == 2 and r["p90_ms"] >= r["p50_ms"] > 0 for r in report["results"])
    assert report["refused"] == []
    assert png.stat().st_size > 1000
    assert report["machine"]["cores"] >= 1 and "load average" in res.output


def test_bench_engine_and_int8_runtimes(folder, tmp_path):
    out = tmp_path / "r.json"
    args = ["bench", str(folder), "--runtime", "ort,ort-int8,engine,engine-int8"]
    args += ["--batch-sizes", "2", "--seq-len", "8", "--dense-baseline", "--repeats", "3"]
    args += ["--max-repeats", "5", "--time-budget", "60", "--precision", "1e-9"]
    res = CliRunner().invoke(main, [*args, "--json", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    keys = {(r["runtime"], r["variant"]) for r in report["results"]}
    assert keys == {
        ("ort", "sparse"), ("ort", "dense"), ("ort-int8", "sparse"), ("ort-int8", "dense"),
        ("engine", "sparse"), ("engine", "dense"), ("engine-int8", "sparse"),
    }  # fmt: skip
    # precision 1e-9 is never reached: timing stops at --max-repeats
    assert all(r["calls"] == 5 and len(r["times_ms"]) == 5 for r in report["results"])
    assert report["refused"] == []
    int8 = [r for r in report["results"] if r["runtime"] in ("ort-int8", "engine-int8")]
    assert all(0 < r["max_abs_diff"] for r in int8)  # really quantized, and checked
    rows = {s["runtime"]: s for s in report["speedups"]}
    for name in ("ort-int8", "engine", "engine-int8"):
        lo, hi = rows[name]["vs_dense_ort_ci"]
        assert lo <= rows[name]["vs_dense_ort"] <= hi
        assert rows[name]["vs_dense_ort_int8"] > 0
    assert set(report["engine_layers"]) == {
        "engine sparse b2",
        "engine dense b2",
        "engine-int8 sparse b2",
    }
    assert "vs dense ort-int8" in res.output


def test_bench_deepsparse_absent_is_explained(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("RECIPEC_DEEPSPARSE_PYTHON", str(tmp_path / "no-python"))
    res = CliRunner().invoke(
        main,
        [
            "bench",
            str(folder),
            "--runtime",
            "deepsparse",
            "--batch-sizes",
            "1",
            "--seq-len",
            "8",
            "--repeats",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "deepsparse: skipped" in res.output and "install_deepsparse.sh" in res.output


def test_bench_a_checkpoint_exports_it_first(folder, tmp_path):
    run = folder.parent  # RUN_DIR with onnx/ inside: bench finds the exported folder
    res = CliRunner().invoke(
        main,
        [
            "bench",
            str(run),
            "--runtime",
            "ort",
            "--batch-sizes",
            "1",
            "--seq-len",
            "8",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--clock",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "1 thread(s), cpu clock" in res.output
    res = CliRunner().invoke(
        main,
        [
            "bench",
            str(run / "model"),
            "--runtime",
            "ort",
            "--batch-sizes",
            "1",
            "--seq-len",
            "8",
            "--repeats",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "exporting it first" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--runtime", "tensorrt"], "unknown runtime"),
        (["--batch-sizes", "1,x"], "--batch-sizes"),
        (["--batch-sizes", "0"], "--batch-sizes"),
        (["--seq-len", "0"], "--seq-len"),
        (["--repeats", "0"], "--repeats"),
        (["--repeats", "5", "--max-repeats", "4"], "--max-repeats must be >= --repeats"),
        (["--precision", "0"], "--precision > 0"),
        (["--seq-len", "65"], "--seq-len 65 is longer than this model takes (64 tokens"),
        (["--plot", "chart.txt"], "--plot chart.txt: .txt is not an image format"),
    ],
)
def test_bench_user_errors_exit_2(folder, args, message):
    res = CliRunner().invoke(main, ["bench", str(folder), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_bench_a_checkpoint_checks_the_seq_len_before_exporting(folder):
    res = CliRunner().invoke(
        main,
        [
            "bench",
            str(folder.parent / "model"),
            "--runtime",
            "ort",
            "--batch-sizes",
            "1",
            "--seq-len",
            "65",
            "--repeats",
            "1",
        ],
    )
    assert res.exit_code == 2, res.output
    assert "--seq-len 65 is longer than this model takes (64 tokens" in res.output
    assert "exporting it first" not in res.output


@pytest.mark.parametrize("config", ['{"model_type": "no_such_architecture"}', "{not json"])
@pytest.mark.parametrize("what", ["checkpoint", "deployment folder"])
def test_bench_a_broken_config_is_a_clear_error(folder, tmp_path, config, what):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folder.parent / "model" if what == "checkpoint" else folder, broken)
    (broken / "config.json").write_text(config)
    res = CliRunner().invoke(
        main,
        [
            "bench",
            str(broken),
            "--runtime",
            "ort",
            "--batch-sizes",
            "1",
            "--seq-len",
            "16",
            "--repeats",
            "1",
        ],
    )
    assert res.exit_code == 2, res.output
    assert "config.json" in res.output and "Traceback" not in res.output


def test_bench_missing_path_exit_2(tmp_path):
    res = CliRunner().invoke(main, ["bench", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "no such file" in res.output


def test_bench_on_a_busy_machine_says_so(folder, monkeypatch):
    """Artificial noise (equal true latencies) and a high load average: the printed ratio is
    "no measurable difference" and the warning names the load average."""
    import numpy as np

    from recipec.runtime import runtimes, stats

    rng = np.random.default_rng(0)
    monkeypatch.setattr(stats, "loadavg", lambda: 7.5)
    monkeypatch.setattr(
        runtimes.OrtRunner,
        "time",
        lambda self, n, clock="wall": list(1e-3 * np.exp(rng.normal(0, 0.5, n))),
    )
    args = ["bench", str(folder), "--runtime", "ort", "--batch-sizes", "1", "--seq-len", "8"]
    res = CliRunner().invoke(main, [*args, "--dense-baseline", "--repeats", "10"])
    assert res.exit_code == 0, res.output
    assert "speedup vs dense onnxruntime, batch 1: ort" in res.output
    assert ": no measurable difference" in res.output
    assert "load average 7.50 -> 7.50" in res.output
    assert "warning: the machine was busy (load average 7.5 on" in res.output
    assert "timings were unstable" in res.output

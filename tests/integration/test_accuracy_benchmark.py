"""The accuracy benchmark's code path, end to end on a small slice of SST-2 (marked integration)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_accuracy_benchmark_small_slice(shared_data_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("accuracy", None)
    import accuracy

    results = tmp_path / "accuracy.json"
    args = [
        "--task",
        "sst2",
        "--configs",
        "dense,gmp_80,smc_80",
        "--data-root",
        str(shared_data_dir),
        "--max-train",
        "64",
        "--max-eval",
        "32",
        "--dense-epochs",
        "1",
        "--prune-epochs",
        "1",
        "--finetune-epochs",
        "1",
        "--batch-size",
        "16",
        "--max-seq-length",
        "64",
        "--workdir",
        str(tmp_path / "work"),
        "--results",
        str(results),
        "--quiet",
    ]
    assert accuracy.main(args) == 0
    rows = json.loads(results.read_text())
    assert [r["config"] for r in rows] == [
        "dense",
        "gmp_80",
        "smc_80",
    ]  # the paper recipe before the baseline
    by = {r["config"]: r for r in rows}
    assert by["dense"]["sparsity_targets"] == 0.0
    assert by["gmp_80"]["sparsity_targets"] == pytest.approx(0.8, abs=1e-4)
    assert 0.0 <= by["gmp_80"]["accuracy"] <= 1.0
    assert {r["steps"] for r in rows} == {
        12
    }  # 64 examples / batch 16 x 3 epochs, for every configuration
    assert "| sst2 | gmp_80 | 80% |" in results.with_suffix(".md").read_text()
    # Resumable: a second call skips finished configurations.
    assert accuracy.main(args) == 0
    assert len(json.loads(results.read_text())) == 3


@pytest.mark.integration
def test_accuracy_benchmark_parallel_jobs_on_multiple_choice(shared_data_dir, tmp_path):
    """--jobs runs the teacher first, then configurations in child processes, on CommonsenseQA."""
    import subprocess

    results = tmp_path / "accuracy.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "accuracy.py"),
        "--task",
        "csqa",
        "--configs",
        "gmp_80,obert_80",
        "--data-root",
        str(shared_data_dir),
        "--max-train",
        "32",
        "--max-eval",
        "16",
        "--dense-epochs",
        "1",
        "--prune-epochs",
        "1",
        "--finetune-epochs",
        "1",
        "--batch-size",
        "8",
        "--max-seq-length",
        "48",
        "--num-grads",
        "4",
        "--jobs",
        "2",
        "--workdir",
        str(tmp_path / "work"),
        "--results",
        str(results),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[failed]" not in done.stdout, done.stdout
    rows = {r["config"]: r for r in json.loads(results.read_text())}
    assert set(rows) == {"dense", "gmp_80", "obert_80"}
    assert {r["steps"] for r in rows.values()} == {
        12
    }  # the oBERT recipe is scaled to the same budget
    assert rows["obert_80"]["sparsity_targets"] == pytest.approx(0.8, abs=1e-4)
    assert (tmp_path / "work" / "logs" / "csqa_obert_80.log").is_file()
    assert results.with_suffix(".png").is_file()

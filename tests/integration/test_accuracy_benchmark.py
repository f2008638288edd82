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
    args = ["--task", "sst2", "--configs", "dense,gmp_80,smc_80", "--data-root", str(shared_data_dir),
            "--max-train", "64", "--max-eval", "32", "--dense-epochs", "1", "--prune-epochs", "1",
            "--finetune-epochs", "1", "--batch-size", "16", "--max-seq-length", "64",
            "--workdir", str(tmp_path / "work"), "--results", str(results), "--quiet"]
    assert accuracy.main(args) == 0
    rows = json.loads(results.read_text())
    assert [r["config"] for r in rows] == ["dense", "smc_80", "gmp_80"]
    by = {r["config"]: r for r in rows}
    assert by["dense"]["sparsity_targets"] == 0.0
    assert by["gmp_80"]["sparsity_targets"] == pytest.approx(0.8, abs=1e-4)
    assert 0.0 <= by["gmp_80"]["accuracy"] <= 1.0
    assert "| sst2 | gmp_80 | 80% |" in results.with_suffix(".md").read_text()
    # Resumable: a second call skips finished configurations.
    assert accuracy.main(args) == 0
    assert len(json.loads(results.read_text())) == 3

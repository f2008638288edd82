"""benchmarks/cram.py end to end on a tiny slice of SST-2 (marked integration)."""

import json

import pytest


@pytest.mark.integration
def test_cram_benchmark_small_slice(shared_data_dir, tmp_path, load_benchmark):
    cram = load_benchmark("cram")
    out = tmp_path / "out"
    argv = [
        "--data",
        str(shared_data_dir / "sst2"),
        "--train-examples",
        "64",
        "--steps",
        "4",
        "--max-eval",
        "32",
        "--sparsities",
        "0.5",
        "0.7",
        "--rho",
        "0.05",
        "0.2",
        "--out",
        str(out),
        "--cache",
        str(tmp_path / "cache"),
        "--quiet",
    ]
    assert cram.main(argv) == 0
    report = json.loads((out / "cram.json").read_text())
    plain, crammed = report["arms"]["plain"], report["arms"]["cram_plus rho=0.05"]
    assert set(report["arms"]) == {"plain", "cram_plus rho=0.05", "cram_plus rho=0.2"}
    assert (
        [r["sparsity"] for r in plain["pruned"]]
        == [r["sparsity"] for r in crammed["pruned"]]
        == [0.5, 0.7]
    )
    for r in plain["pruned"] + crammed["pruned"]:
        assert r["achieved_sparsity"] == pytest.approx(r["sparsity"], abs=1e-6)
        assert 0.0 <= r["dev"] <= 1.0
    # Two different fine-tunings, each cached under its own key.
    models = sorted((tmp_path / "cache").glob("*/model/model.safetensors"))
    assert len(models) == 3 and len({m.read_bytes() for m in models}) == 3
    text = (out / "cram.md").read_text()
    assert (
        "| sparsity | plain | cram_plus rho=0.05 | cram_plus rho=0.2 |" in text
        and "| 70% |" in text
    )
    # Cached: a second run reuses both fine-tuned models.
    assert cram.main(argv) == 0
    assert (
        json.loads((out / "cram.json").read_text())["arms"]["cram_plus rho=0.05"]["train_seconds"]
        == crammed["train_seconds"]
    )
    assert crammed["mean_grad_norm"] > 0  # from the cram modifier's log line
    # --normalize: its own arm and cache entry; the table says so and gives ||g||.
    normalized = [a for a in argv if a not in ("0.2",)] + ["--normalize"]
    assert cram.main(normalized) == 0
    report = json.loads((out / "cram.json").read_text())
    assert set(report["arms"]) == {"plain", "cram_plus rho=0.05 normalized"}
    assert len(sorted((tmp_path / "cache").glob("*/model/model.safetensors"))) == 4
    text = (out / "cram.md").read_text()
    assert (
        "normalized ascent step: w + rho g / ||g||" in text and "Mean gradient norm ||g||" in text
    )

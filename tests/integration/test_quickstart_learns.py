"""The README's default job: the embedded MiniLM learns the built-in task while it is pruned.

The whole quickstart (all 2000 training examples; a 640-example slice reached only 0.61), with
a 200-example evaluation. Marked integration (about 5 minutes on 2 idle cores):
``python -m pytest -m integration tests/integration/test_quickstart_learns.py``. The measured
output of the unshortened run is in the README ("Measured results").
"""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from recipec.cli import main

QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"


@pytest.mark.integration
def test_quickstart_on_the_embedded_model_ends_sparse_and_above_chance(tmp_path, monkeypatch):
    monkeypatch.setenv("RECIPEC_CACHE", str(tmp_path / "cache"))  # a fresh teacher, fine-tuned here
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main, ["apply", str(QUICKSTART), "--max-eval", "200", "--output", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "embedded (all-MiniLM-L6-v2)"
    masks = load_file(str(out / "model" / "masks.safetensors"))
    weights = load_file(str(out / "model" / "model.safetensors"))
    assert len(masks) == 36  # 6 layers x (Q, K, V, attention output, FFN in, FFN out)
    total = sum(m.numel() for m in masks.values())
    pruned = sum(int((m == 0).sum()) for m in masks.values())
    assert pruned == round(0.80 * total)  # the recipe's sparsity, exactly, on the targeted tensors
    for name, mask in masks.items():
        assert torch.equal(weights[name] == 0, mask == 0), name
    others = [n for n in weights if n not in masks and weights[n].dim() == 2]
    assert any("embeddings" in n for n in others) and any("classifier" in n for n in others)
    assert all(
        float((weights[n] == 0).float().mean()) < 0.01 for n in others
    )  # embeddings, head untouched
    # Two balanced classes: chance is 0.5. The dense teacher and the sparse student both learn.
    assert report["final_eval"]["accuracy"] > 0.7, report["final_eval"]
    assert report["teacher"]["eval"]["accuracy"] > 0.7, report["teacher"]
    assert report["collapse"] is None  # a model that learned is not reported as collapsed

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
@pytest.mark.parametrize(("folder", "kind"), [("sst2", "classification"), ("csqa", "multiple_choice")])
def test_apply_on_shared_data(shared_data_dir, tmp_path, folder, kind):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["apply", str(recipe), "--data", str(shared_data_dir / folder), "--max-train", "16",
                                       "--max-eval", "8", "--output", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["task"]["kind"] == kind
    assert report["train_examples"] == 16 and report["eval_examples"] == 8
    assert report["sparsity"]["targets"] == pytest.approx(0.5, abs=1e-6)
    assert 0.0 <= report["final_eval"]["accuracy"] <= 1.0

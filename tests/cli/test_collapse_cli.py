"""A collapsed model is named on the console and in the report; a model that learns is not.

The same tiny BERT, data and recipe twice: once as it is (it learns a keyword task to 100%),
once with its pooler and classifier zeroed, which no gradient can revive (the pooled output is
0, so the classifier's weight gets no gradient and the pooler none through it): every eval
example gets the same logits, the bias.
"""

import json
import random
import re

import pytest
import torch
from click.testing import CliRunner

from recipec.cli import main

RECIPE = """\
training: {epochs: 6, batch_size: 8, learning_rate: 5e-3, max_seq_length: 16, seed: 1, eval_every_epochs: 3}
modifiers:
  - {type: gmp, init_sparsity: 0.2, final_sparsity: 0.5, start_epoch: 2, end_epoch: 4, update_every_steps: 10}
"""


def _keyword_rows(n: int, rng: random.Random) -> str:
    filler = "the a of to and in is it that was for on with as at by".split()
    rows = ["sentence\tlabel"]
    for i in range(n):
        label = i % 2
        word = (["bad", "awful", "poor"], ["good", "great", "fine"])[label][i % 3]
        words = [rng.choice(filler) for _ in range(6)]
        words.insert(rng.randrange(7), word)
        rows.append(f"{' '.join(words)}\t{label}")
    return "\n".join(rows) + "\n"


@pytest.fixture
def keyword_task(tmp_path):
    rng = random.Random(0)
    (tmp_path / "train.tsv").write_text(_keyword_rows(160, rng))
    (tmp_path / "dev.tsv").write_text(_keyword_rows(64, rng))
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    return tmp_path


def _apply(tmp_path, model, out):
    args = ["apply", str(tmp_path / "recipe.yaml"), "--model", str(model), "--output", str(out)]
    args += ["--data", str(tmp_path / "train.tsv"), str(tmp_path / "dev.tsv")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result.output, json.loads((out / "report.json").read_text())


def test_a_model_that_learns_is_not_flagged(keyword_task, tiny_model_dir):
    output, report = _apply(keyword_task, tiny_model_dir, keyword_task / "run")
    assert report["final_eval"]["accuracy"] > 0.9, report["final_eval"]
    assert report["collapse"] is None
    assert report["final_eval"]["top_class_share"] < 0.98
    assert "collapse" not in (keyword_task / "run" / "report.md").read_text().lower()
    # every evaluation is printed (epochs 3 and 6), with the scores and without diagnostics;
    # at epoch 3 the model still answered one class (it is judged at each evaluation), not after
    evals = re.findall(r"stage 'main' step (\d+)/120 \(epoch (\d+)\): eval accuracy", output)
    assert evals == [("60", "3"), ("120", "6")]
    assert output.count(": collapsed: the model predicts one class") == 1
    last = output[output.index("step 120/120 (epoch 6)") :]
    assert "collapse" not in last.lower() and "COLLAPSED" not in output
    assert "top_class" not in output


def test_a_zeroed_head_is_reported_as_collapsed(keyword_task, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for name in ("bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight"):
            model.get_parameter(name).zero_()
    zeroed = keyword_task / "zeroed"
    model.save_pretrained(zeroed)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(zeroed)

    output, report = _apply(keyword_task, zeroed, keyword_task / "run")
    collapse = report["collapse"]
    assert report["final_eval"]["top_class_share"] == 1.0
    top = int(report["final_eval"]["top_class"])
    message = f"the model predicts one class (class {top}) for 64 of 64 eval examples"
    assert collapse["message"] == message
    assert report["final_eval"]["accuracy"] == 0.5  # the share of that class in dev.tsv
    assert len(collapse["causes"]) == 4
    assert collapse["causes"][0].startswith("a training budget too small: 120 optimizer steps")
    assert collapse["causes"][1].startswith("too little data: 160 train examples")
    assert collapse["causes"][2].startswith("a task head whose weights are all zero (classifier")
    assert collapse["causes"][3].startswith("too high a sparsity for the budget: 50.00%")
    # the console: at both evaluations, then before the final line, which says so too
    assert output.count("[warn] stage 'main' step 60: collapsed: ") == 1
    assert output.count("[warn] stage 'main' step 120: collapsed: ") == 1
    assert f"warning: {message}; likely causes:" in output
    assert "COLLAPSED (see the report)" in output
    md = (keyword_task / "run" / "report.md").read_text()
    assert "## Warning: the model collapsed" in md and message[1:] in md
    assert all(f"- {cause}" in md for cause in collapse["causes"])
    assert "| top_class" not in md

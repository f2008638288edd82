"""`recipec predict` end to end: a tiny `recipec apply` run, exported, then raw text to JSON
lines on the engine (FP32 and INT8), checked against onnxruntime on the same tokens."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from recipec.cli import main  # noqa: E402

TINY_RECIPE = """\
training: {epochs: 2, batch_size: 16, learning_rate: 1e-3, max_seq_length: 32, seed: 1, eval_every_epochs: 1}
modifiers:
  - {type: gmp, init_sparsity: 0.5, final_sparsity: 0.9, start_epoch: 0, end_epoch: 1, update_every_steps: 2}
"""

TEXTS = ["a charming, funny film", "a dull and lifeless script", "it is fine"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("predict")
    recipe = root / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    run = root / "run"
    args = ["apply", str(recipe), "--model", str(tiny_model_dir), "--max-train", "64"]
    res = CliRunner().invoke(main, [*args, "--max-eval", "16", "--output", str(run), "--quiet"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["export", str(run), "--onnx"])
    assert res.exit_code == 0, res.output
    return run / "onnx"


def _lines(output: str) -> list[dict]:
    return [json.loads(ln) for ln in output.splitlines() if ln.startswith("{")]


def _ort_labels(folder, texts):
    """Labels from onnxruntime on the folder's tokenizer: the reference for predict."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    labels = []
    for text in texts:
        enc = tok([text], return_tensors="np")
        logits = sess.run(["logits"], {n: enc[n].astype(np.int64) for n in names})[0]
        labels.append(int(np.argmax(logits[0])))
    return labels


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_predict_texts_and_a_file_give_json_lines(folder, tmp_path, dtype):
    lines = tmp_path / "in.txt"
    lines.write_text(f"{TEXTS[1]}\n\n{TEXTS[2]}\n")
    args = ["predict", str(folder), "--text", TEXTS[0], "--file", str(lines), "--dtype", dtype]
    res = CliRunner().invoke(main, [*args, "--threads", "1", "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    assert "logits match onnxruntime" in res.output  # checked before use
    rows = _lines(res.output)
    assert [r["input"] for r in rows] == TEXTS  # in order, blank line skipped
    for r in rows:
        assert set(r) == {"input", "label", "label_name", "scores"}
        assert r["label_name"] == ["negative", "positive"][r["label"]]  # SST-2's names
        assert len(r["scores"]) == 2 and abs(sum(r["scores"]) - 1) < 1e-5
        assert r["label"] == int(np.argmax(r["scores"]))
    if dtype == "fp32":
        assert [r["label"] for r in rows] == _ort_labels(folder, TEXTS)


def test_predict_matches_the_python_api(folder):
    from recipec.runtime.engine import load

    engine = load(folder, "fp32")
    want = engine.predict([TEXTS[0], (TEXTS[1], TEXTS[2])])
    res = CliRunner().invoke(
        main, ["predict", str(folder), "--text", TEXTS[0], "--text", f"{TEXTS[1]}\t{TEXTS[2]}"]
    )
    assert res.exit_code == 0, res.output
    rows = _lines(res.output)
    assert rows[1]["input"] == [TEXTS[1], TEXTS[2]]  # a tab makes a sentence pair
    for got, ref in zip(rows, want):
        assert got["label"] == ref["label"]
        np.testing.assert_allclose(got["scores"], ref["scores"], atol=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "no input: pass --text TEXT"),
        (["--text", "x", "--threads", "0"], "--threads and --batch-size must be positive"),
        (["--text", "x", "--max-length", "1"], "--max-length must be at least 2"),
        (["--text", "x", "--dtype", "fp16"], "'fp16' is not one of"),
        (["--file", "/nonexistent/in.txt"], "--file /nonexistent/in.txt: cannot read"),
    ],
)
def test_predict_user_errors_exit_2(folder, args, message):
    res = CliRunner().invoke(main, ["predict", str(folder), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_predict_a_folder_without_a_tokenizer_or_that_is_none(folder, tmp_path):
    import shutil

    res = CliRunner().invoke(main, ["predict", str(tmp_path / "missing"), "--text", "x"])
    assert res.exit_code == 2 and "no such file or directory" in res.output
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (copy / name).unlink(missing_ok=True)
    res = CliRunner().invoke(main, ["predict", str(copy), "--text", "x"])
    assert res.exit_code == 2, res.output
    assert "no tokenizer in" in res.output and "Traceback" not in res.output

"""What users feed recipec, through the command line (#22, #24): bad data files, corrupt
weights and ONNX files, mismatched teachers, and the `--data` / `--metric` forms.

Every bad input must end with exit code 2 (or 1), a message naming the file, no Python
traceback, and no output folder left behind.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from recipec.cli import main  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

QUICK = """\
training: {steps: 2, batch_size: 8, learning_rate: 1e-3, max_seq_length: 16, seed: 1}
modifiers:
  - {type: gmp, init_sparsity: 0.3, final_sparsity: 0.5, start_step: 0, end_step: 1, update_every_steps: 1}
"""
DISTIL = QUICK + "  - {type: distill, teacher: auto, hardness: 0.5, temperature: 2.0}\n"


def invoke(*args, env: dict | None = None):
    """The command, in this process; COLUMNS keeps the log's lines whole."""
    return CliRunner().invoke(main, [str(a) for a in args], env={"COLUMNS": "250", **(env or {})})


def assert_user_error(result, *names: object, codes=(2,)) -> None:
    """Exit code in ``codes``, every name in the message, and no traceback."""
    assert isinstance(result.exception, SystemExit), (result.exception, result.output)
    assert result.exit_code in codes, result.output
    assert "Traceback" not in result.output
    for name in names:
        assert str(name) in result.output, (name, result.output)


@pytest.fixture(scope="module")
def recipes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipes")
    (root / "quick.yaml").write_text(QUICK)
    (root / "distil.yaml").write_text(DISTIL)
    return {"quick": root / "quick.yaml", "distil": root / "distil.yaml"}


def sentences(labels) -> str:
    return "sentence\tlabel\n" + "".join(f"a sentence {i}\t{lab}\n" for i, lab in enumerate(labels))


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("good")
    (root / "train.tsv").write_text(sentences([i % 2 for i in range(24)]))
    (root / "dev.tsv").write_text(sentences([i % 2 for i in range(8)]))
    return {"train": root / "train.tsv", "dev": root / "dev.tsv"}


# ------------------------------------------------------------------------ bad data files

_ROWS = [i % 2 for i in range(30)]
BAD_DATA: dict[str, bytes] = {
    "binary.tsv": b"sentence\tlabel\n\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    "latin1.tsv": "sentence\tlabel\nun café crème\t1\n".encode("latin-1"),
    "utf16.tsv": "sentence\tlabel\na\t1\n".encode("utf-16"),
    "empty.tsv": b"",
    "blank.csv": b"\n\n  \n",
    "header_only.tsv": b"sentence\tlabel\n",
    "header_only.csv": b"text,label\n",
    "ragged.tsv": b"sentence\tlabel\ngood\t1\ntoo\tmany\tfields\n",
    "ragged.csv": b'text,label\n"an open quote,1\nsecond,0\n',
    "no_header.tsv": b"a fine film\t1\na dull film\t0\n",
    "unknown_header.csv": b"foo,bar\n1,2\n",
    "nested.json": b"[" * 50_000 + b"]" * 50_000,
    "nested.jsonl": b'{"text": "a", "label": ' + b"[" * 50_000 + b"]" * 50_000 + b"}\n",
    "not_json.jsonl": b'{"text": "a", "label": 1}\n{"text": oops}\n',
    "numbers.json": b"[1, 2, 3]",
    "object_label.jsonl": b'{"text": "a", "label": 1}\n{"text": "b", "label": {"x": 1}}\n',
    "huge_int.tsv": sentences([*_ROWS, "9" * 5000]).encode(),
    "huge_int.jsonl": b'{"text": "a", "label": ' + b"7" * 5000 + b"}\n",
    "huge_float.tsv": sentences([f"{i}.5" for i in range(30)] + ["1e999"]).encode(),
    "mixed_types.tsv": sentences([*_ROWS, 0.5]).encode(),
    "names_and_numbers.tsv": sentences(["good", "bad"] * 15 + [3]).encode(),
    "stray_class.tsv": sentences([*_ROWS, 7]).encode(),
    "one_class.tsv": sentences([1] * 30).encode(),
    "typo_class.tsv": sentences(["pos", "neg"] * 15 + ["pso"]).encode(),
    "negative_id.tsv": sentences([*_ROWS, -1]).encode(),
    "unlabelled.tsv": b"index\tsentence\n0\tno label\n",
    "missing_label.jsonl": b'{"text": "a", "label": 1}\n{"text": "b"}\n',
}


def _random_files() -> dict[str, bytes]:
    """Seeded random bytes: binary, invalid UTF-8 and printable noise with tabs and newlines."""
    rng = random.Random(22)
    out = {}
    for i in range(4):
        out[f"random{i}.tsv"] = bytes(rng.randrange(256) for _ in range(300))
        high = bytes(rng.choice(b"abc\t\n\xc3\xa9\xff\xfe") for _ in range(300))
        out[f"random{i}.jsonl"] = high
        printable = "".join(rng.choice("ab ,\t\n\"'{}[]:0123") for _ in range(300))
        out[f"random{i}.csv"] = printable.encode()
    return out


@pytest.mark.parametrize("name", [*BAD_DATA, *_random_files()])
def test_a_bad_train_file_is_named_without_traceback(name, recipes, good, tiny_model_dir, tmp_path):
    bad = tmp_path / name
    bad.write_bytes(BAD_DATA[name] if name in BAD_DATA else _random_files()[name])
    dev = good["dev"]
    if name == "typo_class.tsv":  # class names: an eval file of names too
        dev = tmp_path / "dev.tsv"
        dev.write_text(sentences(["pos", "neg"] * 4))
    out = tmp_path / "run"
    result = invoke(
        "apply",
        recipes["quick"],
        "--model",
        tiny_model_dir,
        "--data",
        bad,
        "--data",
        dev,
        "--output",
        out,
        "--quiet",
    )
    assert_user_error(result, bad)
    assert not out.exists()  # nothing left that blocks the corrected command


def test_a_bad_eval_file_is_named_too(recipes, good, tiny_model_dir, tmp_path):
    bad = tmp_path / "dev.tsv"
    bad.write_text(sentences([0, 1, 2]))  # class 2 is in no train row
    result = invoke(
        "apply",
        recipes["quick"],
        "--model",
        tiny_model_dir,
        "--data",
        good["train"],
        bad,
        "--output",
        tmp_path / "run",
        "--quiet",
    )
    assert_user_error(result, f"{bad}:4: class 2 is in the eval file")


# --------------------------------------------------------------- --data and --metric forms


@pytest.mark.parametrize("form", ["spread", "repeated"])
def test_data_takes_the_train_then_the_eval_file_both_ways(
    form, recipes, good, tiny_model_dir, tmp_path
):
    data = ["--data", good["train"], good["dev"]]
    if form == "repeated":
        data = ["--data", good["train"], "--data", good["dev"]]
    out = tmp_path / "run"
    result = invoke(
        "apply",
        recipes["quick"],
        *data,
        "--model",
        tiny_model_dir,
        "--metric",
        "f1",
        "--output",
        out,
    )
    assert result.exit_code == 0, result.output
    assert "primary metric f1 (--metric)" in result.output
    assert "labels: train {0: 12, 1: 12}, eval {0: 4, 1: 4}" in result.output
    assert json.loads((out / "report.json").read_text())["primary_metric"] == "f1"


def test_data_forms_that_cannot_work_say_which_do(recipes, good, tiny_model_dir, tmp_path):
    result = invoke(
        "apply",
        recipes["quick"],
        "--data",
        good["train"],
        good["dev"],
        good["dev"],
        "--model",
        tiny_model_dir,
        "--output",
        tmp_path / "run",
    )
    assert_user_error(result, "got 3 paths: --data TRAIN EVAL (or --data DIR)")
    result = invoke("apply", recipes["quick"], "--data", good["train"], "--model", tiny_model_dir)
    assert_user_error(result, "pass two paths, the train file then the eval file: --data TRAIN")
    assert "data=[" not in result.output
    result = invoke(
        "apply",
        recipes["quick"],
        "--data",
        good["train"],
        good["dev"],
        "--metric",
        "spearman",
        "--model",
        tiny_model_dir,
    )
    assert_user_error(result, "--metric spearman: a classification task is scored with accuracy")


# ------------------------------------------------------------- models and teachers


def _copy(folder: Path, to: Path) -> Path:
    return Path(shutil.copytree(folder, to))


def _truncate(path: Path, keep: int | None = None) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])
    return path


def test_a_model_with_truncated_weights_is_named(recipes, tiny_model_dir, tmp_path):
    model = _copy(tiny_model_dir, tmp_path / "model")
    weights = _truncate(model / "model.safetensors")
    result = invoke(
        "apply", recipes["quick"], "--model", model, "--max-train", 16, "--output", tmp_path / "run"
    )
    assert_user_error(result, f"{weights}: the weights file is truncated")
    assert not (tmp_path / "run").exists()


def test_a_model_whose_config_does_not_match_its_weights(recipes, tiny_model_dir, tmp_path):
    model = _copy(tiny_model_dir, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    result = invoke("apply", recipes["quick"], "--model", model, "--max-train", 16)
    assert_user_error(result, "intermediate_size is 96 in config.json, 64 in the weights")


def test_a_teacher_that_does_not_fit_is_refused(recipes, good, tiny_model_dir, tmp_path):
    """#22: other labels were a traceback at the first loss; another vocabulary of the same
    size trained silently."""
    import torch
    from transformers import BertForSequenceClassification

    three = tmp_path / "three"
    torch.manual_seed(1)
    BertForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=3, ignore_mismatched_sizes=True
    ).save_pretrained(three)
    shutil.copy(tiny_model_dir / "tokenizer.json", three)
    shutil.copy(tiny_model_dir / "tokenizer_config.json", three)
    args = [
        "apply",
        recipes["distil"],
        "--model",
        tiny_model_dir,
        "--data",
        good["train"],
        good["dev"],
        "--output",
        tmp_path / "run",
    ]
    result = invoke(*args, "--teacher", three)
    assert_user_error(result, f"the teacher '{three}' does not fit this student", "3 labels")

    other_vocab = _copy(tiny_model_dir, tmp_path / "vocab")
    spec = json.loads((other_vocab / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    vocab["good"], vocab["bad"] = vocab["bad"], vocab["good"]
    (other_vocab / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    result = invoke(*args, "--teacher", other_vocab)
    assert_user_error(result, "its vocabulary differs (the same size")
    assert not (tmp_path / "run" / "model").exists()  # nothing trained or written


def test_a_damaged_cached_teacher_says_how_to_clear_the_cache(
    recipes, good, tiny_model_dir, tmp_path
):
    env = {"RECIPEC_CACHE": str(tmp_path / "cache")}
    args = [
        "apply",
        recipes["distil"],
        "--model",
        tiny_model_dir,
        "--data",
        good["train"],
        good["dev"],
        "--quiet",
    ]
    assert invoke(*args, "--output", tmp_path / "first", env=env).exit_code == 0
    (cached,) = (tmp_path / "cache" / "teachers").iterdir()
    weights = _truncate(cached / "model" / "model.safetensors")
    result = invoke(*args, "--output", tmp_path / "second", env=env)
    assert_user_error(result, weights, f"rm -r {cached}")


# ---------------------------------------------------------------- export and bench inputs


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_model_dir) -> Path:
    from recipec import models
    from recipec.checkpoint import magnitude_masks, write_checkpoint
    from recipec.export.onnx import export

    root = tmp_path_factory.mktemp("deploy")
    model = models.load_model(tiny_model_dir, head="sequence-classification").model
    write_checkpoint(model, root / "run" / "model", magnitude_masks(model, 0.8))
    return export(root / "run").output_dir


def _broken_onnx(kind: str, folder: Path) -> Path:
    onnx_file = folder / "model.onnx"
    if kind == "empty onnx":
        onnx_file.write_bytes(b"")
    elif kind == "truncated onnx":
        _truncate(onnx_file)
    elif kind == "random onnx":
        onnx_file.write_bytes(random.Random(3).randbytes(4096))
    elif kind == "text onnx":
        onnx_file.write_text("not a model\n")
    elif kind == "sparsity.json list":
        (folder / "sparsity.json").write_text("[]")
        return folder / "sparsity.json"
    elif kind == "sparsity.json empty object":
        (folder / "sparsity.json").write_text("{}")
        return folder / "sparsity.json"
    elif kind == "sparsity.json not json":
        (folder / "sparsity.json").write_bytes(b"\xff\xfe{")
        return folder / "sparsity.json"
    elif kind == "truncated torch weights":
        return _truncate(folder / "model.safetensors")
    return onnx_file


BROKEN = [
    "empty onnx",
    "truncated onnx",
    "random onnx",
    "text onnx",
    "sparsity.json list",
    "sparsity.json empty object",
    "sparsity.json not json",
    "truncated torch weights",
]


@pytest.mark.parametrize("kind", BROKEN)
def test_bench_a_broken_deployment_folder(kind, deployment, tmp_path):
    folder = _copy(deployment, tmp_path / "onnx")
    named = _broken_onnx(kind, folder)
    result = invoke(
        "bench",
        folder,
        "--runtime",
        "ort,torch-csr",
        "--batch-sizes",
        "1",
        "--seq-len",
        8,
        "--repeats",
        1,
        "--warmup",
        0,
    )
    assert_user_error(result, named)


@pytest.mark.parametrize(
    "kind", ["empty weights", "truncated weights", "truncated masks", "config not json"]
)
def test_export_a_broken_checkpoint(kind, deployment, tmp_path):
    model = _copy(deployment.parent / "model", tmp_path / "model")
    named = {
        "empty weights": model / "model.safetensors",
        "truncated weights": model / "model.safetensors",
        "truncated masks": model / "masks.safetensors",
        "config not json": model / "config.json",
    }[kind]
    if kind == "empty weights":
        named.write_bytes(b"")
    elif kind == "config not json":
        named.write_bytes(b"{\xff")
    else:
        _truncate(named)
    result = invoke("export", model, "--onnx", "-o", tmp_path / "out")
    assert_user_error(result, named if kind != "config not json" else model)
    assert not (tmp_path / "out").exists()


def test_export_an_onnx_file_says_what_to_pass(deployment):
    result = invoke("export", deployment / "model.onnx", "--onnx")
    assert_user_error(result, deployment / "model.onnx", "recipec bench")


def test_bench_reports_the_zeros_in_the_graph_not_sparsity_json(deployment, tmp_path):
    """#22: an ONNX whose pruned weights were refilled printed "80.0% ... zero", row "sparse"."""
    from recipec.runtime.bench import dense_twin_onnx

    folder = _copy(deployment, tmp_path / "onnx")
    dense_twin_onnx(deployment, folder / "model.onnx")  # every pruned weight refilled
    result = invoke(
        "bench",
        folder,
        "--runtime",
        "ort",
        "--batch-sizes",
        "1",
        "--seq-len",
        8,
        "--repeats",
        1,
        "--warmup",
        0,
    )
    assert result.exit_code == 0, result.output
    assert "0.0% of the pruned weights in the graph are zero" in result.output
    assert "80.0% of" not in result.output
    assert f"{folder}/model.onnx was changed after export" in result.output
    assert "sparse*" in result.output
    honest = invoke(
        "bench",
        deployment,
        "--runtime",
        "ort",
        "--batch-sizes",
        "1",
        "--seq-len",
        8,
        "--repeats",
        1,
        "--warmup",
        0,
    )
    assert "80.0% of the pruned weights in the graph are zero" in honest.output
    assert "changed after export" not in honest.output and "sparse*" not in honest.output


def test_bench_refuses_batches_beyond_memory_up_front(deployment):
    result = invoke(
        "bench", deployment, "--batch-sizes", "1,50000000", "--seq-len", 64, "--runtime", "ort"
    )
    assert_user_error(result, "batch 50000000 at --seq-len 64 needs about", "GiB")

"""The evaluation half of ``int8_accuracy.py``: SST-2 dev accuracy of each exported model on
onnxruntime FP32 and INT8 (``quantize_dynamic``) and, for the pruned models, on recipec's
engine FP32 and INT8. Every variant sees the same tokens (the folder's tokenizer, no
truncation below the model's limit, padded per batch)."""

from __future__ import annotations

import csv
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

BATCH = 32


def read_dev(path: Path) -> tuple[list[str], list[int]]:
    """SST-2's ``sentence<TAB>label`` file (with its header line)."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


def ort_labels(onnx_path: Path, folder: Path, texts: list[str], threads: int | None) -> list[int]:
    """Argmax labels of an ONNX model on the folder's tokenizer, ``BATCH`` texts at a time."""
    from recipec.models import load_tokenizer
    from recipec.runtime.runtimes import ort_session

    tok = load_tokenizer(folder)
    session = ort_session(onnx_path, threads)
    names = [i.name for i in session.get_inputs()]
    labels = []
    for start in range(0, len(texts), BATCH):
        enc = tok(texts[start : start + BATCH], padding=True, truncation=True, return_tensors="np")
        feed = {n: enc[n].astype(np.int64) for n in names if n in enc}
        if "token_type_ids" in names and "token_type_ids" not in feed:
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        labels += np.argmax(session.run(["logits"], feed)[0], axis=-1).tolist()
    return labels


def engine_labels(folder: Path, dtype: str, texts: list[str], threads: int | None) -> list[int]:
    """Labels from recipec's engine (checked against onnxruntime at load)."""
    from recipec.runtime.engine import load

    engine = load(folder, dtype, threads=threads)
    return [r["label"] for r in engine.predict(texts, batch_size=BATCH)]


def accuracy(pred: list[int], gold: list[int]) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(gold)))


def evaluate_model(name: str, folder: Path, texts, gold, threads, log) -> dict:
    """One model's accuracies per variant (and how often INT8 changes an FP32 answer)."""
    from recipec.runtime.int8 import quantize_onnx

    preds = {"ort-fp32": ort_labels(folder / "model.onnx", folder, texts, threads)}
    with tempfile.TemporaryDirectory(prefix="recipec-int8-") as tmp:
        q = quantize_onnx(folder / "model.onnx", Path(tmp) / "model.onnx")
        preds["ort-int8"] = ort_labels(q, folder, texts, threads)
    if name != "dense":
        for dtype in ("fp32", "int8"):
            preds[f"engine-{dtype}"] = engine_labels(folder, dtype, texts, threads)
    row = {"model": name, **{k: accuracy(v, gold) for k, v in preds.items()}}
    fp32 = np.asarray(preds["ort-fp32"])
    row["changed_by_int8"] = {
        k: int((np.asarray(v) != fp32).sum()) for k, v in preds.items() if k.endswith("int8")
    }
    log(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float)))
    return row


def markdown(rows: list[dict], n: int) -> str:
    cols = ["ort-fp32", "ort-int8", "engine-fp32", "engine-int8"]
    lines = [
        "| model | " + " | ".join(cols) + " | INT8 - FP32 (points) |",
        "|---|" + "---|" * (len(cols) + 1),
    ]
    for r in rows:
        cells = [f"{r[c]:.2%}" if c in r else "n/a" for c in cols]
        deltas = [f"ort {100 * (r['ort-int8'] - r['ort-fp32']):+.2f}"]
        if "engine-int8" in r:
            deltas.append(f"engine {100 * (r['engine-int8'] - r['engine-fp32']):+.2f}")
        lines.append(f"| {r['model']} | " + " | ".join(cells) + f" | {', '.join(deltas)} |")
    lines += [
        "",
        f"SST-2 dev ({n} sentences) accuracy of each model on onnxruntime FP32, onnxruntime "
        "INT8 (quantize_dynamic, int8 weights) and recipec's engine FP32/INT8 (int8 weights per "
        "output channel, activations per token); INT8 - FP32: the same model's accuracy change.",
    ]
    return "\n".join(lines) + "\n"


def evaluate_all(
    folders: dict[str, Path],
    dev: Path,
    threads: int | None,
    log: Callable[[str], None],
    max_dev: int | None = None,
) -> dict:
    """Rows per model and the markdown table (the first ``max_dev`` dev sentences if given)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    texts, gold = read_dev(dev)
    texts, gold = texts[:max_dev], gold[:max_dev]
    rows = [evaluate_model(n, f, texts, gold, threads, log) for n, f in folders.items()]
    return {"rows": rows, "dev_examples": len(texts), "markdown": markdown(rows, len(texts))}

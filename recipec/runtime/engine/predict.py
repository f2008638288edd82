"""Raw text in, labels and scores out: tokenization, length-sorted batches, softmax.

Items, as the folder's task takes them:

- sequence classification: a string, or a pair ``(text_a, text_b)`` (sentence-pair tasks);
- multiple choice: ``(context, [choice, choice, ...])`` or a flat ``[context, choice, ...]``.

Each result is a dict: ``label`` (the argmax class or choice index), ``label_name`` when the
config names its labels (or the chosen choice's text), ``scores`` (softmax probabilities);
a regression head (one output) gives ``score`` instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

from recipec.runtime.engine.model import Engine, EngineError

_DEFAULT_LABEL = re.compile(r"^LABEL_\d+$")
_ROBERTA_LIKE = ("roberta", "xlm-roberta", "camembert", "longformer")


def max_tokens(engine: Engine) -> int:
    """The longest sequence the model takes (its position embeddings; 512 when unstated)."""
    config = engine.model.config
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return 512
    if getattr(config, "model_type", "") in _ROBERTA_LIKE:
        positions -= (getattr(config, "pad_token_id", 1) or 0) + 1
    tok_max = getattr(engine.tokenizer, "model_max_length", positions) or positions
    return int(min(positions, tok_max))


def label_names(engine: Engine) -> dict[int, str]:
    """Class index -> name, only for names the config really gives (not LABEL_0 ...)."""
    raw = getattr(engine.model.config, "id2label", None) or {}
    return {int(k): str(v) for k, v in raw.items() if not _DEFAULT_LABEL.match(str(v))}


def _as_parts(item, task: str) -> list[str]:
    """An item as a list of strings: [text] / [a, b] / [context, choice, ...]."""
    if isinstance(item, str):
        parts = [item]
    elif isinstance(item, Sequence) and len(item) == 2 and not isinstance(item[1], str):
        parts = [item[0], *item[1]]  # (context, [choices])
    elif isinstance(item, Sequence):
        parts = list(item)
    else:
        raise EngineError(f"expected a string or a sequence of strings, got {type(item).__name__}")
    if not parts or not all(isinstance(p, str) for p in parts):
        raise EngineError(f"every part of an item must be a string: {item!r}")
    if task == "multiple-choice":
        if len(parts) < 3:
            raise EngineError(
                f"a multiple-choice item is a context and at least two choices, got {parts!r}"
            )
    elif len(parts) > 2:
        raise EngineError(f"a classification item is one text or a pair, got {len(parts)} parts")
    return parts


def _encode(engine: Engine, parts: list[str], max_length: int) -> list[dict]:
    """Token ids of one item: one encoding, or one per choice (multiple choice)."""
    tok = engine.tokenizer
    if engine.task == "multiple-choice":
        context, choices = parts[0], parts[1:]
        return [tok(context, c, truncation=True, max_length=max_length) for c in choices]
    return [tok(*parts, truncation=True, max_length=max_length)]


def _batch_inputs(engine: Engine, encodings: list[list[dict]]) -> dict[str, np.ndarray]:
    """Pads a batch of items (each a list of encodings of one length) to its longest."""
    rows = [e for item in encodings for e in item]
    longest = max(len(e["input_ids"]) for e in rows)
    pad_id = engine.tokenizer.pad_token_id or 0
    ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    types = np.zeros((len(rows), longest), dtype=np.int64)
    for i, e in enumerate(rows):
        n = len(e["input_ids"])
        ids[i, :n] = e["input_ids"]
        mask[i, :n] = 1
        if "token_type_ids" in e:
            types[i, :n] = e["token_type_ids"]
    arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    if engine.task == "multiple-choice":
        k = len(encodings[0])
        arrays = {n: a.reshape(len(encodings), k, longest) for n, a in arrays.items()}
    return {n: arrays[n] for n in engine.input_names}


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _result(engine: Engine, logits: np.ndarray, parts: list[str], names: dict) -> dict:
    if engine.task != "multiple-choice" and logits.shape[-1] == 1:
        return {"score": float(logits[0])}
    scores = _softmax(logits.astype(np.float64))
    label = int(np.argmax(scores))
    out: dict = {"label": label}
    if engine.task == "multiple-choice":
        out["label_name"] = parts[1 + label]
    elif label in names:
        out["label_name"] = names[label]
    out["scores"] = [round(float(s), 6) for s in scores]
    return out


def predict(
    engine: Engine, items: Iterable, *, batch_size: int = 16, max_length: int | None = None
) -> list[dict]:
    """Labels and scores for ``items`` (in their order); see the module docstring.

    Items are batched by similar length (``batch_size`` items per call, padded to the longest
    of their batch) and truncated to ``max_length`` tokens (default: the model's limit).

    Raises:
        EngineError: no tokenizer, no items, or an item that does not fit the task.
    """
    if engine.tokenizer is None:
        where = f" in {engine.folder}" if engine.folder else ""
        raise EngineError(f"no tokenizer{where}: predict needs the tokenizer files")
    if batch_size < 1:
        raise EngineError(f"batch_size must be positive, got {batch_size}")
    parts = [_as_parts(item, engine.task) for item in items]
    if not parts:
        raise EngineError("no input texts")
    limit = min(max_length or max_tokens(engine), max_tokens(engine))
    encoded = [_encode(engine, p, limit) for p in parts]
    # Similar lengths together (less padding); multiple-choice batches share a choice count.
    order = sorted(
        range(len(parts)),
        key=lambda i: (len(encoded[i]), max(len(e["input_ids"]) for e in encoded[i])),
    )
    names = label_names(engine)
    results: list[dict | None] = [None] * len(parts)
    start = 0
    while start < len(order):
        k = len(encoded[order[start]])
        batch = [order[start]]
        while (
            len(batch) < batch_size
            and start + len(batch) < len(order)
            and len(encoded[order[start + len(batch)]]) == k
        ):
            batch.append(order[start + len(batch)])
        logits = engine.logits(_batch_inputs(engine, [encoded[i] for i in batch]))
        for row, i in enumerate(batch):
            results[i] = _result(engine, logits[row], parts[i], names)
        start += len(batch)
    return results  # type: ignore[return-value]

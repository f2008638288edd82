"""The engine: a deployment folder's model with its pruned linears on recipec's sparse kernels.

``load(folder)`` reads what ``recipec export`` wrote (``model.safetensors``, ``masks.safetensors``,
``config.json``, tokenizer, ``sparsity.json``), builds the Hugging Face model with recipec's one
loader and swaps every pruned ``nn.Linear`` for an ``EngineLinear`` (sparse kernel or dense, per
a measurement). Attention (PyTorch's scaled-dot-product attention), layer norm, GELU and the
embeddings stay on torch's dense code. One thread pool: the kernels split their work on torch's
own (``torch.set_num_threads``). Before it is used, the engine's logits are compared with
onnxruntime's on the folder's ``model.onnx`` (FP32 within ``FP32_TOLERANCE``, INT8 within
``INT8_TOLERANCE``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from recipec.checkpoint import MASKS_FILE, CheckpointError, infer_masks, load_masks
from recipec.kernels import native
from recipec.quant.fake import QuantError
from recipec.quant.files import INT8_FILE, read_int8
from recipec.runtime.engine.layers import EngineLinear, Planner, Timer

DTYPES = ("fp32", "int8")
# |engine - onnxruntime| <= atol + rtol * max|onnxruntime| on the check inputs.
FP32_TOLERANCE = (1e-3, 1e-3)
# INT8 (per-token activations, per-channel weights, each rounding off by up to half a step of
# 1/127 of the row's range) drifts from FP32 by a few percent of the logits' range: measured
# 0.2-2% of max|logit| on random-init and fine-tuned MiniLM/BERT-base models; 10% is the bound.
INT8_TOLERANCE = (2e-2, 1e-1)
ONNX_FILE = "model.onnx"
SPARSITY_FILE = "sparsity.json"
WEIGHTS_FILE = "model.safetensors"


class EngineError(Exception):
    """The engine cannot load or run as asked (a bad folder, input or option)."""


def tolerance(dtype: str) -> tuple[float, float]:
    """``(atol, rtol)`` of the output check for an engine dtype."""
    return INT8_TOLERANCE if dtype == "int8" else FP32_TOLERANCE


def kernels_note() -> str | None:
    """One line when the fast kernels are not in use here (None when they are)."""
    if native.backend() == "torch-fallback":
        return (
            f"recipec engine: sparse kernels unavailable ({native.unavailable_reason()}); "
            "running the portable pure-torch path (correct, not faster than dense)"
        )
    return None


@dataclass
class LayerInfo:
    """One pruned layer's state, for reports."""

    name: str
    shape: tuple[int, int]
    sparsity: float
    pattern: str
    choices: dict[int, str]
    speedups: dict[int, float]


class Engine:
    """A loaded model on the engine (build it with ``load`` or ``Engine.from_model``).

    Attributes:
        model: the Hugging Face model, pruned linears replaced by ``EngineLinear``.
        task: "sequence-classification" or "multiple-choice".
        dtype: "fp32" or "int8".
        input_names: model inputs (from sparsity.json, else the model's signature).
        tokenizer: the folder's tokenizer (None when it has none).
        layers: module name -> ``EngineLinear``.
    """

    def __init__(
        self,
        model: nn.Module,
        masks: dict[str, torch.Tensor] | None,
        *,
        task: str,
        dtype: str = "fp32",
        input_names: list[str] | None = None,
        tokenizer=None,
        planner: Planner | None = None,
        folder: Path | None = None,
        int8_weights: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        if dtype not in DTYPES:
            raise EngineError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.model = model.eval()
        self.task = task
        self.dtype = dtype
        self.input_names = input_names or ["input_ids", "attention_mask", "token_type_ids"]
        self.tokenizer = tokenizer
        self.folder = folder
        self.planner = planner if planner is not None else Planner()
        self.backend = native.backend()
        if int8_weights is not None and dtype != "int8":
            raise EngineError("int8 weights need dtype 'int8'")
        self.int8_weights = int8_weights
        # where the int8 layers' weights come from (None: fp32)
        self.int8_source = (
            None if dtype != "int8" else ("file" if int8_weights is not None else "quantized here")
        )
        self.layers = self._swap(masks if masks is not None else infer_masks(model))

    @classmethod
    def from_model(cls, model: nn.Module, masks=None, **kwargs) -> Engine:
        """An engine on an in-memory model (its pruned weights must be exact zeros)."""
        kwargs.setdefault("task", "sequence-classification")
        return cls(model, masks, **kwargs)

    def _swap(self, masks: dict[str, torch.Tensor]) -> dict[str, EngineLinear]:
        """Replaces each masked ``nn.Linear`` by an ``EngineLinear`` (in place)."""
        fallback = self.backend == "torch-fallback"
        if fallback and self.dtype == "fp32":
            return {}  # the fallback's fp32 kernel is F.linear with the same weight: stay dense
        modules = dict(self.model.named_modules())
        layers = {}
        for name, module in list(modules.items()):
            if not isinstance(module, nn.Linear) or f"{name}.weight" not in masks:
                continue
            # INT8 on the fallback: its kernels keep the INT8 semantics (no dense to compare).
            quantized = (self.int8_weights or {}).get(f"{name}.weight")
            try:
                layer = EngineLinear(
                    module, self.dtype, None if fallback else self.planner, quantized=quantized
                )
            except ValueError as exc:  # int8 weights that do not belong to this model
                raise EngineError(f"{name}: {exc}") from None
            parent, _, attr = name.rpartition(".")
            setattr(modules[parent] if parent else self.model, attr, layer)
            layers[name] = layer
        return layers

    # -- running ------------------------------------------------------------------------

    def to_tensors(self, inputs: dict) -> dict[str, torch.Tensor]:
        """The model's inputs as int64 tensors (numpy arrays or tensors in); a missing
        ``attention_mask`` is all ones, a missing ``token_type_ids`` all zeros."""
        if "input_ids" not in inputs:
            raise EngineError("missing model input 'input_ids'")
        ids = torch.as_tensor(np.asarray(inputs["input_ids"]), dtype=torch.int64)
        defaults = {"attention_mask": torch.ones_like, "token_type_ids": torch.zeros_like}
        out = {}
        for name in self.input_names:
            if name in inputs:
                out[name] = torch.as_tensor(np.asarray(inputs[name]), dtype=torch.int64)
            elif name in defaults:  # no padding / one segment
                out[name] = defaults[name](ids)
            else:
                raise EngineError(f"missing model input {name!r}")
        return out

    @torch.inference_mode()
    def logits(self, inputs: dict) -> np.ndarray:
        """The model's logits (float32 numpy) for int64 inputs ``[batch, seq]`` (or
        ``[batch, choices, seq]`` for multiple choice)."""
        return self.model(**self.to_tensors(inputs)).logits.float().numpy()

    __call__ = logits

    @torch.inference_mode()
    def prepare(self, batch: int, seq: int, choices: int = 4) -> None:
        """Measures every layer's choice for calls of ``batch x seq`` (x choices) tokens now,
        so that the first real call does not pay for it."""
        rows = batch * (choices if self.task == "multiple-choice" else 1)
        for layer in self.layers.values():
            layer.decide(rows * seq)

    def layer_info(self) -> list[LayerInfo]:
        """Each pruned layer's sparsity and choice per token bucket."""
        return [
            LayerInfo(
                name,
                (layer.out_features, layer.in_features),
                layer.sparsity,
                layer.pattern,
                {b: d.choice for b, d in sorted(layer.choices.items())},
                {b: round(d.speedup, 3) for b, d in sorted(layer.choices.items())},
            )
            for name, layer in self.layers.items()
        ]

    def summary(self, tokens: int | None = None) -> str:
        """One line: how many layers run which kernel (for one token count, else all)."""
        from recipec.runtime.engine.layers import token_bucket

        counts: dict[str, int] = {}
        for layer in self.layers.values():
            picks = layer.choices.values()
            if tokens is not None:
                d = layer.choices.get(token_bucket(tokens))
                picks = [d] if d else []
            for d in picks:
                label = d.choice if d.choice == "dense" else f"{d.choice} {self.dtype}"
                counts[label] = counts.get(label, 0) + 1
        body = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        if not body:
            n = len(self.layers)
            body = f"{n} pruned layers, decided on first call" if n else "no layers on kernels"
        return f"{body} ({self.backend})"

    def predict(self, items: Iterable, **kwargs) -> list[dict]:
        """Labels and scores for raw text; see ``recipec.runtime.engine.predict.predict``."""
        from recipec.runtime.engine.predict import predict

        return predict(self, items, **kwargs)


# --------------------------------------------------------------------------------------------
# Loading a deployment folder
# --------------------------------------------------------------------------------------------


def resolve_folder(path: str | os.PathLike) -> Path:
    """The deployment folder for ``path``: itself or ``path/onnx`` (EngineError otherwise)."""
    path = Path(path)
    if not path.exists():
        raise EngineError(f"{path}: no such file or directory")
    for folder in (path, path / "onnx"):
        if (folder / SPARSITY_FILE).is_file() and (folder / "config.json").is_file():
            if not (folder / WEIGHTS_FILE).is_file():
                raise EngineError(
                    f"{folder}: no {WEIGHTS_FILE} (exported with --no-torch-weights?); "
                    "re-export without that option to run it on the engine"
                )
            return folder
    raise EngineError(
        f"{path}: not a deployment folder (expected sparsity.json, config.json and "
        f"{WEIGHTS_FILE}, as `recipec export RUN_DIR --onnx` writes)"
    )


def _read_info(folder: Path) -> dict:
    import json

    try:
        info = json.loads((folder / SPARSITY_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise EngineError(f"{folder / SPARSITY_FILE}: cannot read: {exc}") from exc
    if not isinstance(info, dict) or "task" not in info:
        raise EngineError(f"{folder / SPARSITY_FILE}: not a recipec sparsity report")
    return info


def load(
    folder: str | os.PathLike,
    dtype: str = "fp32",
    *,
    threads: int | None = None,
    shapes: Iterable[tuple[int, int]] = (),
    verify: bool = True,
    tokenizer: bool | str = True,
    timer: Timer | None = None,
    log: Callable[[str], None] | None = None,
) -> Engine:
    """Loads a deployment folder (or a run directory holding one in ``onnx/``) on the engine.

    Args:
        folder: what ``recipec export`` wrote (with its torch weights).
        dtype: "fp32", or "int8" (int8 weights per output channel, activations per token;
            a folder with ``model.int8.safetensors``, the export of a quantization-aware run,
            gives its int8 weights and scales; otherwise the fp32 weights are quantized here).
        threads: torch's threads (process-wide ``torch.set_num_threads``); None keeps torch's.
        shapes: ``(batch, seq)`` call shapes to measure the kernels for now; other shapes are
            measured on their first call (per power-of-two token count).
        verify: compare the engine's logits with onnxruntime's on ``model.onnx`` first.
        tokenizer: load the folder's tokenizer (needed by ``predict``); "required": an
            EngineError, before anything else is loaded, when the folder has none.
        timer: the layer measurement's timer (tests).
        log: progress messages (the one line about missing fast kernels goes to stderr always).

    Raises:
        EngineError: a bad folder or dtype, or outputs that disagree with onnxruntime.
    """
    log = log or (lambda msg: None)
    if dtype not in DTYPES:
        raise EngineError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if threads is not None:
        if threads < 1:
            raise EngineError(f"threads must be positive, got {threads}")
        torch.set_num_threads(threads)
    path = resolve_folder(folder)
    info = _read_info(path)
    tok = None
    if tokenizer:
        from recipec.models import load_tokenizer

        tok = load_tokenizer(path, required=False)
        if tok is None and tokenizer == "required":
            raise EngineError(f"no tokenizer in {path}: predicting from text needs its files")
    note = kernels_note()
    if note:
        print(note, file=sys.stderr, flush=True)
    model = _load_model(path, info["task"])
    try:
        masks = load_masks(path / MASKS_FILE, model) if (path / MASKS_FILE).is_file() else None
    except CheckpointError as exc:
        raise EngineError(str(exc)) from exc
    int8_weights = None
    if dtype == "int8" and (path / INT8_FILE).is_file():
        try:
            int8_weights = read_int8(path / INT8_FILE)
        except QuantError as exc:
            raise EngineError(str(exc)) from None
        log(f"engine int8: weights from {INT8_FILE} ({len(int8_weights)} layers)")
    engine = Engine(
        model,
        masks,
        task=info["task"],
        dtype=dtype,
        input_names=info.get("inputs"),
        tokenizer=tok,
        planner=Planner(timer=timer),
        folder=path,
        int8_weights=int8_weights,
    )
    for batch, seq in shapes:
        engine.prepare(batch, seq)
        log(f"engine {dtype} b{batch} s{seq}: {engine.summary(batch * seq)}")
    if verify:
        diff = verify_against_ort(engine, path / ONNX_FILE)
        log(f"engine {dtype}: logits match onnxruntime (max |diff| {diff:.2e})")
    return engine


def _load_model(path: Path, task: str) -> nn.Module:
    """The folder's model in float32, eval mode, with recipec's one loader."""
    from recipec import models

    try:
        loaded = models.load_model(path, head=task, dtype=torch.float32, quiet=True)
    except models.ModelLoadError as err:
        cause = err.__cause__ if err.__cause__ is not None else err
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise EngineError(f"{path}: cannot load the model as {task}: {first}") from err
    if loaded.missing_keys:
        raise EngineError(
            f"{path}: {WEIGHTS_FILE} lacks {len(loaded.missing_keys)} weights "
            f"({', '.join(loaded.missing_keys[:3])}...): not what recipec export wrote"
        )
    return loaded.model.eval()


def check_inputs(engine: Engine, vocab_size: int) -> list[dict[str, np.ndarray]]:
    """Two input shapes, one padded, to compare the engine with onnxruntime."""
    rng = np.random.default_rng(7)
    samples = []
    for batch, seq, pad in ((2, 16, False), (3, 11, True)):
        shape = (batch, 2, seq) if engine.task == "multiple-choice" else (batch, seq)
        low = min(1000, vocab_size // 2)
        mask = np.ones(shape, dtype=np.int64)
        if pad:
            mask[-1, ..., seq // 2 :] = 0
        arrays = {
            "input_ids": rng.integers(low, vocab_size, size=shape, dtype=np.int64),
            "attention_mask": mask,
            "token_type_ids": np.zeros(shape, dtype=np.int64),
        }
        samples.append({n: arrays[n] for n in engine.input_names})
    return samples


def reference_dtype(engine: Engine, folder: Path | None) -> str:
    """The tolerance class of the engine's check: int8 when either the engine or the folder's
    ``model.onnx`` (a QDQ export of a quantization-aware run) computes in int8."""
    quantized = folder is not None and (folder / INT8_FILE).is_file()
    return "int8" if engine.dtype == "int8" or quantized else "fp32"


def compare(got: np.ndarray, ref: np.ndarray, dtype: str) -> tuple[float, float]:
    """``(max |got - ref|, bound)`` under the dtype's tolerance."""
    atol, rtol = tolerance(dtype)
    diff = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    bound = atol + rtol * (float(np.max(np.abs(ref))) if ref.size else 0.0)
    return diff, bound


def verify_against_ort(engine: Engine, onnx_path: Path) -> float:
    """Max |engine - onnxruntime| over the check inputs; EngineError above the tolerance."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for inputs in check_inputs(engine, int(engine.model.config.vocab_size)):
        ref = session.run(["logits"], inputs)[0]
        got = engine.logits(inputs)
        diff, bound = compare(got, ref, reference_dtype(engine, onnx_path.parent))
        if got.shape != ref.shape or not np.isfinite(diff) or diff > bound:
            raise EngineError(
                f"engine {engine.dtype} logits disagree with onnxruntime on inputs of shape "
                f"{list(ref.shape)}: max |diff| {diff:.3g} > {bound:.3g}"
            )
        worst = max(worst, diff)
    return worst

"""Export a sparse checkpoint to ONNX and verify it before calling it done.

The deployment folder holds ``model.onnx`` (dynamic batch and sequence axes), ``config.json``,
the tokenizer files, the recipe, ``sparsity.json`` (per-tensor sparsity and the ONNX
initializer holding each pruned tensor) and, unless turned off, ``model.safetensors`` plus
``masks.safetensors`` so the same folder also serves the torch-csr runtime and re-verification.

Verification, both hard errors:
(a) the zeros of every pruned tensor's ONNX initializer equal the checkpoint's zeros exactly;
(b) onnxruntime and PyTorch logits agree within ``atol`` on sample inputs of two shapes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from recipec.checkpoint import (
    MASKS_FILE,
    CheckpointError,
    SparseCheckpoint,
    load_checkpoint,
    load_masks,
    load_model,
    load_tokenizer,
    write_checkpoint,
)
from recipec.export.quantized import INT8_ATOL
from recipec.outputs import ReplaceError, check_output, share_like_umask
from recipec.sparsity.masks import sparsity_table

ONNX_FILE = "model.onnx"
SPARSITY_FILE = "sparsity.json"
SPARSITY_FORMAT = "recipec-sparsity/1"
INPUT_CANDIDATES = ("input_ids", "attention_mask", "token_type_ids")
DEFAULT_OPSET = 17
DEFAULT_ATOL = 1e-4
SAMPLE_TEXTS = (
    "the film is a charming, funny and moving portrait of a family.",
    "a dull, lifeless script that never finds its footing.",
    "sparse models can be just as accurate as dense ones.",
    "where would you keep a spare key? under the doormat.",
    "it rained all week, so the picnic moved indoors.",
    "an unremarkable sequel with one great scene.",
)


class ExportError(Exception):
    """The export could not be produced as asked (a user error)."""


class VerificationError(Exception):
    """The exported model failed verification (zeros or parity)."""


@dataclass
class ExportResult:
    """What ``export`` produced and what it verified."""

    output_dir: Path
    onnx_path: Path
    task: str
    input_names: list[str]
    tensors: dict[str, dict]
    overall_sparsity: float
    ort_max_abs_diff: float
    masks_source: str
    squashed: dict[str, int] = field(default_factory=dict)
    int8_layers: int = 0  # quantized linears (0: an FP32 export)
    structure: dict | None = None  # heads / neurons removed (recipec.export.shrink)


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def input_names_for(model: torch.nn.Module, tokenizer=None) -> list[str]:
    """The model inputs to export, in a fixed order."""
    import inspect

    accepted = set(inspect.signature(model.forward).parameters)
    names = [n for n in INPUT_CANDIDATES if n in accepted]
    if tokenizer is not None:
        produced = set(getattr(tokenizer, "model_input_names", names))
        names = [n for n in names if n == "input_ids" or n in produced]
    if "token_type_ids" in names and getattr(model.config, "type_vocab_size", 2) < 1:
        names.remove("token_type_ids")
    return names


def sample_inputs(
    config,
    task: str,
    input_names: list[str],
    batch: int,
    seq: int,
    *,
    tokenizer=None,
    choices: int = 3,
    pad_last: bool = False,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Int64 model inputs: tokenized sample text when a tokenizer is given, else random ids.

    Shapes are ``[batch, seq]``, or ``[batch, choices, seq]`` for multiple choice. With
    ``pad_last`` the last row is padded (attention mask zeros) to exercise the mask.
    """
    rows = batch * (choices if task == "multiple-choice" else 1)
    rng = np.random.default_rng(seed)
    if tokenizer is not None:
        texts = [SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)] for i in range(rows)]
        if pad_last:
            texts[-1] = "short."
        enc = tokenizer(
            texts, padding="max_length", truncation=True, max_length=seq, return_tensors="np"
        )
        arrays = {n: np.asarray(enc[n], dtype=np.int64) for n in input_names if n in enc}
    else:
        vocab = int(config.vocab_size)
        low = min(1000, vocab // 2)
        arrays = {"input_ids": rng.integers(low, vocab, size=(rows, seq), dtype=np.int64)}
        mask = np.ones((rows, seq), dtype=np.int64)
        if pad_last and seq > 2:
            mask[-1, seq // 2 :] = 0
        arrays["attention_mask"] = mask
    arrays.setdefault("attention_mask", np.ones((rows, seq), dtype=np.int64))
    arrays.setdefault("token_type_ids", np.zeros((rows, seq), dtype=np.int64))
    out = {}
    for name in input_names:
        arr = arrays[name]
        if task == "multiple-choice":
            arr = arr.reshape(batch, choices, seq)
        out[name] = np.ascontiguousarray(arr)
    return out


def torch_logits(model: torch.nn.Module, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """PyTorch logits for numpy inputs."""
    with torch.inference_mode():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    return out.logits.float().numpy()


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------


class _LogitsOnly(torch.nn.Module):
    """Positional-argument wrapper returning only the logits (what the ONNX graph outputs)."""

    def __init__(self, model: torch.nn.Module, input_names: list[str]):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)

    def forward(self, *args):
        return self.model(**dict(zip(self.input_names, args))).logits


def dynamic_axes_for(task: str, input_names: list[str]) -> dict[str, dict[int, str]]:
    """Dynamic batch (and choices) and sequence axes."""
    if task == "multiple-choice":
        axes = {0: "batch", 1: "choices", 2: "sequence"}
    else:
        axes = {0: "batch", 1: "sequence"}
    dyn = {name: dict(axes) for name in input_names}
    dyn["logits"] = {0: "batch"}
    return dyn


def export_onnx(
    model: torch.nn.Module,
    task: str,
    input_names: list[str],
    onnx_path: Path,
    opset: int = DEFAULT_OPSET,
) -> None:
    """Write ``model`` (eval mode) to ``onnx_path`` with the TorchScript-based exporter."""
    model.eval()
    # A padded row keeps the attention-mask path in the trace: with an all-ones mask
    # transformers skips building the mask and the traced graph would ignore padding.
    dummy = sample_inputs(model.config, task, input_names, batch=2, seq=16, pad_last=True, seed=1)
    args = tuple(torch.from_numpy(dummy[n]) for n in input_names)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # The exporter restores the wrapper's training flag afterwards (recursively), so the
        # wrapper must be in eval mode too or the model comes back with dropout on.
        torch.onnx.export(
            _LogitsOnly(model, input_names).eval(),
            args,
            str(onnx_path),
            dynamo=False,
            opset_version=opset,
            input_names=list(input_names),
            output_names=["logits"],
            dynamic_axes=dynamic_axes_for(task, input_names),
            do_constant_folding=True,
        )
    model.eval()


# --------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------


def _initializer_arrays(onnx_model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {init.name: numpy_helper.to_array(init) for init in onnx_model.graph.initializer}


def match_initializers(
    arrays: dict[str, np.ndarray], weights: dict[str, np.ndarray], min_equal: float = 0.9
) -> dict[str, tuple[str, bool]]:
    """Map each torch tensor to the ONNX initializer holding it: ``{name: (init, transposed)}``.

    The exporter renames and transposes MatMul weights when it folds constants, so names are
    only a hint: a tensor matches the same-shape (or transposed-shape) initializer with the most
    exactly equal values, provided at least ``min_equal`` of them are equal. Tensors that no
    initializer holds are left out of the result.
    """
    by_shape: dict[tuple, list[str]] = {}
    for name, arr in arrays.items():
        if arr.ndim == 2 and arr.dtype.kind == "f":
            by_shape.setdefault(arr.shape, []).append(name)
    rng = np.random.default_rng(0)
    mapping = {}
    for name, weight in weights.items():
        candidates = [(c, False) for c in by_shape.get(weight.shape, [])]
        if weight.shape[0] != weight.shape[1]:
            candidates += [(c, True) for c in by_shape.get(weight.shape[::-1], [])]
        else:
            candidates += [(c, True) for c in by_shape.get(weight.shape, [])]
        # Name hints first, so an exact-name initializer wins ties.
        candidates.sort(key=lambda c: not (c[0] == name or c[0].endswith("." + name)))
        idx = tuple(rng.integers(0, s, size=256) for s in weight.shape)
        probe = weight[idx]
        best, best_equal = None, -1
        for init_name, transposed in candidates:
            arr = arrays[init_name]
            view = arr.T if transposed else arr
            if np.mean(view[idx] == probe) < min_equal:
                continue
            equal = int(np.count_nonzero(view == weight))
            if equal > best_equal:
                best, best_equal = (init_name, transposed), equal
            if equal == weight.size:
                break
        if best is not None and best_equal >= min_equal * weight.size:
            mapping[name] = best
    return mapping


def verify_zeros(
    onnx_model, weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
) -> dict[str, dict]:
    """Check every pruned tensor's zeros in the ONNX initializers against the checkpoint.

    Zeros must match exactly: every position the mask prunes is 0 in ONNX, and every position
    that is nonzero in the checkpoint is nonzero in ONNX. Returns the per-tensor table
    (with ``onnx_initializer`` and ``transposed``); raises VerificationError naming each bad tensor.
    """
    if isinstance(onnx_model, str | Path):
        import onnx

        onnx_model = onnx.load(str(onnx_model))
    arrays = _initializer_arrays(onnx_model)
    np_weights = {n: w.detach().float().cpu().numpy() for n, w in weights.items()}
    mapping = match_initializers(arrays, np_weights)
    table = sparsity_table(masks)
    errors = []
    for name, mask in masks.items():
        if name not in mapping:
            errors.append(f"{name}: no ONNX initializer holds this tensor")
            continue
        init_name, transposed = mapping[name]
        arr = arrays[init_name].T if transposed else arrays[init_name]
        keep = mask.cpu().numpy()
        expected_zero = np_weights[name] == 0
        onnx_zero = arr == 0
        pruned_nonzero = ~keep & ~onnx_zero
        kept_zeroed = onnx_zero & ~expected_zero
        for bad, what in (
            (pruned_nonzero, "pruned in the checkpoint but nonzero in ONNX"),
            (kept_zeroed, "nonzero in the checkpoint but zero in ONNX"),
        ):
            count = int(bad.sum())
            if count:
                first = tuple(int(i) for i in np.argwhere(bad)[0])
                errors.append(
                    f"{name} (ONNX initializer {init_name!r}): {count} weight(s) {what}, "
                    f"first at {list(first)}"
                )
        table[name]["onnx_initializer"] = init_name
        table[name]["transposed"] = transposed
        table[name]["onnx_zeros"] = int(onnx_zero.sum())
    if errors:
        raise VerificationError("ONNX zeros do not match the masks:\n  " + "\n  ".join(errors))
    return table


def verify_parity(
    onnx_path: Path,
    model: torch.nn.Module,
    samples: list[dict[str, np.ndarray]],
    atol: float = DEFAULT_ATOL,
) -> float:
    """Max |onnxruntime - PyTorch| over the samples; raises VerificationError above ``atol``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for inputs in samples:
        ref = torch_logits(model, inputs)
        got = session.run(["logits"], inputs)[0]
        if got.shape != ref.shape:
            raise VerificationError(
                f"onnxruntime logits have shape {got.shape}, PyTorch {ref.shape}"
            )
        diff = float(np.max(np.abs(got - ref))) if ref.size else 0.0
        shape = list(next(iter(inputs.values())).shape)
        if not np.isfinite(diff) or diff > atol:
            raise VerificationError(
                f"onnxruntime and PyTorch disagree on inputs of shape {shape}: "
                f"max |diff| = {diff:.3g} > {atol:g}"
            )
        worst = max(worst, diff)
    return worst


def parity_samples(model, task, input_names, tokenizer) -> list[dict[str, np.ndarray]]:
    """Two input shapes (one padded) to exercise the dynamic axes and the attention mask."""
    return [
        sample_inputs(model.config, task, input_names, 2, 16, tokenizer=tokenizer, seed=2),
        sample_inputs(
            model.config, task, input_names, 3, 11, tokenizer=tokenizer, pad_last=True, seed=3
        ),
    ]


# --------------------------------------------------------------------------------------
# The deployment folder
# --------------------------------------------------------------------------------------


def default_output_dir(ckpt: SparseCheckpoint) -> Path:
    """``RUN_DIR/onnx`` for a run directory, else ``<model folder>-onnx`` beside it."""
    if ckpt.run_dir is not None:
        return ckpt.run_dir / "onnx"
    return ckpt.model_dir.with_name(ckpt.model_dir.name + "-onnx")


def _write_folder(
    tmp: Path,
    ckpt: SparseCheckpoint,
    tokenizer,
    info: dict,
    torch_weights: bool,
) -> None:
    recipe = ckpt.recipe_path.read_bytes().decode("utf-8") if ckpt.recipe_path else None
    write_checkpoint(ckpt.model, tmp, ckpt.masks, tokenizer, recipe, weights=torch_weights)
    (tmp / SPARSITY_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _sparsity_info(
    ckpt: SparseCheckpoint,
    opset: int,
    names: list[str],
    tensors: dict[str, dict],
    diff: float,
    atol: float,
    samples: list[dict[str, np.ndarray]],
    torch_weights: bool,
) -> dict:
    """The content of ``sparsity.json``: format, inputs, per-tensor zeros and what was verified."""
    zeros = sum(t["zeros"] for t in tensors.values())
    numel = sum(t["numel"] for t in tensors.values())
    n_params = sum(p.numel() for p in ckpt.model.parameters())
    info = {
        "format": SPARSITY_FORMAT,
        "task": ckpt.task,
        "model_type": getattr(ckpt.config, "model_type", None),
        "opset": opset,
        "inputs": names,
        "outputs": ["logits"],
        "dynamic_axes": {
            k: {str(a): v for a, v in d.items()}
            for k, d in dynamic_axes_for(ckpt.task, names).items()
        },
        "masks_source": ckpt.masks_source,
        "source": str(ckpt.model_dir.resolve()),
        "overall": {
            "masked_params": numel,
            "zeros": zeros,
            "sparsity": zeros / numel if numel else 0.0,
        },
        "model": {"params": n_params, "sparsity": zeros / n_params if n_params else 0.0},
        "tensors": tensors,
        "verification": {
            "zeros_match_masks": True,
            "ort_vs_torch_max_abs_diff": diff,
            "atol": atol,
            "sample_shapes": [list(s["input_ids"].shape) for s in samples],
        },
        "torch_weights": torch_weights,
    }
    if ckpt.squashed:
        info["squashed"] = ckpt.squashed
    return info


def export(
    path: str | Path,
    output_dir: str | Path | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    task: str = "auto",
    atol: float | None = None,
    overwrite: bool = False,
    torch_weights: bool = True,
    log=None,
    shrink: bool = True,
) -> ExportResult:
    """Export a run directory or model folder to a verified deployment folder.

    The folder is built in a temporary sibling directory and moved into place only after
    both checks pass, so a failed export never leaves a half-written or unverified folder.
    A checkpoint with ``quantization.json`` exports as INT8 QDQ (:mod:`recipec.export.quantized`):
    the zeros are checked in the int8 weights, the parity against the fake-quant model
    (``atol`` None: 1e-4 for FP32, ``INT8_ATOL`` for INT8).
    With ``shrink`` (default; FP32 exports only, an INT8 one keeps its shapes), heads and FFN
    neurons the masks remove entirely are taken out of the weights and the graph first,
    verified against the masked model (:mod:`recipec.export.shrink`).
    """
    import onnx

    log = log or (lambda msg: None)
    if not 7 <= opset <= 20:
        raise ExportError(f"opset {opset} is not supported (use 14-20; 17 is the default)")
    ckpt = load_checkpoint(path, task)
    out = _output_folder(ckpt, path, output_dir, overwrite)
    if ckpt.squashed:
        total = sum(ckpt.squashed.values())
        log(f"squashed {total} nonzero weight(s) under the masks into exact zeros")
    tokenizer = load_tokenizer(ckpt.model_dir)
    names = input_names_for(ckpt.model, tokenizer)
    quant = _load_quant(ckpt)
    if atol is None:
        atol = DEFAULT_ATOL if quant is None else INT8_ATOL
    structure = None
    if shrink and quant is None:
        from recipec.export.shrink import shrink_checkpoint

        samples = parity_samples(ckpt.model, ckpt.task, names, tokenizer)
        ckpt, structure = shrink_checkpoint(ckpt, samples, torch_logits, log)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        onnx_path = tmp / ONNX_FILE
        log(f"exporting {ckpt.task} model ({len(ckpt.masks)} masked tensors) at opset {opset}")
        if quant is None:
            export_onnx(ckpt.model, ckpt.task, names, onnx_path, opset)
            tensors = verify_zeros(onnx.load(str(onnx_path)), ckpt.weights(), ckpt.masks)
            log(f"verified zeros of {len(tensors)} tensors against the masks")
        else:
            tensors = _export_int8(ckpt, quant, names, onnx_path, opset, log)
        samples = parity_samples(ckpt.model, ckpt.task, names, tokenizer)
        diff = verify_parity(onnx_path, ckpt.model, samples, atol)
        what = "PyTorch" if quant is None else "the fake-quant PyTorch model"
        log(f"onnxruntime vs {what}: max |diff| {diff:.2e} (<= {atol:g})")
        info = _sparsity_info(ckpt, opset, names, tensors, diff, atol, samples, torch_weights)
        if quant is not None:
            info = _with_quant(info, tmp, quant)
        if structure is not None:
            info["structure"] = structure
        _write_folder(tmp, ckpt, tokenizer, info, torch_weights)
        share_like_umask(tmp)  # not mkdtemp's 0700: a deployment folder is shared
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(
        output_dir=out,
        onnx_path=out / ONNX_FILE,
        task=ckpt.task,
        input_names=names,
        tensors=tensors,
        overall_sparsity=info["overall"]["sparsity"],
        ort_max_abs_diff=diff,
        masks_source=ckpt.masks_source,
        squashed=ckpt.squashed,
        int8_layers=len(quant.layers) if quant is not None else 0,
        structure=structure,
    )


def _output_folder(
    ckpt: SparseCheckpoint, path: str | Path, output_dir: str | Path | None, overwrite: bool
) -> Path:
    """The deployment folder to write (default beside the checkpoint), checked: never the
    checkpoint's own folder, replaced only by the overwrite rule; its parent created."""
    out = Path(output_dir) if output_dir is not None else default_output_dir(ckpt)
    if out.resolve() == ckpt.model_dir.resolve():
        raise ExportError(f"{out}: the output folder cannot be the checkpoint folder")
    try:
        check_output(
            out,
            overwrite=overwrite,
            marker=SPARSITY_FILE,
            written_by="a recipec export",
            busy="pass --overwrite to replace it",
            inputs=[("the checkpoint", ckpt.model_dir), ("the source", path)],
        )
    except ReplaceError as exc:
        raise ExportError(str(exc)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _load_quant(ckpt: SparseCheckpoint):
    """The checkpoint's recorded fake quantization, installed on its model (None if none)."""
    from recipec.quant.fake import QuantError
    from recipec.quant.files import install_frozen, read_quant

    try:
        record = read_quant(ckpt.model_dir)
        return None if record is None else install_frozen(ckpt.model, record)
    except QuantError as exc:
        raise ExportError(str(exc)) from None


def _export_int8(ckpt: SparseCheckpoint, quant, names, onnx_path: Path, opset: int, log) -> dict:
    """Trace the QDQ graph, store its weights as int8, check the pruned weights are 0 there."""
    import onnx

    from recipec.export.quantized import Int8ExportError, int8_weights, verify_int8_zeros

    if opset < 13:
        raise ExportError(f"an INT8 export needs opset >= 13 (per-channel scales), not {opset}")
    quant.set_export_mode(True)
    try:
        export_onnx(ckpt.model, ckpt.task, names, onnx_path, opset)
    finally:
        quant.set_export_mode(False)
    graph = onnx.load(str(onnx_path))
    try:
        mapping = int8_weights(graph, quant)
        int8 = verify_int8_zeros(graph, mapping, ckpt.masks)
    except Int8ExportError as exc:
        raise ExportError(f"INT8 export: {exc}") from None
    except ValueError as exc:
        raise VerificationError(str(exc)) from None
    onnx.save(graph, str(onnx_path))
    tensors = sparsity_table(ckpt.masks)
    for name, entry in tensors.items():
        if name in int8:
            entry.update(
                onnx_initializer=int8[name]["int8_initializer"],
                transposed=int8[name]["transposed"],
                onnx_zeros=int8[name]["int8_zeros"],
                rounded_to_zero=int8[name].get("rounded_to_zero", 0),
            )
    log(f"INT8 QDQ: {len(mapping)} linears with int8 weights; pruned weights are 0 in all")
    return tensors


def _with_quant(info: dict, folder: Path, quant) -> dict:
    """``sparsity.json``'s ``quantization`` entry; writes the int8 weights and quantization.json."""
    from recipec.export.quantized import INT8_ATOL
    from recipec.quant.files import INT8_FILE, QUANT_FILE, SCHEMES, quant_record, write_int8

    write_int8(folder / INT8_FILE, quant)
    (folder / QUANT_FILE).write_text(json.dumps(quant_record(quant), indent=2) + "\n")
    int8_zeros = sum(t.get("onnx_zeros", 0) for t in info["tensors"].values())
    numel = info["overall"]["masked_params"]
    info["overall"]["onnx_sparsity"] = int8_zeros / numel if numel else 0.0
    info["quantization"] = {
        **SCHEMES,
        "format": "QDQ",
        "layers": len(quant.layers),
        "int8_file": INT8_FILE,
        "parity_reference": "fake-quant PyTorch model",
        "default_atol": INT8_ATOL,
    }
    return info


_SPARSITY_KEYS = {
    "task": str,
    "inputs": list,
    "tensors": dict,
    "overall": dict,
}


def read_sparsity(folder: str | Path) -> dict:
    """The folder's ``sparsity.json``, checked to be one ``export`` wrote.

    Raises:
        ExportError: The file is missing, not JSON, or lacks what the benchmark reads.
    """
    path = Path(folder) / SPARSITY_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise ExportError(f"{path}: cannot read: {exc}") from None
    redo = "export the checkpoint again (recipec export RUN_DIR --onnx --overwrite)"
    if not isinstance(info, dict):
        raise ExportError(f"{path}: not a sparsity.json written by recipec export; {redo}")
    for key, kind in _SPARSITY_KEYS.items():
        if not isinstance(info.get(key), kind):
            raise ExportError(f"{path}: {key!r} is missing or not a {kind.__name__}; {redo}")
    tensors = info["tensors"].values()
    if not all(isinstance(t, dict) and isinstance(t.get("numel"), int) for t in tensors):
        raise ExportError(f"{path}: its 'tensors' table is not one recipec export wrote; {redo}")
    if not isinstance(info["overall"].get("sparsity"), int | float):
        raise ExportError(f"{path}: 'overall.sparsity' is missing; {redo}")
    return info


def load_onnx(path: str | Path):
    """The ONNX model at ``path``; an empty, truncated or foreign file is an ExportError."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    try:
        model = onnx.load(str(path))
    except (OSError, DecodeError, ValueError, RuntimeError) as exc:
        raise ExportError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc}); export it again"
        ) from None
    if not model.graph.node:
        size = path.stat().st_size
        raise ExportError(
            f"{path}: no ONNX graph in this file ({'empty' if size == 0 else f'{size} bytes'}"
            "; truncated or not ONNX); export it again"
        )
    return model


def graph_zeros(onnx_model, info: dict) -> dict:
    """The zeros actually held by the initializers sparsity.json names, and where they differ.

    Returns:
        ``{"zeros", "numel", "sparsity", "recorded", "missing", "differ"}``: ``recorded`` is
        sparsity.json's overall sparsity, ``missing`` the tensors whose initializer is not in
        the graph, ``differ`` the tensors whose zero count differs from the recorded one.
    """
    from onnx import numpy_helper

    by_name = {init.name: init for init in onnx_model.graph.initializer}
    zeros = numel = 0
    missing, differ = [], []
    for name, t in info["tensors"].items():
        init = by_name.get(t.get("onnx_initializer"))
        if init is None:
            missing.append(name)
            continue
        arr = numpy_helper.to_array(init)
        count = int(arr.size - np.count_nonzero(arr))
        zeros, numel = zeros + count, numel + int(arr.size)
        if count != t.get("onnx_zeros", t.get("zeros")):
            differ.append(name)
    return {
        "zeros": zeros,
        "numel": numel,
        "sparsity": zeros / numel if numel else 0.0,
        "recorded": float(info["overall"].get("onnx_sparsity", info["overall"]["sparsity"])),
        "missing": missing,
        "differ": differ,
    }


def is_deployment_folder(folder: str | Path) -> bool:
    """Whether ``folder`` looks like what ``export`` writes."""
    folder = Path(folder)
    return (folder / ONNX_FILE).is_file() and (folder / SPARSITY_FILE).is_file()


def verify_deployment(folder: str | Path, atol: float | None = None) -> dict:
    """Re-run both checks on a deployment folder (needs its torch weights and masks; an INT8
    folder's zeros are checked in its int8 weights, its parity against the fake-quant model)."""

    folder = Path(folder)
    info = read_sparsity(folder)
    if not (folder / MASKS_FILE).is_file():
        raise ExportError(f"{folder}: no {MASKS_FILE} (exported with --no-torch-weights?)")
    try:
        model = load_model(folder, info["task"])
    except CheckpointError as exc:
        raise ExportError(str(exc)) from exc
    masks = load_masks(folder / MASKS_FILE, model)
    params = dict(model.named_parameters())
    graph = load_onnx(folder / ONNX_FILE)
    quant = _load_quant(SparseCheckpoint(model, folder, info["task"], masks, MASKS_FILE))
    if quant is None:
        tensors = verify_zeros(graph, {n: params[n].detach() for n in masks}, masks)
    else:
        tensors = _verify_int8_folder(graph, info, masks)
    tokenizer = load_tokenizer(folder)
    samples = parity_samples(model, info["task"], info["inputs"], tokenizer)
    atol = atol if atol is not None else (DEFAULT_ATOL if quant is None else INT8_ATOL)
    diff = verify_parity(folder / ONNX_FILE, model, samples, atol)
    return {"tensors": tensors, "ort_vs_torch_max_abs_diff": diff}


def _verify_int8_folder(graph, info: dict, masks: dict) -> dict:
    from recipec.export.quantized import verify_int8_zeros

    mapping = {
        name: (t["onnx_initializer"], bool(t.get("transposed")))
        for name, t in info["tensors"].items()
        if "onnx_initializer" in t
    }
    try:
        return verify_int8_zeros(graph, mapping, masks)
    except (ValueError, KeyError) as exc:
        raise VerificationError(str(exc)) from None

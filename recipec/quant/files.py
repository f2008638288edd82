"""The quantization files: ``quantization.json`` beside a checkpoint's weights, and the int8
weights file of a deployment folder (``model.int8.safetensors``).

``quantization.json`` (written by ``recipec apply`` in ``RUN_DIR/model`` when a stage
quantized)::

    {"format": "recipec-quant/1",
     "weights": "int8_per_channel_symmetric", "activations": "int8_per_tensor_symmetric",
     "layers": {"<weight parameter name>": {"input_scale": s, "input_range": [lo, hi]}}}

``model.int8.safetensors`` (written by ``recipec export --onnx`` for a quantized checkpoint),
for every quantized linear ``<w>`` (its weight's parameter name):

- ``<w>`` int8 ``[out, in]``: ``round(W / scale)`` in -127..127 (pruned weights are 0);
- ``<w>.scale`` float32 ``[out]``: ``max|W[o]| / 127`` (0 for a row of zeros);
- ``<w>.input_scale`` float32 ``[]``: the input's per-tensor scale (zero point 0, -128..127).

A weight dequantizes as ``<w>.float() * <w>.scale[:, None]``; metadata ``format`` is
``recipec-int8/1``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recipec.quant.fake import FakeQuant, QuantError, install, quantize_weight

QUANT_FILE = "quantization.json"
QUANT_FORMAT = "recipec-quant/1"
INT8_FILE = "model.int8.safetensors"
INT8_FORMAT = "recipec-int8/1"
SCHEMES = {"weights": "int8_per_channel_symmetric", "activations": "int8_per_tensor_symmetric"}


def quant_record(quant: FakeQuant) -> dict[str, Any]:
    """The content of ``quantization.json`` for a model's fake quantization."""
    return {
        "format": QUANT_FORMAT,
        **SCHEMES,
        "layers": {
            name: {"input_scale": float(layer.scale), "input_range": [layer.lo, layer.hi]}
            for name, layer in quant.layers.items()
        },
    }


def read_quant(folder: Path) -> dict[str, Any] | None:
    """``quantization.json`` of a model folder (None when it has none); QuantError when it
    cannot be read as this format."""
    path = Path(folder) / QUANT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QuantError(f"{path}: cannot read: {exc}") from None
    if not isinstance(record, dict) or record.get("format") != QUANT_FORMAT:
        raise QuantError(f"{path}: not a {QUANT_FORMAT} file")
    layers = record.get("layers")
    if not isinstance(layers, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("input_range"), list) for v in layers.values()
    ):
        raise QuantError(f"{path}: 'layers' must map weight names to their input_range")
    return record


def install_frozen(model: nn.Module, record: dict[str, Any]) -> FakeQuant:
    """Fake quantization as recorded (enabled, observers frozen at the recorded ranges)."""
    quant = install(model, list(record["layers"]))
    for name, entry in record["layers"].items():
        lo, hi = entry["input_range"]
        quant.layers[name].load_state_dict(
            {"enabled": True, "observing": False, "lo": lo, "hi": hi, "seen": 1}
        )
    return quant


def int8_tensors(quant: FakeQuant) -> dict[str, torch.Tensor]:
    """The tensors of ``model.int8.safetensors`` (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in quant.layers.items():
        q, scale = quantize_weight(layer.module.weight)
        out[name] = q.cpu().contiguous()
        out[f"{name}.scale"] = scale.cpu().contiguous()
        out[f"{name}.input_scale"] = layer.scale.reshape(()).contiguous()
    return out


def read_int8(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{weight name: (q int8 [out, in], scale float32 [out])}`` from ``model.int8.safetensors``
    (safetensors: no code runs); QuantError naming the file when it is not this format."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (OSError, SafetensorError, ValueError) as exc:
        raise QuantError(f"{path}: cannot read: {exc}") from None
    if meta.get("format") != INT8_FORMAT:
        raise QuantError(f"{path}: not a {INT8_FORMAT} file (format {meta.get('format')!r})")
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, q in tensors.items():
        if name.endswith((".scale", ".input_scale")):
            continue
        scale = tensors.get(f"{name}.scale")
        if (
            q.dtype != torch.int8
            or q.dim() != 2
            or scale is None
            or scale.dtype != torch.float32
            or tuple(scale.shape) != (q.shape[0],)
        ):
            raise QuantError(
                f"{path}: {name} must be int8 [out, in] with a float32 [out] {name}.scale"
            )
        out[name] = (q, scale)
    return out


def write_int8(path: Path, quant: FakeQuant) -> None:
    from safetensors.torch import save_file

    save_file(int8_tensors(quant), str(path), metadata={"format": INT8_FORMAT, **SCHEMES})

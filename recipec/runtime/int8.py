"""onnxruntime's dynamic INT8 quantization: the baseline a user picks instead of pruning.

``quantize_onnx`` is one ``onnxruntime.quantization.quantize_dynamic`` call with int8 weights
(``QuantType.QInt8``) and otherwise onnxruntime's defaults (per-tensor weight scales, activations
quantized to uint8 per tensor at run time, no pre-processing): what its documentation shows and
what "one call, no training" means. Applied to the dense twin it is "dense INT8"; applied to the
sparse model it is "sparse INT8" (onnxruntime's INT8 kernels gain nothing from zeros either).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path


@contextlib.contextmanager
def _quiet_root_logger():
    # quantize_dynamic logs "Please consider to run pre-processing" on the root logger.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_onnx(src: str | Path, dst: str | Path) -> Path:
    """Writes ``src`` dynamically quantized (int8 weights) to ``dst``; returns ``dst``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_root_logger():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return dst

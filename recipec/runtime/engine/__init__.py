"""recipec's CPU inference engine: sparse kernels for the pruned linears, torch for the rest.

    from recipec.runtime.engine import load
    engine = load("runs/quickstart/onnx", "int8")
    engine.predict(["a charming, funny film", "a dull script"])
    # [{"label": 1, "scores": [0.03, 0.97]}, {"label": 0, ...}]

- ``model``: ``load``, ``Engine`` (logits for token ids, the ONNX Runtime check);
- ``layers``: ``EngineLinear`` and the ``Planner`` that measures which kernel each layer runs;
- ``predict``: raw text to labels and scores.
"""

from recipec.runtime.engine.layers import EngineLinear, Planner, token_bucket
from recipec.runtime.engine.model import (
    DTYPES,
    FP32_TOLERANCE,
    INT8_TOLERANCE,
    Engine,
    EngineError,
    kernels_note,
    load,
    tolerance,
)

__all__ = [
    "DTYPES",
    "FP32_TOLERANCE",
    "INT8_TOLERANCE",
    "Engine",
    "EngineError",
    "EngineLinear",
    "Planner",
    "kernels_note",
    "load",
    "token_bucket",
    "tolerance",
]

"""recipec's own sparse CPU kernels (fp32/int8, unstructured/block4); see ``native``."""

from recipec.kernels.native import (
    PackedLinear,
    SparseLinearModule,
    backend,
    pack_linear,
    sparse_linear,
    unavailable_reason,
)

__all__ = [
    "PackedLinear",
    "SparseLinearModule",
    "backend",
    "pack_linear",
    "sparse_linear",
    "unavailable_reason",
]

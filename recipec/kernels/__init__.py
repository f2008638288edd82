"""recipec's own sparse CPU kernels (fp32/int8, unstructured/block4); see ``native``."""

from recipec.kernels.native import (
    PackedLinear,
    SparseLinearModule,
    backend,
    make_train_layout,
    pack_linear,
    sparse_linear,
    sparse_linear_train,
    unavailable_reason,
)

__all__ = [
    "PackedLinear",
    "SparseLinearModule",
    "backend",
    "make_train_layout",
    "pack_linear",
    "sparse_linear",
    "sparse_linear_train",
    "unavailable_reason",
]

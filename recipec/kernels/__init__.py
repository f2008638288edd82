"""Sparse CPU kernels and the layers built on them.

- ``native``: recipec's own kernels (fp32/int8, unstructured/block4, inference and training),
  built on first use, with a portable C path and a pure-torch fallback;
- ``sparseprop``: the optional ``sparseprop`` package's kernels (torch-csr runtime);
- ``sparse_backprop``: pruned linear layers swapped onto sparse kernels during training.
"""

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

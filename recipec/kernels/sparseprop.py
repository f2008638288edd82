"""SparseProp's CPU kernels (the optional ``sparseprop`` package) and an inference layer on them.

``sparseprop`` installs its compiled module under the generic top-level name ``backend``; it is
imported lazily and only recognised by the functions it must have.
"""

from __future__ import annotations

import functools
import importlib.util

import torch


class RuntimeUnavailable(Exception):
    """A runtime or kernel that cannot be used here (not installed, wrong environment)."""


@functools.lru_cache(maxsize=1)
def sparseprop_backend():
    """The ``sparseprop`` package's compiled module (top-level ``backend``), or None."""
    if importlib.util.find_spec("sparseprop") is None:
        return None
    try:
        import backend  # installed by sparseprop under this generic name
    except ImportError:
        return None
    return backend if hasattr(backend, "sparse_linear_vectorized_forward") else None


def available_kernels() -> list[str]:
    """Sparse kernels usable here: always ``csr``, plus ``sparseprop`` when installed."""
    return ["csr"] + (["sparseprop"] if sparseprop_backend() is not None else [])


_TRANSPOSE_BLOCK = 16


def transpose_2d(x: torch.Tensor) -> torch.Tensor:
    """A contiguous transpose of a 2-D float32 tensor.

    Uses sparseprop's blocked transpose when installed and both sides are multiples of 16
    (about 3x faster than ``x.t().contiguous()`` at BERT sizes), else torch.
    """
    backend = sparseprop_backend()
    rows, cols = x.shape
    if (
        backend is not None
        and rows % _TRANSPOSE_BLOCK == 0
        and cols % _TRANSPOSE_BLOCK == 0
        and x.dtype == torch.float32
        and x.is_contiguous()
    ):
        out = torch.empty(cols, rows, dtype=torch.float32)
        backend.transpose(x.numpy(), out.numpy(), _TRANSPOSE_BLOCK)
        return out
    return x.t().contiguous()


class TransposeCache:
    """Remembers the last input transposed, so Q, K and V (same input) transpose it once."""

    def __init__(self):
        self.clear()

    def clear(self, *_args) -> None:
        """Forget the cached input (called before and after every model forward)."""
        self.src: torch.Tensor | None = None
        self.version: int | None = -1
        self.dst: torch.Tensor | None = None

    def get(self, x: torch.Tensor, in_features: int) -> torch.Tensor:
        """``x`` as a contiguous ``[in_features, tokens]`` matrix."""
        try:
            version = x._version
        except RuntimeError:  # inference tensors keep no version counter: identity only
            version = None
        if self.src is x and self.version == version:
            return self.dst
        self.src, self.version = x, version
        self.dst = transpose_2d(x.reshape(-1, in_features).contiguous())
        return self.dst


class SparseLinear(torch.nn.Module):
    """Inference-only ``nn.Linear`` replacement computing ``W @ X^T`` with a sparse ``W``.

    ``csr`` uses ``torch.sparse.addmm(bias, W_csr, X^T)`` (``F.linear`` with a CSR weight is
    2-3x slower than dense); ``sparseprop`` uses that package's AVX2 CSR kernel. Both want
    ``X^T`` contiguous and return ``[out, tokens]``, so the input and output are transposed
    explicitly (a transposed *view* as output would push attention off its fused kernel and
    slow every elementwise op after it). Modules sharing a ``TransposeCache`` transpose a
    shared input once.
    """

    def __init__(
        self, linear: torch.nn.Linear, kernel: str = "csr", cache: TransposeCache | None = None
    ):
        super().__init__()
        if kernel not in ("csr", "sparseprop"):
            raise ValueError(f"unknown sparse kernel {kernel!r}")
        weight = linear.weight.detach().float()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.kernel = kernel
        self.cache = cache or TransposeCache()
        bias = linear.bias.detach().float() if linear.bias is not None else None
        bias = torch.zeros(self.out_features) if bias is None else bias
        self.register_buffer("bias_col", bias.reshape(-1, 1).contiguous())
        csr = weight.to_sparse_csr()
        self.nnz = int(csr.values().numel())
        self.sparsity = 1.0 - self.nnz / weight.numel()
        if kernel == "csr":
            self.weight_csr = csr
        else:
            self.indptr = csr.crow_indices().to(torch.int32).contiguous().numpy()
            self.indices = csr.col_indices().to(torch.int32).contiguous().numpy()
            self.values = csr.values().contiguous().numpy()
            self._backend = sparseprop_backend()
            if self._backend is None:
                raise RuntimeUnavailable("sparseprop is not installed")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xt = self.cache.get(x, self.in_features)
        if self.kernel == "csr":
            out = torch.sparse.addmm(self.bias_col, self.weight_csr, xt)
        else:
            # The kernel accumulates into ``out``: start from the bias (always a fresh copy).
            out = self.bias_col.expand(self.out_features, xt.shape[1]).clone(
                memory_format=torch.contiguous_format
            )
            self._backend.sparse_linear_vectorized_forward(
                xt.numpy(), self.indptr, self.indices, self.values, out.numpy()
            )
        return transpose_2d(out).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"kernel={self.kernel}, sparsity={self.sparsity:.3f}"
        )

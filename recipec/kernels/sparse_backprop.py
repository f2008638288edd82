"""Sparse training on CPU: pruned ``nn.Linear`` layers run forward and backward on SparseProp's
AVX2 CSR kernels between mask changes.

Between two pruning steps (and after the last one, or through a sparse-transfer stage under a
``constant`` modifier) the masks are fixed, and training only ever multiplies by the surviving
weights. :class:`SparseBackprop` then swaps the forward of every pruned linear layer whose
sparsity reaches ``min_sparsity`` for :class:`MaskedSparseLinear`, which computes

- forward ``y = x W^T + b`` from the weight's values at the mask's nonzeros,
- backward ``dL/dx = dL/dy W`` and ``dL/dW`` *at the mask's nonzeros only* (the rest is the
  exact zero that the mask would have written into the gradient anyway),

with the ``sparseprop`` package's kernels (Nikdan et al., ICML 2023). The parameter stays the
model's dense ``weight`` tensor: the optimizer, its state, checkpoints, distillation and
the exported model see nothing different, and the results equal the dense path's up to float
rounding (tests/unit/kernels/test_sparse_backprop.py). Only the module instance's ``forward``
attribute is replaced, so ``state_dict`` keys do not change; :meth:`SparseBackprop.remove`
restores it. The training loop removes the kernels before every step that may change masks
(so pruners, and oBERT's gradient collection, see the dense layers), rebuilds them after it,
and removes them before the stage's finalize and whenever the stage ends.

Not used: on CUDA, in distributed runs, or in stages with a ``cram`` modifier (it perturbs
the weights densely). ``benchmarks/sparse_backprop.py`` measures the step-time gain.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from recipec import distributed as dist_utils
from recipec.kernels.sparseprop import sparseprop_backend
from recipec.kernels.sparseprop import transpose_2d as _transpose

INSTALL_HINT = "pip install pybind11 && pip install --no-build-isolation sparseprop"
# Measured on this project's CPU (benchmarks/sparse_backprop.py): a whole MiniLM training step
# is 0.92x at 80% zeros, 1.12x at 90%, 1.35x at 95%, 1.62x at 97% on these kernels.
DEFAULT_MIN_SPARSITY = 0.9


class SparseBackpropError(RuntimeError):
    """Sparse backprop asked for where it cannot run (kernel missing, wrong device)."""


def backend():
    """SparseProp's compiled module, or None when the package is not installed."""
    return sparseprop_backend()


def require_backend():
    found = backend()
    if found is None:
        raise SparseBackpropError(
            f"--sparse-backprop needs the sparseprop package ({INSTALL_HINT})"
        )
    return found


@dataclass(frozen=True)
class Layout:
    """The CSR pattern of one mask: row pointers and column indices (int32, for the kernel)
    and the flat positions of the nonzeros in the dense weight (to gather values, scatter grads)."""

    shape: tuple[int, int]
    indptr: torch.Tensor
    indices: torch.Tensor
    flat: torch.Tensor

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> Layout:
        mask = mask.detach().to(device="cpu", dtype=torch.bool)
        rows, cols = mask.shape
        flat = mask.reshape(-1).nonzero().reshape(-1)  # row-major: CSR order
        counts = mask.sum(dim=1, dtype=torch.int64)
        indptr = torch.zeros(rows + 1, dtype=torch.int64)
        indptr[1:] = torch.cumsum(counts, 0)
        return cls(
            (rows, cols),
            indptr.to(torch.int32).contiguous(),
            (flat % cols).to(torch.int32).contiguous(),
            flat,
        )

    @property
    def nnz(self) -> int:
        return int(self.flat.numel())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self.shape[0] * self.shape[1])


class MaskedSparseLinear(torch.autograd.Function):
    """``F.linear(x, weight * mask, bias)`` on SparseProp's CSR kernels; the weight gradient is
    dense in shape and zero off the mask."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layout: Layout
    ):
        kernels = require_backend()
        rows, cols = layout.shape
        lead = x.shape[:-1]
        xt = _transpose(x.detach().reshape(-1, cols).contiguous())  # [in, tokens]
        values = weight.detach().reshape(-1)[layout.flat].contiguous()
        out = torch.zeros(rows, xt.shape[1], dtype=torch.float32)  # the kernel accumulates into it
        kernels.sparse_linear_vectorized_forward(
            xt.numpy(), layout.indptr.numpy(), layout.indices.numpy(), values.numpy(), out.numpy()
        )
        y = _transpose(out)
        if bias is not None:
            y += bias.detach()
        ctx.save_for_backward(xt, values)
        ctx.layout = layout
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        return y.reshape(*lead, rows)

    @staticmethod
    @once_differentiable  # its backward is not itself differentiable: double backward raises
    def backward(ctx, grad_out: torch.Tensor):
        xt, values = ctx.saved_tensors
        layout: Layout = ctx.layout
        rows, cols = layout.shape
        go = grad_out.reshape(-1, rows).contiguous().float()
        got = _transpose(go)  # [out, tokens]
        # float32 throughout: the kernel takes float arrays and would write into a converted copy
        grad_xt = torch.zeros(
            cols, got.shape[1], dtype=torch.float32
        )  # accumulated into by the kernel
        grad_values = torch.zeros(layout.nnz, dtype=torch.float32)
        require_backend().sparse_linear_vectorized_backward(
            xt.numpy(),
            layout.indptr.numpy(),
            layout.indices.numpy(),
            values.numpy(),
            got.numpy(),
            grad_xt.numpy(),
            grad_values.numpy(),
        )
        grad_x = _transpose(grad_xt).reshape(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (
                torch.zeros(rows * cols, dtype=torch.float32)
                .index_copy_(0, layout.flat, grad_values)
                .reshape(rows, cols)
            )
        grad_b = go.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def _sparse_forward(module: nn.Linear, layout: Layout, x: torch.Tensor) -> torch.Tensor:
    usable = (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and module.weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
    )
    if not usable:  # e.g. a caller moved the model or autocasts: the dense layer is always right
        return F.linear(x, module.weight, module.bias)
    return MaskedSparseLinear.apply(x, module.weight, module.bias, layout)


class SparseBackprop:
    """Swaps the forward of pruned linear layers for :class:`MaskedSparseLinear`.

    ``masks`` maps weight names (``...dense.weight``) to boolean masks (True = keep), as
    :class:`recipec.modifiers.base.MaskState` holds them; ``version`` is its change counter.
    :meth:`refresh` (re)builds the layouts when the masks changed since the last call, and
    uses the sparse kernel for each linear layer at ``min_sparsity`` or more; :meth:`remove`
    puts every layer back. A dense ``nn.Linear`` whose weight has a mask is the only kind of
    layer touched; anything else named in the masks keeps its dense path. The model must be on
    the CPU, in a single process (:class:`SparseBackpropError` otherwise).
    """

    def __init__(self, model: nn.Module, min_sparsity: float = DEFAULT_MIN_SPARSITY):
        if not 0.0 <= min_sparsity <= 1.0:
            raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
        require_backend()
        if {p.device.type for p in model.parameters()} != {"cpu"} or dist_utils.world_size() > 1:
            raise SparseBackpropError(
                "sparse backprop runs SparseProp's CPU kernels: a model on the CPU in a single "
                "process (not --device cuda, not torchrun)"
            )
        self.model = model
        self.min_sparsity = min_sparsity
        self._patched: dict[str, nn.Linear] = {}
        self._version: int | None = None

    @property
    def layers(self) -> dict[str, float]:
        """The layers on the kernels now: weight name -> sparsity of its mask."""
        return {
            name: module.__dict__[_LAYOUT_ATTR].sparsity for name, module in self._patched.items()
        }

    def _linear_of(self, weight_name: str) -> nn.Linear | None:
        owner, _, attr = weight_name.rpartition(".")
        if attr != "weight":
            return None
        try:
            module = self.model.get_submodule(owner)
        except AttributeError:
            return None
        return module if type(module) is nn.Linear else None

    def refresh(self, masks: Mapping[str, torch.Tensor], version: Any) -> bool:
        """Use the sparse kernels for the masks as they are now (a no-op while ``version`` is the
        one last seen); True when it (re)built the layers."""
        if version == self._version:
            return False
        self.remove()
        self._version = version
        for name, mask in masks.items():
            module = self._linear_of(name)
            if module is None or mask.shape != module.weight.shape or "forward" in module.__dict__:
                continue  # not a plain linear layer, or someone else's forward hook is installed
            layout = Layout.from_mask(mask)
            if layout.sparsity < self.min_sparsity:
                continue
            module.__dict__[_LAYOUT_ATTR] = layout
            # a method bound to the module: a deepcopy of the model rebinds it to the copy
            module.forward = types.MethodType(_sparse_method, module)
            self._patched[name] = module
        return True

    def remove(self) -> None:
        """Every patched layer back to its dense forward (the next :meth:`refresh` rebuilds)."""
        for module in self._patched.values():
            module.__dict__.pop("forward", None)
            module.__dict__.pop(_LAYOUT_ATTR, None)
        self._patched = {}
        self._version = None

    @property
    def active(self) -> bool:
        return bool(self._patched)

    def describe(self, total: int) -> str:
        """One line for the log: how many of ``total`` pruned tensors run sparse."""
        spars = list(self.layers.values())
        if not spars:
            return f"sparse backprop: none of the {total} pruned tensors is a linear layer at >= {100 * self.min_sparsity:.0f}% zeros; dense kernels"
        return (
            f"sparse backprop: {len(spars)} of {total} pruned tensors on SparseProp kernels "
            f"({100 * min(spars):.1f}-{100 * max(spars):.1f}% zeros)"
        )


_LAYOUT_ATTR = "_recipec_sparse_layout"


def _sparse_method(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _sparse_forward(self, self.__dict__[_LAYOUT_ATTR], x)

"""Sparse training on CPU: pruned ``nn.Linear`` layers run forward and backward on recipec's own
sparse kernels (:mod:`recipec.kernels.native`) between mask changes.

Between two pruning steps (and after the last one, or through a sparse-transfer stage under a
``constant`` modifier) the masks are fixed, and training only ever multiplies by the surviving
weights. :class:`SparseBackprop` then swaps the forward of every pruned linear layer whose
sparsity reaches ``min_sparsity`` for :class:`MaskedSparseLinear`, which computes

- forward ``y = x W^T + b`` from the weight's values at the mask's nonzeros,
- backward ``dL/dx = dL/dy W`` (the forward kernel on the mask's transposed CSR) and ``dL/dW``
  *at the mask's nonzeros only* (the rest is the exact zero that the mask would have written
  into the gradient anyway),

with ``native.sparse_linear_train`` on the layout ``native.make_train_layout`` builds once per
mask. The kernels are compiled on first use (``recipec apply`` starts that build); where they
cannot be built, or the CPU has no AVX2+FMA, the layers run a pure-torch fallback with the same
results and dense speed, and :func:`slow_reason` says why (one line in the log).

The parameter stays the model's dense ``weight`` tensor: the optimizer, its state,
checkpoints, distillation and the exported model see nothing different, and the results equal
the dense path's up to float rounding (tests/unit/kernels/test_sparse_backprop.py). Only the module
instance's ``forward`` attribute is replaced, so ``state_dict`` keys do not change;
:meth:`SparseBackprop.remove` restores it. The training loop removes the kernels before every
step that may change masks (so pruners, and oBERT's gradient collection, see the dense
layers), rebuilds them after it, and removes them before the stage's finalize and whenever the
stage ends.

Not used: on CUDA, in distributed runs, or in stages with a ``cram`` modifier (it perturbs
the weights densely). ``benchmarks/sparse_backprop.py`` measures the step-time gain.
"""

from __future__ import annotations

import os
import threading
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from recipec import distributed as dist_utils
from recipec.kernels import native

# Measured on this project's CPU (benchmarks/sparse_backprop.py --threads 1 --clock cpu,
# benchmarks/results/sparse_backprop.md): one MiniLM layer's forward + backward at 2,048 tokens
# is 0.89-1.07x dense at 50% zeros, 1.08-1.29x at 60%, 1.47-1.72x at 70%, 3.6-4.3x at 90%; a
# whole training step 1.24x at 70%, 1.61x at 80%, 2.02x at 90%. 70% keeps a margin over the
# crossover (~55%) for thread counts and token counts not measured.
DEFAULT_MIN_SPARSITY = 0.7
FAST_BACKEND = "avx2"  # the only path faster than dense kernels (portable C: 0.6x at 90%)


class SparseBackpropError(RuntimeError):
    """Sparse backprop asked for where it cannot run (a model off the CPU, several processes)."""


def backend() -> str:
    """The path the layers take: "avx2" (recipec's compiled kernels) or "torch-fallback".

    Builds the kernels on first use (once per machine, ~10 s). Where the compiled path is not
    AVX2 (a CPU without it, ``RECIPEC_KERNELS=portable-c``) the fallback is used: the portable
    C path is slower than dense kernels at every sparsity below ~95%.
    """
    return FAST_BACKEND if native.backend() == FAST_BACKEND else "torch-fallback"


def slow_reason() -> str | None:
    """Why sparse backprop will not be faster than dense kernels here, or None when it will."""
    if backend() == FAST_BACKEND:
        return None
    why = native.unavailable_reason() or f"recipec's kernels run {native.backend()!r} here"
    return (
        f"sparse backprop will not be faster here: {why}; the pruned layers run the pure-torch "
        "fallback (same results, dense speed)"
    )


def start_build() -> threading.Thread | None:
    """Builds recipec's kernels in a background thread if they are not built yet (a no-op once
    they are, and under ``RECIPEC_KERNELS=torch``), so that ``recipec apply`` leaves them built
    for ``--sparse-backprop`` and the kernel benchmarks while it trains. The thread is not a
    daemon: a process that ends first waits for the build rather than leave it half done.
    Where nothing can be built, ``native.prebuild`` says why in one line, on the first run."""
    if os.environ.get("RECIPEC_KERNELS", "").strip().lower() in ("torch", "torch-fallback"):
        return None
    thread = threading.Thread(target=native.prebuild, name="recipec-kernels-build")
    thread.start()
    return thread


@dataclass(frozen=True, eq=False)
class Layout:
    """The fixed pattern of one mask, as the kernels take it (``native.TrainLayout``: CSR by
    output row, its transpose for dX, and the flat positions of the nonzeros in the weight)."""

    train: native.TrainLayout

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> Layout:
        return cls(native.make_train_layout(mask))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.train.out_features, self.train.in_features)

    @property
    def indptr(self) -> torch.Tensor:
        """CSR row pointers (int32)."""
        return self.train.row_ptr

    @property
    def indices(self) -> torch.Tensor:
        """CSR column indices (int32; the kernels keep them as int16 where they fit)."""
        return self.train.col.to(torch.int32)

    @property
    def flat(self) -> torch.Tensor:
        """Positions of the nonzeros in ``weight.view(-1)``, row-major (CSR order)."""
        return self.train.flat

    @property
    def nnz(self) -> int:
        return self.train.nnz

    @property
    def sparsity(self) -> float:
        rows, cols = self.shape
        return 1.0 - self.nnz / (rows * cols)


class MaskedSparseLinear(torch.autograd.Function):
    """``F.linear(x, weight * mask, bias)`` on recipec's sparse kernels; the weight gradient is
    dense in shape and zero off the mask.

    ``native.sparse_linear_train`` runs inside, on detached inputs: its graph is kept from the
    forward to this function's backward, which takes its gradients (no recomputation). This
    wrapper adds the kernel path chosen once (:func:`backend`) and a refused double backward."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        layout: Layout,
        grad: bool = True,
    ):
        # ``grad``: whether the caller records a graph (``needs_input_grad`` says True for a
        # parameter even under ``no_grad``); an evaluation keeps no activations.
        wants = ctx.needs_input_grad[:3] if grad else (False, False, False)
        with torch.enable_grad():
            inner = [
                None if t is None else t.detach().requires_grad_(want)
                for t, want in zip((x, weight, bias), wants)
            ]
            y = native.sparse_linear_train(*inner, layout.train, backend=backend())
        ctx.inner = (y, inner) if y.requires_grad else None
        return y.detach()

    @staticmethod
    @once_differentiable  # its backward is not itself differentiable: double backward raises
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.inner is None:  # its activations were freed by the first backward
            raise RuntimeError(
                "Trying to backward through a sparse backprop layer a second time: its saved "
                "activations were freed (sparse backprop does not keep them for retain_graph)"
            )
        y, inner = ctx.inner
        ctx.inner = None  # the activations it holds are freed now, not with the graph
        wanted = [t for t in inner if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, grad_out))
        out = [next(grads) if t is not None and t.requires_grad else None for t in inner]
        return (*out, None, None)


def _sparse_forward(module: nn.Linear, layout: Layout, x: torch.Tensor) -> torch.Tensor:
    usable = (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and module.weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
    )
    if not usable:  # e.g. a caller moved the model or autocasts: the dense layer is always right
        return F.linear(x, module.weight, module.bias)
    return MaskedSparseLinear.apply(x, module.weight, module.bias, layout, torch.is_grad_enabled())


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
        if {p.device.type for p in model.parameters()} != {"cpu"} or dist_utils.world_size() > 1:
            raise SparseBackpropError(
                "sparse backprop runs recipec's CPU kernels: a model on the CPU in a single "
                "process (not --device cuda, not torchrun)"
            )
        self.backend = backend()  # builds the kernels here if they are not built yet
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
        """One line for the log: how many of ``total`` pruned tensors run sparse, and on what."""
        spars = list(self.layers.values())
        if not spars:
            return (
                f"sparse backprop: none of the {total} pruned tensors is a linear layer at "
                f">= {100 * self.min_sparsity:.0f}% zeros; dense kernels"
            )
        where = (
            "recipec's sparse kernels"
            if self.backend == FAST_BACKEND
            else "the pure-torch fallback (not faster)"
        )
        return (
            f"sparse backprop: {len(spars)} of {total} pruned tensors on {where} "
            f"({100 * min(spars):.1f}-{100 * max(spars):.1f}% zeros)"
        )


_LAYOUT_ATTR = "_recipec_sparse_layout"


def _sparse_method(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _sparse_forward(self, self.__dict__[_LAYOUT_ATTR], x)

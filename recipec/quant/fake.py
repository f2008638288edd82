"""Fake quantization of linear layers: int8 weights per output channel, int8 inputs per tensor.

The scheme (the one the INT8 ONNX export and the int8 weights file write, see
docs/export_and_bench.md):

- weights: symmetric per output channel, ``scale[o] = max|W[o, :]| / 127``,
  ``q = clamp(round_half_even(W / scale[o]), -127, 127)`` as int8, dequantized ``q * scale[o]``
  (a row of zeros has scale 0 and stays zero). A pruned weight (exact 0) quantizes to exactly 0.
- inputs (activations): symmetric per tensor, ``scale = max(|lo|, |hi|) / 127`` from the
  observed range ``[lo, hi]`` of the layer's inputs, ``q = clamp(round_half_even(x / scale),
  -128, 127)`` (ONNX ``QuantizeLinear`` int8 with zero point 0), dequantized ``q * scale``.

Training uses the straight-through estimator: the forward sees the quantize-dequantized
values, the backward passes the gradient through unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_QMAX = 127
ACT_QMIN, ACT_QMAX = -128, 127
ATTRIBUTE = "_recipec_quant"  # where a model keeps its FakeQuant (see :func:`quant_of`)


class QuantError(ValueError):
    """Targets that cannot be quantized (not the weight of an ``nn.Linear``)."""


def weight_scales(weight: torch.Tensor) -> torch.Tensor:
    """``max|W[o, :]| / 127`` per output channel (float32)."""
    return weight.detach().float().abs().amax(dim=1) / WEIGHT_QMAX


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 [out, in], scale float32 [out])`` of the per-channel symmetric scheme."""
    scale = weight_scales(weight)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(weight.detach().float() / safe[:, None]).clamp_(-WEIGHT_QMAX, WEIGHT_QMAX)
    return q.to(torch.int8), scale


def fake_quant_weight(weight: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize ``weight`` per output channel, straight-through gradient."""
    q, scale = quantize_weight(weight)
    dequant = (q.float() * scale[:, None]).to(weight.dtype)
    return dequant + (weight - weight.detach())  # exactly ``dequant`` forward, identity backward


def act_scale(lo: float, hi: float) -> torch.Tensor:
    """The per-tensor input scale of an observed range (float32 scalar; 1.0 for an all-zero range)."""
    amax = max(abs(lo), abs(hi))
    return torch.tensor(amax / WEIGHT_QMAX if amax > 0 else 1.0, dtype=torch.float32)


def fake_quant_act(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize ``x`` per tensor (int8, zero point 0), straight-through gradient."""
    s = scale.to(x.device)
    q = torch.round(x.detach().float() / s).clamp_(ACT_QMIN, ACT_QMAX)
    return (q * s).to(x.dtype) + (x - x.detach())  # exactly the dequantized values forward


class QuantLinear:
    """One quantized ``nn.Linear``: its input observer and its fake-quant forward.

    Installed by replacing the module's ``forward`` (an instance attribute), so parameter names,
    the optimizer and the masks see the same ``weight`` tensor as before.
    """

    def __init__(self, name: str, module: nn.Linear):
        self.name = name  # the weight's parameter name
        self.module = module
        self.enabled = False
        self.observing = True
        self.lo = 0.0
        self.hi = 0.0
        self.seen = 0  # forward passes observed
        self.export_mode = False  # trace torch's fake-quant ops (exported as QDQ)
        module.forward = self.forward

    def remove(self) -> None:
        if "forward" in self.module.__dict__:
            del self.module.forward

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = float(x.detach().amin()), float(x.detach().amax())
        self.lo, self.hi = (lo, hi) if self.seen == 0 else (min(self.lo, lo), max(self.hi, hi))
        self.seen += 1

    @property
    def scale(self) -> torch.Tensor:
        return act_scale(self.lo, self.hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module
        if not self.enabled:
            return F.linear(x, module.weight, module.bias)
        if self.export_mode:
            return self._export_forward(x)
        if self.observing and x.numel():
            self.observe(x)
        return F.linear(
            fake_quant_act(x, self.scale), fake_quant_weight(module.weight), module.bias
        )

    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same function through torch's fake-quant ops, which the TorchScript exporter
        writes as ``QuantizeLinear``/``DequantizeLinear`` pairs (int8 range -128..127: the
        weights' ``round(W / scale)`` never leaves -127..127)."""
        module = self.module
        xq = torch.fake_quantize_per_tensor_affine(x, float(self.scale), 0, ACT_QMIN, ACT_QMAX)
        scale = weight_scales(module.weight)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.zeros_like(scale, dtype=torch.int32)
        wq = torch.fake_quantize_per_channel_affine(module.weight, safe, zero, 0, -128, 127)
        return F.linear(xq, wq, module.bias)

    def state_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "observing": self.observing,
            "lo": self.lo,
            "hi": self.hi,
            "seen": self.seen,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.enabled = bool(state["enabled"])
        self.observing = bool(state["observing"])
        self.lo, self.hi = float(state["lo"]), float(state["hi"])
        self.seen = int(state["seen"])


class FakeQuant:
    """The quantized linears of a model (kept on the model: see :func:`quant_of`)."""

    def __init__(self, model: nn.Module, weight_names: list[str]):
        self.layers: dict[str, QuantLinear] = {}
        for name in weight_names:
            self.layers[name] = QuantLinear(name, linear_of(model, name))
        setattr(model, ATTRIBUTE, self)

    def enable(self) -> None:
        for layer in self.layers.values():
            layer.enabled = True

    def freeze(self) -> None:
        """Stop observing: the input scales stay what they are now."""
        for layer in self.layers.values():
            layer.observing = False

    @property
    def frozen(self) -> bool:
        return all(not layer.observing for layer in self.layers.values())

    def set_export_mode(self, on: bool) -> None:
        for layer in self.layers.values():
            layer.export_mode = on

    def remove(self, model: nn.Module) -> None:
        for layer in self.layers.values():
            layer.remove()
        if getattr(model, ATTRIBUTE, None) is self:
            delattr(model, ATTRIBUTE)

    def state_dict(self) -> dict[str, Any]:
        return {name: layer.state_dict() for name, layer in self.layers.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state) != set(self.layers):
            raise QuantError(
                "saved quantization state is for other layers: "
                f"{sorted(set(state) ^ set(self.layers))[:3]}"
            )
        for name, layer_state in state.items():
            self.layers[name].load_state_dict(layer_state)


def linear_of(model: nn.Module, weight_name: str) -> nn.Linear:
    """The ``nn.Linear`` whose weight is ``weight_name``; QuantError for anything else."""
    module_name, _, leaf = weight_name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    if leaf != "weight" or not isinstance(module, nn.Linear):
        raise QuantError(
            f"{weight_name} is not the weight of an nn.Linear: quantize targets must be "
            "linear layers' weights"
        )
    return module


def quant_of(model: nn.Module) -> FakeQuant | None:
    """The model's installed fake quantization, or None."""
    return getattr(model, ATTRIBUTE, None)


def install(model: nn.Module, weight_names: list[str]) -> FakeQuant:
    """Install (or replace) fake quantization of the given linear weights, disabled until
    :meth:`FakeQuant.enable`."""
    old = quant_of(model)
    if old is not None:
        old.remove(model)
    return FakeQuant(model, weight_names)

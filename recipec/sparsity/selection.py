"""Which parameters a recipe prunes, and what each model component costs.

Targets and excludes are regular expressions matched with ``re.search`` against the full
names of ``model.named_parameters()``. The defaults select the encoder's linear weights only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn


class SelectionError(ValueError):
    """Targets that match nothing, or that match parameters that cannot be pruned."""


def select_parameters(
    model: nn.Module, targets: Sequence[str], exclude: Sequence[str] = ()
) -> dict[str, nn.Parameter]:
    """Parameters whose names match any target and no exclude, in model order."""
    target_res = [re.compile(t) for t in targets]
    exclude_res = [re.compile(e) for e in exclude]
    selected = {
        name: param
        for name, param in model.named_parameters()
        if any(r.search(name) for r in target_res) and not any(r.search(name) for r in exclude_res)
    }
    return selected


def require_parameters(
    model: nn.Module, targets: Sequence[str], exclude: Sequence[str] = (), *, what: str = "recipe"
) -> dict[str, nn.Parameter]:
    """Like :func:`select_parameters`, but a selection that matches nothing is an error."""
    selected = select_parameters(model, targets, exclude)
    if not selected:
        sample = ", ".join(name for name, _ in list(model.named_parameters())[:6])
        raise SelectionError(
            f"the {what}'s targets match no parameter of {type(model).__name__} "
            f"(targets: {list(targets)}; exclude: {list(exclude)}). Parameter names look like: {sample}, ..."
        )
    for name, param in selected.items():
        if param.dim() < 2:
            # Biases and LayerNorm vectors: pruning them saves nothing and harms accuracy.
            raise SelectionError(
                f"target {name!r} is a {param.dim()}-D tensor (bias or norm); only weight matrices can be pruned. "
                "Add it to 'exclude' or narrow 'targets'."
            )
    return selected


_COMPONENTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("embeddings", re.compile(r"embeddings")),
    ("layernorm", re.compile(r"LayerNorm|layer_norm|_layernorm|\.ln")),
    ("attention.qkv", re.compile(r"(self\.(query|key|value)|\.(q_lin|k_lin|v_lin))\.")),
    ("attention.output", re.compile(r"(attention\.output\.dense|out_lin)\.")),
    ("ffn.in", re.compile(r"(intermediate\.dense|ffn\.lin1)\.")),
    ("ffn.out", re.compile(r"(layer\.\d+\.output\.dense|ffn\.lin2)\.")),
    ("pooler", re.compile(r"pooler")),
    ("head", re.compile(r"classifier|pre_classifier|qa_outputs|lm_head|score")),
)


def component_of(name: str) -> str:
    """The component a parameter belongs to (embeddings, attention.qkv, ffn.in, head, ...)."""
    for component, pattern in _COMPONENTS:
        if pattern.search(name):
            return component
    return "other"


@dataclass(frozen=True)
class ComponentCost:
    component: str
    params: int
    flops: float  # multiply-adds x 2 per sequence at the given length
    pruned_params: int

    def row(self, total_params: int, total_flops: float) -> tuple[str, int, float, float, int]:
        return (
            self.component,
            self.params,
            100.0 * self.params / max(total_params, 1),
            100.0 * self.flops / max(total_flops, 1.0),
            self.pruned_params,
        )


def cost_table(model: nn.Module, seq_len: int, targets: Iterable[str] = ()) -> list[ComponentCost]:
    """Share of parameters and of inference FLOPs per component at ``seq_len`` tokens.

    Linear layers of the encoder run on every token (2*L*in*out FLOPs); the pooler and the
    classification head run on one token; embeddings are lookups (no matmul FLOPs); attention
    scores and the weighted sum cost 4*L^2*hidden per layer with no parameters.
    """
    targets = set(targets)
    params: dict[str, int] = {}
    flops: dict[str, float] = {}
    pruned: dict[str, int] = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            weight_name = names.get(id(module.weight), f"{module_name}.weight")
            component = component_of(weight_name)
            tokens = 1 if component in ("pooler", "head") else seq_len
            flops[component] = (
                flops.get(component, 0.0) + 2.0 * tokens * module.in_features * module.out_features
            )
    for name, param in model.named_parameters():
        component = component_of(name)
        params[component] = params.get(component, 0) + param.numel()
        if name in targets:
            pruned[component] = pruned.get(component, 0) + param.numel()
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", None)
    if layers and hidden:
        flops["attention.scores"] = 4.0 * layers * seq_len * seq_len * hidden
        params.setdefault("attention.scores", 0)
    order = [c for c, _ in _COMPONENTS[:1]] + [
        "attention.qkv",
        "attention.scores",
        "attention.output",
        "ffn.in",
        "ffn.out",
        "layernorm",
        "pooler",
        "head",
        "other",
    ]
    return [
        ComponentCost(c, params.get(c, 0), flops.get(c, 0.0), pruned.get(c, 0))
        for c in order
        if c in params or c in flops
    ]

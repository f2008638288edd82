"""Where an engine call's time goes: sparse kernels, dense linears, attention, the rest.

Forward hooks time every module of interest with a clock (thread CPU time by default, so
that on one thread a busy machine does not count); a module's own time excludes the time of
the timed modules inside it. Groups: ``kernels`` (EngineLinear running a sparse form),
``dense linear`` (EngineLinear kept dense, other nn.Linear), ``attention`` (the self-attention
module without its Q/K/V linears: SDPA, reshapes), ``gelu`` (the intermediate/FFN activation
module without its linear), ``layer norm``, ``embeddings``, and ``other`` (the rest of the
forward: residual adds, masks, Python). Per kernel shape, the achieved GFLOP/s of the useful
(nonzero) multiply-adds is reported next to its FLOP limit.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from recipec.runtime.engine.layers import EngineLinear, token_bucket


def _group(module: nn.Module) -> str | None:
    name = type(module).__name__
    if isinstance(module, EngineLinear) or isinstance(module, nn.Linear):
        return "linear"
    if name.endswith("SelfAttention") or name in ("MultiHeadSelfAttention",):
        return "attention"
    if name.endswith("Intermediate") or isinstance(module, nn.GELU):
        return "gelu"
    if isinstance(module, nn.LayerNorm):
        return "layer norm"
    if name.endswith("Embeddings"):
        return "embeddings"
    return None


def profile(
    engine, inputs: dict, rounds: int = 5, clock: Callable[[], float] = time.thread_time
) -> dict:
    """Median-free totals over ``rounds`` calls (after one warm-up), per call, in ms."""
    model = engine.model
    stack: list[list] = []  # [module, start, child_time]
    totals: dict[str, float] = {}
    per_layer: dict[str, float] = {}
    names = {m: n for n, m in model.named_modules()}
    handles = []

    def pre(module, args):
        stack.append([module, clock(), 0.0])

    def post(module, args, output):
        mod, start, child = stack.pop()
        spent = clock() - start
        own = spent - child
        if stack:
            stack[-1][2] += spent
        group = _group(mod)
        if isinstance(mod, EngineLinear):
            x = args[0]
            choice = mod.decide(x.numel() // mod.in_features).choice
            group = "kernels" if choice != "dense" else "dense linear"
            per_layer[names[mod]] = per_layer.get(names[mod], 0.0) + own
        elif group == "linear":
            group = "dense linear"
        totals[group] = totals.get(group, 0.0) + own

    for module in model.modules():
        if _group(module) is not None:
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
    try:
        engine.logits(inputs)  # warm-up (and any pending measurement)
        totals.clear()
        per_layer.clear()
        whole = 0.0
        for _ in range(rounds):
            start = clock()
            engine.logits(inputs)
            whole += clock() - start
    finally:
        for h in handles:
            h.remove()
    ms = {k: v / rounds * 1e3 for k, v in totals.items()}
    ms["other"] = whole / rounds * 1e3 - sum(ms.values())
    tokens = int(next(iter(inputs.values())).size)
    return {
        "total_ms": whole / rounds * 1e3,
        "groups_ms": dict(sorted(ms.items(), key=lambda kv: -kv[1])),
        "kernels": _kernel_rates(engine, per_layer, rounds, tokens),
    }


def _kernel_rates(engine, per_layer: dict[str, float], rounds: int, tokens: int) -> list[dict]:
    """Per (shape, choice): calls, ms per call, useful GFLOP/s and the FLOP-limit speedup."""
    rows: dict[tuple, dict] = {}
    for name, seconds in per_layer.items():
        layer = engine.layers[name]
        d = layer.choices.get(token_bucket(tokens))
        choice = d.choice if d else "?"
        key = (layer.out_features, layer.in_features, choice)
        row = rows.setdefault(
            key, {"shape": f"{key[0]}x{key[1]}", "choice": choice, "layers": 0, "ms": 0.0, "nnz": 0}
        )
        row["layers"] += 1
        row["ms"] += seconds / rounds * 1e3
        row["nnz"] += int((layer.weight != 0).sum())
        row["dense_macs"] = row.get("dense_macs", 0) + layer.weight.numel()
    out = []
    for row in rows.values():
        useful = 2.0 * tokens * row["nnz"]
        row["useful_gflops"] = useful / (row["ms"] / 1e3) / 1e9 if row["ms"] > 0 else None
        row["flop_limit"] = row.pop("dense_macs") / max(1, row.pop("nnz"))
        out.append(row)
    return out


@torch.inference_mode()
def time_calls(fn: Callable[[], object], n: int, clock: Callable[[], float]) -> list[float]:
    """Seconds of ``n`` calls of ``fn``."""
    times = []
    for _ in range(n):
        start = clock()
        fn()
        times.append(clock() - start)
    return times

"""``recipec plan --model``: the structure a recipe leaves (per layer heads, FFN neurons,
FLOPs), computed by shrinking a meta-device copy of the model as export would."""

from __future__ import annotations

from typing import Any

import click


def _final_removals(plans) -> tuple[list[Any], dict[str, list[Any]]]:
    """The ``layers`` specs in order, and the ``heads`` / ``neurons`` specs (in order)."""
    layers, groups = [], {"heads": [], "neurons": []}
    for plan in plans:
        for mod in plan.modifiers:
            kind = mod.spec.structured
            if kind == "layers":
                layers.append(mod.spec)
            elif kind in groups:
                groups[kind].append(mod.spec)
    return layers, groups


def _keep_vectors(model, groups: dict[str, list[Any]]) -> tuple[dict, list[str]]:
    """Kept groups per set for the final sparsities (the first ones kept: shapes only)."""
    import torch

    from recipec.sparsity.structured import group_sets

    keep: dict[str, torch.Tensor] = {}
    notes = []
    for kind, specs in groups.items():
        for spec in specs:
            sets = group_sets(model, kind, layers=spec.layers)
            if spec.scope == "global":
                notes.append(
                    f"{kind}: global ranking decides how many each layer keeps; shown: the same "
                    f"fraction everywhere (each layer keeps at least {spec.min_per_layer})"
                )
            for gs in sets:
                removed = int(round(spec.final_sparsity * gs.count))
                previous = keep.get(gs.key)
                if previous is not None:
                    removed = max(removed, int((~previous).sum()))
                keep[gs.key] = torch.arange(gs.count) >= removed
    return keep, notes


def structure_section(plans, model, model_name: str, seq_len: int, as_json: bool) -> dict | None:
    """Per layer: heads and FFN neurons that remain and FLOPs per sequence, before and after."""
    from recipec.architectures import layer_flops
    from recipec.modifiers.layers import kept_layers
    from recipec.sparsity.shrink import drop_layers_, shrink_
    from recipec.sparsity.structured import group_sets

    layer_specs, groups = _final_removals(plans)
    if not layer_specs and not any(groups.values()):
        return None
    dense = layer_flops(model, seq_len)
    dense_counts = {k: {gs.layer: gs.count for gs in group_sets(model, k)} for k in groups}
    source = list(range(len(dense)))
    for spec in layer_specs:
        source = kept_layers(spec, model)
        drop_layers_(model, source)
    keep, notes = _keep_vectors(model, groups)
    if keep:
        shrink_(model, keep)
    after = layer_flops(model, seq_len)
    counts = {k: {gs.layer: gs.count for gs in group_sets(model, k)} for k in groups}
    rows = []
    for layer, flops in sorted(after.items()):
        src = source[layer] if layer < len(source) and len(source) == len(after) else layer
        rows.append(
            {
                "layer": layer,
                "source_layer": src,
                "heads": counts["heads"].get(layer),
                "heads_of": dense_counts["heads"].get(src),
                "neurons": counts["neurons"].get(layer),
                "neurons_of": dense_counts["neurons"].get(src),
                "flops": flops,
                "flops_dense": dense.get(src),
            }
        )
    total, total_dense = sum(after.values()), sum(dense.values())
    out = {
        "layers": rows,
        "encoder_flops": total,
        "encoder_flops_dense": total_dense,
        "kept_layers": source,
        "notes": notes,
    }
    if not as_json:
        _echo(out, model_name, seq_len)
    return out


def _echo(out: dict, model_name: str, seq_len: int) -> None:
    click.echo(
        f"\nstructure after the recipe, model {model_name} (seq {seq_len}); encoder layers kept: "
        f"{', '.join(map(str, out['kept_layers']))}"
    )
    click.echo(
        f"  {'layer':>5} {'(was)':>6} {'heads':>9} {'FFN neurons':>13} {'GFLOPs':>9} {'dense':>9}"
    )
    for r in out["layers"]:
        heads = f"{r['heads']}/{r['heads_of']}" if r["heads"] is not None else "-"
        ffn = f"{r['neurons']}/{r['neurons_of']}" if r["neurons"] is not None else "-"
        click.echo(
            f"  {r['layer']:>5} {r['source_layer']:>6} {heads:>9} {ffn:>13} "
            f"{r['flops'] / 1e9:>9.3f} {r['flops_dense'] / 1e9:>9.3f}"
        )
    ratio = out["encoder_flops_dense"] / out["encoder_flops"] if out["encoder_flops"] else 0
    click.echo(
        f"  encoder FLOPs per sequence: {out['encoder_flops'] / 1e9:.3f} G "
        f"(dense {out['encoder_flops_dense'] / 1e9:.3f} G, {ratio:.2f}x fewer); dense-kernel "
        "runtimes (onnxruntime) run these; unstructured zeros on top need sparse kernels"
    )
    for note in out["notes"]:
        click.echo(f"  note: {note}")

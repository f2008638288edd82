"""Final artefacts of a run: HF checkpoint with masks, report.json / report.md, PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from recipec.checkpoint import write_checkpoint
from recipec.outputs import write_text_atomic
from recipec.sparsity.masks import count_zeros, weight_sparsity
from recipec.sparsity.selection import component_sparsity, dense_encoder_linears, grouped_names
from recipec.tasks.collapse import scores
from recipec.train.diagnose import collapse_report
from recipec.train.plots import write_plots


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a line that is not a record (a write cut short by a
    full disk) is left out."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step", 0), int):
            records.append(record)
    return records


def number(value: Any, digits: int = 4) -> str:
    """A metric for people: ``0.8125``; anything that is not a number as it is."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.{digits}f}"
    return str(value)


def kept_line(primary: str, final: Any, teacher: Any) -> str:
    """The dense teacher's score and the share of it the sparse model kept: a percentage only
    when the teacher's score is positive (a Matthews correlation of 0, or a negative one, has
    no meaningful ratio)."""
    line = f"Dense teacher: {primary} {number(teacher)}"
    finite = all(isinstance(v, int | float) and math.isfinite(v) for v in (final, teacher))
    if finite and teacher > 0:
        return line + f"; kept {100 * final / teacher:.2f}% of it."
    return (
        line
        + f"; the sparse model: {number(final)} (no percentage: the teacher's score is not positive)."
    )


def _stage_entry(o) -> dict[str, Any]:
    """One stage in report.json: steps, time, evaluation, pruning history."""
    return {
        "name": o.name,
        "steps": o.result.steps,
        "steps_per_epoch": o.plan.steps_per_epoch,
        "seconds": o.result.seconds,
        "final_eval": o.result.final_eval,
        "pruning": o.program.history(),
        **({"sparse_backprop": o.result.sparse_backprop} if o.result.sparse_backprop else {}),
        **(
            {"prune_only": True, "eval_before_pruning": o.result.eval_before_pruning}
            if o.plan.training.prune_only
            else {}
        ),
    }


def write_outputs(
    *,
    out: Path,
    model,
    tokenizer,
    recipe,
    recipe_text: str,
    info,
    task,
    outcomes,
    final_eval,
    teacher_report,
    seconds: float,
    config,
    resumes: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write the model folder, report.json, report.md and plots; return the report."""
    program = outcomes[-1].program if outcomes else None
    masks = program.masks.masks if program is not None else {}
    folder = write_checkpoint(model, out / "model", masks, tokenizer, recipe_text)
    quantized = _write_quant(folder, model)
    params = dict(model.named_parameters())
    targets_sparsity, per_tensor = weight_sparsity(params, list(masks))
    zeros = {name: count_zeros(params[name]) for name in masks}
    all_params = sum(p.numel() for p in params.values())
    records = _read_metrics(out / "metrics.jsonl")
    report = {
        "recipe": str(config.recipe_path),
        "overrides": list(config.overrides),
        "model": config.model or "embedded (all-MiniLM-L6-v2)",
        "task": info.to_dict(),
        "train_examples": len(task.train),
        "eval_examples": len(task.eval),
        "final_eval": final_eval,
        "primary_metric": info.primary_metric,
        "teacher": teacher_report,
        "sparsity": {
            "targets": targets_sparsity,
            "model": sum(zeros.values()) / all_params if all_params else 0.0,
            "per_tensor": per_tensor,
            "per_component": component_sparsity(model, zeros),
            # encoder linear layers left dense (an exclude named them, or nothing prunes)
            "dense_encoder_linears": dense_encoder_linears(model, masks),
        },
        "stages": [_stage_entry(o) for o in outcomes],
        "wall_seconds": seconds,
        "resumed": bool(config.resume),
        "model_dir": str(folder),
        "collapse": collapse_report(
            info,
            final_eval,
            eval_examples=len(task.eval),
            train_examples=len(task.train),
            outcomes=outcomes,
            model=model,
            masks=masks,
            targets_sparsity=targets_sparsity,
        ),
    }
    if resumes:
        report["resumes"] = resumes
    structure = structure_report(model, masks)
    if structure is not None:
        report["structure"] = structure
    if quantized is not None:
        report["quantization"] = quantized
    history = [(o.name, h) for o in outcomes for h in o.program.history()]
    report["plots"] = write_plots(
        out,
        records,
        per_tensor,
        info.primary_metric,
        teacher=teacher_report["eval"].get(info.primary_metric) if teacher_report else None,
        pruning=[(stage, h["step"]) for stage, h in history],
        target=history[-1][1]["target"] if history else None,
    )
    write_text_atomic(out / "report.json", json.dumps(report, indent=2))
    write_text_atomic(out / "report.md", _markdown(report))
    return report


def structure_report(model, masks) -> dict[str, Any] | None:
    """Per encoder layer, the heads and FFN neurons left (a group is gone when its masks remove
    it whole: what ``recipec export`` takes out), the removed heads' indices, and the layers
    kept from the model as loaded; None when nothing structured happened."""
    from recipec.architectures import ArchitectureError
    from recipec.sparsity.shrink import read_record
    from recipec.sparsity.structured import all_group_sets, removable_groups

    source = read_record(model).get("source_layers")
    try:
        sets = all_group_sets(model)
    except ArchitectureError:  # a model outside the family table: no heads/neurons to count
        sets = []
    rows: dict[int, dict[str, Any]] = {}
    removed_any = False
    for gs in sets:
        gone = removable_groups(gs, masks)
        removed_any |= bool(gone.any())
        row = rows.setdefault(gs.layer, {"layer": gs.layer})
        if source is not None and gs.layer < len(source):
            row["source_layer"] = source[gs.layer]
        row[gs.kind] = gs.count - int(gone.sum())
        row[f"{gs.kind}_of"] = gs.count
        if gs.kind == "heads":
            row["removed_heads"] = gone.nonzero().flatten().tolist()
    if not removed_any and source is None:
        return None
    return {"source_layers": source, "layers": [rows[k] for k in sorted(rows)]}


def _structure_lines(structure: dict[str, Any] | None) -> list[str]:
    if not structure:
        return []
    lines = ["", "## Structure", ""]
    if structure.get("source_layers") is not None:
        kept = ", ".join(map(str, structure["source_layers"]))
        lines += [f"Encoder layers kept (numbered as loaded): {kept}.", ""]
    lines += [
        "Heads and FFN neurons left per layer (whole groups removed; `recipec export` takes "
        "them out of the weights and the ONNX graph):",
        "",
        "| layer | (was) | heads | removed heads | FFN neurons |",
        "|---|---|---|---|---|",
    ]
    for r in structure["layers"]:
        heads = f"{r['heads']}/{r['heads_of']}" if "heads" in r else "-"
        gone = ", ".join(map(str, r.get("removed_heads", []))) or "-"
        ffn = f"{r['neurons']}/{r['neurons_of']}" if "neurons" in r else "-"
        was = r.get("source_layer", r["layer"])
        lines.append(f"| {r['layer']} | {was} | {heads} | {gone} | {ffn} |")
    return lines


def _write_quant(folder: Path, model) -> dict[str, Any] | None:
    """``quantization.json`` beside the weights of a model a stage quantized (its report
    entry), else None."""
    from recipec.quant.fake import quant_of
    from recipec.quant.files import QUANT_FILE, quant_record

    quant = quant_of(model)
    if quant is None:
        return None
    record = quant_record(quant)
    write_text_atomic(folder / QUANT_FILE, json.dumps(record, indent=2))
    return {
        "file": QUANT_FILE,
        "weights": record["weights"],
        "activations": record["activations"],
        "layers": len(record["layers"]),
    }


def _wall_time(report: dict[str, Any]) -> str:
    """The wall-time line; a resumed run's session time alone would understate the run."""
    line = f"- wall time: {report['wall_seconds']:.1f} s"
    if report.get("resumed"):
        training = sum(stage["seconds"] for stage in report["stages"])
        line += (
            f" in the last session (resumed from a checkpoint); the stages trained {training:.1f} s "
            "over all sessions"
        )
    return line


def _sparse_line(sparse: dict[str, Any]) -> str:
    least = f">= {100 * sparse['min_sparsity']:.0f}% zeros"
    if sparse.get("from_step") is None:
        return f"Sparse backprop: no pruned linear layer reached {least}; dense kernels throughout."
    where = (
        "the pure-torch fallback (recipec's sparse kernels could not run here; not faster)"
        if sparse.get("fallback")
        else "recipec's sparse kernels"
    )
    since = f"step {sparse['from_step']}" + (
        " (of the last session: the stage was resumed)" if sparse.get("resumed") else ""
    )
    return (
        f"Sparse backprop: from {since}, pruned linear layers with {least} ran forward and "
        f"backward on {where} between mask changes ({sparse['layers']} at the end of the stage)."
    )


def _collapse_lines(collapse: dict[str, Any] | None) -> list[str]:
    """The report's warning for a collapsed model: what it does, and the usual causes."""
    if not collapse:
        return []
    return [
        "",
        "## Warning: the model collapsed",
        "",
        f"{collapse['message'][0].upper()}{collapse['message'][1:]}: its score is that of a "
        "constant answer, not a result. Likely causes, with this run's numbers:",
        "",
        *(f"- {cause}" for cause in collapse["causes"]),
    ]


def _dense_lines(dense: list[str] | None) -> list[str]:
    if dense is None:  # an architecture whose encoder linear layers recipec cannot tell
        return []
    if not dense:
        return ["Every encoder linear layer is pruned.", ""]
    return [
        f"Encoder linear layers left dense ({len(dense)}):",
        "",
        *(f"- `{line}`" for line in grouped_names(dense)),
        "",
    ]


def _markdown(report: dict[str, Any]) -> str:
    primary = report["primary_metric"]
    lines = [
        "# recipec run report",
        "",
        f"- recipe: `{report['recipe']}`"
        + (
            f" with `{' '.join('--set ' + o for o in report['overrides'])}`"
            if report["overrides"]
            else ""
        ),
        f"- model: {report['model']}",
        f"- task: {report['task']['name']} ({report['task']['kind']}), {report['train_examples']} train / {report['eval_examples']} eval",
        _wall_time(report),
        *_collapse_lines(report.get("collapse")),
        "",
        "## Final evaluation",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {number(v)} |" for k, v in scores(report["final_eval"]).items()]
    if report.get("teacher"):
        t = report["teacher"]["eval"]
        lines += ["", kept_line(primary, report["final_eval"].get(primary), t.get(primary))]
    changes = [(r, c) for r in report.get("resumes", []) for c in r.get("changes", [])]
    if changes:
        lines += ["", "Changed on resume:", ""]
        lines += [
            f"- `{c['field']}`: {c['was']} -> {c['now']} (from stage `{r['stage']}` step {r['step']})"
            for r, c in changes
        ]
    s = report["sparsity"]
    lines += [
        "",
        "## Sparsity",
        "",
        f"Targeted tensors: {100 * s['targets']:.2f}% zeros; whole model: {100 * s['model']:.2f}%.",
        "",
        *_dense_lines(s.get("dense_encoder_linears")),
        "| component | sparsity |",
        "|---|---|",
    ]
    lines += [f"| {c} | {100 * v:.2f}% |" for c, v in s["per_component"].items()]
    lines += _structure_lines(report.get("structure"))
    lines += ["", "| tensor | sparsity |", "|---|---|"]
    lines += [f"| `{n}` | {100 * v:.2f}% |" for n, v in s["per_tensor"].items()]
    for stage in report["stages"]:
        if stage.get("prune_only"):
            lines += [
                "",
                f"## Stage `{stage['name']}`: prune-only (one-shot), {stage['seconds']:.1f} s",
                "",
            ]
            before, after = stage.get("eval_before_pruning") or {}, stage.get("final_eval") or {}
            if primary in before and primary in after:
                lines += [
                    f"{primary}: {number(before[primary])} before pruning, {number(after[primary])} after.",
                    "",
                ]
        else:
            lines += [
                "",
                f"## Stage `{stage['name']}`: {stage['steps']} steps, {stage['seconds']:.1f} s",
                "",
            ]
        if stage["pruning"]:
            lines += ["| step | modifier | target | achieved | seconds |", "|---|---|---|---|---|"]
            lines += [
                f"| {h['step']} | {h['modifier']} | {100 * h['target']:.2f}% | {100 * h['achieved']:.2f}% | {h['seconds']:.2f} |"
                for h in stage["pruning"]
            ]
        sparse = stage.get("sparse_backprop")
        if sparse:
            lines += ["", _sparse_line(sparse)]
    if report.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    return "\n".join(lines) + "\n"

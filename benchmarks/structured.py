"""Structured pruning on MiniLM-L6 and SST-2: accuracy and onnxruntime latency of shrunk models.

Phases (each resumable: finished records in the results JSON are skipped):

1. ``train``: one ``recipec apply`` run per configuration, every one on the same budget
   (``--max-train`` examples, ``--max-seq-length`` tokens, 4 epochs, batch 32); the dense run
   first, it is the teacher the others distil from:
   - ``dense``: fine-tuning, no pruning;
   - ``ffn50``: 50% of the FFN neurons of every layer removed (1 dense + 2 pruning + 1 epochs);
   - ``heads33``: 1/3 of the heads of every layer (4 of 12) removed, same schedule;
   - ``ffn50_gmp80``: the bundled ``structured_ffn50_gmp80.yaml``: 50% of the FFN neurons,
     then 80% unstructured of the weights left;
   - ``layers3_kd``: the bundled ``layers_kd.yaml``: 3 of the 6 layers dropped before
     fine-tuning (layers 0, 2, 5 kept), 4 epochs with KD;
   - extra rows (``--configs``): ``heads33_ffn50`` (both), ``layers3_ffn50``.
2. ``oneshot``: the saliency measurement behind the defaults: from the dense model, remove
   1/3 of the heads or 50% of the FFN neurons in one shot (no retraining), by magnitude or by
   the block-Fisher saliency, per layer or globally, and evaluate.
3. ``export``: ``recipec export`` of every trained model: the removed heads / neurons are taken
   out (verified against the masked model) and the ONNX graph is checked (zeros, parity).
4. ``latency``: onnxruntime (``ORT_ENABLE_ALL``, ``--threads``), batch 1 and 16, sequence
   ``--seq-len``: all models of one batch size interleaved in one run (``run_alternating``),
   medians, ratios against the dense model.

    python benchmarks/structured.py                       # all phases (hours on 2 shared cores)
    python benchmarks/structured.py --phases oneshot,render

Writes ``benchmarks/results/structured.json`` and ``structured.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_name, loadavg  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PHASES = ("train", "oneshot", "export", "latency", "render")

_SCHEDULE = """\
version: 1
description: {description}
variables:
  kd_temperature: 5.5
  dense_epochs: 1
  pruning_epochs: 2
  finetune_epochs: 1
  update_every: 0.5
  prune_end: ${{dense_epochs + pruning_epochs}}
  total_epochs: ${{prune_end + finetune_epochs}}
  lr_max: 5e-5
  lr_min: 5e-6
training:
  epochs: ${{total_epochs}}
  batch_size: 32
  learning_rate: ${{lr_max}}
  max_seq_length: 128
  eval_every_epochs: 1
  seed: 42
modifiers:
{pruners}
  - type: lr
    schedule: linear
    init_lr: ${{lr_max}}
    final_lr: ${{lr_min}}
    end_epoch: ${{dense_epochs}}
  - type: lr
    schedule: cyclic_linear
    init_lr: ${{lr_max}}
    final_lr: ${{lr_min}}
    cycle_epochs: ${{update_every}}
    start_epoch: ${{dense_epochs}}
    end_epoch: ${{prune_end}}
  - type: lr
    schedule: linear
    init_lr: ${{lr_max}}
    final_lr: 0.0
    start_epoch: ${{prune_end}}
  - type: distill
    teacher: auto
    hardness: 1.0
    temperature: ${{kd_temperature}}
"""


def _pruner(kind: str, final: float, init: float, saliency: str, extra: str = "") -> str:
    return f"""\
  - type: {kind}
    init_sparsity: {init}
    final_sparsity: {final}
    start_epoch: ${{dense_epochs}}
    end_epoch: ${{prune_end}}
    update_every_epochs: ${{update_every}}
    scope: per_layer
    saliency: {saliency}{extra}"""


DENSE = """\
version: 1
description: Dense fine-tuning (the teacher of the structured benchmark).
training:
  epochs: 4
  batch_size: 32
  learning_rate: 5e-5
  max_seq_length: 128
  eval_every_epochs: 1
  seed: 42
modifiers: []
"""


def configurations(saliency: str) -> dict[str, dict]:
    """name -> {recipe text or bundled name, note}; ``saliency`` for the structured pruners."""
    ffn = _pruner("neurons", 0.5, 0.25, saliency)
    heads = _pruner("heads", 0.3333, 0.0, saliency)
    return {
        "dense": {"text": DENSE, "note": "dense fine-tuning (the teacher)"},
        "ffn50": {
            "text": _SCHEDULE.format(description="50% of the FFN neurons", pruners=ffn),
            "note": "50% of the FFN neurons of every layer",
        },
        "heads33": {
            "text": _SCHEDULE.format(description="1/3 of the heads", pruners=heads),
            "note": "1/3 of the heads of every layer (4 of 12)",
        },
        "ffn50_gmp80": {
            "bundled": "structured_ffn50_gmp80.yaml",
            "sets": [f"modifiers.1.saliency={saliency}"],
            "note": "50% of the FFN neurons, then 80% unstructured of the rest",
        },
        "layers3_kd": {
            "bundled": "layers_kd.yaml",
            "note": "3 of 6 layers dropped (0, 2, 5 kept), KD",
        },
        "heads33_ffn50": {
            "text": _SCHEDULE.format(description="1/3 heads + 50% FFN", pruners=heads + "\n" + ffn),
            "note": "1/3 of the heads and 50% of the FFN neurons",
            "extra": True,
        },
    }


DEFAULT_CONFIGS = ("dense", "ffn50", "heads33", "ffn50_gmp80", "layers3_kd")


# --------------------------------------------------------------------------- records


def load(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"train": {}, "oneshot": [], "export": {}, "latency": []}


def _same_budget(results: dict, budget: dict, path: Path) -> bool:
    """One budget for every row: results of another budget are never mixed in (records of
    earlier phases are reused only when they were made with this one)."""
    before = results.setdefault("budget", budget)
    if before == budget:
        return True
    changed = {k: (before.get(k), v) for k, v in budget.items() if before.get(k) != v}
    print(
        f"error: {path} holds results of another budget ({changed}: was, now); pass "
        "--results and --workdir for a new one, or the same budget to continue",
        file=sys.stderr,
    )
    return False


def save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)


def budget_of(args) -> dict:
    return {
        "max_train": args.max_train,
        "max_eval": args.max_eval,
        "max_seq_length": args.max_seq_length,
        "epochs": 4,
        "batch_size": 32,
        "saliency": args.saliency,
    }


# --------------------------------------------------------------------------- train


def run_sets(cfg: dict, max_seq_length: int) -> list[str]:
    """The ``--set`` overrides of a configuration's run: its own, the budget's sequence length,
    and the final evaluation only (the table's number; no evaluation after each epoch)."""
    return [
        *cfg.get("sets", []),
        f"training.max_seq_length={max_seq_length}",
        "training.eval_every_epochs=4",
    ]


def train(args, results: dict, path: Path, names: list[str]) -> None:
    from recipec.train.run import Reporter, RunConfig, run

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    configs = configurations(args.saliency)
    for name in names:
        if name in results["train"]:
            print(f"[skip] train {name}: {100 * results['train'][name]['accuracy']:.2f}")
            continue
        cfg = configs[name]
        if "bundled" in cfg:
            recipe = str(ROOT / "recipes" / cfg["bundled"])
        else:
            recipe = str(workdir / f"{name}.yaml")
            Path(recipe).write_text(cfg["text"])
        sets = run_sets(cfg, args.max_seq_length)
        out = workdir / name
        teacher = None if name == "dense" else results["train"]["dense"]["model_dir"]
        print(f"[run] train {name}: {cfg['note']}", flush=True)
        started = time.perf_counter()
        report = run(
            RunConfig(
                recipe_path=recipe,
                overrides=sets,
                data=[str(Path(args.data_root) / "sst2")],
                teacher=teacher,
                output=out,
                resume=(out / "run.json").is_file(),
                max_train=args.max_train,
                max_eval=args.max_eval,
                teacher_cache=workdir / "teachers",
            ),
            Reporter(quiet=args.quiet),
        )
        results["train"][name] = {
            "config": name,
            "note": cfg["note"],
            "recipe": cfg.get("bundled", f"{name}.yaml (benchmarks/structured.py)"),
            "sets": sets,
            "accuracy": report["final_eval"]["accuracy"],
            "sparsity_targets": report["sparsity"]["targets"],
            "train_seconds": sum(s["seconds"] for s in report["stages"]),
            "wall_seconds": time.perf_counter() - started,
            "steps": sum(s["steps"] for s in report["stages"]),
            "model_dir": report["model_dir"],
            "budget": budget_of(args),
            "loadavg_end": loadavg(),
        }
        save(path, results)
        print(f"[done] train {name}: {100 * results['train'][name]['accuracy']:.2f}", flush=True)


# --------------------------------------------------------------------------- one-shot


def _grad_fn(model, targets: dict, loader):
    """Gradients of ``targets`` on the next batch of ``loader`` (cycling)."""
    batches = iter(loader)

    def grad():
        nonlocal batches
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        return {n: p.grad.detach().clone() for n, p in targets.items()}

    return grad


def _oneshot_one(args, dense_dir, kind, sparsity, saliency, scope, task, tokenizer, cache):
    """Remove ``sparsity`` of the ``kind`` groups of the dense model in one shot; its accuracy."""
    import torch

    from recipec.checkpoint import load_checkpoint
    from recipec.sparsity.masks import apply_masks_
    from recipec.sparsity.structured import (
        fisher_group_scores,
        group_masks,
        group_sets,
        magnitude_group_scores,
        select_groups,
    )
    from recipec.tasks.data import make_dataloader

    model = load_checkpoint(dense_dir).model
    params = dict(model.named_parameters())
    sets = group_sets(model, kind)
    targets = {s.param: params[s.param] for gs in sets for s in gs.targets()}
    started = time.perf_counter()
    if saliency == "magnitude":
        scores = magnitude_group_scores(sets, targets)
    elif kind in cache:
        scores = cache[kind]
    else:
        loader = make_dataloader(
            task.train,
            tokenizer,
            task.info,
            batch_size=16,
            max_seq_length=args.max_seq_length,
            shuffle=True,
            seed=1,
        )
        scores = cache[kind] = fisher_group_scores(
            sets,
            targets,
            _grad_fn(model, targets, loader),
            num_grads=args.num_grads,
            block_size=50,
            damp=1e-7,
            max_memory_gb=2.0,
            progress=print,
        )
    keep = select_groups(scores, sparsity, scope)
    with torch.no_grad():
        apply_masks_(params, group_masks(sets, keep, targets))
    return model, time.perf_counter() - started


def oneshot(args, results: dict, path: Path) -> None:
    """Saliency x scope, one-shot from the dense model, for heads (1/3) and neurons (50%)."""
    from recipec.checkpoint import load_checkpoint
    from recipec.models import load_tokenizer
    from recipec.tasks import load_task
    from recipec.train.loop import evaluate

    dense_dir = results["train"]["dense"]["model_dir"]
    task = load_task(
        None,
        [str(Path(args.data_root) / "sst2")],
        max_train=args.max_train,
        max_eval=args.max_eval,
        seed=42,
    )
    tokenizer = load_tokenizer(dense_dir)

    def accuracy(model) -> float:
        out = evaluate(
            model,
            task.eval,
            tokenizer,
            task.info,
            batch_size=64,
            max_seq_length=args.max_seq_length,
            device="cpu",
        )
        return out["accuracy"]

    done = {(r["kind"], r["saliency"], r["scope"]) for r in results["oneshot"]}
    if ("none", "-", "-") not in done:
        acc = accuracy(load_checkpoint(dense_dir).model)
        results["oneshot"].append(
            {"kind": "none", "saliency": "-", "scope": "-", "sparsity": 0.0, "accuracy": acc}
        )
        save(path, results)
    cache: dict = {}
    for kind, sparsity in (("heads", 1 / 3), ("neurons", 0.5)):
        for saliency in ("magnitude", "fisher"):
            for scope in ("per_layer", "global"):
                if (kind, saliency, scope) in done:
                    continue
                model, seconds = _oneshot_one(
                    args, dense_dir, kind, sparsity, saliency, scope, task, tokenizer, cache
                )
                record = {
                    "kind": kind,
                    "saliency": saliency,
                    "scope": scope,
                    "sparsity": sparsity,
                    "accuracy": accuracy(model),
                    "seconds": seconds,
                    "num_grads": args.num_grads if saliency == "fisher" else None,
                }
                results["oneshot"].append(record)
                save(path, results)
                print(f"[done] oneshot {kind} {saliency} {scope}: {100 * record['accuracy']:.2f}")


# --------------------------------------------------------------------------- export, latency


def export_all(args, results: dict, path: Path, names: list[str]) -> None:
    from recipec.export.onnx import export

    for name in names:
        if name in results["export"] or name not in results["train"]:
            continue
        model_dir = Path(results["train"][name]["model_dir"])
        out = Path(args.workdir) / "onnx" / name
        started = time.perf_counter()
        res = export(model_dir, out, overwrite=True, log=print)
        info = json.loads((out / "sparsity.json").read_text())
        results["export"][name] = {
            "onnx": str(res.onnx_path),
            "onnx_bytes": res.onnx_path.stat().st_size,
            "ort_vs_torch_max_abs_diff": res.ort_max_abs_diff,
            "structure": info.get("structure"),
            "params": info["model"]["params"],
            "seconds": time.perf_counter() - started,
        }
        save(path, results)
        print(f"[done] export {name}: {info['model']['params']:,} params", flush=True)


def latency(args, results: dict, path: Path, names: list[str]) -> None:
    from recipec.runtime.bench import Target, bench_inputs, run_alternating
    from recipec.runtime.runtimes import OrtRunner, ort_session

    rows = [n for n in names if n in results["export"]]
    for batch in args.batch_sizes:
        if any(r["batch"] == batch and r["seq"] == args.seq_len for r in results["latency"]):
            continue
        targets = []
        for name in rows:
            session = ort_session(results["export"][name]["onnx"], args.threads)
            inputs = bench_inputs(
                [i.name for i in session.get_inputs()],
                "sequence-classification",
                30522,
                batch,
                args.seq_len,
            )
            targets.append(
                Target(name, "ort", name, batch, args.seq_len, OrtRunner(session, inputs))
            )
        before = loadavg()
        measured = run_alternating(
            targets, warmup=3, repeats=args.repeats, block=args.block, log=print
        )
        for m in measured:
            results["latency"].append(
                {
                    "model": m.model,
                    "batch": batch,
                    "seq": args.seq_len,
                    "p50_ms": m.p50_ms,
                    "p90_ms": m.p90_ms,
                    "calls": m.calls,
                    "threads": args.threads,
                    "loadavg_before": before,
                    "loadavg_after": loadavg(),
                    "cpu": cpu_name(),
                }
            )
        save(path, results)
        print(f"[done] latency batch {batch}", flush=True)


# --------------------------------------------------------------------------- render


def render(results: dict, out_md: Path) -> str:
    lines = []
    train = results.get("train", {})
    dense = train.get("dense")
    lat = {(r["model"], r["batch"]): r for r in results.get("latency", [])}
    budget = (dense or {}).get("budget", {})
    seq = sorted({r["seq"] for r in results.get("latency", [])}) or "-"
    if train:
        lines += [
            f"Budget (every row): SST-2, first {budget.get('max_train')} training examples, "
            f"sequences of at most {budget.get('max_seq_length')} tokens, 4 epochs, batch 32, "
            f"KD from the dense model (T 5.5); structured saliency: {budget.get('saliency')}, "
            f"per layer. Dev accuracy on {budget.get('max_eval') or 'all 872'} examples. "
            "Latency: onnxruntime "
            f"(ORT_ENABLE_ALL), random tokens, seq {seq}, median of interleaved calls.",
            "",
            "| config | what is removed | dev acc. | vs dense | params | zeros of the original "
            "encoder weights (removed groups included) | ORT b1 ms | speed-up b1 | ORT b16 ms | speed-up b16 |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, rec in train.items():
            exp = results.get("export", {}).get(name, {})
            cells = [name, rec["note"], f"{100 * rec['accuracy']:.2f}"]
            cells.append(
                f"{100 * (rec['accuracy'] - dense['accuracy']):+.2f}"
                if dense and name != "dense"
                else "-"
            )
            cells.append(f"{exp['params'] / 1e6:.2f}M" if exp else "-")
            cells.append(f"{100 * rec['sparsity_targets']:.1f}%")
            for batch in (1, 16):
                r, d = lat.get((name, batch)), lat.get(("dense", batch))
                cells.append(f"{r['p50_ms']:.2f}" if r else "-")
                cells.append(f"{d['p50_ms'] / r['p50_ms']:.2f}x" if r and d else "-")
            lines.append("| " + " | ".join(cells) + " |")
        loads = sorted({tuple(r["loadavg_before"] or []) for r in results.get("latency", [])})
        if loads:
            lines += [
                "",
                f"Load average (1/5/15 min) before each latency batch: {loads}; "
                f"CPU: {results['latency'][0]['cpu']}, {results['latency'][0]['threads']} threads.",
            ]
        lines.append("")
    if results.get("oneshot"):
        lines += [
            "One-shot saliency check (from the dense model, no retraining):",
            "",
            "| removed | saliency | scope | dev acc. |",
            "|---|---|---|---|",
        ]
        for r in results["oneshot"]:
            what = (
                "nothing"
                if r["kind"] == "none"
                else ("1/3 of the heads" if r["kind"] == "heads" else "50% of the FFN neurons")
            )
            lines.append(f"| {what} | {r['saliency']} | {r['scope']} | {100 * r['accuracy']:.2f} |")
        lines.append("")
    text = "\n".join(lines)
    out_md.write_text(text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--max-train", type=int, default=4000)
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument(
        "--max-eval", type=int, default=None, help="dev examples (default: all 872; smoke runs)"
    )
    parser.add_argument("--saliency", choices=("magnitude", "fisher"), default="magnitude")
    parser.add_argument("--num-grads", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument(
        "--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16]
    )
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--block", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--workdir",
        default=os.path.join(os.path.expanduser("~"), ".cache", "recipec", "structured"),
    )
    parser.add_argument(
        "--results", default=str(ROOT / "benchmarks" / "results" / "structured.json")
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    phases = args.phases.split(",")
    names = args.configs.split(",")
    if "dense" not in names:
        names.insert(0, "dense")
    path = Path(args.results)
    results = load(path)
    if not _same_budget(results, budget_of(args), path):
        return 2
    if "train" in phases:
        train(args, results, path, names)
    if "oneshot" in phases:
        oneshot(args, results, path)
    if "export" in phases:
        export_all(args, results, path, names)
    if "latency" in phases:
        latency(args, results, path, names)
    print(render(results, path.with_suffix(".md")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

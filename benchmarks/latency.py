"""Latency table: MiniLM-L6 and a BERT-base-shaped model at 0/80/90/95% sparsity.

Every model is pruned per tensor by magnitude (encoder linear weights only), exported with
``recipec export`` (verified zeros and parity), and timed on onnxruntime, DeepSparse (when
its venv is found) and torch-csr at each batch size, all targets of one (model, batch)
alternating in the same run. Ratios are vs the dense (0%) model on onnxruntime.

    python benchmarks/latency.py                      # full table (~15 min on 2 cores)
    python benchmarks/latency.py --models minilm --batch-sizes 1 --quick

Writes ``benchmarks/results/latency.json`` and ``latency.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

from _common import cpu_name, save_report  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from recipec.checkpoint import (  # noqa: E402
    MASKS_FILE,
    load_masks,
    load_model,
    magnitude_masks,
    read_config,
    write_checkpoint,
)
from recipec.export.onnx import (  # noqa: E402
    ONNX_FILE,
    export,
    is_deployment_folder,
    read_sparsity,
)
from recipec.models import load_model_and_tokenizer  # noqa: E402
from recipec.runtime.bench import Target, bench_inputs, run_alternating  # noqa: E402
from recipec.runtime.runtimes import (  # noqa: E402
    OrtRunner,
    OutputMismatch,
    RuntimeUnavailable,
    check_outputs,
    default_threads,
    ort_session,
    start_deepsparse,
    torch_csr_runner,
)
from recipec.tasks import TaskInfo  # noqa: E402

ROOT = Path(__file__).resolve().parent
MODELS = ("minilm", "bert-base")
RUNTIME_NAMES = {"ort": "onnxruntime", "deepsparse": "DeepSparse", "torch-csr": "torch-csr"}


def log(msg: str) -> None:
    """Timestamped progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_model(name: str):
    """(model, tokenizer) for ``minilm`` (real weights, random head) or ``bert-base`` (random)."""
    import transformers

    torch.manual_seed(0)
    if name == "minilm":
        model, tokenizer = load_model_and_tokenizer(None, TaskInfo("latency", "classification", 2))
    elif name == "bert-base":
        config = transformers.BertConfig(num_labels=2)  # 12 x 768, FFN 3072: BERT-base shape
        model = transformers.BertForSequenceClassification(config)
        tokenizer = None
    else:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return model.eval(), tokenizer


def prepare(name: str, sparsities: list[int], workdir: Path, reuse: bool) -> dict[int, Path]:
    """Prune, write and export ``name`` at each sparsity; returns deployment folders."""
    folders = {}
    base = None
    for s in sparsities:
        folder = workdir / f"{name}-s{s}" / "onnx"
        if reuse and is_deployment_folder(folder) and (folder / MASKS_FILE).is_file():
            log(f"{name} {s}%: reusing {folder}")
            folders[s] = folder
            continue
        if base is None:
            base, tokenizer = build_model(name)
        import copy

        model = copy.deepcopy(base)
        masks = magnitude_masks(model, s / 100.0)
        ckpt = write_checkpoint(model, workdir / f"{name}-s{s}" / "model", masks, tokenizer)
        start = time.perf_counter()
        result = export(ckpt, folder, overwrite=True)
        log(
            f"{name} {s}%: exported and verified in {time.perf_counter() - start:.0f}s "
            f"(sparsity {result.overall_sparsity:.1%}, ort diff {result.ort_max_abs_diff:.1e})"
        )
        folders[s] = folder
    return folders


def time_model(
    name: str,
    folders: dict[int, Path],
    batch_sizes: list[int],
    seq: int,
    runtimes: list[str],
    repeats: dict[int, int],
    warmup: dict[int, int],
    worker,
    threads: int,
    clock: str = "wall",
) -> tuple[list[dict], dict, list[str]]:
    """Time every (sparsity, runtime) of one model, alternating, per batch size."""
    sparsities = sorted(folders)
    info = {s: read_sparsity(folders[s]) for s in sparsities}
    config = read_config(folders[sparsities[0]])
    task, names = info[sparsities[0]]["task"], info[sparsities[0]]["inputs"]
    sessions = {s: ort_session(folders[s] / ONNX_FILE, threads) for s in sparsities}
    torch_models = {}
    if "torch-csr" in runtimes:
        for s in sparsities:
            model = load_model(folders[s], task)
            torch_models[s] = (model, load_masks(folders[s] / MASKS_FILE, model))
    rows, layers, problems = [], {}, []
    for batch in batch_sizes:
        inputs = bench_inputs(names, task, int(config.vocab_size), batch, seq)
        targets = []
        for s in sparsities:
            ort_runner = OrtRunner(sessions[s], inputs)
            ref = ort_runner.outputs()
            label = f"{name}-s{s}"
            targets.append(Target(label, "ort", f"{s}", batch, seq, ort_runner, 0.0))
            if worker is not None and "deepsparse" in runtimes:
                try:
                    runner = worker.runner(folders[s] / ONNX_FILE, inputs, ref)
                    targets.append(
                        Target(
                            label,
                            "deepsparse",
                            f"{s}",
                            batch,
                            seq,
                            runner,
                            runner.load_info["max_abs_diff"],
                        )
                    )
                    log(
                        f"{label} b{batch}: deepsparse compiled in "
                        f"{runner.load_info['compile_s']:.0f}s, diff {runner.load_info['max_abs_diff']:.1e}"
                    )
                except (OutputMismatch, RuntimeUnavailable) as exc:
                    problems.append(f"{label} b{batch}: {exc}")
                    log(f"{label} b{batch}: deepsparse REFUSED: {exc}")
            if "torch-csr" in runtimes:
                model, masks = torch_models[s]
                runner = torch_csr_runner(model, masks, inputs)
                layers[f"{label}-b{batch}"] = [asdict(c) for c in runner.choices]
                try:
                    diff = check_outputs("torch-csr", runner.outputs(), ref, 1e-3, 1e-3)
                    targets.append(Target(label, "torch-csr", f"{s}", batch, seq, runner, diff))
                    log(f"{label} b{batch}: torch-csr layers -> {runner.summary()}")
                except OutputMismatch as exc:
                    problems.append(f"{label} b{batch}: {exc}")
                    log(f"{label} b{batch}: torch-csr REFUSED: {exc}")
        load_before = os.getloadavg()
        start = time.perf_counter()
        log(
            f"{name} b{batch}: timing {len(targets)} targets, {warmup[batch]} warm-up + "
            f"{repeats[batch]} alternating rounds"
        )
        measured = run_alternating(targets, warmup[batch], repeats[batch], clock=clock)
        elapsed = time.perf_counter() - start
        load_after = os.getloadavg()
        for t in targets:
            t.runner.close()
        base = next(m for m in measured if m.runtime == "ort" and m.variant == str(sparsities[0]))
        for m in measured:
            row = asdict(m)
            row["model"] = name
            row["sparsity"] = int(m.variant)
            row["ratio_vs_dense_ort"] = base.p50_ms / m.p50_ms
            row["load_avg_1m"] = [load_before[0], load_after[0]]
            rows.append(row)
        log(
            f"{name} b{batch}: done in {elapsed:.0f}s (load avg {load_before[0]:.1f} -> "
            f"{load_after[0]:.1f})"
        )
    return rows, layers, problems


def markdown(report: dict) -> str:
    """The ratio table (vs dense onnxruntime, p50 latency) as markdown."""
    rows = report["results"]
    runtimes = [
        r for r in ("ort", "deepsparse", "torch-csr") if any(x["runtime"] == r for x in rows)
    ]
    batches = sorted({r["batch"] for r in rows})
    head = ["model", "sparsity"]
    for b in batches:
        head += [f"b{b} dense ort p50 ms"] + [f"b{b} {RUNTIME_NAMES[r]}" for r in runtimes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    index = {(r["model"], r["sparsity"], r["batch"], r["runtime"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        for s in sorted({r["sparsity"] for r in rows if r["model"] == model}):
            cells = [model, f"{s}%"]
            for b in batches:
                base = index.get(
                    (model, min(x["sparsity"] for x in rows if x["model"] == model), b, "ort")
                )
                cells.append(f"{base['p50_ms']:.1f}" if base else "")
                for rt in runtimes:
                    r = index.get((model, s, b, rt))
                    cells.append(f"{r['ratio_vs_dense_ort']:.2f}x" if r else "n/a")
            lines.append("| " + " | ".join(cells) + " |")
    env = report["environment"]
    notes = [
        "",
        f"Ratios are p50-latency speedups vs the dense (0%) model on onnxruntime, same model and "
        f"batch, seq {report['seq_len']}, measured alternating in one run; {env['threads']} thread(s) "
        f"on {env['cpu']}, {report.get('clock', 'wall')}-clock time (load average at start "
        f"{env['load_avg_at_start'][0]:.1f}). onnxruntime {env['onnxruntime']}, torch {env['torch']}"
        + (f", DeepSparse {env['deepsparse']}" if env.get("deepsparse") else "")
        + ".",
        f"Command: `{report['command']}`",
    ]
    if report.get("problems"):
        notes += ["", "Problems:"] + [f"- {p}" for p in report["problems"]]
    return "\n".join(lines + notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the JSON and markdown files."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--sparsities", default="0,80,90,95")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--runtimes", default="ort,deepsparse,torch-csr")
    p.add_argument("--repeats", default="1:15,16:3", help="rounds per batch size, BATCH:N,...")
    p.add_argument("--warmup", default="1:2,16:1", help="warm-up calls per batch size")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: process CPU time, for a busy shared machine (use --threads 1)",
    )
    p.add_argument("--deepsparse-python", default=None)
    p.add_argument("--workdir", type=Path, default=ROOT / "results" / "tmp")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--reuse", action="store_true", help="reuse exported folders in --workdir")
    p.add_argument("--quick", action="store_true", help="few repeats (smoke test)")
    args = p.parse_args(argv)

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    sparsities = sorted(int(s) for s in args.sparsities.split(","))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]

    def per_batch(spec: str, default: int) -> dict[int, int]:
        table = dict(tuple(int(x) for x in item.split(":")) for item in spec.split(",") if item)
        return {b: (1 if args.quick else table.get(b, default)) for b in batch_sizes}

    repeats, warmup = per_batch(args.repeats, 5), per_batch(args.warmup, 1)
    worker, problems = None, []
    env = {
        "cpu": cpu_name(),
        "load_avg_at_start": list(os.getloadavg()),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "numpy": np.__version__,
    }
    if "deepsparse" in runtimes:
        try:
            worker = start_deepsparse(args.deepsparse_python, num_cores=threads)
            env["deepsparse"] = worker.info.get("deepsparse")
            env["deepsparse_python"] = str(worker.python)
        except RuntimeUnavailable as exc:
            problems.append(f"deepsparse not measured: {exc}")
            log(f"deepsparse not measured: {exc}")
    from recipec.runtime.runtimes import available_kernels

    env["torch_csr_kernels"] = available_kernels()
    results, layers = [], {}
    started = time.time()
    try:
        for name in models:
            folders = prepare(name, sparsities, args.workdir, args.reuse)
            rows, lay, probs = time_model(
                name,
                folders,
                batch_sizes,
                args.seq_len,
                runtimes,
                repeats,
                warmup,
                worker,
                threads,
                args.clock,
            )
            results += rows
            layers.update(lay)
            problems += probs
    finally:
        if worker is not None:
            worker.close()
    report = {
        "command": "python benchmarks/latency.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "seq_len": args.seq_len,
        "clock": args.clock,
        "sparsities": sparsities,
        "batch_sizes": batch_sizes,
        "repeats": repeats,
        "warmup": warmup,
        "environment": env,
        "wall_s": time.time() - started,
        "results": results,
        "problems": problems,
        "torch_csr_layers": layers,
    }
    text = markdown(report)
    save_report(args.out, "latency", report, text)
    print(text)
    log(f"wrote {args.out / 'latency.json'} and {args.out / 'latency.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

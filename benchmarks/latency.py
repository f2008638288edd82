"""Latency table: MiniLM-L6 and a BERT-base-shaped model, dense vs pruned, on every CPU runtime.

Every model is pruned per tensor by magnitude (encoder linear weights only), exported with
``recipec export`` (verified zeros and parity), and timed at each batch size and thread count
on onnxruntime FP32 and INT8 (``quantize_dynamic``, int8 weights), recipec's engine FP32 and
INT8 (pruned models only), DeepSparse (when its venv is found) and torch-csr. Every target's
logits are checked against onnxruntime FP32 first (INT8 within the engine's INT8 bound). The
targets of one (model, batch, threads) are timed in interleaved rounds in the same run
(``recipec.runtime.stats``: at least ``--repeats`` rounds, more until every ratio's 95%
interval is within +-``--precision`` or ``--budget`` seconds are spent, at most
``--max-repeats``). Ratios are p50 speedups vs the dense (0%) model on onnxruntime FP32 (and,
for the INT8 rows, vs dense onnxruntime INT8), with paired bootstrap intervals; "FLOP limit" is
the dense model's FLOPs over the pruned one's (linears at their nonzeros, attention dense):
what the pruned linears could give at best.

    python benchmarks/latency.py                                   # the full table (long)
    python benchmarks/latency.py --models bert-base --sparsities 0,90 \\
        --runtimes ort,ort-int8,engine,engine-int8,deepsparse --threads 1,2   # issue #18's
    python benchmarks/latency.py --models minilm --sparsities 0,90 --batch-sizes 1 --quick

Writes ``OUT/latency.json`` and ``OUT/latency.md`` (``--out``, default benchmarks/results).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from _common import cpu_name, save_report  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# Worker threads that sleep when idle (read by OpenMP when torch loads): interleaved runtimes
# must not steal each other's cores (recipec bench does the same).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
from recipec.runtime import stats  # noqa: E402
from recipec.runtime.bench import Target, bench_inputs, summarize  # noqa: E402
from recipec.runtime.bench_targets import EngineRunner  # noqa: E402
from recipec.runtime.engine import INT8_TOLERANCE  # noqa: E402
from recipec.runtime.engine import load as load_engine  # noqa: E402
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
RUNTIMES = ("ort", "ort-int8", "engine", "engine-int8", "deepsparse", "torch-csr")
RUNTIME_NAMES = {
    "ort": "onnxruntime",
    "ort-int8": "onnxruntime INT8",
    "engine": "engine",
    "engine-int8": "engine INT8",
    "deepsparse": "DeepSparse",
    "torch-csr": "torch-csr",
}
ENGINES = {"engine": "fp32", "engine-int8": "int8"}  # on pruned models only
INT8 = ("ort-int8", "engine-int8")
FP32_TOL = (1e-3, 1e-3)


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


def flop_limits(folder: Path, seq: int) -> dict[str, float]:
    """Dense FLOPs / pruned FLOPs per sequence: ``linear`` (the masked linears only) and
    ``model`` (plus attention's two seq x seq matmuls per layer, which stay dense)."""
    from safetensors.torch import load_file

    config = read_config(folder)
    dense = pruned = 0.0
    if (folder / MASKS_FILE).is_file():
        for mask in load_file(str(folder / MASKS_FILE)).values():
            dense += 2.0 * seq * mask.numel()
            pruned += 2.0 * seq * float((mask != 0).sum())
    attention = 4.0 * seq * seq * config.hidden_size * config.num_hidden_layers
    return {
        "linear": dense / pruned if pruned else 1.0,
        "model": (dense + attention) / (pruned + attention),
    }


# --------------------------------------------------------------------------------------------
# Runtimes of one model at one thread count
# --------------------------------------------------------------------------------------------


@dataclass
class Loaded:
    """What one model's targets need at one thread count."""

    name: str
    folders: dict[int, Path]
    runtimes: list[str]
    threads: int
    task: str = ""
    input_names: list[str] = field(default_factory=list)
    vocab: int = 0
    sessions: dict[tuple[str, int], object] = field(default_factory=dict)  # (runtime, s)
    torch_models: dict[int, tuple] = field(default_factory=dict)
    engines: dict[tuple[str, int], object] = field(default_factory=dict)  # (runtime, s)
    worker: object = None
    sparse_runtimes: list[str] = field(default_factory=list)


def load_runtimes(name, folders, runtimes, threads, workdir, worker) -> Loaded:
    """Sessions (FP32 and INT8), torch-csr models and engines for every sparsity."""
    from recipec.runtime.int8 import quantize_onnx

    first = folders[min(folders)]
    info = read_sparsity(first)
    loaded = Loaded(name, folders, runtimes, threads, info["task"], info["inputs"])
    loaded.vocab = int(read_config(first).vocab_size)
    loaded.worker = worker if "deepsparse" in runtimes else None
    for s, folder in folders.items():
        loaded.sessions[("ort", s)] = ort_session(folder / ONNX_FILE, threads)
        if "ort-int8" in runtimes:
            q = workdir / f"{name}-s{s}" / "int8" / "model.onnx"
            if not q.is_file():
                quantize_onnx(folder / ONNX_FILE, q)
            loaded.sessions[("ort-int8", s)] = ort_session(q, threads)
        if "torch-csr" in runtimes:
            model = load_model(folder, loaded.task)
            loaded.torch_models[s] = (model, load_masks(folder / MASKS_FILE, model))
        for runtime, dtype in ENGINES.items():
            if runtime in runtimes and s > 0:
                loaded.engines[(runtime, s)] = _engine(folder, dtype)
    return loaded


_ENGINES: dict[tuple[Path, str], object] = {}


def _engine(folder: Path, dtype: str):
    """The folder's engine, loaded once per run; its kernel choices are measured afresh (the
    fastest form can change with the thread count)."""
    from recipec.runtime.engine import Planner

    engine = _ENGINES.get((folder, dtype))
    if engine is None:
        engine = _ENGINES[(folder, dtype)] = load_engine(
            folder, dtype, verify=False, tokenizer=False
        )
    engine.planner = Planner()
    for layer in engine.layers.values():
        layer.planner, layer.choices = engine.planner, {}
    return engine


def _engine_layers(engine, tokens: int) -> dict:
    """The engine's choice per layer kind at ``tokens``: each candidate's best time (ms) from
    the measurement at load, against the layer's FLOP limit (1 / density of its weights)."""
    from recipec.runtime.engine import token_bucket

    kinds = {}
    for layer in engine.layers.values():
        d = layer.choices.get(token_bucket(tokens))
        key = f"{layer.out_features}x{layer.in_features} s{layer.sparsity:.2f} {layer.pattern}"
        if d is not None and key not in kinds:
            kinds[key] = {
                "choice": d.choice,
                "times_ms": {k: round(v * 1e3, 3) for k, v in d.times.items()},
                "speedup": round(d.speedup, 3),
                "flop_limit": round(1 / max(1e-9, 1 - layer.sparsity), 2),
            }
    return {"summary": engine.summary(tokens), "kinds": kinds}


def _checked(target: Target, ref, problems: list[str], tol=FP32_TOL) -> Target | None:
    """The target when its logits match onnxruntime FP32's (its diff recorded), else None."""
    try:
        target.max_abs_diff = check_outputs(target.runtime, target.runner.outputs(), ref, *tol)
        return target
    except OutputMismatch as exc:
        problems.append(f"{target.model} {target.runtime} b{target.batch}: {exc}")
        log(f"{target.model} {target.runtime} b{target.batch}: REFUSED: {exc}")
        return None


def _deepsparse_target(loaded: Loaded, s, label, batch, seq, inputs, ref, problems):
    try:
        runner = loaded.worker.runner(loaded.folders[s] / ONNX_FILE, inputs, ref)
    except (OutputMismatch, RuntimeUnavailable) as exc:
        problems.append(f"{label} b{batch}: {exc}")
        log(f"{label} b{batch}: deepsparse REFUSED: {exc}")
        return None
    info = runner.load_info
    log(f"{label} b{batch}: deepsparse compiled in {info['compile_s']:.0f}s")
    return Target(label, "deepsparse", f"{s}", batch, seq, runner, info["max_abs_diff"])


def _targets_at(loaded: Loaded, s: int, batch: int, seq: int, inputs, problems, layers):
    """The checked targets of sparsity ``s`` at one batch (onnxruntime FP32 first)."""
    label = f"{loaded.name}-s{s}"
    ort_runner = OrtRunner(loaded.sessions[("ort", s)], inputs)
    ref = ort_runner.outputs()
    targets = [Target(label, "ort", f"{s}", batch, seq, ort_runner, 0.0)]
    dense = s == min(loaded.folders)
    if not dense and "ort" not in loaded.sparse_runtimes:
        targets = []  # the reference only
    candidates = []
    if ("ort-int8", s) in loaded.sessions and (dense or "ort-int8" in loaded.sparse_runtimes):
        runner = OrtRunner(loaded.sessions[("ort-int8", s)], inputs)
        candidates.append(Target(label, "ort-int8", f"{s}", batch, seq, runner))
    for runtime in ENGINES:
        engine = loaded.engines.get((runtime, s))
        if engine is not None:
            engine.prepare(batch, seq)
            layers[f"{label}-{runtime}-b{batch}-t{loaded.threads}"] = _engine_layers(
                engine, batch * seq
            )
            runner = EngineRunner(engine, inputs, runtime)
            candidates.append(Target(label, runtime, f"{s}", batch, seq, runner))
    if s in loaded.torch_models:
        model, masks = loaded.torch_models[s]
        runner = torch_csr_runner(model, masks, inputs)
        layers[f"{label}-torch-csr-b{batch}-t{loaded.threads}"] = runner.summary()
        candidates.append(Target(label, "torch-csr", f"{s}", batch, seq, runner))
    for t in candidates:
        tol = INT8_TOLERANCE if t.runtime in INT8 else FP32_TOL
        targets.append(_checked(t, ref, problems, tol))
    if loaded.worker is not None and (dense or "deepsparse" in loaded.sparse_runtimes):
        targets.append(_deepsparse_target(loaded, s, label, batch, seq, inputs, ref, problems))
    return [t for t in targets if t is not None]


# --------------------------------------------------------------------------------------------
# Timing and rows
# --------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Rounds per batch size, the time budget and the precision goal."""

    repeats: dict[int, int]
    max_repeats: dict[int, int]
    warmup: dict[int, int]
    budget_s: float
    precision: float
    clock: str = "wall"


def _ratio(base: dict | None, row: dict) -> dict:
    """``{"ratio", "ci", "no_difference"}`` of base p50 / row p50 (paired rounds)."""
    if base is None:
        return {}
    r, lo, hi = stats.ratio_interval(base["times_ms"], row["times_ms"])
    return {
        "ratio": r,
        "ci": [round(lo, 4), round(hi, 4)],
        "no_difference": stats.no_difference(lo, hi),
    }


def time_batch(loaded: Loaded, batch: int, seq: int, timing: Timing, problems, layers):
    """Rows of every target of one model at one batch, timed in interleaved rounds."""
    inputs = bench_inputs(loaded.input_names, loaded.task, loaded.vocab, batch, seq)
    targets = []
    for s in sorted(loaded.folders):
        targets += _targets_at(loaded, s, batch, seq, inputs, problems, layers)
    for t in targets:
        t.runner.time(timing.warmup[batch], timing.clock)
    dense = min(loaded.folders)
    calls = {t.key: (lambda n, r=t.runner: r.time(n, timing.clock)) for t in targets}
    load_before = os.getloadavg()[0]
    log(f"{loaded.name} b{batch} t{loaded.threads}: timing {len(targets)} targets")
    rounds = stats.run_rounds(
        calls,
        baseline=next(t.key for t in targets if t.runtime == "ort" and t.variant == f"{dense}"),
        min_rounds=timing.repeats[batch],
        max_rounds=max(timing.repeats[batch], timing.max_repeats[batch]),
        budget_s=timing.budget_s,
        precision=timing.precision,
    )
    load_after = os.getloadavg()[0]
    log(
        f"{loaded.name} b{batch} t{loaded.threads}: {rounds.rounds} rounds in "
        f"{rounds.elapsed_s:.0f}s ({rounds.stopped}; load avg {load_before:.1f} -> {load_after:.1f})"
    )
    for t in targets:
        t.runner.close()
    machine = stats.MachineLoad(load_before, load_after, stats.usable_cores(), loaded.threads)
    if machine.busy:
        problems.append(
            f"{loaded.name} b{batch} t{loaded.threads}: the machine was busy (load average "
            f"{load_before:.1f} -> {load_after:.1f} on {machine.cores} cores): not trustworthy"
        )
    rows = []
    for t in targets:
        row = asdict(summarize(t, rounds.times[t.key]))
        row.update(model=loaded.name, sparsity=int(t.variant), threads=loaded.threads)
        row.update(rounds=rounds.rounds, stopped=rounds.stopped)
        row["load_avg_1m"] = [load_before, load_after]
        row["flop_limit"] = flop_limits(loaded.folders[int(t.variant)], seq)
        rows.append(row)
    return _with_ratios(rows, dense)


def _with_ratios(rows: list[dict], dense: int) -> list[dict]:
    """Each row's ratio vs dense onnxruntime FP32 and, for INT8 rows, vs dense ort-int8."""
    base = next(r for r in rows if r["runtime"] == "ort" and r["sparsity"] == dense)
    base8 = next((r for r in rows if r["runtime"] == "ort-int8" and r["sparsity"] == dense), None)
    for row in rows:
        fp32 = _ratio(base, row)
        row["ratio_vs_dense_ort"] = fp32["ratio"]
        row["ratio_vs_dense_ort_ci"] = fp32["ci"]
        row["ratio_vs_dense_ort_no_difference"] = fp32["no_difference"]
        if row["runtime"] in INT8 and base8 is not None:
            int8 = _ratio(base8, row)
            row["ratio_vs_dense_ort_int8"] = int8["ratio"]
            row["ratio_vs_dense_ort_int8_ci"] = int8["ci"]
            row["ratio_vs_dense_ort_int8_no_difference"] = int8["no_difference"]
    return rows


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _cell(row: dict | None, key: str = "ratio_vs_dense_ort") -> str:
    """``2.51x [2.40-2.63]``, ``=`` when the interval contains 1.0; n/a when not measured."""
    if row is None or row.get(key) is None:
        return "n/a"
    lo, hi = row[f"{key}_ci"]
    mark = "=" if row[f"{key}_no_difference"] else ""
    return f"{row[key]:.2f}x [{lo:.2f}-{hi:.2f}]{mark}"


def _table(rows: list[dict]) -> list[str]:
    """One thread count's table: a line per (model, sparsity), columns per batch x runtime."""
    runtimes = [r for r in RUNTIMES if any(x["runtime"] == r for x in rows)]
    batches = sorted({r["batch"] for r in rows})
    index = {(r["model"], r["sparsity"], r["batch"], r["runtime"]): r for r in rows}
    int8 = [r for r in INT8 if r in runtimes and "ort-int8" in runtimes]
    head = ["model", "sparsity", "FLOP limit"]
    for b in batches:
        head += [f"b{b} dense ort p50 ms"] + [f"b{b} {RUNTIME_NAMES[r]}" for r in runtimes]
        head += [f"b{b} {RUNTIME_NAMES[r]} vs dense ort INT8" for r in int8]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in dict.fromkeys(r["model"] for r in rows):
        dense = min(x["sparsity"] for x in rows if x["model"] == model)
        for s in sorted({r["sparsity"] for r in rows if r["model"] == model}):
            any_row = next(r for r in rows if r["model"] == model and r["sparsity"] == s)
            cells = [model, f"{s}%", f"{any_row['flop_limit']['model']:.2f}x"]
            for b in batches:
                base = index.get((model, dense, b, "ort"))
                cells.append(f"{base['p50_ms']:.1f}" if base else "")
                cells += [_cell(index.get((model, s, b, rt))) for rt in runtimes]
                cells += [
                    _cell(index.get((model, s, b, rt)), "ratio_vs_dense_ort_int8") for rt in int8
                ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict) -> str:
    """The ratio tables (one per thread count) and how they were measured, as markdown."""
    lines: list[str] = []
    for threads in sorted({r["threads"] for r in report["results"]}):
        lines += ["", f"**{threads} thread(s)**", ""]
        lines += _table([r for r in report["results"] if r["threads"] == threads])
    env = report["environment"]
    notes = [
        "",
        "Ratios are p50-latency speedups vs the dense (0%) model on onnxruntime FP32, same model, "
        f"batch and threads, seq {report['seq_len']}, timed in interleaved rounds in one run; "
        "[lo-hi] is the 95% paired-bootstrap interval, '=' marks an interval that contains 1.0 "
        "(no measurable difference). 'vs dense ort INT8': the same against onnxruntime's "
        "quantize_dynamic of the dense model. FLOP limit: dense FLOPs / pruned FLOPs (linears at "
        f"their nonzeros, attention dense). {env['cpu']}, {report.get('clock', 'wall')}-clock "
        f"time, load average at start {env['load_avg_at_start'][0]:.1f}; onnxruntime "
        f"{env['onnxruntime']}, torch {env['torch']}, kernels {env['kernels']}"
        + (f", DeepSparse {env['deepsparse']}" if env.get("deepsparse") else "")
        + ".",
        f"Command: `{report['command']}` ({report['wall_s'] / 60:.1f} min)",
    ]
    if report.get("problems"):
        notes += ["", "Problems:"] + [f"- {p}" for p in report["problems"]]
    return "\n".join(lines[1:] + notes) + "\n"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _ints(spec: str) -> list[int]:
    return [int(x) for x in spec.split(",") if x.strip()]


def _names(spec: str) -> list[str]:
    names = [r.strip() for r in spec.split(",") if r.strip()]
    unknown = [r for r in names if r not in RUNTIMES]
    if unknown:
        raise SystemExit(
            f"unknown runtime(s) {', '.join(unknown)}; choose from {', '.join(RUNTIMES)}"
        )
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1].split("Writes")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument(
        "--sparsities", default="0,80,90,95", help="percent; the lowest is the dense base"
    )
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument(
        "--runtimes", default=",".join(RUNTIMES), help="comma list of " + ", ".join(RUNTIMES)
    )
    p.add_argument(
        "--sparse-runtimes",
        default=None,
        help="runtimes timed on the pruned models [default: all of --runtimes]; onnxruntime "
        "FP32 still checks their outputs (e.g. engine,engine-int8,deepsparse saves time: "
        "onnxruntime gains nothing from zeros)",
    )
    p.add_argument(
        "--threads",
        default=None,
        help="comma list of thread counts, e.g. 1,2 [default: recipec bench's default]",
    )
    p.add_argument(
        "--repeats", default="1:10,16:3", help="least rounds per batch size, BATCH:N,..."
    )
    p.add_argument("--max-repeats", default="1:40,16:8", help="most rounds per batch size")
    p.add_argument(
        "--budget",
        type=float,
        default=20.0,
        help="seconds per (model, batch, threads) to keep adding rounds after --repeats",
    )
    p.add_argument(
        "--precision",
        type=float,
        default=0.05,
        help="stop when every ratio's 95%% interval is within +- this",
    )
    p.add_argument("--warmup", default="1:2,16:1", help="warm-up calls per batch size")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: process CPU time (only meaningful with --threads 1)",
    )
    p.add_argument("--deepsparse-python", default=None)
    p.add_argument("--workdir", type=Path, default=ROOT / "results" / "tmp")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--reuse", action="store_true", help="reuse exported folders in --workdir")
    p.add_argument("--quick", action="store_true", help="2 rounds, no budget (smoke test)")
    return p.parse_args(argv)  # fmt: skip


def timing_from(args: argparse.Namespace, batch_sizes: list[int]) -> Timing:
    def per_batch(spec: str, default: int) -> dict[int, int]:
        table = dict(tuple(int(x) for x in item.split(":")) for item in spec.split(",") if item)
        return {b: table.get(b, default) for b in batch_sizes}

    if args.quick:
        two = dict.fromkeys(batch_sizes, 2)
        return Timing(two, two, dict.fromkeys(batch_sizes, 1), 0.0, args.precision, args.clock)
    return Timing(
        per_batch(args.repeats, 5),
        per_batch(args.max_repeats, 20),
        per_batch(args.warmup, 1),
        args.budget,
        args.precision,
        args.clock,
    )


def environment() -> dict:
    from recipec.kernels import native

    return {
        "cpu": cpu_name(),
        "load_avg_at_start": list(os.getloadavg()),
        "cores": stats.usable_cores(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "numpy": np.__version__,
        "kernels": native.backend(),
    }


def run_threads(args, threads, models, folders, runtimes, timing, env, out) -> None:
    """Every model at one thread count; rows, problems and layer choices into ``out``."""
    sparse_runtimes = _names(args.sparse_runtimes) if args.sparse_runtimes else runtimes
    torch.set_num_threads(threads)
    worker = None
    if "deepsparse" in runtimes:
        try:
            worker = start_deepsparse(args.deepsparse_python, num_cores=threads)
            env["deepsparse"] = worker.info.get("deepsparse")
        except RuntimeUnavailable as exc:
            out["problems"].append(f"deepsparse not measured ({threads} threads): {exc}")
            log(f"deepsparse not measured: {exc}")
    try:
        for name in models:
            loaded = load_runtimes(name, folders[name], runtimes, threads, args.workdir, worker)
            loaded.sparse_runtimes = sparse_runtimes
            for batch in _ints(args.batch_sizes):
                out["results"] += time_batch(
                    loaded, batch, args.seq_len, timing, out["problems"], out["layers"]
                )
    finally:
        if worker is not None:
            worker.close()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the JSON and markdown files."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    thread_counts = _ints(args.threads) if args.threads else [default_threads()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    runtimes = _names(args.runtimes)
    if "ort" not in runtimes:
        raise SystemExit("--runtimes must include ort (the reference)")
    if args.sparse_runtimes:
        _names(args.sparse_runtimes)
    timing = timing_from(args, _ints(args.batch_sizes))
    env = environment()
    out = {"results": [], "problems": [], "layers": {}}
    started = time.time()
    sparsities = sorted(_ints(args.sparsities))
    folders = {name: prepare(name, sparsities, args.workdir, args.reuse) for name in models}
    for threads in thread_counts:
        run_threads(args, threads, models, folders, runtimes, timing, env, out)
    report = {
        "command": "python benchmarks/latency.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "seq_len": args.seq_len,
        "clock": args.clock,
        "sparsities": sparsities,
        "threads": thread_counts,
        "timing": asdict(timing),
        "environment": env,
        "wall_s": time.time() - started,
        "results": out["results"],
        "problems": out["problems"],
        "layers": out["layers"],
    }
    text = markdown(report)
    save_report(args.out, "latency", report, text)
    print(text)
    log(f"wrote {args.out / 'latency.json'} and {args.out / 'latency.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

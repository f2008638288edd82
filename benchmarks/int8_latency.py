"""Issue 19's table from the runs of ``benchmarks/int8_table.sh``: dev accuracy of every row and
its CPU latency, all rows timed side by side in one run.

Rows (folders under RUNS, each with ``report.json`` and an exported ``onnx/``): dense FP32 (the
teacher, ``dense_fp32/onnx``), dense INT8 (PTQ of the teacher), sparse FP32 at 80/90%, sparse +
PTQ, sparse + QAT. Runtimes: onnxruntime (every row), DeepSparse 1.8 (every row, when its venv
is installed; ``--no-deepsparse`` leaves it out) and recipec's engine (INT8 on the quantized
sparse rows: the int8 weights of ``model.int8.safetensors``; FP32 on the sparse FP32 rows).
Every target of one batch size is timed in interleaved rounds (``run_alternating``), so the
ratios against dense FP32 and dense INT8 on onnxruntime come from the same minutes.

    OMP_NUM_THREADS=1 python benchmarks/int8_latency.py runs/int8 --threads 1

Writes RUNS/int8_table.json and .md (``--out`` to copy them elsewhere too).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle pools sleep

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name, loadavg, save_report  # noqa: E402

ROWS = [
    ("dense FP32", "dense_fp32", None),
    ("dense INT8 (PTQ)", "dense_int8", "final_eval"),
    ("sparse 80% FP32", "sparse_80", "final_eval"),
    ("sparse 80% + PTQ", "ptq_80", "final_eval"),
    ("sparse 80% + QAT", "qat_80", "final_eval"),
    ("sparse 90% FP32", "sparse_90", "final_eval"),
    ("sparse 90% + PTQ", "ptq_90", "final_eval"),
    ("sparse 90% + QAT", "qat_90", "final_eval"),
]


def accuracy(runs: Path, run: str) -> float | None:
    """The row's dev accuracy: its run's final eval (dense FP32: the teacher's eval)."""
    if run == "dense_fp32":
        report = json.loads((runs / "sparse_90" / "report.json").read_text())
        return report["teacher"]["eval"]["accuracy"]
    path = runs / run / "report.json"
    return json.loads(path.read_text())["final_eval"]["accuracy"] if path.is_file() else None


def targets_for(runs: Path, batch: int, seq: int, threads: int, worker, engines: bool, log):
    """Every row's targets at one batch size; a runtime that disagrees is left out (logged)."""
    from recipec.runtime.bench import Target, bench_inputs
    from recipec.runtime.bench_targets import EngineRunner
    from recipec.runtime.engine import INT8_TOLERANCE, EngineError, load
    from recipec.runtime.runtimes import OrtRunner, OutputMismatch, ort_session

    targets, refused = [], []
    for _, run, _ in ROWS:
        folder = runs / run / "onnx"
        if not (folder / "model.onnx").is_file():
            log(f"{run}: no {folder}/model.onnx, left out")
            continue
        int8 = (folder / "model.int8.safetensors").is_file()
        session = ort_session(folder / "model.onnx", threads)
        names = [i.name for i in session.get_inputs()]
        inputs = bench_inputs(names, "sequence-classification", 30522, batch, seq)
        ort = OrtRunner(session, inputs)
        ref = ort.outputs()
        targets.append(Target(run, "ort", run, batch, seq, ort, 0.0))
        tol = INT8_TOLERANCE if int8 else (1e-3, 1e-3)
        if worker is not None:
            try:
                ds = worker.runner(folder / "model.onnx", inputs, ref, atol=tol[0], rtol=tol[1])
                diff = ds.load_info["max_abs_diff"]
                targets.append(Target(run, "deepsparse", run, batch, seq, ds, diff))
            except OutputMismatch as exc:
                refused.append(f"deepsparse {run} b{batch}: {exc}")
        if engines and run.startswith(("sparse", "ptq", "qat")):
            dtype = "int8" if int8 else "fp32"
            try:
                engine = load(
                    folder, dtype, threads=threads, shapes=[(batch, seq)], tokenizer=False
                )
            except EngineError as exc:  # its load-time check against onnxruntime failed
                refused.append(f"engine-{dtype} {run} b{batch}: {exc}")
                continue
            runner = EngineRunner(engine, inputs, f"engine-{dtype}")
            diff = float(abs(runner.outputs() - ref).max())
            targets.append(Target(run, f"engine-{dtype}", run, batch, seq, runner, diff))
    for line in refused:
        log(f"REFUSED: {line}")
    return targets, refused


def render(report: dict) -> str:
    """One table per batch size: accuracy, and per runtime the p50 with its ratios against dense
    FP32 and dense INT8 on onnxruntime (engine: INT8 on the quantized rows, FP32 otherwise)."""
    rows, lat = report["rows"], report["latency"]
    seen = {m["runtime"] for m in lat}
    columns = [c for c in ("ort", "deepsparse", "engine") if c in seen or
               (c == "engine" and seen & {"engine-int8", "engine-fp32"})]  # fmt: skip

    def p50(run, runtime, batch):
        names = ("engine-int8", "engine-fp32") if runtime == "engine" else (runtime,)
        return next(
            (m["p50_ms"] for m in lat
             if m["model"] == run and m["runtime"] in names and m["batch"] == batch),
            None,
        )  # fmt: skip

    fp32_of = {"ptq_80": "sparse_80", "qat_80": "sparse_80", "ptq_90": "sparse_90",
               "qat_90": "sparse_90", "dense_int8": "dense_fp32"}  # fmt: skip
    lines = [
        f"Budget: {report['budget']}.",
        "",
        f"Latency: seq {report['seq']}, {report['threads']} thread(s), {report['clock']} clock, "
        f"p50 of {report['repeats']} interleaved rounds of {report['block']} calls over every "
        f"row and runtime of a batch size; CPU {report['cpu']}; load average "
        f"{report['load_start']} -> {report['load_end']}. Each cell: p50 ms (dense FP32 on "
        "onnxruntime / it, dense INT8 on onnxruntime / it). engine: recipec's engine, INT8 "
        "(int8 weights from model.int8.safetensors) on the quantized rows, FP32 on the others.",
    ]
    for b in sorted({m["batch"] for m in lat}):
        fp32, int8 = p50("dense_fp32", "ort", b), p50("dense_int8", "ort", b)
        lines += ["", f"Batch {b}:", ""]
        lines.append("| model | dev acc | vs its FP32 | " + " | ".join(columns) + " |")
        lines.append("|---" * (3 + len(columns)) + "|")
        for name, run, _ in ROWS:
            acc = rows.get(run)
            if acc is None:
                continue
            base = rows.get(fp32_of.get(run, ""))
            delta = f"{100 * (acc - base):+.2f} pt" if base is not None else "-"
            cells = []
            for c in columns:
                t = p50(run, c, b)
                if t is None or fp32 is None:
                    cells.append("-")
                    continue
                ratio = f"{fp32 / t:.2f}x" + (f", {int8 / t:.2f}x" if int8 else "")
                cells.append(f"{t:.2f} ({ratio})")
            lines.append(f"| {name} | {100 * acc:.2f} | {delta} | " + " | ".join(cells) + " |")
    if report["refused"]:
        lines += ["", "Refused (outputs disagree with onnxruntime):", ""]
        lines += [f"- {r}" for r in report["refused"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", type=Path, help="OUT of benchmarks/int8_table.sh")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--block", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--no-deepsparse", action="store_true")
    parser.add_argument("--no-engine", action="store_true")
    parser.add_argument("--budget", default="see benchmarks/int8_table.sh", help="for the header")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()

    import torch

    from recipec.runtime.bench import run_alternating
    from recipec.runtime.runtimes import RuntimeUnavailable, start_deepsparse

    torch.set_num_threads(args.threads)
    worker = None
    if not args.no_deepsparse:
        try:
            worker = start_deepsparse(None, num_cores=args.threads)
        except RuntimeUnavailable as exc:
            print(f"deepsparse: skipped: {exc}")
    report = {
        "budget": args.budget,
        "seq": args.seq_len,
        "threads": args.threads,
        "clock": args.clock,
        "repeats": args.repeats,
        "block": args.block,
        "cpu": cpu_name(),
        "load_start": loadavg(),
        "rows": {run: accuracy(args.runs, run) for _, run, _ in ROWS},
        "latency": [],
        "refused": [],
    }
    try:
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            targets, refused = targets_for(
                args.runs, batch, args.seq_len, args.threads, worker, not args.no_engine, print
            )
            report["refused"] += refused
            for m in run_alternating(
                targets, warmup=2, repeats=args.repeats, block=args.block, log=print,
                clock=args.clock,
            ):  # fmt: skip
                report["latency"].append(
                    {k: getattr(m, k) for k in ("model", "runtime", "batch", "seq", "p50_ms",
                                                "p90_ms", "p10_ms", "calls", "max_abs_diff")}
                )  # fmt: skip
            for t in targets:
                t.runner.close()
    finally:
        if worker is not None:
            worker.close()
    report["load_end"] = loadavg()
    table = render(report)
    print(table)
    save_report(args.runs, "int8_table", report, table)
    if args.out is not None:
        save_report(args.out, "int8_table", report, table)


if __name__ == "__main__":
    main()

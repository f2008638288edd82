"""``recipec bench``: dense vs sparse CPU latency on onnxruntime (FP32, INT8), DeepSparse,
torch-csr and recipec's engine (FP32, INT8)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from recipec.cli._common import check_image_path, fail, quiet_hf, to_stderr


def _int_list(value: str, what: str) -> list[int]:
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        fail(f"{what} must be comma-separated integers, got {value!r}")
    if not items or any(v < 1 for v in items):
        fail(f"{what} must be positive integers, got {value!r}")
    return items


@click.command("bench")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--runtime",
    "runtime_spec",
    default="all",
    show_default=True,
    help="Comma list of ort, ort-int8, deepsparse, torch-csr, engine, engine-int8 (or all). "
    "ort always runs: it is the reference.",
)
@click.option("--batch-sizes", default="1,16", show_default=True, help="Comma list of batch sizes.")
@click.option("--seq-len", type=int, default=128, show_default=True, help="Sequence length.")
@click.option(
    "--dense-baseline",
    is_flag=True,
    help="Also time the dense twin (zeros refilled) on each runtime, alternating with the sparse one.",
)
@click.option("--warmup", type=int, default=2, show_default=True, help="Untimed calls per target.")
@click.option(
    "--repeats",
    type=int,
    default=10,
    show_default=True,
    help="Timed alternating rounds (at least; more until the ratios are stable).",
)
@click.option(
    "--max-repeats",
    type=int,
    default=None,
    help="Most rounds per batch size [default: 10 x --repeats].",
)
@click.option(
    "--time-budget",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds per batch size to keep adding rounds after --repeats (0: exactly --repeats).",
)
@click.option(
    "--precision",
    type=float,
    default=0.05,
    show_default=True,
    help="Stop adding rounds when every ratio's 95%% interval is within +- this fraction.",
)
@click.option(
    "--threads",
    type=int,
    default=None,
    help="Threads/cores per runtime [default: OMP_NUM_THREADS if set, else all cores].",
)
@click.option(
    "--choices", type=int, default=4, show_default=True, help="Choices per item (multiple choice)."
)
@click.option(
    "--deepsparse-python",
    type=click.Path(path_type=Path),
    default=None,
    envvar="RECIPEC_DEEPSPARSE_PYTHON",
    help="Python of the DeepSparse venv (scripts/install_deepsparse.sh) [env: RECIPEC_DEEPSPARSE_PYTHON].",
)
@click.option(
    "--kernels",
    type=click.Choice(["auto", "csr", "sparseprop"]),
    default="auto",
    show_default=True,
    help="torch-csr sparse kernels to consider (auto: csr, plus sparseprop if installed).",
)
@click.option(
    "--clock",
    type=click.Choice(["wall", "cpu"]),
    default="wall",
    show_default=True,
    help="wall: elapsed time. cpu: process CPU time, for busy shared machines (use with --threads 1).",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the report as JSON.",
)
@click.option(
    "--plot",
    "plot_out",
    type=click.Path(path_type=Path),
    default=None,
    help="Write a PNG bar chart.",
)
def command(
    path: Path,
    runtime_spec: str,
    batch_sizes: str,
    seq_len: int,
    dense_baseline: bool,
    warmup: int,
    repeats: int,
    max_repeats: int | None,
    time_budget: float,
    precision: float,
    threads: int | None,
    choices: int,
    deepsparse_python: Path | None,
    kernels: str,
    clock: str,
    json_out: Path | None,
    plot_out: Path | None,
) -> None:
    """Time PATH (an exported folder, or a run dir / checkpoint, exported first).

    Warm-up, then repeated timed calls alternating between every runtime (and the dense
    twin with --dense-baseline); prints p50/p90 latency, items/s and the speedup of each
    sparse runtime over dense onnxruntime. Every runtime's outputs are checked against
    onnxruntime first; one that disagrees is refused (exit code 1).

    \b
    Example:
      recipec bench runs/quickstart/onnx --runtime ort,torch-csr --batch-sizes 1 --dense-baseline
    """
    # Before torch loads: OpenMP worker threads sleep when idle instead of spinning, so the
    # runtimes timed in turn do not steal each other's cores (onnxruntime: see ort_session).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if seq_len < 1:
        fail("--seq-len must be positive")
    if repeats < 1 or warmup < 0 or choices < 1 or (threads is not None and threads < 1):
        fail("--repeats, --choices and --threads must be positive, --warmup >= 0")
    if (max_repeats is not None and max_repeats < repeats) or time_budget < 0 or precision <= 0:
        fail("--max-repeats must be >= --repeats, --time-budget >= 0 and --precision > 0")
    sizes = _int_list(batch_sizes, "--batch-sizes")
    if plot_out:
        check_image_path(plot_out, "--plot")
    quiet_hf()
    from recipec.checkpoint import CheckpointError
    from recipec.export.onnx import ExportError, VerificationError
    from recipec.runtime.bench import (
        BenchError,
        bench,
        parse_runtimes,
    )
    from recipec.runtime.runtimes import RuntimeUnavailable, available_kernels

    try:
        runtimes = parse_runtimes(runtime_spec)
    except BenchError as exc:
        fail(str(exc))
    kernel_list = None if kernels == "auto" else [kernels]
    if kernel_list == ["sparseprop"] and "sparseprop" not in available_kernels():
        fail(
            "sparseprop is not installed (pip install pybind11 && pip install --no-build-isolation sparseprop)"
        )
    import warnings

    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    try:
        report = bench(
            path,
            runtimes,
            sizes,
            seq_len,
            dense_baseline=dense_baseline,
            warmup=warmup,
            repeats=repeats,
            threads=threads,
            choices=choices,
            deepsparse_python=deepsparse_python,
            kernels=kernel_list,
            clock=clock,
            log=to_stderr(),
            max_repeats=max_repeats,
            time_budget=time_budget,
            precision=precision,
        )
    except (BenchError, CheckpointError, ExportError, RuntimeUnavailable) as exc:
        fail(str(exc))
    except VerificationError as exc:
        fail(f"export verification failed: {exc}", code=1)
    _print_report(report, seq_len, clock, json_out, plot_out)


def _print_report(
    report: dict, seq_len: int, clock: str, json_out: Path | None, plot_out: Path | None
) -> None:
    """The table, the speedups and what was skipped; then the JSON and the plot if asked."""
    from recipec.runtime.bench import format_table, plot, save_json

    click.echo(
        f"{report['folder']}: {report['task']}, {report['sparsity']:.1%} of the pruned weights in "
        f"the graph are zero, seq {seq_len}, {report['threads']} thread(s), {clock} clock"
    )

    click.echo(format_table(report))
    ratios = [s for s in report["speedups"] if s["vs_dense_ort"]]
    for s in ratios:
        line = f"speedup vs dense onnxruntime, batch {s['batch']}: {s['runtime']} {s['vs_dense_ort']:.3g}x"
        if s.get("vs_dense_ort_ci"):
            lo, hi = s["vs_dense_ort_ci"]
            line += f" (95% interval {lo:.3g}-{hi:.3g})"
            if s.get("vs_dense_ort_no_difference"):
                line += ": no measurable difference"
        click.echo(line)
    machine = report.get("machine") or {}
    if machine.get("load_avg_start") is not None:
        click.echo(
            f"load average {machine['load_avg_start']:.2f} -> {machine['load_avg_end']:.2f} "
            f"on {machine['cores']} cores"
        )
    for warning in report.get("warnings", []):
        click.echo(warning)
    for name, why in report["skipped"].items():
        click.echo(f"{name}: skipped: {why}")
    if json_out:
        save_json(report, json_out)
        click.echo(f"wrote {json_out}")
    if plot_out:
        plot(report, plot_out)
        click.echo(f"wrote {plot_out}")
    if report["refused"]:
        for why in report["refused"]:
            click.echo(f"refused: {why}", err=True)
        raise SystemExit(1)

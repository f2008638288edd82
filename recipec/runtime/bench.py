"""Latency harness: warm-up, then repeated timed calls alternating between all targets.

Every (runtime, variant) pair is a *target*. Each round times one block of calls per target,
rotating the order each round, so slow drifts of the machine (thermal, other processes) hit
sparse and dense alike. Reported: p50/p90 latency and items/s (batch / p50), and the speedup
of each sparse target over the dense model on onnxruntime measured in the same run.

The dense baseline ("dense twin") is the same model with the pruned weights refilled with
random nonzero values of the kept weights' scale: identical graph and shapes, no zeros.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recipec.checkpoint import (
    MASKS_FILE,
    CheckpointError,
    load_masks,
    load_model,
    read_config,
    resolve_model_dir,
)
from recipec.export.onnx import (
    ONNX_FILE,
    export,
    graph_zeros,
    is_deployment_folder,
    load_onnx,
    read_sparsity,
)
from recipec.runtime import stats
from recipec.runtime.bench_targets import ENGINE_RUNTIMES, extra_targets, setup_extras
from recipec.runtime.engine import INT8_TOLERANCE
from recipec.runtime.runtimes import (
    RUNTIMES,
    OrtRunner,
    OutputMismatch,
    Runner,
    RuntimeUnavailable,
    TorchRunner,
    check_outputs,
    default_threads,
    ort_session,
    start_deepsparse,
    torch_csr_runner,
)

BASELINE = ("ort", "dense")
INT8_BASELINE = ("ort-int8", "dense")


class BenchError(Exception):
    """The benchmark cannot run as asked (a user error)."""


@dataclass
class Target:
    """One thing to time: a runner plus its labels."""

    model: str
    runtime: str
    variant: str
    batch: int
    seq: int
    runner: Runner
    max_abs_diff: float | None = None
    note: str = ""

    @property
    def key(self) -> tuple:
        """Unique key within a run."""
        return (self.model, self.runtime, self.variant, self.batch, self.seq)


@dataclass
class Measurement:
    """Summary of one target's timed calls."""

    model: str
    runtime: str
    variant: str
    batch: int
    seq: int
    calls: int
    p50_ms: float
    p90_ms: float
    mean_ms: float
    items_per_s: float
    max_abs_diff: float | None = None
    note: str = ""
    p10_ms: float | None = None
    times_ms: list[float] = field(default_factory=list)  # per round, for paired intervals


def summarize(target: Target, times: list[float]) -> Measurement:
    """p10/p50/p90/mean latency in ms and items/s (batch / p50)."""
    arr = np.asarray(times, dtype=float) * 1e3
    p50 = float(np.percentile(arr, 50))
    return Measurement(
        model=target.model,
        runtime=target.runtime,
        variant=target.variant,
        batch=target.batch,
        seq=target.seq,
        calls=len(times),
        p50_ms=p50,
        p90_ms=float(np.percentile(arr, 90)),
        mean_ms=float(arr.mean()),
        items_per_s=target.batch / (p50 / 1e3) if p50 > 0 else math.inf,
        max_abs_diff=target.max_abs_diff,
        note=target.note,
        p10_ms=float(np.percentile(arr, 10)),
        times_ms=[round(float(t), 4) for t in arr],
    )


def run_alternating(
    targets: list[Target],
    warmup: int = 2,
    repeats: int = 10,
    block: int = 1,
    log: Callable[[str], None] | None = None,
    clock: str = "wall",
) -> list[Measurement]:
    """Warm every target up, then ``repeats`` rounds of ``block`` calls each, rotating order."""
    log = log or (lambda msg: None)
    for t in targets:
        if warmup:
            t.runner.time(warmup, clock)
    times: dict[tuple, list[float]] = {t.key: [] for t in targets}
    n = len(targets)
    for r in range(repeats):
        order = targets[r % n :] + targets[: r % n] if n else []
        for t in order:
            times[t.key].extend(t.runner.time(block, clock))
        if repeats >= 5 and (r + 1) % max(1, repeats // 5) == 0:
            log(f"  round {r + 1}/{repeats}")
    return [summarize(t, times[t.key]) for t in targets]


def speedups(measurements: list[Measurement]) -> list[dict]:
    """Ratios of each sparse measurement vs dense onnxruntime, vs the same runtime dense and
    vs dense onnxruntime INT8, each with its paired bootstrap interval (``*_ci``: [lo, hi])
    and ``*_no_difference`` when that interval contains 1.0."""
    by_key = {(m.model, m.runtime, m.variant, m.batch, m.seq): m for m in measurements}
    rows = []
    for m in measurements:
        if m.variant == "dense":
            continue
        row = {"model": m.model, "runtime": m.runtime, "batch": m.batch, "seq": m.seq}
        bases = {
            "vs_dense_ort": by_key.get((m.model, *BASELINE, m.batch, m.seq)),
            "vs_dense_same_runtime": by_key.get((m.model, m.runtime, "dense", m.batch, m.seq)),
            "vs_dense_ort_int8": by_key.get((m.model, *INT8_BASELINE, m.batch, m.seq)),
        }
        for name, base in bases.items():
            row[name] = base.p50_ms / m.p50_ms if base else None
            if base is not None and len(base.times_ms) > 1 and len(m.times_ms) > 1:
                _, lo, hi = stats.ratio_interval(base.times_ms, m.times_ms)
                row[f"{name}_ci"] = [round(lo, 4), round(hi, 4)]
                row[f"{name}_no_difference"] = stats.no_difference(lo, hi)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------
# Inputs and dense twins
# --------------------------------------------------------------------------------------


def bench_inputs(
    input_names: list[str], task: str, vocab_size: int, batch: int, seq: int, choices: int = 4
) -> dict[str, np.ndarray]:
    """Random token ids (no padding) of a fixed shape; items = batch."""
    rng = np.random.default_rng(1234 + batch * 7 + seq)
    shape = (batch, choices, seq) if task == "multiple-choice" else (batch, seq)
    low = min(1000, vocab_size // 2)
    arrays = {
        "input_ids": rng.integers(low, vocab_size, size=shape, dtype=np.int64),
        "attention_mask": np.ones(shape, dtype=np.int64),
        "token_type_ids": np.zeros(shape, dtype=np.int64),
    }
    return {n: arrays[n] for n in input_names}


def _refill(arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    zeros = arr == 0
    if not zeros.any():
        return arr
    kept = arr[~zeros]
    scale = float(kept.std()) if kept.size > 1 else 0.02
    fill = rng.normal(0.0, scale or 0.02, size=int(zeros.sum())).astype(arr.dtype)
    fill[fill == 0] = scale or 0.02
    out = arr.copy()
    out[zeros] = fill
    return out


def max_sequence_length(config) -> int | None:
    """Tokens per sequence the model's position embeddings allow (None: not stated)."""
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return None
    # RoBERTa-style models number positions from padding_idx + 1 (two rows are never used).
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert", "longformer"):
        positions -= (getattr(config, "pad_token_id", 1) or 0) + 1
    return positions


def dense_twin_onnx(folder: str | Path, out_path: str | Path, seed: int = 0) -> Path:
    """Write ``folder``'s model.onnx with every pruned initializer refilled (no zeros)."""
    import onnx
    from onnx import numpy_helper

    info = read_sparsity(folder)
    model = load_onnx(Path(folder) / ONNX_FILE)
    targets = {t["onnx_initializer"] for t in info["tensors"].values() if "onnx_initializer" in t}
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        if init.name in targets:
            arr = _refill(numpy_helper.to_array(init), rng)
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    out_path = Path(out_path)
    onnx.save(model, str(out_path))
    return out_path


@torch.no_grad()
def dense_twin_torch(
    model: torch.nn.Module, tensors: dict[str, dict], dense_onnx: str | Path
) -> torch.nn.Module:
    """A copy of ``model`` whose masked tensors take the dense twin ONNX's values.

    ``tensors`` is sparsity.json's table (it names each tensor's initializer), so torch and
    onnxruntime time exactly the same dense model.
    """
    import onnx
    from onnx import numpy_helper

    arrays = {i.name: i for i in onnx.load(str(dense_onnx)).graph.initializer}
    twin = copy.deepcopy(model)
    params = dict(twin.named_parameters())
    for name, t in tensors.items():
        arr = numpy_helper.to_array(arrays[t["onnx_initializer"]])
        arr = np.ascontiguousarray(arr.T if t["transposed"] else arr)
        params[name].copy_(torch.from_numpy(arr))
    return twin


# --------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------


def check_seq_len(folder: Path, seq_len: int):
    """The model config in ``folder`` (CheckpointError if unreadable); refuses (BenchError) a
    ``seq_len`` longer than the model takes."""
    config = read_config(folder)
    positions = max_sequence_length(config)
    if positions is not None and seq_len > positions:
        raise BenchError(
            f"--seq-len {seq_len} is longer than this model takes ({positions} tokens, "
            f"max_position_embeddings in {folder / 'config.json'})"
        )
    return config


def activation_bytes(config, task: str, batch: int, seq: int, choices: int = 4) -> int:
    """A rough peak of one forward's activations in bytes (float32): the hidden states, Q/K/V,
    the FFN's intermediate output and the attention scores of one layer, plus the inputs."""
    rows = batch * (choices if task == "multiple-choice" else 1)
    hidden = int(getattr(config, "hidden_size", 768) or 768)
    inner = int(getattr(config, "intermediate_size", 4 * hidden) or 4 * hidden)
    heads = int(getattr(config, "num_attention_heads", 12) or 12)
    per_token = 4 * (6 * hidden + 2 * inner) + 3 * 8
    return rows * seq * per_token + 4 * 3 * rows * heads * seq * seq


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(config, task: str, batch_sizes, seq: int, choices: int = 4) -> None:
    """Refuses (BenchError) batch sizes whose activations would not fit in memory, up front."""
    free = available_memory()
    if free is None:
        return
    for batch in batch_sizes:
        need = activation_bytes(config, task, batch, seq, choices)
        if need > 0.8 * free:
            items = f"{batch} x {choices} choices" if task == "multiple-choice" else f"{batch}"
            raise BenchError(
                f"batch {items} at --seq-len {seq} needs about {need / 2**30:.1f} GiB of "
                f"activations per call (estimate), more than the {free / 2**30:.1f} GiB of memory "
                "available: use smaller --batch-sizes or --seq-len"
            )


def resolve_folder(path: str | Path, workdir: Path, log, seq_len: int | None = None) -> Path:
    """A deployment folder for ``path``: itself, ``path/onnx``, or a fresh verified export
    (with ``seq_len``, checked against the checkpoint's config before exporting)."""
    path = Path(path)
    if not path.exists():
        raise BenchError(f"{path}: no such file or directory")
    if is_deployment_folder(path):
        return path
    if is_deployment_folder(path / "onnx"):
        return path / "onnx"
    if path.is_file():
        raise BenchError(f"{path}: expected a deployment folder (recipec export) or a checkpoint")
    if seq_len is not None:  # a too-long --seq-len fails before the export, not after it
        try:
            check_seq_len(resolve_model_dir(path)[0], seq_len)
        except CheckpointError:
            pass  # export() says what is wrong with the checkpoint
    log(f"{path} is not an exported folder: exporting it first")
    return export(path, workdir / "onnx", log=log).output_dir


def parse_runtimes(spec: str) -> list[str]:
    """``"ort,deepsparse"`` -> list; ``"all"`` -> every runtime."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if names == ["all"]:
        return list(RUNTIMES)
    bad = [n for n in names if n not in RUNTIMES]
    if bad or not names:
        raise BenchError(
            f"unknown runtime(s) {', '.join(bad) or spec!r}; choose from {', '.join(RUNTIMES)}"
        )
    if "ort" not in names:
        names.insert(0, "ort")  # the reference for output checks and the baseline
    return list(dict.fromkeys(names))


def bench(
    path: str | Path,
    runtimes: list[str] | tuple[str, ...] = ("ort",),
    batch_sizes: list[int] | tuple[int, ...] = (1, 16),
    seq_len: int = 128,
    *,
    dense_baseline: bool = False,
    warmup: int = 2,
    repeats: int = 10,
    threads: int | None = None,
    choices: int = 4,
    deepsparse_python: str | Path | None = None,
    kernels: list[str] | None = None,
    atol: float = 1e-3,
    rtol: float = 1e-3,
    clock: str = "wall",
    log: Callable[[str], None] | None = None,
    max_repeats: int | None = None,
    time_budget: float = 30.0,
    precision: float = 0.05,
) -> dict:
    """Benchmark a deployment folder (or a checkpoint, exported first) and return a report.

    Timing runs ``repeats`` interleaved rounds, then more (up to ``max_repeats``, default
    10 x ``repeats``) until every ratio's 95% interval is within +-``precision`` or
    ``time_budget`` seconds per batch size are spent (``recipec.runtime.stats``).
    """
    log = log or (lambda msg: None)
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    if "ort" not in runtimes:
        runtimes = ["ort", *runtimes]
    if seq_len < 1 or any(b < 1 for b in batch_sizes):
        raise BenchError("batch sizes and --seq-len must be positive")
    report: dict = {
        "threads": threads,
        "clock": clock,
        "seq_len": seq_len,
        "batch_sizes": list(batch_sizes),
        "warmup": warmup,
        "repeats": repeats,
        "dense_baseline": dense_baseline,
        "runtimes": list(runtimes),
        "skipped": {},
        "refused": [],
        "torch_csr_layers": {},
        "timing": {
            "min_rounds": repeats,
            "max_rounds": max_repeats or 10 * repeats,
            "time_budget_s": time_budget,
            "precision": precision,
        },
    }
    with tempfile.TemporaryDirectory(prefix="recipec-bench-") as tmp:
        setup = _setup(
            path, Path(tmp), list(runtimes), seq_len, choices, dense_baseline, threads,
            deepsparse_python, kernels, atol, rtol, report, log,
        )  # fmt: skip
        try:
            load = stats.MachineLoad(stats.loadavg(), None, stats.usable_cores(), threads)
            measurements = _measure_batches(setup, batch_sizes, warmup, repeats, clock, report, log)
            load.load_end = stats.loadavg()
        finally:
            if setup.worker is not None:
                setup.worker.close()
    report["results"] = [asdict(m) for m in measurements]
    report["speedups"] = speedups(measurements)
    _judge(report, load, measurements)
    return report


def _judge(report: dict, load: stats.MachineLoad, measurements: list[Measurement]) -> None:
    """The machine's load and, when busy or unstable, the warning (``report["warnings"]``)."""
    report["machine"] = {
        "load_avg_start": load.load_start,
        "load_avg_end": load.load_end,
        "cores": load.cores,
        "threads": load.threads,
        "busy": load.busy,
    }
    unstable = [
        f"{m.runtime} {m.variant} b{m.batch}"
        for m in measurements
        if m.p10_ms and m.p90_ms / m.p10_ms > stats.UNSTABLE_SPREAD
    ]
    warning = stats.busy_warning(load, unstable)
    report["warnings"] = [warning] if warning else []


@dataclass
class _Setup:
    """What every batch size of one bench run shares (sessions, models, checks)."""

    label: str
    runtimes: list[str]
    names: list[str]
    task: str
    vocab_size: int
    seq_len: int
    choices: int
    sess_sparse: Any
    sess_dense: Any
    onnx_sparse: Path
    onnx_dense: Path | None
    worker: Any
    torch_model: Any
    torch_dense: Any
    masks: Any
    kernels: list[str] | None
    atol: float
    rtol: float
    extras: Any = None
    timing: dict = field(default_factory=dict)

    def tol(self, variant: str) -> tuple[float, float]:
        """``(atol, rtol)`` against onnxruntime's logits: an INT8 folder's graph (QDQ) is the
        reference of its sparse variant, so every runtime is checked at the INT8 tolerance."""
        if variant == "sparse" and self.extras is not None and self.extras.quantized:
            return INT8_TOLERANCE
        return self.atol, self.rtol


def _setup(
    path, workdir: Path, active: list[str], seq_len: int, choices: int, dense_baseline: bool,
    threads: int, deepsparse_python, kernels, atol: float, rtol: float, report: dict,
    log: Callable[[str], None],
) -> _Setup:  # fmt: skip
    """Export if needed, read the folder, start every runtime's session or model once."""
    folder = resolve_folder(path, workdir, log, seq_len)
    info = read_sparsity(folder)
    config = check_seq_len(folder, seq_len)
    check_memory(config, info["task"], report["batch_sizes"], seq_len, choices)
    onnx_sparse = folder / ONNX_FILE
    report.update(model=str(path), folder=str(folder), task=info["task"])
    _count_zeros(load_onnx(onnx_sparse), info, report, log)
    onnx_dense = dense_twin_onnx(folder, workdir / "dense.onnx") if dense_baseline else None
    worker = _deepsparse_worker(active, deepsparse_python, threads, report, log)
    torch_model, masks, torch_dense = _torch_models(active, folder, info, onnx_dense, report, log)
    onnx_paths = {"sparse": onnx_sparse, **({"dense": onnx_dense} if onnx_dense else {})}
    extras = setup_extras(
        active, folder, info, onnx_paths, workdir, threads, (torch_model, masks, torch_dense),
        report, log,
    )  # fmt: skip
    return _Setup(
        label=Path(path).name or str(path),
        runtimes=active,
        names=info["inputs"],
        task=info["task"],
        vocab_size=int(config.vocab_size),
        seq_len=seq_len,
        choices=choices,
        sess_sparse=_session(onnx_sparse, threads),
        sess_dense=_session(onnx_dense, threads) if onnx_dense else None,
        onnx_sparse=onnx_sparse,
        onnx_dense=onnx_dense,
        worker=worker,
        torch_model=torch_model,
        torch_dense=torch_dense,
        masks=masks,
        kernels=kernels,
        atol=atol,
        rtol=rtol,
        extras=extras,
        timing=report["timing"],
    )


def _count_zeros(graph, info: dict, report: dict, log: Callable[[str], None]) -> None:
    """The zeros actually in the graph's pruned initializers go into the report (``sparsity``);
    where they differ from sparsity.json, ``sparsity_mismatch`` says so."""
    found = graph_zeros(graph, info)
    report["sparsity"] = found["sparsity"]
    report["sparsity_recorded"] = found["recorded"]
    problems = []
    if found["missing"]:
        problems.append(f"{len(found['missing'])} pruned tensor(s) are not in the graph")
    if found["differ"] or abs(found["sparsity"] - found["recorded"]) > 1e-9:
        problems.append(
            f"its pruned initializers hold {found['sparsity']:.1%} zeros, sparsity.json records "
            f"{found['recorded']:.1%} ({len(found['differ'])} tensor(s) differ)"
        )
    if problems:
        report["sparsity_mismatch"] = (
            f"{report['folder']}/{ONNX_FILE} was changed after export: {'; '.join(problems)}. "
            "The 'sparse' rows time the graph as it is"
        )
        log(f"warning: {report['sparsity_mismatch']}")


def _session(onnx_path: Path, threads: int):
    """An onnxruntime session; a graph it cannot load is a BenchError naming the file."""
    try:
        return ort_session(onnx_path, threads)
    except Exception as exc:  # onnxruntime's pybind errors (InvalidProtobuf, Fail, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BenchError(f"{onnx_path}: onnxruntime cannot load it: {first}") from None


def _measure_batches(
    setup: _Setup,
    batch_sizes,
    warmup: int,
    repeats: int,
    clock: str,
    report: dict,
    log: Callable[[str], None],
) -> list[Measurement]:
    """For each batch size: inputs, the checked targets, then alternating timed rounds."""
    measurements: list[Measurement] = []
    for batch in batch_sizes:
        inputs = bench_inputs(
            setup.names, setup.task, setup.vocab_size, batch, setup.seq_len, setup.choices
        )
        try:
            targets = _targets_for_batch(setup, inputs, batch, report, log)
        except Exception as exc:  # MemoryError, or onnxruntime's "Failed to allocate memory"
            if not isinstance(exc, MemoryError) and "alloc" not in str(exc).lower():
                raise
            raise BenchError(
                f"batch {batch} at --seq-len {setup.seq_len} ran out of memory: use smaller "
                "--batch-sizes or --seq-len"
            ) from None
        log(
            f"batch {batch}: timing {len(targets)} target(s), {warmup} warm-up + "
            f"{repeats}-{setup.timing['max_rounds']} alternating rounds "
            f"(until +-{setup.timing['precision']:.0%} or {setup.timing['time_budget_s']:g} s)"
        )
        try:
            measurements += measure_targets(targets, warmup, clock, setup.timing, log)
        finally:
            for t in targets:
                t.runner.close()
    return measurements


def measure_targets(
    targets: list[Target], warmup: int, clock: str, timing: dict, log: Callable[[str], None]
) -> list[Measurement]:
    """Warm-up, then interleaved rounds until the ratios vs dense onnxruntime (or, without
    a dense baseline, each median) are stable or the budget is spent (``stats.run_rounds``)."""
    for t in targets:
        if warmup:
            t.runner.time(warmup, clock)
    calls = {t.key: (lambda n, r=t.runner: r.time(n, clock)) for t in targets}
    base = next((t.key for t in targets if (t.runtime, t.variant) == BASELINE), None)
    rounds = stats.run_rounds(
        calls,
        baseline=base,
        min_rounds=timing["min_rounds"],
        max_rounds=max(timing["max_rounds"], timing["min_rounds"]),
        budget_s=timing["time_budget_s"],
        precision=timing["precision"],
        log=log,
    )
    log(f"  {rounds.rounds} rounds in {rounds.elapsed_s:.1f} s ({rounds.stopped})")
    out = []
    for t in targets:
        m = summarize(t, rounds.times[t.key])
        m.note = (m.note + "; " if m.note else "") + f"{rounds.rounds} rounds, {rounds.stopped}"
        out.append(m)
    return out


def _deepsparse_worker(
    active: list[str], python: str | Path | None, threads: int, report: dict, log
) -> Any:
    """The DeepSparse worker when asked for; None (and the runtime dropped) when unavailable."""
    if "deepsparse" not in active:
        return None
    try:
        worker = start_deepsparse(python, num_cores=threads)
    except RuntimeUnavailable as exc:
        report["skipped"]["deepsparse"] = str(exc)
        log(f"deepsparse: skipped: {exc}")
        active.remove("deepsparse")
        return None
    report["deepsparse"] = {k: v for k, v in worker.info.items() if k != "ok"}
    report["deepsparse"]["python"] = str(worker.python)
    return worker


def _torch_models(
    active: list[str], folder: Path, info: dict, onnx_dense: Path | None, report: dict, log
) -> tuple[torch.nn.Module | None, dict | None, torch.nn.Module | None]:
    """``(model, masks, dense twin)`` for torch-csr and the engines; Nones (and those runtimes
    dropped) without torch weights in the folder."""
    users = [r for r in ("torch-csr", *ENGINE_RUNTIMES) if r in active]
    if not users:
        return None, None, None
    if not (folder / MASKS_FILE).is_file():
        msg = f"{folder} has no torch weights/masks (exported with --no-torch-weights)"
        for runtime in users:
            report["skipped"][runtime] = msg
            log(f"{runtime}: skipped: {msg}")
            active.remove(runtime)
        return None, None, None
    model = load_model(folder, info["task"])
    masks = load_masks(folder / MASKS_FILE, model)
    dense = dense_twin_torch(model, info["tensors"], onnx_dense) if onnx_dense else None
    return model, masks, dense


def _targets_for_batch(
    setup: _Setup, inputs, batch: int, report: dict, log: Callable[[str], None]
) -> list[Target]:
    targets = []
    ort_sparse = OrtRunner(setup.sess_sparse, inputs)
    ref = {"sparse": ort_sparse.outputs()}
    targets.append(Target(setup.label, "ort", "sparse", batch, setup.seq_len, ort_sparse, 0.0))
    if setup.sess_dense is not None:
        ort_dense = OrtRunner(setup.sess_dense, inputs)
        ref["dense"] = ort_dense.outputs()
        targets.append(Target(setup.label, "ort", "dense", batch, setup.seq_len, ort_dense, 0.0))
    variants = ["sparse"] + (["dense"] if setup.sess_dense is not None else [])
    for variant in variants:
        if "deepsparse" in setup.runtimes:
            path = setup.onnx_sparse if variant == "sparse" else setup.onnx_dense
            try:
                atol, rtol = setup.tol(variant)
                runner = setup.worker.runner(path, inputs, ref[variant], atol=atol, rtol=rtol)
                diff = runner.load_info["max_abs_diff"]
                targets.append(
                    Target(setup.label, "deepsparse", variant, batch, setup.seq_len, runner, diff)
                )
                log(
                    f"deepsparse {variant} b{batch}: compiled in "
                    f"{runner.load_info['compile_s']:.1f}s, max |diff| vs ort {diff:.2e}"
                )
            except (OutputMismatch, RuntimeUnavailable) as exc:
                report["refused"].append(str(exc))
                log(f"deepsparse {variant} b{batch}: REFUSED: {exc}")
        if "torch-csr" in setup.runtimes:
            if variant == "sparse":
                runner = torch_csr_runner(
                    setup.torch_model, setup.masks, inputs, kernels=setup.kernels
                )
                report["torch_csr_layers"][str(batch)] = runner.summary()
                log(f"torch-csr b{batch}: layers -> {runner.summary()}")
            else:
                runner = TorchRunner(setup.torch_dense, inputs)
            try:
                diff = check_outputs(
                    f"torch-csr {variant}", runner.outputs(), ref[variant], *setup.tol(variant)
                )
                targets.append(
                    Target(setup.label, "torch-csr", variant, batch, setup.seq_len, runner, diff)
                )
            except OutputMismatch as exc:
                report["refused"].append(str(exc))
                log(f"torch-csr {variant} b{batch}: REFUSED: {exc}")
    tol = (setup.atol, setup.rtol)
    for runtime, variant, runner, diff in extra_targets(
        setup.extras, inputs, ref, tol, report, log
    ):
        targets.append(Target(setup.label, runtime, variant, batch, setup.seq_len, runner, diff))
    return targets


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def _ratio_cell(row: dict | None, name: str) -> str:
    """``2.51x [2.40-2.63]``, with ``=`` for an interval containing 1.0 (no difference)."""
    if not row or not row.get(name):
        return ""
    text = f"{row[name]:.2f}x"
    ci = row.get(f"{name}_ci")
    if ci:
        text += f" [{ci[0]:.2f}-{ci[1]:.2f}]" + ("=" if row.get(f"{name}_no_difference") else "")
    return text


def format_table(report: dict) -> str:
    """A plain-text table of the measurements with speedups and their 95% intervals.

    A ratio marked ``=`` has an interval that contains 1.0: no measurable difference.
    """
    ratios = {
        (s["model"], s["runtime"], s["batch"], s["seq"]): s for s in report.get("speedups", [])
    }
    int8 = any(s.get("vs_dense_ort_int8") for s in report.get("speedups", []))
    header = (
        f"{'batch':>5}  {'runtime':<11} {'variant':<7} {'p10 ms':>9} {'p50 ms':>9} {'p90 ms':>9} "
        f"{'items/s':>9}  {'vs dense ort':>22}  {'vs same dense':>22}"
    ) + (f"  {'vs dense ort-int8':>22}" if int8 else "")
    lines = [header, "-" * len(header)]
    mismatch = bool(report.get("sparsity_mismatch"))
    for m in report.get("results", []):
        r = (
            ratios.get((m["model"], m["runtime"], m["batch"], m["seq"]))
            if m["variant"] == "sparse"
            else None
        )
        variant = f"{m['variant']}*" if mismatch and m["variant"] == "sparse" else m["variant"]
        p10 = m.get("p10_ms")
        line = (
            f"{m['batch']:>5}  {m['runtime']:<11} {variant:<7} "
            f"{p10 if p10 is not None else math.nan:>9.2f} {m['p50_ms']:>9.2f} "
            f"{m['p90_ms']:>9.2f} {m['items_per_s']:>9.1f}  "
            f"{_ratio_cell(r, 'vs_dense_ort'):>22}  {_ratio_cell(r, 'vs_dense_same_runtime'):>22}"
        )
        if int8:
            line += f"  {_ratio_cell(r, 'vs_dense_ort_int8'):>22}"
        lines.append(line)
    if any(s.get(k) for s in ratios.values() for k in s if k.endswith("_no_difference")):
        lines.append(
            "[lo-hi]: 95% interval (paired bootstrap); '=': contains 1.0, no measurable difference"
        )
    if mismatch:
        lines.append(
            f"* the graph holds {report['sparsity']:.1%} zeros where sparsity.json records "
            f"{report['sparsity_recorded']:.1%}: see the warning"
        )
    return "\n".join(lines)


def save_json(report: dict, path: str | Path) -> None:
    """Write the report as JSON."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def plot(report: dict, path: str | Path) -> None:
    """Bar chart of items/s per runtime and variant, one group per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report.get("results", [])
    batches = sorted({m["batch"] for m in results})
    order = {name: i for i, name in enumerate(RUNTIMES)}
    series = sorted(
        dict.fromkeys((m["runtime"], m["variant"]) for m in results),
        key=lambda s: (order.get(s[0], len(order)), s[1] != "dense"),
    )
    width = max(4.5, 0.9 * len(series) + 1)
    fig, axes = plt.subplots(1, max(1, len(batches)), figsize=(width * max(1, len(batches)), 4))
    axes = np.atleast_1d(axes)
    for ax, batch in zip(axes, batches):
        rows = {(m["runtime"], m["variant"]): m for m in results if m["batch"] == batch}
        labels = [f"{rt}\n{var}" for rt, var in series]
        values = [rows[s]["items_per_s"] if s in rows else 0.0 for s in series]
        colors = ["#4c72b0" if var == "dense" else "#dd8452" for _, var in series]
        bars = ax.bar(range(len(series)), values, color=colors)
        ax.set_xticks(range(len(series)), labels, fontsize=7)
        ax.set_title(f"batch {batch}, seq {report.get('seq_len')}")
        ax.set_ylabel("items/s (higher is better)")
        for bar, val in zip(bars, values):
            ax.annotate(
                f"{val:.1f}",
                (bar.get_x() + bar.get_width() / 2, val),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    sparsity = report.get("sparsity")
    title = f"{report.get('model', '')}" + (f" ({sparsity:.0%} sparse)" if sparsity else "")
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=120)
    plt.close(fig)

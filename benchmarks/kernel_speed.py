"""recipec's sparse CPU kernels vs dense ``F.linear`` (torch's MKL/oneDNN), per layer shape.

For each BERT-base (768x768, 3072x768, 768x3072) and MiniLM (384x384, 1536x384, 384x1536)
linear (out x in), token count, sparsity, structure and thread count: a random pruned weight
(unstructured: random mask; block4: random mask of 1x4 blocks), then dense ``F.linear``, the
fp32 kernel and the int8 kernel (and, where onnxruntime is installed, its dense fp32 and
dynamically quantized int8 MatMul: the runtime to beat) timed in interleaved rounds (the first
of each round rotates), median per variant. Reported: times, speedup over dense, and the GFLOP/s of the useful work
(2 * tokens * nonzeros) next to dense's GFLOP/s (2 * tokens * out * in): at 90% sparsity a
kernel running at 40% of dense's rate is 4x faster. ``--interop`` also checks that the
kernels and torch's ops share the cores well (a loop alternating both vs each alone).
``--training`` instead times one forward + backward (dX and the masked dW) per MiniLM layer at
90% on 2048 tokens: dense autograd, recipec's kernels (``sparse_linear_train``) and the
sparseprop package driven as recipec's ``MaskedSparseLinear`` drove it before it moved to
recipec's kernels (with its transposes), plus sparseprop's two kernel calls alone on
pre-transposed arrays.

    PYTHONPATH=. python benchmarks/kernel_speed.py                     # ~5 min on 2 idle cores
    PYTHONPATH=. python benchmarks/kernel_speed.py --models minilm --tokens 128 --sparsities 0.9 --repeats 3
    PYTHONPATH=. python benchmarks/kernel_speed.py --training              # sparseprop rows if installed

Writes ``--out/kernels.json`` and ``kernels.md`` (``training.json``/``.md`` with ``--training``;
default ``--out`` ``benchmarks/results/kernels/``).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import cpu_name, loadavg, save_report  # noqa: E402

from recipec.kernels import native  # noqa: E402

SHAPES = {
    "bert-base": [(768, 768), (3072, 768), (768, 3072)],
    "minilm": [(384, 384), (1536, 384), (384, 1536)],
}


def pruned_weight(out_f: int, in_f: int, sparsity: float, structure: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    if structure == "block4":
        keep = torch.rand(out_f, (in_f + 3) // 4, generator=g) >= sparsity
        mask = keep.repeat_interleave(4, dim=1)[:, :in_f]
    else:
        mask = torch.rand(out_f, in_f, generator=g) >= sparsity
    return w * mask


def time_interleaved(
    fns: dict, repeats: int, min_sample_s: float = 0.01, clock=None, stat=statistics.median
) -> dict:
    """Seconds per call of each function (median of samples), in rotating interleaved rounds.

    ``clock`` defaults to wall time; ``time.thread_time`` (CPU time of this thread) gives
    1-thread numbers that other processes on the cores do not inflate. ``stat=min`` picks the
    sample least disturbed by them (for several threads on a loaded machine).
    """
    clock = clock or time.perf_counter
    inner = {}
    for name, fn in fns.items():
        fn()  # warm-up: faults in the thread-local scratch, warms caches
        t = clock()
        fn()
        one = max(clock() - t, 1e-6)
        inner[name] = max(1, math.ceil(min_sample_s / one))
    samples = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn, n = fns[name], inner[name]
            t = clock()
            for _ in range(n):
                fn()
            samples[name].append((clock() - t) / n)
    return {name: stat(s) for name, s in samples.items()}


_ORT_SESSIONS: dict = {}


def ort_sessions(out_f: int, in_f: int, threads: int):
    """onnxruntime sessions of a dense [in -> out] MatMul: fp32, and int8 (dynamic quantization,
    as ``quantize_dynamic`` makes it: DynamicQuantizeLinear + MatMulInteger); None without ORT.
    Their speed does not depend on the weight's values, so one pair serves every sparsity."""
    key = (out_f, in_f, threads)
    if key in _ORT_SESSIONS:
        return _ORT_SESSIONS[key]
    try:
        import numpy as np
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        _ORT_SESSIONS[key] = None
        return None
    tmp = Path(tempfile.mkdtemp(prefix="recipec-kernels-ort-"))
    w = np.random.default_rng(0).standard_normal((in_f, out_f), dtype=np.float32) * 0.05
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", in_f])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", out_f])],
        [numpy_helper.from_array(w, "w")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, tmp / "fp32.onnx")
    quantize_dynamic(tmp / "fp32.onnx", tmp / "int8.onnx", weight_type=QuantType.QInt8)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    # ORT's own pool would keep spinning after each run and slow the torch/kernel calls
    # interleaved with it (the two-pools problem); 1 thread runs on the caller, no pool.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = tuple(
        ort.InferenceSession(str(tmp / f), so, providers=["CPUExecutionProvider"])
        for f in ("fp32.onnx", "int8.onnx")
    )
    _ORT_SESSIONS[key] = sessions
    return sessions


def bench_layer(model, out_f, in_f, tokens, sparsity, structure, threads, args) -> dict:
    torch.set_num_threads(threads)
    w = pruned_weight(out_f, in_f, sparsity, structure, seed=out_f * 7 + in_f)
    b = torch.randn(out_f) * 0.01
    x = torch.randn(tokens, in_f)
    fns = {"dense": lambda: F.linear(x, w, b)}
    ort_pair = None if args.no_ort else ort_sessions(out_f, in_f, threads)
    if ort_pair is not None:
        xn = x.numpy()
        fns["ort_fp32"] = lambda: ort_pair[0].run(None, {"x": xn})
        fns["ort_int8"] = lambda: ort_pair[1].run(None, {"x": xn})
    packed = {}
    for dtype in args.dtypes:
        p = native.pack_linear(w, b, structure=structure, dtype=dtype)
        packed[dtype] = p
        fns[dtype] = lambda p=p: native.sparse_linear(x, p)
    # Thread CPU time only where all the work runs on this thread (1 thread).
    clock = time.thread_time if (args.clock == "thread" and threads == 1) else time.perf_counter
    stat = min if args.stat == "min" else statistics.median
    with torch.inference_mode():
        med = time_interleaved(fns, args.repeats, clock=clock, stat=stat)
    nnz = packed[args.dtypes[0]].nnz
    dense_gf = 2 * tokens * out_f * in_f / med["dense"] / 1e9
    row = {
        "model": model,
        "out": out_f,
        "in": in_f,
        "tokens": tokens,
        "sparsity": sparsity,
        "structure": structure,
        "threads": threads,
        "clock": "thread-cpu" if clock is time.thread_time else "wall",
        "stat": args.stat,
        "nnz": nnz,
        "dense_ms": med["dense"] * 1e3,
        "dense_gflops": dense_gf,
    }
    for dtype in args.dtypes:
        useful = 2 * tokens * nnz / med[dtype] / 1e9
        row[f"{dtype}_ms"] = med[dtype] * 1e3
        row[f"{dtype}_speedup"] = med["dense"] / med[dtype]
        row[f"{dtype}_useful_gflops"] = useful
        row[f"{dtype}_vs_dense_rate"] = useful / dense_gf
    if ort_pair is not None:
        for kind in ("fp32", "int8"):
            row[f"ort_{kind}_ms"] = med[f"ort_{kind}"] * 1e3
            row[f"ort_{kind}_gflops"] = 2 * tokens * out_f * in_f / med[f"ort_{kind}"] / 1e9
            if kind in args.dtypes:  # ours vs ORT's dense kernel of the same dtype
                row[f"{kind}_vs_ort_{kind}"] = med[f"ort_{kind}"] / med[kind]
    return row


def interop_check(repeats: int) -> dict:
    """Loop time of torch matmul + kernel alternating vs the sum of each alone (2 threads)."""
    torch.set_num_threads(max(2, torch.get_num_threads()))
    w = pruned_weight(768, 768, 0.9, "unstructured", 0)
    p = native.pack_linear(w, None)
    x = torch.randn(128, 768)
    a = torch.randn(128, 768)
    dense_w = torch.randn(768, 768)

    def torch_op():
        return torch.matmul(a, dense_w)

    def kernel():
        return native.sparse_linear(x, p)

    def both():
        torch_op()
        kernel()

    with torch.inference_mode():
        med = time_interleaved({"torch": torch_op, "kernel": kernel, "both": both}, repeats * 3)
    return {
        "torch_ms": med["torch"] * 1e3,
        "kernel_ms": med["kernel"] * 1e3,
        "alternating_ms": med["both"] * 1e3,
        "alternating_over_sum": med["both"] / (med["torch"] + med["kernel"]),
        "threads": torch.get_num_threads(),
    }


def sparseprop_kernels():
    """The sparseprop package's compiled module (installed as top-level ``backend``), or None."""
    try:
        import backend  # sparseprop's generic module name
    except ImportError:
        return None
    return backend if hasattr(backend, "sparse_linear_vectorized_forward") else None


def training_layer(
    out_f: int, in_f: int, threads: int, tokens: int, repeats: int, sp, clock_mode: str
) -> dict:
    """Median forward + backward times of one 90% layer for each implementation."""
    torch.set_num_threads(threads)
    w = pruned_weight(out_f, in_f, 0.9, "unstructured", seed=out_f + in_f)
    mask = w != 0
    b = torch.zeros(out_f)
    x = torch.randn(tokens, in_f)
    gy = torch.randn(tokens, out_f)
    lay = native.make_train_layout(mask)

    def step(fn):
        xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
        fn(xg, wg, bg).backward(gy)

    fns = {
        "dense": lambda: step(F.linear),
        "recipec": lambda: step(lambda xg, wg, bg: native.sparse_linear_train(xg, wg, bg, lay)),
    }
    if sp is not None:
        # sparseprop as recipec's MaskedSparseLinear drove it: [features, tokens] arrays, so x,
        # y, dY and dX are transposed around the two kernel calls.
        flat = mask.reshape(-1).nonzero().reshape(-1)
        ip = lay.row_ptr.numpy()
        ix = (flat % in_f).to(torch.int32).numpy()

        def sp_step(with_transposes: bool):
            vals = w.reshape(-1)[flat].contiguous()
            xt = x.T.contiguous() if with_transposes else x_t
            out = torch.zeros(out_f, tokens)
            sp.sparse_linear_vectorized_forward(xt.numpy(), ip, ix, vals.numpy(), out.numpy())
            if with_transposes:
                (out.T.contiguous() + b).sum()
            got = gy.T.contiguous() if with_transposes else gy_t
            gxt = torch.zeros(in_f, tokens)
            gv = torch.zeros(flat.numel())
            sp.sparse_linear_vectorized_backward(
                xt.numpy(), ip, ix, vals.numpy(), got.numpy(), gxt.numpy(), gv.numpy()
            )
            if with_transposes:
                gxt.T.contiguous()
                torch.zeros(out_f * in_f).index_copy_(0, flat, gv)
                gy.sum(0)

        x_t, gy_t = x.T.contiguous(), gy.T.contiguous()
        fns["sparseprop"] = lambda: sp_step(True)
        fns["sparseprop_kernels"] = lambda: sp_step(False)
    # sparseprop's OpenMP runs on torch's libgomp (same soname, loaded first): 1 thread is 1.
    clock = time.thread_time if (clock_mode == "thread" and threads == 1) else time.perf_counter
    med = time_interleaved(fns, repeats, clock=clock)
    row = {"out": out_f, "in": in_f, "tokens": tokens, "threads": threads}
    row["clock"] = "thread-cpu" if clock is time.thread_time else "wall"
    row.update({f"{k}_ms": v * 1e3 for k, v in med.items()})
    return row


def training_rows(
    threads_list: list[int], repeats: int, clock_mode: str, tokens: int = 2048
) -> list[dict]:
    """Forward + backward per MiniLM layer: dense autograd, recipec, sparseprop (if installed)."""
    sp = sparseprop_kernels()
    rows = []
    for out_f, in_f in [(384, 1536), (1536, 384), (384, 384)]:
        for threads in threads_list:
            row = training_layer(out_f, in_f, threads, tokens, repeats, sp, clock_mode)
            rows.append(row)
            times = ", ".join(f"{k[:-3]} {v:.1f} ms" for k, v in row.items() if k.endswith("_ms"))
            print(f"train {out_f}x{in_f} thr={threads}: {times}", file=sys.stderr, flush=True)
    return rows


def training_markdown(rows: list[dict], machine: dict) -> str:
    lines = [
        "# Training step of one layer (forward + backward), 90% unstructured, 2048 tokens",
        "",
        f"{machine['cpu']}, torch {machine['torch']}, kernels backend `{machine['backend']}`, "
        f"load average {machine['loadavg_start']} -> {machine['loadavg_end']}, "
        f"{machine['repeats']} interleaved repeats (median), clock {machine['clock']} (thread: "
        "1-thread rows in thread CPU time). sparseprop: driven like recipec's former "
        "`MaskedSparseLinear` (transposes included); kernels: its two calls alone.",
        "",
        "| out x in | thr | dense ms | recipec ms | sparseprop ms | sparseprop kernels ms |"
        " recipec vs dense | recipec vs sparseprop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sp, spk, ours = r.get("sparseprop_ms"), r.get("sparseprop_kernels_ms"), r["recipec_ms"]
        sp_s = f"{sp:.1f}" if sp else "-"
        spk_s = f"{spk:.1f}" if spk else "-"
        vs_sp = f"{sp / ours:.2f}x" if sp else "-"
        lines.append(
            f"| {r['out']}x{r['in']} | {r['threads']} | {r['dense_ms']:.1f} | {ours:.1f} | "
            f"{sp_s} | {spk_s} | {r['dense_ms'] / ours:.2f}x | {vs_sp} |"
        )
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict], machine: dict, dtypes: list[str], interop: dict | None) -> str:
    lines = [
        "# Sparse kernels vs dense F.linear",
        "",
        f"{machine['cpu']}, torch {machine['torch']}, kernels backend `{machine['backend']}`, "
        f"load average {machine['loadavg_start']} -> {machine['loadavg_end']}, "
        f"{machine['repeats']} interleaved repeats ({machine['stat']}); clock: "
        + (
            "1-thread rows in thread CPU time, 2-thread rows wall time."
            if machine["clock"] == "thread"
            else "wall time."
        ),
        "Speedup = dense time / kernel time. GF/s = useful GFLOP/s (2 x tokens x nonzeros / time);"
        " % = that rate over dense's GFLOP/s.",
        "",
    ]
    ort = any("ort_fp32_ms" in r for r in rows)
    if ort:
        lines.insert(
            -1,
            "ORT: onnxruntime's dense MatMul on the same layer, fp32 and dynamically quantized int8"
            " (GF/s); `vs ORT` = ORT's time of the same dtype / ours.",
        )
    head = "| model | out x in | T | sparsity | structure | thr | dense ms | dense GF/s |"
    sep = "|---|---|---|---|---|---|---|---|"
    if ort:
        head += " ORT fp32 / int8 GF/s |"
        sep += "---|"
    for d in dtypes:
        head += f" {d} ms | {d} speedup | {d} GF/s (%) |"
        sep += "---|---|---|"
        if ort:
            head += f" {d} vs ORT |"
            sep += "---|"
    lines += [head, sep]
    for r in rows:
        line = (
            f"| {r['model']} | {r['out']}x{r['in']} | {r['tokens']} | {r['sparsity']:.0%} | "
            f"{r['structure']} | {r['threads']} | {r['dense_ms']:.3f} | {r['dense_gflops']:.0f} |"
        )
        if ort:
            line += f" {r.get('ort_fp32_gflops', 0):.0f} / {r.get('ort_int8_gflops', 0):.0f} |"
        for d in dtypes:
            line += (
                f" {r[f'{d}_ms']:.3f} | **{r[f'{d}_speedup']:.2f}x** | "
                f"{r[f'{d}_useful_gflops']:.0f} ({r[f'{d}_vs_dense_rate']:.0%}) |"
            )
            if ort:
                line += f" {r.get(f'{d}_vs_ort_{d}', 0):.2f}x |"
        lines.append(line)
    if interop:
        lines += [
            "",
            f"Interop ({interop['threads']} threads, 128 tokens, 768x768): torch matmul "
            f"{interop['torch_ms']:.3f} ms, kernel {interop['kernel_ms']:.3f} ms, both alternating "
            f"{interop['alternating_ms']:.3f} ms = {interop['alternating_over_sum']:.2f} x the sum.",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="bert-base,minilm")
    ap.add_argument("--tokens", default="128,2048")
    ap.add_argument("--sparsities", default="0.8,0.9,0.95")
    ap.add_argument("--structures", default="unstructured,block4")
    ap.add_argument("--dtypes", default="fp32,int8")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--stat",
        choices=("median", "min"),
        default="median",
        help="statistic of the interleaved samples (min: least disturbed by other processes)",
    )
    ap.add_argument(
        "--clock",
        choices=("wall", "thread"),
        default="wall",
        help="thread: 1-thread rows timed in this thread's CPU time (for a shared, loaded machine)",
    )
    ap.add_argument("--training", action="store_true", help="the training comparison instead")
    ap.add_argument("--stem", default=None, help="file name stem (default kernels / training)")
    ap.add_argument("--no-interop", action="store_true", help="skip the torch/kernel interop check")
    ap.add_argument("--no-ort", action="store_true", help="skip onnxruntime's dense baselines")
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "kernels"
    )
    args = ap.parse_args(argv)
    args.dtypes = args.dtypes.split(",")
    be = native.backend()
    print(f"kernels backend: {be} ({native.unavailable_reason() or 'fast path'})", file=sys.stderr)
    machine = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "backend": be,
        "repeats": args.repeats,
        "clock": args.clock,
        "stat": args.stat,
        "loadavg_start": loadavg(),
    }
    print(f"load average {machine['loadavg_start']}, threads {args.threads}", file=sys.stderr)
    if args.training:
        threads = [int(t) for t in args.threads.split(",")]
        rows = training_rows(threads, args.repeats, args.clock)
        machine["loadavg_end"] = loadavg()
        md = training_markdown(rows, machine)
        print(md)
        save_report(args.out, args.stem or "training", {"machine": machine, "rows": rows}, md)
        return 0
    rows = []
    for model in args.models.split(","):
        for out_f, in_f in SHAPES[model]:
            for tokens in map(int, args.tokens.split(",")):
                for sparsity in map(float, args.sparsities.split(",")):
                    for structure in args.structures.split(","):
                        for threads in map(int, args.threads.split(",")):
                            r = bench_layer(
                                model, out_f, in_f, tokens, sparsity, structure, threads, args
                            )
                            rows.append(r)
                            msg = " ".join(f"{d} {r[f'{d}_speedup']:.2f}x" for d in args.dtypes)
                            print(
                                f"{model} {out_f}x{in_f} T={tokens} {sparsity:.0%} {structure} "
                                f"thr={threads}: dense {r['dense_ms']:.2f} ms, {msg}",
                                file=sys.stderr,
                                flush=True,
                            )
    interop = None if args.no_interop else interop_check(args.repeats)
    machine["loadavg_end"] = loadavg()
    md = markdown(rows, machine, args.dtypes, interop)
    print(md)
    report = {"machine": machine, "rows": rows, "interop": interop}
    save_report(args.out, args.stem or "kernels", report, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

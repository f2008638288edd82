"""Training-step time with fixed masks: dense kernels vs recipec's sparse kernels (`--sparse-backprop`).

For each sparsity, the embedded all-MiniLM-L6-v2 (``AutoModelForSequenceClassification``, new
2-label head) has each of its 36 encoder linears pruned to exactly that sparsity by magnitude;
then two copies train with the compiled ``constant`` recipe (masks fixed, as in the fine-tuning
after the last pruning step or a sparse-transfer run) on the same random token ids, AdamW and
gradient clipping, in the loop's hook order. Copy A keeps PyTorch's dense kernels, copy B runs
the pruned linears on recipec's kernels (:class:`recipec.kernels.sparse_backprop.SparseBackprop`,
every layer, whatever its sparsity). Blocks of steps alternate A/B (the first of each pair
alternates too) in one run, so drift in machine load hits both. Reported per sparsity: the
median step times, their ratio, and the largest weight difference between the copies at the
end (they see the same batches: float rounding only). Then, per MiniLM layer shape, one
layer's forward + backward, sparse vs dense, at ``--layer-sparsities`` (where the kernels
start paying off: ``DEFAULT_MIN_SPARSITY``), and the parts of the sparse one at 90%.

    python benchmarks/sparse_backprop.py --threads 2          # ~10 min on 2 idle cores
    python benchmarks/sparse_backprop.py --threads 1 --clock cpu   # a busy machine: CPU time
    python benchmarks/sparse_backprop.py --model tiny --sparsities 0.9 --rounds 1 --block 2   # smoke run

``--clock cpu`` times with the process's CPU time (``time.process_time``): with one torch
thread other processes on the cores do not inflate it, so it measures what a quiet machine's
wall clock would. The kernels are built on first use; where they cannot be, the B copy runs
the pure-torch fallback and the report says so. Writes
``benchmarks/results/sparse_backprop.json`` and ``sparse_backprop.md``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import platform
import statistics
import sys
import time

from _common import add_ab_training_options, cpu_name, loadavg, save_report  # noqa: E402
from overhead import start_ab_run  # noqa: E402  (the same model and random batches)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import recipec  # noqa: E402
from recipec.checkpoint import magnitude_masks  # noqa: E402
from recipec.kernels import native  # noqa: E402
from recipec.kernels import sparse_backprop as sbp  # noqa: E402
from recipec.recipe.load import load_recipe_text  # noqa: E402
from recipec.sparsity.masks import apply_masks_  # noqa: E402

RECIPE = "training: {steps: 1000000}\nmodifiers:\n  - {type: constant}\n"
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter  # set by main (--clock)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@torch.no_grad()
def prune_per_layer(model: torch.nn.Module, sparsity: float) -> int:
    """Zero the smallest-magnitude ``sparsity`` of each encoder linear weight; returns how many tensors."""
    masks = magnitude_masks(model, sparsity)
    apply_masks_(dict(model.named_parameters()), masks)
    return len(masks)


class Arm:
    """One copy: the compiled constant recipe's hooks around forward, backward, clip, AdamW."""

    def __init__(self, model: torch.nn.Module, max_grad_norm: float, sparse: bool):
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
        recipe = load_recipe_text(RECIPE, "<sparse_backprop recipe>")
        self.program = recipec.compile(recipe, model, self.optimizer, steps_per_epoch=1_000_000)
        self.program.step_start(0)  # the constant modifier installs the masks
        self.kernels = None
        if sparse:
            self.kernels = sbp.SparseBackprop(model, min_sparsity=0.0)
            self.kernels.refresh(self.program.masks.masks, self.program.masks.version)
        self.max_grad_norm = max_grad_norm

    def step(self, step: int, batch: dict[str, torch.Tensor]) -> float:
        torch.manual_seed(step)  # the same dropout masks in both arms
        start = clock()
        self.program.step_start(step)
        outputs = self.model(**batch)
        loss = self.program.loss(outputs.loss, batch=batch, outputs=outputs)
        loss.backward()
        self.program.before_optimizer_step(step)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.program.after_optimizer_step(step)
        return clock() - start


def run_sparsity(base: torch.nn.Module, sparsity: float, args, batches) -> dict:
    model = copy.deepcopy(base)
    tensors = prune_per_layer(model, sparsity)
    dense = Arm(copy.deepcopy(model), args.max_grad_norm, sparse=False)
    sparse = Arm(model, args.max_grad_norm, sparse=True)
    for step in range(args.warmup):
        batch = batches[step % len(batches)]
        log(
            f"{100 * sparsity:.0f}%: warm-up {step + 1}/{args.warmup}: A {dense.step(step, batch):.2f}s, "
            f"B {sparse.step(step, batch):.2f}s"
        )
    times = {"A": [], "B": []}
    rounds = []
    next_step = {"A": args.warmup, "B": args.warmup}
    for r in range(args.rounds):
        order = "AB" if r % 2 == 0 else "BA"
        block = {"A": [], "B": []}
        for which in order:
            arm = dense if which == "A" else sparse
            for _ in range(args.block):
                s = next_step[which]
                block[which].append(arm.step(s, batches[s % len(batches)]))
                next_step[which] += 1
        times["A"] += block["A"]
        times["B"] += block["B"]
        a, b = statistics.median(block["A"]), statistics.median(block["B"])
        rounds.append({"round": r + 1, "order": order, "dense_s": a, "sparse_s": b, "ratio": a / b})
        log(
            f"{100 * sparsity:.0f}%: round {r + 1}/{args.rounds} ({order}): dense {a:.3f}s, sparse {b:.3f}s, "
            f"speedup {a / b:.2f}x"
        )
    worst = max(
        float((p.detach() - q.detach()).abs().max())
        for p, q in zip(dense.model.parameters(), sparse.model.parameters())
    )
    med_a, med_b = statistics.median(times["A"]), statistics.median(times["B"])
    return {
        "sparsity": sparsity,
        "pruned_tensors": tensors,
        "sparse_layers": len(sparse.kernels.layers),
        "dense_median_s": med_a,
        "sparse_median_s": med_b,
        "speedup": med_a / med_b,
        "median_round_speedup": statistics.median(r["ratio"] for r in rounds),
        "max_weight_difference": worst,
        "rounds": rounds,
    }


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return 1000.0 * statistics.median(times)


def _layer(rows: int, cols: int, sparsity: float, tokens: int):
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(rows, cols, generator=gen) >= sparsity
    weight = (torch.randn(rows, cols, generator=gen) * mask).requires_grad_()
    bias = torch.randn(rows, generator=gen).requires_grad_()
    x = torch.randn(tokens, cols, generator=gen).requires_grad_()
    grad_out = torch.randn(tokens, rows, generator=gen)
    return sbp.Layout.from_mask(mask), weight, bias, x, grad_out


def _dense_step(weight, bias, x, grad_out):
    y = torch.nn.functional.linear(x, weight, bias)
    return torch.autograd.grad(y, [x, weight, bias], grad_out)


def _sparse_step(layout, weight, bias, x, grad_out):
    y = sbp.MaskedSparseLinear.apply(x, weight, bias, layout)
    return torch.autograd.grad(y, [x, weight, bias], grad_out)


def layer_speedups(shapes, sparsities, tokens: int, repeats: int) -> list[dict]:
    """One layer's forward + backward (x, weight and bias gradients) as ``--sparse-backprop``
    runs it vs ``F.linear``'s: median ms and ratio per shape and sparsity."""
    rows_out = []
    for rows, cols in shapes:
        for sparsity in sparsities:
            layout, *tensors = _layer(rows, cols, sparsity, tokens)
            dense_ms = _median_ms(functools.partial(_dense_step, *tensors), repeats)
            sparse_ms = _median_ms(functools.partial(_sparse_step, layout, *tensors), repeats)
            rows_out.append(
                {
                    "shape": [rows, cols],
                    "sparsity": sparsity,
                    "tokens": tokens,
                    "dense_ms": dense_ms,
                    "sparse_ms": sparse_ms,
                    "speedup": dense_ms / sparse_ms,
                }
            )
            log(
                f"layer {rows}x{cols} at {100 * sparsity:.0f}%: dense {dense_ms:.1f} ms, "
                f"sparse {sparse_ms:.1f} ms, {dense_ms / sparse_ms:.2f}x"
            )
    return rows_out


def layer_breakdown(shapes, sparsity: float, tokens: int, repeats: int = 20) -> list[dict]:
    """Median ms of each part of one sparse layer's forward + backward: the kernels' forward,
    their backward (dX on the transposed CSR, dW at the kept positions, the bias gradient),
    the whole of it as ``--sparse-backprop`` runs it, and the dense ``F.linear`` forward +
    backward of the same layer for comparison."""
    return [_layer_parts(rows, cols, sparsity, tokens, repeats) for rows, cols in shapes]


def _layer_parts(rows: int, cols: int, sparsity: float, tokens: int, repeats: int) -> dict:
    layout, weight, bias, x, grad_out = _layer(rows, cols, sparsity, tokens)
    which = sbp.backend()
    train = layout.train
    y = native.sparse_linear_train(x, weight, bias, train, backend=which)  # kept for backward

    def forward():
        with torch.no_grad():
            return native.sparse_linear_train(x, weight, bias, train, backend=which)

    parts = {
        "forward kernel": forward,
        "backward kernel": lambda: torch.autograd.grad(
            y, [x, weight, bias], grad_out, retain_graph=True
        ),
        "sparse forward + backward": lambda: _sparse_step(layout, weight, bias, x, grad_out),
        "dense F.linear forward + backward": lambda: _dense_step(weight, bias, x, grad_out),
    }
    row = {"shape": [rows, cols], "sparsity": sparsity, "tokens": tokens}
    for name, fn in parts.items():
        row[name] = _median_ms(fn, repeats)
    return row


def markdown(report: dict) -> str:
    cfg, machine = report["config"], report["machine"]
    clock_note = (
        "CPU time of the process (`--clock cpu`)" if cfg["clock"] == "cpu" else "wall clock"
    )
    lines = [
        "# Training step with fixed masks: dense kernels vs recipec's sparse kernels",
        "",
        f"Model: {cfg['model']}, every encoder linear pruned to exactly the sparsity shown "
        f"(per-layer magnitude); batch {cfg['batch_size']} x seq {cfg['seq_len']}, AdamW, clip "
        f"{cfg['max_grad_norm']}, `constant` recipe; CPU {machine['cpu']}, "
        f"{machine['torch_threads']} torch threads, {clock_note}; {cfg['rounds']} rounds of A/B "
        f"blocks of {cfg['block']} steps after {cfg['warmup']} warm-up steps, alternating. Load "
        f"average {machine['loadavg_start']} -> {machine['loadavg_end']}. torch "
        f"{machine['torch']}, recipec kernels `{machine['kernels']}`.",
    ]
    if machine.get("kernels_note"):
        lines += ["", f"**{machine['kernels_note']}**"]
    lines += [
        "",
        f"Command: `{report['command']}`",
        "",
        "| sparsity | layers on the kernels | dense step, median (s) | sparse step, median (s) "
        "| speedup | median of per-round speedups | max weight difference after training |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["results"]:
        lines.append(
            f"| {100 * row['sparsity']:.0f}% | {row['sparse_layers']} of {row['pruned_tensors']} "
            f"| {row['dense_median_s']:.3f} | {row['sparse_median_s']:.3f} | "
            f"**{row['speedup']:.2f}x** | {row['median_round_speedup']:.2f}x | "
            f"{row['max_weight_difference']:.1e} |"
        )
    lines += _layer_tables(report)
    return "\n".join(lines) + "\n"


def _layer_tables(report: dict) -> list[str]:
    lines = []
    speed = report.get("layer_speedups") or []
    if speed:
        shapes = list(dict.fromkeys(tuple(r["shape"]) for r in speed))
        spars = list(dict.fromkeys(r["sparsity"] for r in speed))
        got = {(tuple(r["shape"]), r["sparsity"]): r for r in speed}
        lines += [
            "",
            f"One layer's forward + backward (x, weight and bias gradients), {speed[0]['tokens']} "
            "tokens: dense `F.linear` time / sparse time (where the kernels start paying off: "
            "`DEFAULT_MIN_SPARSITY`):",
            "",
            "| layer (out x in) | " + " | ".join(f"{100 * sp:.0f}%" for sp in spars) + " |",
            "| --- |" + " ---: |" * len(spars),
        ]
        for shape in shapes:
            cells = [f"{got[(shape, sp)]['speedup']:.2f}x" for sp in spars]
            lines.append(f"| {shape[0]}x{shape[1]} | " + " | ".join(cells) + " |")
    parts = report.get("layer_breakdown") or []
    if parts:
        names = [k for k in parts[0] if k not in ("shape", "sparsity", "tokens")]
        lines += [
            "",
            f"One layer at {100 * parts[0]['sparsity']:.0f}% zeros, {parts[0]['tokens']} tokens, "
            "median ms of each part of its sparse forward + backward:",
            "",
            "| layer (out x in) | " + " | ".join(names) + " |",
            "| --- |" + " ---: |" * len(names),
        ]
        for row in parts:
            lines.append(
                f"| {row['shape'][0]}x{row['shape'][1]} | "
                + " | ".join(f"{row[n]:.1f}" for n in names)
                + " |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    global clock
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_ab_training_options(parser, rounds=4, block=3, what=" per sparsity")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95, 0.97])
    parser.add_argument(
        "--layer-sparsities",
        type=float,
        nargs="*",
        default=[0.5, 0.6, 0.7, 0.8, 0.9],
        help="sparsities of the one-layer sparse vs dense table (none: skip it)",
    )
    parser.add_argument("--layer-repeats", type=int, default=20)
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall (default), or cpu: the process's CPU time (for --threads 1 on a busy machine)",
    )
    args = parser.parse_args(argv)
    clock = CLOCKS[args.clock]
    if args.clock == "cpu" and args.threads != 1:
        log("warning: --clock cpu adds up the CPU time of every torch thread; use --threads 1")
    command, base, batches = start_ab_run("sparse_backprop.py", args, argv, log)
    kernels_note = sbp.slow_reason()
    if kernels_note:
        log(f"warning: {kernels_note}")
    load_start = loadavg()
    results = [run_sparsity(base, s, args, batches) for s in args.sparsities]
    hidden, inner = base.config.hidden_size, base.config.intermediate_size
    shapes = [(hidden, hidden), (inner, hidden), (hidden, inner)]
    tokens = args.batch_size * args.seq_len
    speedups = layer_speedups(shapes, args.layer_sparsities, tokens, args.layer_repeats)
    breakdown = layer_breakdown(shapes, 0.9, tokens, args.layer_repeats)
    report = {
        "benchmark": "sparse_backprop",
        "command": command,
        "config": {
            "model": "all-MiniLM-L6-v2 (embedded)"
            if args.model == "minilm"
            else "tiny random BERT",
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "max_grad_norm": args.max_grad_norm,
            "rounds": args.rounds,
            "block": args.block,
            "warmup": args.warmup,
            "clock": args.clock,
        },
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "kernels": sbp.backend(),
            "kernels_note": kernels_note,
            "loadavg_start": load_start,
            "loadavg_end": loadavg(),
        },
        "results": results,
        "layer_speedups": speedups,
        "layer_breakdown": breakdown,
    }
    text = markdown(report)
    save_report(args.out, "sparse_backprop", report, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

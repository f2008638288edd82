"""Training-step time with fixed masks: dense kernels vs SparseProp kernels (`--sparse-backprop`).

For each sparsity, the embedded all-MiniLM-L6-v2 (``AutoModelForSequenceClassification``, new
2-label head) has each of its 36 encoder linears pruned to exactly that sparsity by magnitude;
then two copies train with the compiled ``constant`` recipe (masks fixed, as in the fine-tuning
after the last pruning step or a sparse-transfer run) on the same random token ids, AdamW and
gradient clipping, in the loop's hook order. Copy A keeps PyTorch's dense kernels, copy B runs
the pruned linears on SparseProp's (:class:`recipec.kernels.sparse_backprop.SparseBackprop`,
every layer, whatever its sparsity). Blocks of steps alternate A/B (the first of each pair
alternates too) in one run, so drift in machine load hits both. Reported per sparsity: the
median step times, their ratio, and the largest weight difference between the copies at the
end (they see the same batches: float rounding only).

    python benchmarks/sparse_backprop.py --threads 2          # ~10 min on 2 idle cores
    python benchmarks/sparse_backprop.py --model tiny --sparsities 0.9 --rounds 1 --block 2   # smoke run

Needs the optional sparseprop package (pip install pybind11 && pip install --no-build-isolation
sparseprop). Writes ``benchmarks/results/sparse_backprop.json`` and ``sparse_backprop.md``.
"""

from __future__ import annotations

import argparse
import copy
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
from recipec.kernels import sparse_backprop as sbp  # noqa: E402
from recipec.recipe.load import load_recipe_text  # noqa: E402
from recipec.sparsity.masks import apply_masks_  # noqa: E402

RECIPE = "training: {steps: 1000000}\nmodifiers:\n  - {type: constant}\n"


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
        start = time.perf_counter()
        self.program.step_start(step)
        outputs = self.model(**batch)
        loss = self.program.loss(outputs.loss, batch=batch, outputs=outputs)
        loss.backward()
        self.program.before_optimizer_step(step)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.program.after_optimizer_step(step)
        return time.perf_counter() - start


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


def layer_breakdown(shapes, sparsity: float, tokens: int, repeats: int = 20) -> list[dict]:
    """Median ms of each part of one sparse layer's forward + backward, as MaskedSparseLinear
    does them: the four transposes, the zero-filled buffers, the two kernels, and the dense
    ``F.linear`` forward + backward of the same layer for comparison."""
    return [_layer_parts(rows, cols, sparsity, tokens, repeats) for rows, cols in shapes]


def _layer_parts(rows: int, cols: int, sparsity: float, tokens: int, repeats: int) -> dict:
    from recipec.kernels.sparseprop import transpose_2d

    kernels = sbp.require_backend()
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(rows, cols, generator=gen) >= sparsity
    weight = torch.randn(rows, cols, generator=gen) * mask
    layout = sbp.Layout.from_mask(mask)
    x, grad_out = torch.randn(tokens, cols, generator=gen), torch.randn(tokens, rows, generator=gen)
    xt, got = transpose_2d(x), transpose_2d(grad_out)
    values = weight.reshape(-1)[layout.flat].contiguous()
    idx = (layout.indptr.numpy(), layout.indices.numpy())
    w, xg = weight.clone().requires_grad_(), x.clone().requires_grad_()
    parts = {
        "transposes (4)": lambda: (
            transpose_2d(x),
            transpose_2d(torch.empty(rows, tokens)),
            transpose_2d(grad_out),
            transpose_2d(torch.empty(cols, tokens)),
        ),
        "zero-filled buffers": lambda: (
            torch.zeros(rows, tokens),
            torch.zeros(cols, tokens),
            torch.zeros(layout.nnz),
            torch.zeros(rows * cols),
        ),
        "forward kernel": lambda: kernels.sparse_linear_vectorized_forward(
            xt.numpy(), *idx, values.numpy(), torch.zeros(rows, tokens).numpy()
        ),
        "backward kernel": lambda: kernels.sparse_linear_vectorized_backward(
            xt.numpy(),
            *idx,
            values.numpy(),
            got.numpy(),
            torch.zeros(cols, tokens).numpy(),
            torch.zeros(layout.nnz).numpy(),
        ),
        "dense F.linear forward + backward": lambda: torch.autograd.grad(
            torch.nn.functional.linear(xg, w), [xg, w], grad_out
        ),
    }
    row = {"shape": [rows, cols], "sparsity": sparsity, "tokens": tokens}
    for name, fn in parts.items():
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        row[name] = 1000.0 * statistics.median(times)
    return row


def markdown(report: dict) -> str:
    cfg, machine = report["config"], report["machine"]
    lines = [
        "# Training step with fixed masks: dense kernels vs SparseProp kernels",
        "",
        f"Model: {cfg['model']}, every encoder linear pruned to exactly the sparsity shown (per-layer magnitude); "
        f"batch {cfg['batch_size']} x seq {cfg['seq_len']}, AdamW, clip {cfg['max_grad_norm']}, `constant` recipe; "
        f"CPU {machine['cpu']}, {machine['torch_threads']} torch threads; {cfg['rounds']} rounds of A/B blocks of "
        f"{cfg['block']} steps after {cfg['warmup']} warm-up steps, alternating. Load average {machine['loadavg_start']}"
        f" -> {machine['loadavg_end']}. torch {machine['torch']}, sparseprop {machine['sparseprop']}.",
        "",
        f"Command: `{report['command']}`",
        "",
        "| sparsity | layers on SparseProp | dense step, median (s) | SparseProp step, median (s) | speedup | median of per-round speedups | max weight difference after training |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["results"]:
        lines.append(
            f"| {100 * row['sparsity']:.0f}% | {row['sparse_layers']} of {row['pruned_tensors']} | {row['dense_median_s']:.3f} | "
            f"{row['sparse_median_s']:.3f} | **{row['speedup']:.2f}x** | {row['median_round_speedup']:.2f}x | "
            f"{row['max_weight_difference']:.1e} |"
        )
    parts = report.get("layer_breakdown") or []
    if parts:
        names = [k for k in parts[0] if k not in ("shape", "sparsity", "tokens")]
        lines += [
            "",
            f"One layer at {100 * parts[0]['sparsity']:.0f}% zeros, {parts[0]['tokens']} tokens, median ms "
            "of each part of its sparse forward + backward (the kernels' zero-filled outputs included in "
            "their times too):",
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
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_ab_training_options(parser, rounds=4, block=3, what=" per sparsity")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    args = parser.parse_args(argv)
    if sbp.backend() is None:
        log(f"error: this benchmark needs the sparseprop package ({sbp.INSTALL_HINT})")
        return 2
    command, base, batches = start_ab_run("sparse_backprop.py", args, argv, log)
    load_start = loadavg()
    results = [run_sparsity(base, s, args, batches) for s in args.sparsities]
    hidden, inner = base.config.hidden_size, base.config.intermediate_size
    breakdown = layer_breakdown(
        [(hidden, hidden), (inner, hidden), (hidden, inner)], 0.9, args.batch_size * args.seq_len
    )
    from importlib.metadata import version

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
        },
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "sparseprop": version("sparseprop"),
            "loadavg_start": load_start,
            "loadavg_end": loadavg(),
        },
        "results": results,
        "layer_breakdown": breakdown,
    }
    text = markdown(report)
    save_report(args.out, "sparse_backprop", report, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

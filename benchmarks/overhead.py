"""Training-step overhead of a compiled recipe: plain PyTorch loop vs the same loop + recipec.

Both loops train a copy of the same model (the embedded all-MiniLM-L6-v2 with a new
2-label head, ``AutoModelForSequenceClassification``) on the same random token ids with
AdamW and gradient clipping; the second also runs a compiled GMP + LR recipe
(``step_start`` / ``loss`` / ``before_optimizer_step`` / ``after_optimizer_step``). Blocks
of steps alternate A/B/A/B (the first of each pair alternates too) in one run, so drift in
machine load hits both. Reported: the median step-time ratio B/A over steps that do not
prune (goal <= 1.03), and the cost of one pruning step (the modifier's own timing of mask
selection + installation, and the pruning step's time minus a normal step's). The time spent
inside the hooks is also timed directly, which is robust to noise from other processes.

    python benchmarks/overhead.py                     # ~5 min on 2 idle cores (MiniLM, 8 x 2 x 4 steps)
    python benchmarks/overhead.py --model tiny --rounds 2 --block 3   # smoke run, seconds

Writes ``benchmarks/results/overhead.json`` and ``overhead.md``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from _common import add_ab_training_options, cpu_name, save_report  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import yaml  # noqa: E402

import recipec  # noqa: E402
from recipec.recipe.load import load_recipe_text  # noqa: E402

ROOT = Path(__file__).resolve().parent
GOAL = 1.03


def log(msg: str) -> None:
    print(f"[overhead] {msg}", file=sys.stderr, flush=True)


def build_model(name: str) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    if name == "tiny":
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=1000,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=512,
        )
        return BertForSequenceClassification(config)
    from recipec.models import load_model
    from recipec.tasks import TaskInfo

    torch.manual_seed(0)  # the new classification head
    return load_model(None, task=TaskInfo("overhead", "classification", 2)).model


def make_recipe(total: int, warmup: int, final_sparsity: float) -> tuple[str, dict]:
    """GMP (30% first step, cubic to ``final_sparsity``) with a rewound LR at each pruning step."""
    start = warmup + 1
    end = warmup + max(2, int(0.75 * (total - warmup)))
    every = max(1, (end - start) // 5)
    data = {
        "training": {"steps": total},
        "modifiers": [
            {
                "type": "gmp",
                "init_sparsity": 0.3,
                "final_sparsity": final_sparsity,
                "start_step": start,
                "end_step": end,
                "update_every_steps": every,
                "scope": "global",
                "schedule": "cubic",
            },
            {
                "type": "lr",
                "schedule": "linear",
                "init_lr": 5e-5,
                "final_lr": 5e-6,
                "end_step": start,
            },
            {
                "type": "lr",
                "schedule": "cyclic_linear",
                "init_lr": 5e-5,
                "final_lr": 5e-6,
                "cycle_steps": every,
                "start_step": start,
                "end_step": end,
            },
            {
                "type": "lr",
                "schedule": "linear",
                "init_lr": 5e-5,
                "final_lr": 0.0,
                "start_step": end,
            },
        ],
    }
    return yaml.safe_dump(data, sort_keys=False), data


def make_batches(
    vocab: int, n: int, batch_size: int, seq_len: int
) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    low = min(1000, vocab // 2)  # skip [PAD]/[CLS]/... in the real vocabulary
    return [
        {
            "input_ids": torch.randint(low, vocab, (batch_size, seq_len), generator=g),
            "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
            "labels": torch.randint(0, 2, (batch_size,), generator=g),
        }
        for _ in range(n)
    ]


def start_ab_run(
    script: str, args, argv: list[str] | None, log
) -> tuple[str, torch.nn.Module, list]:
    """Shared start of the A/B training-step benchmarks: torch threads, the command line as
    run, the model in train mode, and 4 random batches of ``--batch-size`` x ``--seq-len``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    given = sys.argv[1:] if argv is None else argv
    command = f"python benchmarks/{script}" + (" " + " ".join(given) if given else "")
    log(f"loading {args.model}")
    base = build_model(args.model)
    base.train()
    return command, base, make_batches(base.config.vocab_size, 4, args.batch_size, args.seq_len)


class Plain:
    """The plain loop: forward, backward, clip, AdamW step."""

    def __init__(self, model: torch.nn.Module, max_grad_norm: float):
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
        self.max_grad_norm = max_grad_norm

    def step(self, step: int, batch: dict[str, torch.Tensor]) -> float:
        start = time.perf_counter()
        loss = self.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


class WithRecipe(Plain):
    """The same loop with the compiled recipe's hooks, in the contract's order."""

    def __init__(self, model: torch.nn.Module, max_grad_norm: float, recipe_text: str, total: int):
        super().__init__(model, max_grad_norm)
        recipe = load_recipe_text(recipe_text, "<overhead recipe>")
        self.program = recipec.compile(recipe, model, self.optimizer, steps_per_epoch=total)
        self.hook_times: dict[int, float] = {}  # seconds spent inside the four hooks, per step

    def step(self, step: int, batch: dict[str, torch.Tensor]) -> float:
        program = self.program
        clock = time.perf_counter
        start = clock()
        program.step_start(step)
        t1 = clock()
        outputs = self.model(**batch)
        t2 = clock()
        loss = program.loss(outputs.loss, batch=batch, outputs=outputs)
        t3 = clock()
        loss.backward()
        t4 = clock()
        program.before_optimizer_step(step)
        t5 = clock()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        t6 = clock()
        program.after_optimizer_step(step)
        t7 = clock()
        self.optimizer.zero_grad(set_to_none=True)
        end = clock()
        self.hook_times[step] = (t1 - start) + (t3 - t2) + (t5 - t4) + (t7 - t6)
        return end - start


def median_ms(fn, repeats: int = 20) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def _mask_grads_ms(masks) -> float:
    """``mask_grads_`` with gradients present (after ``zero_grad(set_to_none=True)`` there are none)."""
    for name in masks.masks:
        masks.params[name].grad = torch.ones_like(masks.params[name])
    try:
        return median_ms(masks.mask_grads_)
    finally:
        for name in masks.masks:
            masks.params[name].grad = None


def markdown(report: dict) -> str:
    s = report["summary"]
    cfg = report["config"]
    lines = [
        "# Training-step overhead of a compiled recipe (GMP + LR)",
        "",
        f"Model: {cfg['model']} ({cfg['params'] / 1e6:.1f}M parameters, {cfg['target_params'] / 1e6:.1f}M pruned), "
        f"batch {cfg['batch_size']} x seq {cfg['seq_len']}, AdamW, clip {cfg['max_grad_norm']}, CPU "
        f"({report['machine']['cpu']}, {report['machine']['torch_threads']} torch threads). "
        f"{cfg['rounds']} rounds of A/B blocks of {cfg['block']} steps, alternating.",
        "",
        f"Command: `{report['command']}`",
        "",
        "| | plain loop (A) | with recipe (B) | B / A |",
        "| --- | ---: | ---: | ---: |",
        f"| median step, non-pruning steps (s) | {s['median_plain_s']:.3f} | {s['median_recipe_s']:.3f} | "
        f"**{s['ratio_of_medians']:.3f}** |",
        f"| median of per-round ratios | | | {s['median_round_ratio']:.3f} |",
        f"| goal | | | <= {GOAL} ({'met' if s['goal_met'] else 'NOT met'}) |",
        f"| time inside the 4 hooks per non-pruning step, median / max (ms) | | {s['hooks_median_ms']:.1f} / "
        f"{s['hooks_max_ms']:.1f} | 1 + hooks / A = {s['hooks_ratio']:.4f} |",
        "",
        "| pruning step cost | seconds |",
        "| --- | ---: |",
        f"| mask selection + installation (modifier timing), median of {s['pruning_events']} | "
        f"{s['prune_compute_median_s']:.3f} |",
        f"| same, max | {s['prune_compute_max_s']:.3f} |",
        f"| pruning step time minus median non-pruning step (median) | {s['prune_step_extra_median_s']:.3f} |",
        "",
        "| hook | ms per call (median of 20) |",
        "| --- | ---: |",
        f"| `MaskState.apply_()` (after each optimizer step) | {s['apply_masks_ms']:.2f} |",
        f"| `MaskState.mask_grads_()` (before each optimizer step) | {s['mask_grads_ms']:.2f} |",
        "",
        f"Final sparsity of the pruned tensors: {100 * s['final_sparsity']:.2f}%. "
        f"Load average during the run: {report['machine']['loadavg_start']} -> {report['machine']['loadavg_end']} "
        "(other processes share these 2 cores; the A/B alternation spreads their effect over both).",
        "",
        "| round | order | A median (s) | B median, non-pruning (s) | B / A |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    for r in report["rounds"]:
        b = "n/a" if r["recipe_median_s"] is None else f"{r['recipe_median_s']:.3f}"
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.3f}"
        lines.append(f"| {r['round']} | {r['order']} | {r['plain_median_s']:.3f} | {b} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_ab_training_options(parser, rounds=8, block=4, what="")
    parser.add_argument("--final-sparsity", type=float, default=0.9)
    args = parser.parse_args(argv)
    command, base, batches = start_ab_run("overhead.py", args, argv, log)
    timed = args.rounds * args.block
    total = args.warmup + timed
    recipe_text, recipe_data = make_recipe(total, args.warmup, args.final_sparsity)
    plain = Plain(copy.deepcopy(base), args.max_grad_norm)
    with_recipe = WithRecipe(copy.deepcopy(base), args.max_grad_norm, recipe_text, total)
    del base
    program = with_recipe.program
    pruning_steps = {s for s, _, _ in program.plan.pruning_events()}
    log(f"recipe: {total} steps, pruning at {sorted(pruning_steps)}; {timed} timed steps per loop")

    load_start = os.getloadavg()
    for step in range(args.warmup):
        batch = batches[step % len(batches)]
        log(
            f"warm-up {step + 1}/{args.warmup}: A {plain.step(step, batch):.2f}s, "
            f"B {with_recipe.step(step, batch):.2f}s"
        )

    plain_times: dict[int, float] = {}
    recipe_times: dict[int, float] = {}
    rounds = []
    step_a = step_b = args.warmup
    for r in range(args.rounds):
        order = "AB" if r % 2 == 0 else "BA"
        first_a, first_b = step_a, step_b
        for which in order:
            for _ in range(args.block):
                if which == "A":
                    plain_times[step_a] = plain.step(step_a, batches[step_a % len(batches)])
                    step_a += 1
                else:
                    recipe_times[step_b] = with_recipe.step(step_b, batches[step_b % len(batches)])
                    step_b += 1
        a = [plain_times[s] for s in range(first_a, step_a)]
        b = [recipe_times[s] for s in range(first_b, step_b) if s not in pruning_steps]
        a_med = statistics.median(a)
        b_med = statistics.median(b) if b else None
        rounds.append(
            {
                "round": r + 1,
                "order": order,
                "plain_median_s": a_med,
                "recipe_median_s": b_med,
                "ratio": None if b_med is None else b_med / a_med,
                "pruning_steps": sorted(s for s in range(first_b, step_b) if s in pruning_steps),
            }
        )
        log(
            f"round {r + 1}/{args.rounds} ({order}): A {a_med:.3f}s, B {b_med if b_med is None else round(b_med, 3)}s"
            + ("" if b_med is None else f", B/A {b_med / a_med:.3f}")
        )
    program.finalize()
    load_end = os.getloadavg()

    non_pruning_b = [t for s, t in recipe_times.items() if s not in pruning_steps]
    pruning_b = [t for s, t in recipe_times.items() if s in pruning_steps]
    med_a = statistics.median(plain_times.values())
    med_b = statistics.median(non_pruning_b)
    history = [h for h in program.history() if h["step"] in recipe_times]
    hooks = [with_recipe.hook_times[s] for s in recipe_times if s not in pruning_steps]
    masks = program.masks
    summary = {
        "median_plain_s": med_a,
        "median_recipe_s": med_b,
        "ratio_of_medians": med_b / med_a,
        "median_round_ratio": statistics.median(
            r["ratio"] for r in rounds if r["ratio"] is not None
        ),
        "goal": GOAL,
        "goal_met": med_b / med_a <= GOAL,
        # Robust to machine noise: time inside the hooks only, relative to a plain step.
        "hooks_median_ms": 1000.0 * statistics.median(hooks),
        "hooks_max_ms": 1000.0 * max(hooks),
        "hooks_ratio": 1.0 + statistics.median(hooks) / med_a,
        "pruning_events": len(history),
        "prune_compute_median_s": statistics.median(h["seconds"] for h in history)
        if history
        else 0.0,
        "prune_compute_max_s": max((h["seconds"] for h in history), default=0.0),
        "prune_step_extra_median_s": statistics.median(t - med_b for t in pruning_b)
        if pruning_b
        else 0.0,
        "apply_masks_ms": median_ms(masks.apply_),
        "mask_grads_ms": _mask_grads_ms(masks),
        "final_sparsity": program.sparsity()[0],
    }
    params = sum(p.numel() for p in with_recipe.model.parameters())
    report = {
        "benchmark": "overhead",
        "command": command,
        "config": {
            "model": "all-MiniLM-L6-v2 (embedded), AutoModelForSequenceClassification"
            if args.model == "minilm"
            else "tiny random BERT",
            "params": params,
            "target_params": sum(m.numel() for m in masks.masks.values()),
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "rounds": args.rounds,
            "block": args.block,
            "warmup": args.warmup,
            "max_grad_norm": args.max_grad_norm,
            "recipe": recipe_data,
        },
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in load_end],
        },
        "summary": summary,
        "rounds": rounds,
        "pruning_history": history,
        "step_times": {"plain": plain_times, "recipe": recipe_times},
    }
    text = markdown(report)
    save_report(args.out, "overhead", report, text)
    print(text)
    log(f"wrote {args.out / 'overhead.json'} and {args.out / 'overhead.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One-shot pruning quality on a real model: global magnitude vs oBERT on SST-2.

1. Fine-tune the embedded all-MiniLM-L6-v2 (new 2-label head) on a seeded subset of SST-2
   train with recipec's own training loop (AdamW, warm-up + linear decay, dynamic padding).
   The dense model is cached under ``$RECIPEC_CACHE/oneshot/<key>/`` (default
   ``~/.cache/recipec``) keyed by every setting, so reruns skip this.
2. From the same dense weights, prune the encoder linears one-shot (no retraining) to each
   sparsity with a compiled one-step recipe: ``gmp`` (global magnitude) and ``obert`` (global,
   unstructured, block Fisher of B=50 from m gradients of SST-2 train mini-batches).
3. oBERT's dampening is chosen per sparsity on held-out *train* examples (disjoint from the
   fine-tuning subset; the dev set is never used for the choice) from ``--damps``; SST-2 dev
   accuracy is reported for every run, the chosen damp marked.

    python benchmarks/oneshot.py                 # what we ran; see benchmarks/results/oneshot.md
    python benchmarks/oneshot.py --train-examples 64 --steps 4 --num-grads 4 --damps 1e-5 \\
        --tune-examples 16 --max-eval 32 --out /tmp/oneshot     # smoke run

Writes ``oneshot.json`` and ``oneshot.md`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from _common import save_report  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent
DEFAULT_DATA = ROOT.parent.parent / "shared" / "data" / "sst2"


def log(msg: str) -> None:
    print(f"[oneshot] {msg}", file=sys.stderr, flush=True)


def default_cache() -> Path:
    root = os.environ.get("RECIPEC_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "recipec"
    )
    return Path(root) / "oneshot"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data", default=str(DEFAULT_DATA), help="SST-2 folder with train.tsv and dev.tsv"
    )
    p.add_argument(
        "--model", default=None, help="model folder or name (default: the embedded MiniLM-L6)"
    )
    p.add_argument(
        "--train-examples", type=int, default=20000, help="fine-tuning subset of SST-2 train"
    )
    p.add_argument("--steps", type=int, default=600, help="fine-tuning optimizer steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of --steps")
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7])
    p.add_argument("--num-grads", type=int, default=128, help="oBERT m")
    p.add_argument("--grad-batch-size", type=int, default=16, help="sentences per oBERT gradient")
    p.add_argument("--block-size", type=int, default=50, help="oBERT Fisher block B")
    p.add_argument(
        "--damps",
        type=float,
        nargs="+",
        default=[1e-9, 1e-8, 1e-7, 1e-6, 1e-5],
        help="oBERT dampening candidates (chosen on held-out train examples)",
    )
    p.add_argument("--recomputations", type=int, default=1)
    p.add_argument(
        "--grad-batch",
        type=int,
        default=16,
        help="gradients per rank-k Woodbury update (1 = exact rank-1; same Fisher up to rounding)",
    )
    p.add_argument(
        "--tune-examples",
        type=int,
        default=1000,
        help="held-out SST-2 train examples used to choose the damp",
    )
    p.add_argument("--max-eval", type=int, default=None, help="dev examples (default: all 872)")
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="dense model cache (default: $RECIPEC_CACHE/oneshot)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default; 1 is ~3x faster on a busy 2-core machine)",
    )
    p.add_argument("--quiet", action="store_true")
    return p


# ------------------------------------------------------------------------------- data


def load_splits(args):
    """SST-2 train split into a fine-tuning subset and a disjoint tuning set; the dev set."""
    import numpy as np

    from recipec.tasks import load_task

    task = load_task("sst2", str(args.data), max_eval=args.max_eval, seed=args.seed)
    n = len(task.train)
    need = args.train_examples + args.tune_examples
    if need > n:
        raise SystemExit(f"--train-examples + --tune-examples = {need} > {n} SST-2 train examples")
    order = np.random.default_rng(args.seed).permutation(n)
    train = [task.train[i] for i in sorted(order[: args.train_examples])]
    tune = [task.train[i] for i in sorted(order[args.train_examples : need])]
    return task.info, train, tune, task.eval


# ------------------------------------------------------------------------------- dense model


def _key(args, modifiers: str = "") -> str:
    from recipec.models import resolve_model_path

    parts = [
        "oneshot-dense-v1",
        str(resolve_model_path(args.model)),
        str(Path(args.data).resolve()),
        args.train_examples,
        args.tune_examples,
        args.steps,
        args.batch_size,
        args.lr,
        _warmup(args),
        args.max_seq_length,
        args.seed,
    ]
    if modifiers:
        parts.append(modifiers)
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _warmup(args) -> int:
    return args.warmup_steps if args.warmup_steps is not None else args.steps // 10


def dense_model(args, info, train, dev, modifiers: str = ""):
    """Fine-tune (or reuse from the cache) the dense model; returns (model, tokenizer, record).

    ``modifiers``: YAML list items added to the fine-tuning recipe (e.g. a ``cram`` modifier,
    benchmarks/cram.py); they are part of the cache key."""
    import recipec
    from recipec.models import load_model_and_tokenizer
    from recipec.recipe.load import load_recipe_text
    from recipec.train.loop import (
        StageData,
        StageRunner,
        evaluate,
        make_optimizer,
        seed_everything,
    )

    cache = Path(args.cache or default_cache()) / _key(args, modifiers)
    done = cache / "model"
    if (done / "config.json").is_file() and (cache / "dense.json").is_file():
        log(f"reusing the fine-tuned dense model at {done}")
        model, tokenizer = load_model_and_tokenizer(str(done), info)
        return model, tokenizer, json.loads((cache / "dense.json").read_text())

    recipe = load_recipe_text(
        f"""
version: 1
training:
  steps: {args.steps}
  batch_size: {args.batch_size}
  learning_rate: {args.lr!r}
  warmup_steps: {_warmup(args)}
  max_seq_length: {args.max_seq_length}
  weight_decay: 0.01
  seed: {args.seed}
modifiers: {"[]" if not modifiers else chr(10) + modifiers}
""",
        "<oneshot dense>",
    )
    spe = max(1, -(-len(train) // args.batch_size))
    seed_everything(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model, info)
    optimizer = make_optimizer(model, args.lr, 0.01)
    messages: list[str] = []

    def progress(msg: str) -> None:  # the modifiers' lines also go into the record
        messages.append(msg)
        log(msg)

    # no modifiers: plain fine-tuning (the Program only schedules the LR)
    program = recipec.compile(recipe, model, optimizer, spe, progress=progress, own_lr=True)
    log(
        f"fine-tuning dense: {args.steps} steps x {args.batch_size} of {len(train)} SST-2 train examples "
        f"(lr {args.lr:g}, warm-up {_warmup(args)}, dynamic padding, max {args.max_seq_length} tokens)"
    )
    last = [time.perf_counter()]

    def on_step(step, rec):
        if not args.quiet and (time.perf_counter() - last[0] > 30 or step == args.steps):
            last[0] = time.perf_counter()
            log(f"  step {step}/{args.steps} loss {rec['loss']:.4f} lr {rec['lr']:.2e}")

    data = StageData(model, tokenizer, info, train, dev)
    result = StageRunner(program, data, on_step=on_step, log_sparsity=bool(modifiers)).run()
    final = result.final_eval or evaluate(
        model, dev, tokenizer, info, batch_size=64, max_seq_length=args.max_seq_length, device="cpu"
    )
    record = {
        "dev": final,
        "train_seconds": result.seconds,
        "steps": args.steps,
        "train_examples": len(train),
        "path": str(done),
        "modifier_log": messages,
    }
    tmp = cache / ".model-tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if done.exists():
        shutil.rmtree(done)
    os.replace(tmp, done)
    (cache / "dense.json").write_text(json.dumps(record, indent=2))
    log(
        f"dense dev accuracy {final['accuracy']:.4f} ({result.seconds / 60:.1f} min); cached at {done}"
    )
    return model, tokenizer, record


# ------------------------------------------------------------------------------- pruning


def prune_one_shot(
    model, method: str, sparsity: float, args, grad_batches=None, damp: float | None = None
):
    """Compile a one-step recipe (``gmp`` or ``obert``) and prune at step 0; returns its record."""
    import recipec
    from recipec.recipe.load import load_recipe_text

    extra = ""
    if method == "obert":
        extra = f"""
    num_grads: {args.num_grads}
    fisher_block_size: {args.block_size}
    damp: {damp!r}
    grad_batch_size: {args.grad_batch_size}
    recomputations: {args.recomputations}
    woodbury_batch: {args.grad_batch}"""
    recipe = load_recipe_text(
        f"""
version: 1
training: {{steps: 1, batch_size: {args.batch_size}}}
modifiers:
  - type: {"obert" if method == "obert" else "gmp"}
    init_sparsity: {sparsity!r}
    final_sparsity: {sparsity!r}
    start_step: 0
    end_step: 0
    scope: global
    structure: unstructured{extra}
""",
        f"<oneshot {method}>",
    )
    program = recipec.compile(recipe, model, None, 1, grad_batches=grad_batches)
    started = time.perf_counter()
    program.step_start(0)
    seconds = time.perf_counter() - started
    (mod,) = program.modifiers
    return {
        "achieved_sparsity": mod.history[-1]["achieved"],
        "prune_seconds": seconds,
        "pruned_tensors": len(mod.targets),
    }


def run(args) -> dict:
    import torch

    from recipec.tasks.data import make_dataloader
    from recipec.train.loop import evaluate

    info, train, tune, dev = load_splits(args)
    model, tokenizer, dense_rec = dense_model(args, info, train, dev)
    model.eval()
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def ev(examples):
        return evaluate(
            model,
            examples,
            tokenizer,
            info,
            batch_size=64,
            max_seq_length=args.max_seq_length,
            device="cpu",
        )["accuracy"]

    def grad_batches(batch_size: int):
        # The same seeded mini-batches (dynamic padding) for every run: damps compare fairly.
        loader = make_dataloader(
            train,
            tokenizer,
            info,
            batch_size=batch_size,
            max_seq_length=args.max_seq_length,
            shuffle=True,
            seed=args.seed + 1,
        )
        return iter(loader)

    dense_dev = ev(dev)
    dense_tune = ev(tune)
    log(f"dense: dev {dense_dev:.4f}, tune {dense_tune:.4f}")
    rows = []
    for s in args.sparsities:
        model.load_state_dict(dense_state)
        rec = prune_one_shot(model, "magnitude", s, args)
        rec.update(method="magnitude", sparsity=s, dev=ev(dev), tune=ev(tune))
        log(f"{s:.0%} magnitude: dev {rec['dev']:.4f} (tune {rec['tune']:.4f})")
        rows.append(rec)
        sweep = []
        for damp in args.damps:
            model.load_state_dict(dense_state)
            torch.manual_seed(args.seed)
            rec = prune_one_shot(model, "obert", s, args, grad_batches=grad_batches, damp=damp)
            rec.update(method="obert", sparsity=s, damp=damp, dev=ev(dev), tune=ev(tune))
            log(
                f"{s:.0%} oBERT damp {damp:g}: dev {rec['dev']:.4f} (tune {rec['tune']:.4f}), "
                f"{rec['prune_seconds']:.0f} s"
            )
            sweep.append(rec)
        best = max(sweep, key=lambda r: (r["tune"], -r["damp"]))
        for r in sweep:
            r["chosen"] = r is best
        rows.extend(sweep)
    model.load_state_dict(dense_state)
    return {
        "dense": {
            "dev": dense_dev,
            "tune": dense_tune,
            **{k: v for k, v in dense_rec.items() if k != "dev"},
        },
        "rows": rows,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "dev_examples": len(dev),
        "tune_examples": len(tune),
    }


def render_md(report: dict) -> str:
    st = report["settings"]
    dense = report["dense"]
    lines = [
        "# One-shot pruning on SST-2: global magnitude vs oBERT (MiniLM-L6, no retraining)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Dense model: all-MiniLM-L6-v2 + 2-label head fine-tuned for {st['steps']} steps x batch "
        f"{st['batch_size']} on {st['train_examples']} SST-2 train examples (lr {st['lr']:g}, "
        f"linear decay, dynamic padding, max {st['max_seq_length']} tokens, "
        f"{dense.get('train_seconds', 0) / 60:.0f} min on 2 shared CPU cores). "
        f"Pruned: the 36 encoder linear weights (Q, K, V, attention output, FFN in/out), global "
        f"ranking, unstructured. oBERT: m={st['num_grads']} gradients of {st['grad_batch_size']} "
        f"train sentences, Fisher blocks B={st['block_size']}, recomputations {st['recomputations']}, "
        f"rank-{st['grad_batch']} Woodbury updates; damp chosen per sparsity from {st['damps']} on "
        f"{report['tune_examples']} held-out train examples (never on dev).",
        "",
        f"SST-2 dev accuracy ({report['dev_examples']} examples); dense: **{100 * dense['dev']:.2f}**",
        "",
        "| sparsity | magnitude (global) | oBERT (chosen damp) | oBERT - magnitude | oBERT damp |",
        "|---:|---:|---:|---:|---:|",
    ]
    for s in st["sparsities"]:
        mag = next(r for r in report["rows"] if r["method"] == "magnitude" and r["sparsity"] == s)
        ob = next(
            r
            for r in report["rows"]
            if r["method"] == "obert" and r["sparsity"] == s and r["chosen"]
        )
        lines.append(
            f"| {100 * s:.0f}% | {100 * mag['dev']:.2f} | **{100 * ob['dev']:.2f}** | "
            f"{100 * (ob['dev'] - mag['dev']):+.2f} | {ob['damp']:g} |"
        )
    lines += [
        "",
        "All runs (tune = held-out train accuracy used for the choice):",
        "",
        "| sparsity | method | damp | achieved | tune acc | dev acc | prune time s |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        damp = (
            f"{r['damp']:g}" + (" (chosen)" if r.get("chosen") else "")
            if r["method"] == "obert"
            else "-"
        )
        lines.append(
            f"| {100 * r['sparsity']:.0f}% | {r['method']} | {damp} | {100 * r['achieved_sparsity']:.2f}% | "
            f"{100 * r['tune']:.2f} | {100 * r['dev']:.2f} | {r['prune_seconds']:.1f} |"
        )
    lines += ["", f"Wall time {report['wall_seconds'] / 60:.1f} min; machine: {report['machine']}."]
    return "\n".join(lines) + "\n"


def run_benchmark(name: str, args, run_fn, render_fn, argv: list[str] | None) -> int:
    """Shared by the SST-2 benchmarks on this model (oneshot, cram): check the data, set the
    threads, time ``run_fn(args)``, write ``<name>.json`` / ``<name>.md`` and print the table."""
    if not (Path(args.data) / "train.tsv").is_file():
        log(f"no SST-2 data at {args.data} (expected train.tsv and dev.tsv)")
        return 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report = {
        "command": f"python benchmarks/{name}.py "
        + " ".join(argv if argv is not None else sys.argv[1:])
    }
    report.update(run_fn(args))
    report["wall_seconds"] = time.perf_counter() - started
    report["machine"] = (
        f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), {platform.machine()}"
    )
    text = render_fn(report)
    save_report(args.out, name, report, text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_benchmark("oneshot", build_parser().parse_args(argv), run, render_md, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Does CrAM+ training make a model prune one-shot better? Plain vs CrAM+ fine-tuning on SST-2.

Dense fine-tunings of the embedded all-MiniLM-L6-v2 from the same start, data order and
settings (benchmarks/oneshot.py's dense fine-tuning, cached the same way): plain, and with a
``cram`` modifier (CrAM+, global top-k at a sparsity drawn per step from ``--sparsities``) for
each ``--rho``.
Each dense model is then pruned one-shot with global magnitude (no retraining) to every
sparsity, and SST-2 dev accuracy is reported side by side, with both fine-tuning times.

    python benchmarks/cram.py --threads 1 --rho 0.01 0.05 0.2   # what we ran; benchmarks/results/cram.md
    python benchmarks/cram.py --threads 1 --rho 0.005 0.02 0.08 --normalize   # results/cram_normalized/
    python benchmarks/cram.py --train-examples 64 --steps 4 --max-eval 32 --out /tmp/cram  # smoke

Writes ``cram.json`` and ``cram.md`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import oneshot


def build_parser():
    p = oneshot.build_parser()
    p.description = __doc__
    p.set_defaults(
        train_examples=4000,
        tune_examples=0,
        steps=250,
        max_seq_length=64,
        sparsities=[0.5, 0.6, 0.7, 0.8],
    )
    p.add_argument(
        "--rho",
        type=float,
        nargs="+",
        default=[0.05],
        help="CrAM perturbation size(s): one CrAM fine-tuning per value",
    )
    p.add_argument("--variant", choices=["cram", "cram_plus"], default="cram_plus")
    p.add_argument(
        "--normalize",
        action="store_true",
        help="normalized ascent step (w + rho * g / ||g||) for every --rho",
    )
    return p


def cram_modifier(args, rho: float) -> str:
    sparsities = ", ".join(repr(s) for s in args.sparsities)
    normalize = ", normalize: true" if args.normalize else ""
    return (
        f"  - {{type: cram, variant: {args.variant}, rho: {rho!r}{normalize}, sparsities: [{sparsities}], "
        "scope: global}"
    )


def arm_name(variant: str, rho: float, normalize: bool = False) -> str:
    return f"{variant} rho={rho:g}" + (" normalized" if normalize else "")


def mean_grad_norm(messages: list[str]) -> float | None:
    """The mean ||g|| the cram modifier logs at the end of its fine-tuning (None: not logged)."""
    for msg in messages:
        found = re.search(r"mean gradient norm ([0-9.eE+-]+)\)", msg)
        if found:
            return float(found.group(1))
    return None


def run(args) -> dict:
    from recipec.train.loop import evaluate

    info, train, _, dev = oneshot.load_splits(args)
    arms = {}
    for arm, modifiers in [("plain", "")] + [
        (arm_name(args.variant, r, args.normalize), cram_modifier(args, r)) for r in args.rho
    ]:
        model, tokenizer, record = oneshot.dense_model(args, info, train, dev, modifiers)
        model.eval()
        dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

        def ev(model=model, tokenizer=tokenizer):
            return evaluate(
                model,
                dev,
                tokenizer,
                info,
                batch_size=64,
                max_seq_length=args.max_seq_length,
                device="cpu",
            )["accuracy"]

        dense = ev()
        oneshot.log(f"{arm}: dense dev {dense:.4f}")
        pruned = []
        for s in args.sparsities:
            model.load_state_dict(dense_state)
            rec = oneshot.prune_one_shot(model, "magnitude", s, args)
            pruned.append(
                {"sparsity": s, "achieved_sparsity": rec["achieved_sparsity"], "dev": ev()}
            )
            oneshot.log(f"{arm}: {s:.0%} magnitude one-shot: dev {pruned[-1]['dev']:.4f}")
        arms[arm] = {
            "dense": dense,
            "pruned": pruned,
            "train_seconds": record.get("train_seconds"),
            "mean_grad_norm": mean_grad_norm(record.get("modifier_log", [])),
        }
    return {
        "arms": arms,
        "dev_examples": len(dev),
        "train_examples": len(train),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }


def render_md(report: dict) -> str:
    st = report["settings"]
    rhos = st["rho"] if isinstance(st["rho"], list) else [st["rho"]]
    plain = report["arms"]["plain"]
    normalize = st.get("normalize", False)
    heads = [arm_name(st["variant"], r, normalize) for r in rhos]
    arms = [report["arms"].get(h) or report["arms"][st["variant"]] for h in heads]
    lines = [
        f"# One-shot magnitude pruning after plain vs {st['variant']} fine-tuning (MiniLM-L6, SST-2)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"All arms: all-MiniLM-L6-v2 + 2-label head fine-tuned {st['steps']} steps x batch {st['batch_size']} on "
        f"{report['train_examples']} SST-2 train examples (lr {st['lr']:g}, warm-up + linear decay, max "
        f"{st['max_seq_length']} tokens, same seed and data order). {st['variant']}: global top-k at a sparsity "
        f"drawn per step from {st['sparsities']}, at each rho{' (normalized ascent step: w + rho g / ||g||)' if normalize else ''}. Then the 36 encoder linears pruned once by global "
        f"magnitude, no retraining. SST-2 dev accuracy ({report['dev_examples']} examples; in brackets: the "
        "difference to plain):",
        "",
        "| sparsity | plain | " + " | ".join(heads) + " |",
        "|---:|---:|" + "---:|" * len(heads),
    ]

    def cell(value: float, base: float) -> str:
        return f"{100 * value:.2f} ({100 * (value - base):+.2f})"

    lines.append(
        f"| 0% (dense) | {100 * plain['dense']:.2f} | "
        + " | ".join(cell(a["dense"], plain["dense"]) for a in arms)
        + " |"
    )
    for i, base in enumerate(plain["pruned"]):
        lines.append(
            f"| {100 * base['sparsity']:.0f}% | {100 * base['dev']:.2f} | "
            + " | ".join(cell(a["pruned"][i]["dev"], base["dev"]) for a in arms)
            + " |"
        )
    times = ", ".join(f"{h} {a['train_seconds'] / 60:.1f} min" for h, a in zip(heads, arms))
    norms = [
        f"{h} {a['mean_grad_norm']:.3g}"
        for h, a in zip(heads, arms)
        if a.get("mean_grad_norm") is not None
    ]
    if norms:
        lines += ["", "Mean gradient norm ||g|| over the CrAM steps: " + ", ".join(norms) + "."]
    lines += [
        "",
        f"Fine-tuning time: plain {plain['train_seconds'] / 60:.1f} min, {times} (one extra forward "
        f"and backward per CrAM step). Wall time {report['wall_seconds'] / 60:.1f} min (fine-tunings cached "
        f"by earlier runs are reused and not counted); machine: {report['machine']}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return oneshot.run_benchmark("cram", build_parser().parse_args(argv), run, render_md, argv)


if __name__ == "__main__":
    sys.exit(main())

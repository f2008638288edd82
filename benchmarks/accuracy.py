"""Accuracy recovered at 80% and 90% sparsity on real data (SST-2, CommonsenseQA), MiniLM-L6.

One `recipec apply` run per configuration; results are appended to a JSON file as each run
finishes, so the script is resumable: finished configurations are skipped, and an interrupted
run resumes from its last checkpoint in WORKDIR. Writes a markdown table and a PNG of accuracy
vs sparsity.

Every configuration gets the same epoch budget (``--dense-epochs`` + ``--prune-epochs`` +
``--finetune-epochs``) and the same data subset, stated in the table. The sparse runs distil
from the dense run's model (the teacher), so the dense configuration runs first.

    python benchmarks/accuracy.py --task sst2 --max-train 4000 --max-seq-length 64   # 2 CPU cores
    python benchmarks/accuracy.py --task csqa --configs dense,gmp_90,smc_90
    python benchmarks/accuracy.py --task all --device cuda --jobs 8   # one GPU, 8 runs at a time

With ``--jobs N`` the dense teachers run first, then the other configurations run N at a time,
each in its own process (log in WORKDIR/logs/), and the results file is updated as each ends.
On CPU each run then gets the CPU count / N torch threads (``--threads`` sets it): more threads
than cores in total slows every run down several times.

The budget (epochs, data, batch, sequence length, oBERT m) is stored with every record; a table
holds the records of one budget, each "kept vs dense" against the dense teacher of its budget.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = {"sst2": "sst2", "csqa": "csqa"}


@dataclass
class Config:
    name: str
    recipe: str
    sparsity: float
    sets: list[str] = field(default_factory=list)
    distil: bool = True
    note: str = ""


def configurations(task: str, budget: dict[str, float]) -> list[Config]:
    """The configurations of issue 7, with every schedule scaled to the same epoch budget."""
    dense, prune, fine = budget["dense"], budget["prune"], budget["finetune"]
    total = dense + prune + fine
    paper = [
        f"dense_epochs={dense}",
        f"pruning_epochs={prune}",
        f"finetune_epochs={fine}",
        f"pruning_steps_per_epoch={budget['steps_per_epoch']}",
        "init_sparsity=0.3",
    ]
    configs = [
        Config(
            "dense",
            "dense",
            0.0,
            [f"training.epochs={total}"],
            distil=False,
            note="dense fine-tuned teacher",
        )
    ]
    for s in (80, 90):
        configs += [
            Config(
                f"smc_{s}",
                "smc_baseline.yaml",
                s / 100,
                [f"target_sparsity={s / 100}", f"epochs={total}"],
                distil=False,
                note="SMC-style: global GMP from 0% over 10-80%, embeddings+head pruned, no KD, no rewinding",
            ),
            Config(
                f"gmp_{s}",
                f"downstream_gmp_{s}.yaml",
                s / 100,
                list(paper),
                note="paper GMP: encoder only, 30% first step, cubic, LR rewinding, KD T=5.5",
            ),
            Config(
                f"obert_{s}",
                f"obert_{s}.yaml",
                s / 100,
                list(paper) + [f"num_grads={budget['num_grads']}"],
                note=f"paper oBERT (m={budget['num_grads']})",
            ),
        ]
    if task == "sst2":
        configs += [
            Config(
                "ablate_prune_all_90",
                "downstream_gmp_90.yaml",
                0.9,
                list(paper) + ["targets=['\\.weight$']", "exclude=['LayerNorm']"],
                note="paper GMP 90%, embeddings + head pruned too",
            ),
            Config(
                "ablate_no_kd_90",
                "downstream_gmp_90.yaml",
                0.9,
                list(paper) + ["modifiers.4.hardness=0.0"],
                note="paper GMP 90%, no KD (hardness 0)",
            ),
            Config(
                "ablate_kd_t5.5_90",
                "downstream_gmp_90.yaml",
                0.9,
                list(paper) + ["modifiers.4.temperature=5.5"],
                note="paper GMP 90%, KD temperature 5.5",
            ),
            Config(
                "ablate_no_first_step_no_rewind_90",
                "downstream_gmp_90.yaml",
                0.9,
                [s for s in paper if not s.startswith("init_sparsity")]
                + ["init_sparsity=0.0", f"modifiers.2.cycle_epochs={prune}"],
                note="paper GMP 90%, no accelerated first step, no LR rewinding",
            ),
        ]
    return configs


DENSE_RECIPE = """\
version: 1
description: Dense fine-tuning (the teacher for the accuracy benchmark).
training:
  epochs: 4
  batch_size: 32
  learning_rate: 5e-5
  max_seq_length: 128
  eval_every_epochs: 1
  seed: 42
modifiers: []
"""


def run_config(
    cfg: Config, task: str, args, teacher: str | None, workdir: Path, out: Path | None = None
) -> dict:
    """One configuration's `recipec apply` run (resumed when its folder ``out``, by default
    WORKDIR/TASK/CONFIG, holds one), as a results record."""
    from recipec.train.run import Reporter, RunConfig, run

    recipe = cfg.recipe
    if recipe == "dense":
        path = workdir / "dense.yaml"
        path.write_text(DENSE_RECIPE)
        recipe = str(path)
    sets = list(cfg.sets) + [
        f"training.batch_size={args.batch_size}",
        f"training.max_seq_length={args.max_seq_length}",
    ]
    if task == "csqa":
        sets.append("training.learning_rate=3e-5")
    out = out or workdir / task / cfg.name
    resume = (out / "run.json").is_file()
    config = RunConfig(
        recipe_path=recipe,
        overrides=sets,
        data=[str(Path(args.data_root) / DATA[task])],
        teacher=teacher if cfg.distil else None,
        output=out,
        resume=resume,
        max_train=args.max_train,
        max_eval=args.max_eval,
        teacher_cache=workdir / "teachers",
        device=args.device,
        precision=getattr(args, "precision", "auto"),
        model=getattr(args, "model", None),
    )
    started = time.perf_counter()
    report = run(config, Reporter(quiet=args.quiet))
    return {
        "task": task,
        "config": cfg.name,
        "note": cfg.note,
        "recipe": cfg.recipe,
        "sets": sets,
        "target_sparsity": cfg.sparsity,
        "sparsity_targets": report["sparsity"]["targets"],
        "sparsity_model": report["sparsity"]["model"],
        "accuracy": report["final_eval"]["accuracy"],
        "wall_seconds": time.perf_counter() - started,
        "steps": sum(s["steps"] for s in report["stages"]),
        # training time summed over resumes (wall_seconds is this process's part only)
        "train_seconds": sum(s["seconds"] for s in report["stages"]),
        "train_examples": report["train_examples"],
        "eval_examples": report["eval_examples"],
        "model_dir": report["model_dir"],
        "device": describe_device(args.device),
        "precision": (report.get("precision") or {}).get("used"),
        "kd_temperature": kd_temperature(out / "recipe.yaml"),
    }


def kd_temperature(recipe_yaml: Path) -> float | None:
    """The distillation temperature of a run's resolved recipe (None: no distillation), so rows
    measured before and after the paper's T=5.5 (#21) cannot be mistaken for each other."""
    import yaml

    recipe = yaml.safe_load(recipe_yaml.read_text())
    temps = [
        m.get("temperature")
        for m in recipe.get("modifiers") or []
        if isinstance(m, dict) and m.get("type") == "distill" and m.get("hardness", 1.0) > 0
    ]
    return float(temps[0]) if temps else None


def describe_device(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(device)} (GPU)"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _budget_text(budget: dict) -> str:
    data = "all" if budget.get("max_train") is None else f"first {budget['max_train']}"
    return (
        f"{budget['dense']:g} dense + {budget['prune']:g} pruning + {budget['finetune']:g} fine-tuning epochs, "
        f"{budget['steps_per_epoch']} pruning steps per epoch, batch {budget['batch_size']}, "
        f"sequences of at most {budget.get('max_seq_length', '?')} tokens, "
        f"{data} training examples, oBERT m={budget['num_grads']}"
        + (f"; series: {budget['series']}" if budget.get("series") else "")
    )


def _record_budget(record: dict) -> dict | None:
    """A record's budget; records written before ``max_seq_length`` joined the budget get it
    from their own ``training.max_seq_length=`` override (every run passes one)."""
    budget = record.get("budget")
    if budget is None or "max_seq_length" in budget:
        return budget
    seq = next(
        (
            int(s.split("=", 1)[1])
            for s in record.get("sets", [])
            if s.startswith("training.max_seq_length=")
        ),
        None,
    )
    return {**budget, "max_seq_length": seq}


def load_results(path: Path) -> list[dict]:
    """The results file's records (none if it does not exist yet), each budget complete."""
    if not path.is_file():
        return []
    records = json.loads(path.read_text())
    for r in records:
        if r.get("budget") is not None:
            r["budget"] = _record_budget(r)
    return records


def write_tables(
    results: list[dict], out_md: Path, out_png: Path, budget: dict | None = None
) -> str:
    """One table per (budget, device kind): every configuration's accuracy, sparsity and wall time.

    ``budget`` (the current run's) comes first; runs under other budgets follow in their own
    tables, so a partial GPU run and a CPU run on a smaller budget sit side by side, each
    "kept vs dense" computed against the dense teacher of its own budget.
    """
    groups: dict[str, list[dict]] = {}
    for r in results:
        key = (
            json.dumps(r.get("budget"), sort_keys=True)
            + "|"
            + ("GPU" if "GPU" in r.get("device", "") else "CPU")
        )
        groups.setdefault(key, []).append(r)
    current = json.dumps(budget, sort_keys=True) if budget is not None else None
    order = sorted(groups, key=lambda k: (k.split("|")[0] != current, k))
    lines: list[str] = []
    panels = []
    for key in order:
        rows = groups[key]
        b = rows[0].get("budget") or {}
        devices = sorted({r.get("device", "-") for r in rows})
        mixed = len(devices) > 1  # e.g. runs with different thread counts: their times differ
        lines += [
            f"Budget: {_budget_text(b) if b else '?'}; device: {', '.join(devices)}",
            "",
            "| task | config | target | achieved (targets) | dev accuracy | kept vs dense | steps | train time (min) |"
            + (" device |" if mixed else ""),
            "|---|---|---|---|---|---|---|---|" + ("---|" if mixed else ""),
        ]
        dense = {r["task"]: r["accuracy"] for r in rows if r["config"] == "dense"}
        for r in rows:
            kept = (
                f"{100 * r['accuracy'] / dense[r['task']]:.1f}%"
                if r["task"] in dense and r["config"] != "dense"
                else "-"
            )
            lines.append(
                f"| {r['task']} | {r['config']} | {100 * r['target_sparsity']:.0f}% | "
                f"{100 * r['sparsity_targets']:.1f}% | {100 * r['accuracy']:.2f} | {kept} | {r['steps']} | "
                f"{r.get('train_seconds', r['wall_seconds']) / 60:.1f} |"
                + (f" {r.get('device', '-')} |" if mixed else "")
            )
        lines.append("")
        for task in sorted(dense):
            if any(
                r["task"] == task and r["config"] != "dense" for r in rows
            ):  # a plot needs sparse points
                panels.append((task, "GPU" if key.endswith("GPU") else "CPU", b, rows, dense[task]))
    text = "\n".join(lines)
    out_md.write_text(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = max(1, len(panels))
        fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4), squeeze=False)
        for ax, (task, kind, b, rows, dense_acc) in zip(axes[0], panels):
            for family, marker in (("smc", "x"), ("gmp", "o"), ("obert", "s")):
                pts = sorted(
                    (r["target_sparsity"], r["accuracy"])
                    for r in rows
                    if r["task"] == task and r["config"].startswith(family + "_")
                )
                if pts:
                    ax.plot(
                        [100 * p[0] for p in pts],
                        [100 * p[1] for p in pts],
                        marker=marker,
                        label=family,
                    )
            for r in rows:
                if r["task"] == task and r["config"].startswith("ablate"):
                    ax.scatter(
                        [100 * r["target_sparsity"]],
                        [100 * r["accuracy"]],
                        marker="^",
                        s=18,
                        color="gray",
                    )
            ax.axhline(100 * dense_acc, color="gray", linestyle="--", label="dense")
            chance = {"sst2": 50.0, "csqa": 20.0}.get(task)
            if chance is not None:
                ax.axhline(chance, color="red", linestyle=":", linewidth=1, label="chance")
            data = "all" if b.get("max_train") is None else str(b.get("max_train"))
            ax.set_title(
                f"{task} ({kind}, {b.get('dense', 0) + b.get('prune', 0) + b.get('finetune', 0)} epochs, {data} train)"
            )
            ax.set_xlabel("sparsity of encoder linears (%)")
            ax.set_ylabel("dev accuracy (%)")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_png, dpi=110)
        plt.close(fig)
    except Exception as exc:  # the table matters more than the plot
        print(f"plot skipped: {exc}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=["sst2", "csqa", "all"], default="sst2")
    parser.add_argument(
        "--configs", default=None, help="comma list of configuration names (default: all)"
    )
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--max-eval", type=int, default=None)
    parser.add_argument("--dense-epochs", type=float, default=1)
    parser.add_argument("--prune-epochs", type=float, default=2)
    parser.add_argument("--finetune-epochs", type=float, default=1)
    parser.add_argument("--pruning-steps-per-epoch", type=int, default=2)
    parser.add_argument("--num-grads", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument(
        "--workdir", default=os.path.join(os.path.expanduser("~"), ".cache", "recipec", "accuracy")
    )
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "accuracy.json"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="recipec apply --precision (auto: bf16 autocast + TF32 on CUDA, fp32 on CPU)",
    )
    parser.add_argument(
        "--model", default=None, help="recipec apply --model (default: the embedded MiniLM-L6)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="configurations run at once, each in its own process (dense teachers first)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads per run (0: the CPU count divided by --jobs when "
        "several runs share the CPU, else torch's default); runs sharing cores "
        "with more threads than cores slow each other down several times",
    )
    parser.add_argument(
        "--series",
        default=None,
        help="a label that joins this run's budget (e.g. 'KD T=5.5 recipes'): runs under the "
        "same budget but another series (say, before a recipe default changed) are not reused "
        "and get their own table, with their own dense row",
    )
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument(
        "--render", action="store_true", help="only rewrite the .md and .png from --results"
    )
    return parser


def run_budget(args: argparse.Namespace) -> dict:
    """What a record must share with a run to be reused by it and to share its table: the
    epochs, data and sizes, and ``--series`` only when given (records written before series
    existed carry none, and keep matching runs without one)."""
    budget = {
        "dense": args.dense_epochs,
        "prune": args.prune_epochs,
        "finetune": args.finetune_epochs,
        "steps_per_epoch": args.pruning_steps_per_epoch,
        "num_grads": args.num_grads,
        "max_train": args.max_train,
        "max_eval": args.max_eval,
        "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length,
    }
    if args.series:
        budget["series"] = args.series
    return budget


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.render:
        results_path = Path(args.results)
        print(
            write_tables(
                load_results(results_path),
                results_path.with_suffix(".md"),
                results_path.with_suffix(".png"),
            )
        )
        return 0
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    threads = args.threads or (
        max(1, (os.cpu_count() or 1) // args.jobs) if args.device == "cpu" and args.jobs > 1 else 0
    )
    if threads:
        import torch

        torch.set_num_threads(threads)
        args.threads = threads  # the children get the resolved count

    data_root = Path(args.data_root)
    tasks = ["sst2", "csqa"] if args.task == "all" else [args.task]
    for task in tasks:
        if not (data_root / DATA[task]).is_dir():
            parser.error(f"{data_root / DATA[task]} is absent: pass --data-root")
    budget = run_budget(args)
    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results = load_results(results_path)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    wanted = set(args.configs.split(",")) if args.configs else None
    if wanted is not None:
        known = {c.name for t in tasks for c in configurations(t, budget)}
        if wanted - known:
            parser.error(
                f"unknown configuration(s) {', '.join(sorted(wanted - known))}; "
                f"known for {args.task}: {', '.join(sorted(known))}"
            )

    def find(task: str, name: str) -> dict | None:
        return next(
            (
                r
                for r in results
                if r["task"] == task and r["config"] == name and r.get("budget") == budget
            ),
            None,
        )

    def selected(task: str) -> list[Config]:
        return [
            c
            for c in configurations(task, budget)
            if wanted is None or c.name in wanted or c.name == "dense"
        ]

    if args.jobs > 1:
        run_parallel(args, tasks, selected, find, results, results_path, workdir, budget)
    else:
        for task in tasks:
            teacher = None
            for _, cfg in priority_order([(task, c) for c in selected(task)], tasks):
                done = find(task, cfg.name)
                if done is not None:
                    print(f"[skip] {task}/{cfg.name}: done ({100 * done['accuracy']:.2f})")
                else:
                    print(f"[run] {task}/{cfg.name}: {cfg.note}", flush=True)
                    record = run_config(cfg, task, args, teacher, workdir)
                    record["budget"] = budget
                    results.append(record)
                    results_path.write_text(json.dumps(results, indent=2))
                    done = record
                    print(
                        f"[done] {task}/{cfg.name}: accuracy {100 * record['accuracy']:.2f} "
                        f"sparsity {100 * record['sparsity_targets']:.1f}% in {record['wall_seconds'] / 60:.1f} min",
                        flush=True,
                    )
                if cfg.name == "dense":
                    teacher = done["model_dir"]
    text = write_tables(
        results, results_path.with_suffix(".md"), results_path.with_suffix(".png"), budget
    )
    print(text)
    return 0


def priority_order(items: list[tuple[str, Config]], tasks: list[str]) -> list[tuple[str, Config]]:
    """Dense first, then the goals' configurations (90% before 80%, the paper recipes before the
    baseline), the ablations last: a benchmark cut short has the numbers that matter."""
    family = {"dense": -1, "gmp": 0, "smc": 1, "obert": 2}
    return sorted(
        items,
        key=lambda tc: (
            tc[1].name != "dense",
            tc[1].name.startswith("ablate"),
            -tc[1].sparsity,
            family.get(tc[1].name.split("_")[0], 3),
            tasks.index(tc[0]),
        ),
    )


# Options a child run gets from its parent unchanged; --task, --configs and --results are set per
# child, --jobs is 1 and --quiet is on. tests/recipes/test_benchmark_configs.py checks that every
# option of build_parser() is in one of these groups.
FORWARDED = (
    "data_root",
    "max_train",
    "max_eval",
    "dense_epochs",
    "prune_epochs",
    "finetune_epochs",
    "pruning_steps_per_epoch",
    "num_grads",
    "batch_size",
    "max_seq_length",
    "workdir",
    "device",
    "precision",
    "model",
    "threads",
    "series",
)
PER_CHILD = ("task", "configs", "results", "jobs", "quiet", "render", "help")


def _child_argv(args: argparse.Namespace) -> list[str]:
    """The options that a child run inherits, rebuilt from the parent's parsed arguments."""
    out: list[str] = []
    for dest in FORWARDED:
        value = getattr(args, dest)
        if value is not None:
            out += ["--" + dest.replace("_", "-"), str(value)]
    return out


def run_parallel(
    args, tasks, selected, find, results, results_path: Path, workdir: Path, budget
) -> None:
    """Dense teachers first, then every other configuration, ``args.jobs`` processes at a time.

    Each child is this script with one task and one configuration and its own results file,
    seeded with the dense record so that it distils from the finished teacher; the parent
    appends each child's record to the shared results file when the child ends.
    """
    parts, logs = workdir / "parts", workdir / "logs"
    parts.mkdir(exist_ok=True)
    logs.mkdir(exist_ok=True)
    base = (
        [sys.executable, str(Path(__file__).resolve())]
        + _child_argv(args)
        + ["--jobs", "1", "--quiet"]
    )

    def waves():
        yield [(t, c) for t in tasks for c in selected(t) if c.name == "dense"]
        yield priority_order(
            [(t, c) for t in tasks for c in selected(t) if c.name != "dense"], tasks
        )

    for wave in waves():
        todo = [(t, c) for t, c in wave if find(t, c.name) is None]
        for t, c in wave:
            if (t, c) not in todo:
                print(f"[skip] {t}/{c.name}: done")
        running: list[tuple[str, Config, subprocess.Popen, Path, object]] = []
        while todo or running:
            while todo and len(running) < args.jobs:
                task, cfg = todo.pop(0)
                part = parts / f"{task}_{cfg.name}.json"
                dense = find(task, "dense")
                part.write_text(
                    json.dumps([dense] if dense is not None and cfg.name != "dense" else [])
                )
                log = open(logs / f"{task}_{cfg.name}.log", "w")
                cmd = base + ["--task", task, "--configs", cfg.name, "--results", str(part)]
                print(f"[run] {task}/{cfg.name}: {cfg.note} (log {log.name})", flush=True)
                running.append(
                    (
                        task,
                        cfg,
                        subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT),
                        part,
                        log,
                    )
                )
            time.sleep(2)
            for item in list(running):
                task, cfg, proc, part, log = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                log.close()
                record = next(
                    (r for r in json.loads(part.read_text()) if r["config"] == cfg.name), None
                )
                if proc.returncode != 0 or record is None:
                    print(
                        f"[failed] {task}/{cfg.name}: exit {proc.returncode}; see {log.name}",
                        flush=True,
                    )
                    continue
                results.append(record)
                results_path.write_text(json.dumps(results, indent=2))
                print(
                    f"[done] {task}/{cfg.name}: accuracy {100 * record['accuracy']:.2f} sparsity "
                    f"{100 * record['sparsity_targets']:.1f}% in {record['wall_seconds'] / 60:.1f} min",
                    flush=True,
                )


if __name__ == "__main__":
    raise SystemExit(main())

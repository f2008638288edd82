"""SST-2 dev accuracy of every INT8 variant next to its FP32 twin (real MiniLM, real data).

Builds (or reuses) three models of the embedded all-MiniLM-L6-v2 with ``recipec apply`` on
``../shared/data/sst2`` under one short budget, exports each with ``recipec export``, and
evaluates the 872 dev sentences on:

- onnxruntime FP32 (the exported model) and onnxruntime INT8 (``quantize_dynamic``, int8
  weights) of the dense model and of each sparse model;
- recipec's engine, FP32 and INT8, on each sparse model.

Budget (the ``SETS`` below): the first 4000 training examples, batch 32, sequences of at most
64 tokens, 1 dense + 2 pruning + 1 fine-tuning epochs (500 optimizer steps), GMP to 90% of the
encoder linear weights (unstructured and block4), LR rewinding, no distillation; the dense
model trains 4 epochs. About 10 minutes per model on 2 quiet cores.

    python benchmarks/int8_accuracy.py                  # train what is missing, then evaluate
    python benchmarks/int8_accuracy.py --train-only
    python benchmarks/int8_accuracy.py --models unstructured --max-train 64 --max-dev 64 \\
        --workdir /tmp/int8-smoke --out /tmp/int8-smoke     # smoke test (a few minutes)

Writes ``benchmarks/results/int8_accuracy.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import cpu_name, loadavg, save_report  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
DATA = REPO.parent / "shared" / "data" / "sst2"

RECIPE = """\
version: 1
description: SST-2 INT8 accuracy benchmark - GMP to 90% ({structure}), LR rewinding, no KD.
variables:
  target_sparsity: 0.90
  dense_epochs: 1
  pruning_epochs: 2
  finetune_epochs: 1
  update_every: 0.5
  prune_end: ${{dense_epochs + pruning_epochs}}
  lr_max: 5e-5
  lr_min: 5e-6
training:
  epochs: ${{prune_end + finetune_epochs}}
  batch_size: 32
  learning_rate: ${{lr_max}}
  max_seq_length: 64
  eval_every_epochs: 1
  seed: 42
modifiers:
  - type: lr
    schedule: linear
    init_lr: ${{lr_max}}
    final_lr: ${{lr_min}}
    end_epoch: ${{dense_epochs}}
  - type: gmp
    init_sparsity: 0.3
    final_sparsity: ${{target_sparsity}}
    start_epoch: ${{dense_epochs}}
    end_epoch: ${{prune_end}}
    update_every_epochs: ${{update_every}}
    schedule: cubic
    scope: global
    structure: {structure}
  - type: lr
    schedule: cyclic_linear
    init_lr: ${{lr_max}}
    final_lr: ${{lr_min}}
    cycle_epochs: ${{update_every}}
    start_epoch: ${{dense_epochs}}
    end_epoch: ${{prune_end}}
  - type: lr
    schedule: linear
    init_lr: ${{lr_max}}
    final_lr: 0.0
    start_epoch: ${{prune_end}}
"""

DENSE_RECIPE = """\
version: 1
description: SST-2 INT8 accuracy benchmark - dense fine-tuning, same budget.
training:
  epochs: 4
  batch_size: 32
  learning_rate: 5e-5
  max_seq_length: 64
  eval_every_epochs: 1
  seed: 42
modifiers: []
"""

MODELS = ("block4", "unstructured", "dense")
MAX_TRAIN = 4000


def log(msg: str) -> None:
    """Timestamped progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def recipec(*args: str) -> None:
    """Runs the ``recipec`` command line of this checkout in a subprocess."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-c", "from recipec.cli import main; main()", *args]
    log("recipec " + " ".join(args))
    subprocess.run(cmd, check=True, env=env)


def build(
    name: str, workdir: Path, max_train: int = MAX_TRAIN, max_eval: int | None = None
) -> Path:
    """The exported deployment folder of model ``name``: trained and exported when missing."""
    run_dir = workdir / name
    folder = run_dir / "onnx"
    if (folder / "sparsity.json").is_file():
        log(f"{name}: reusing {folder}")
        return folder
    if not (run_dir / "report.json").is_file():
        workdir.mkdir(parents=True, exist_ok=True)
        recipe = workdir / f"{name}.yaml"
        text = DENSE_RECIPE if name == "dense" else RECIPE.format(structure=name)
        recipe.write_text(text)
        recipec(
            "apply", str(recipe), "--data", str(DATA), "--max-train", str(max_train),
            "--output", str(run_dir), "--overwrite", "--quiet",
            *(["--max-eval", str(max_eval)] if max_eval else []),
        )  # fmt: skip
    recipec("export", str(run_dir), "--onnx", "--overwrite")
    return folder


def main(argv: list[str] | None = None) -> int:
    """Train what is missing, evaluate every variant, write the JSON and markdown."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=ROOT / "results" / "tmp" / "sst2-int8")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--train-only", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--models", default=",".join(MODELS), help="comma list of " + ", ".join(MODELS))
    p.add_argument(
        "--max-train", type=int, default=MAX_TRAIN, help="training examples (smoke: e.g. 64)"
    )
    p.add_argument(
        "--max-dev",
        type=int,
        default=None,
        help="first N dev sentences, also for the evaluations during training (smoke)",
    )
    args = p.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if not names or any(m not in MODELS for m in names):
        raise SystemExit(f"--models: choose from {', '.join(MODELS)}")
    folders = {name: build(name, args.workdir, args.max_train, args.max_dev) for name in names}
    if args.train_only:
        return 0
    from int8_eval import evaluate_all  # noqa: PLC0415 - the heavy part, after training

    started = time.time()
    report = evaluate_all(folders, DATA / "dev.tsv", args.threads, log, args.max_dev)
    report.update(
        command="python benchmarks/int8_accuracy.py " + " ".join(argv or sys.argv[1:]),
        budget={"max_train": args.max_train, "recipe": RECIPE.format(structure="STRUCTURE")},
        environment={"cpu": cpu_name(), "load_avg": loadavg()},
        wall_s=time.time() - started,
    )
    save_report(args.out, "int8_accuracy", report, report.pop("markdown"))
    print(json.dumps(report["rows"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

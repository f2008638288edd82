"""``recipec apply``: fine-tune and prune a model with a recipe."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from recipec.cli._common import fail, load_or_exit, set_option


class _ApplyCommand(click.Command):
    """``apply`` with ``--data TRAIN EVAL`` as well as ``--data TRAIN --data EVAL``.

    Once RECIPE has been given, the paths that follow ``--data`` up to the next option are all
    data paths (``recipec apply RECIPE --data train.tsv dev.tsv``); before RECIPE, ``--data``
    takes one path as usual (``recipec apply --data DIR RECIPE``).
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        takes_value = {
            opt
            for p in self.params
            if isinstance(p, click.Option) and not p.is_flag and not p.count
            for opt in (*p.opts, *p.secondary_opts)
        }
        return super().parse_args(ctx, _spread_data(list(args), takes_value))


def _spread_data(args: list[str], takes_value: set[str]) -> list[str]:
    """``[R, --data, A, B]`` -> ``[R, --data, A, --data, B]`` (see ``_ApplyCommand``)."""
    out: list[str] = []
    positional = False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return out + args[i:]
        if arg == "--data" or arg.startswith("--data="):
            taken = 1 if "=" in arg else 2
            out += args[i : i + taken]
            i += taken
            while positional and i < len(args) and not args[i].startswith("-"):
                out += ["--data", args[i]]
                i += 1
            continue
        if arg in takes_value:
            out += args[i : i + 2]
            i += 2
            continue
        positional = positional or not arg.startswith("-")
        out.append(arg)
        i += 1
    return out


def _exit_130_on_ctrl_c(func):
    """Ctrl-C outside the training loop's own handling (while starting, or a second Ctrl-C):
    one message and exit status 130, no traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt:
            if os.environ.get("RANK", "0") == "0":  # (torch may be half imported: no is_main)
                click.echo(
                    "\ninterrupted: stopped at once (Ctrl-C while starting, or a second Ctrl-C). "
                    "The last checkpoint, if any, is kept: the same command plus --resume "
                    "continues from it",
                    err=True,
                )
            sys.exit(130)

    return wrapper


@click.command("apply", cls=_ApplyCommand)
@click.argument("recipe")
@click.option(
    "--model",
    default=None,
    help="HF hub name or local folder (default: the embedded all-MiniLM-L6-v2).",
)
@click.option(
    "--task",
    default=None,
    help="builtin (default), a hub dataset (glue/sst2, tau/commonsense_qa, winogrande, ...), "
    "or a name for --data.",
)
@click.option(
    "--data",
    multiple=True,
    type=click.Path(),
    metavar="DIR | TRAIN EVAL",
    help="Local data: a folder with train/dev files (--data DIR), or the train file then the "
    "eval file (--data TRAIN EVAL, or --data TRAIN --data EVAL): UTF-8 TSV with a header or "
    "GLUE's headerless CoLA TSV, CSV, JSONL, JSON, CommonsenseQA or WinoGrande JSONL.",
)
@click.option(
    "--metric",
    default=None,
    help="Primary metric (the report's and the final line's): accuracy, f1 or mcc "
    "for classification, pearson or spearman for regression [default: the known task's, "
    "else accuracy / spearman].",
)
@click.option(
    "--task-kind",
    type=click.Choice(["classification", "regression"]),
    default=None,
    help="How to read numeric labels when the files alone are ambiguous (integers mixed with "
    "decimals) [default: integers are class ids, decimals are scores].",
)
@click.option(
    "--labels",
    "label_list",
    default=None,
    metavar="A,B,...",
    help="Every class, in id order (e.g. 0,1,2 or negative,positive): labels outside it are "
    "refused; rare, missing or eval-only classes in it are accepted.",
)
@click.option(
    "--teacher",
    default=None,
    help="Distillation teacher: a path or hub name of a model fine-tuned on the task (with its "
    "head), or 'auto' to fine-tune one first (default: the recipe's).",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Run folder (default: runs/<recipe name>).",
)
@set_option
@click.option(
    "--resume", is_flag=True, help="Continue the run in --output from its last checkpoint."
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing, non-empty --output folder that a recipec run "
    "wrote (never one holding this run's inputs or the current folder).",
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16"]),
    default="auto",
    show_default=True,
    help="auto: bf16 autocast of the training forward and loss plus TF32 matmuls on a CUDA "
    "device with bf16, fp32 elsewhere (CPU). bf16: autocast on any device (slow on CPUs "
    "without bf16 units). Weights, evaluation, oBERT gradients and CrAM's second pass stay fp32.",
)
@click.option(
    "--max-train", type=click.IntRange(min=1), default=None, help="Use at most N training examples."
)
@click.option(
    "--max-eval", type=click.IntRange(min=1), default=None, help="Use at most N eval examples."
)
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=1),
    default=None,
    help="Checkpoint every N optimizer steps (default: training.checkpoint_every_steps or ~10 per stage).",
)
@click.option(
    "--keep-checkpoints",
    default="last",
    show_default=True,
    metavar="last|N|all",
    help="Checkpoints a finished run keeps: 'last' (the final one, all --resume needs), N (the "
    "last stage's newest N) or 'all' (every periodic checkpoint of every stage). While "
    "training, the newest two per stage (N or all: as many).",
)
@click.option(
    "--sparse-backprop",
    is_flag=True,
    help="Between mask changes, run pruned linear layers at >= --sparse-backprop-min zeros forward and "
    "backward on recipec's sparse CPU kernels (built on first use; same results up to float "
    "rounding).",
)
@click.option(
    "--sparse-backprop-min",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="Least sparsity of a layer for --sparse-backprop (default 0.7: below ~60% dense kernels "
    "are as fast). Implies --sparse-backprop.",
)
@click.option("--quiet", is_flag=True, help="No progress output.")
@_exit_130_on_ctrl_c
def command(
    recipe,
    model,
    task,
    data,
    teacher,
    output,
    overrides,
    resume,
    overwrite,
    device,
    precision,
    max_train,
    max_eval,
    checkpoint_every,
    keep_checkpoints,
    sparse_backprop,
    sparse_backprop_min,
    quiet,
    **task_options,  # --metric, --task-kind, --labels
) -> None:
    """Fine-tune and prune a model with RECIPE; write a sparse checkpoint and a report.

    \b
    Examples:
      recipec apply recipes/quickstart.yaml
      recipec apply recipes/downstream_gmp_90.yaml --data ../shared/data/sst2 --set init_sparsity=0.3
      recipec apply quickstart --data train.tsv dev.tsv --metric f1
      recipec apply recipes/downstream_gmp_90.yaml --model roberta-large --task glue/sst2 --device cuda
      recipec apply recipes/obert_90.yaml --device cuda --precision fp32   # no bf16 / TF32
      recipec apply recipes/quickstart.yaml --resume        # after Ctrl-C or a crash
      torchrun --nproc_per_node 4 --no-python recipec apply recipes/quickstart.yaml --device cuda
      recipec apply recipes/downstream_gmp_90.yaml --sparse-backprop   # CPU: sparse kernels (README)

    Under torchrun / accelerate launch every process trains a shard of each global batch
    (DDP); only rank 0 prints and writes. See docs/distributed.md.

    Exit status: 0 done, 1 training stopped (non-finite loss, a full disk, a lost or diverging
    rank; the last checkpoint is kept), 2 bad input (including an output folder in use by another
    run, read-only, or not recipec's), 130 interrupted. See docs/safety.md.
    """
    if resume and overwrite:
        fail("--resume continues the run in --output and --overwrite replaces it: pass one of them")
    load_or_exit(recipe, overrides)  # every recipe problem at once, before anything heavy
    min_sparsity = _sparse_backprop_min(sparse_backprop, sparse_backprop_min, device)
    _check_device(device)

    from recipec.distributed import DistributedError, is_main
    from recipec.modifiers.base import CompileError
    from recipec.train.loop import Interrupted, TrainingError
    from recipec.train.run import Reporter, RunConfig, RunError, run

    config = RunConfig(
        recipe_path=recipe,
        overrides=overrides,
        model=model,
        task=task,
        data=data,
        **_task_options(**task_options),
        teacher=teacher,
        output=output,
        resume=resume,
        overwrite=overwrite,
        device=device,
        precision=precision,
        max_train=max_train,
        max_eval=max_eval,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=_keep_checkpoints(keep_checkpoints),
        sparse_backprop=min_sparsity,
    )
    reporter = Reporter(quiet=quiet)
    try:
        report = run(config, reporter)
    except (RunError, CompileError) as exc:
        if not is_main() and not str(exc).startswith("rank "):
            sys.exit(2)  # every rank hit the same error; rank 0 prints it
        fail(f"{exc}")
    except (TrainingError, DistributedError) as exc:
        if is_main() or isinstance(exc, DistributedError):
            click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except Interrupted as exc:
        if is_main():
            click.echo(f"{exc}; continue with the same command plus --resume", err=True)
        sys.exit(130)

    if not is_main():
        return
    _print_result(report)


def _print_result(report: dict) -> None:
    """The final line (and a collapsed model's warning, with its likely causes, before it)."""
    from recipec.train.report import number

    collapse = report.get("collapse")
    if collapse:
        click.echo(f"warning: {collapse['message']}; likely causes:", err=True)
        for cause in collapse["causes"]:
            click.echo(f"  - {cause}", err=True)
    primary = report["primary_metric"]
    final = report["final_eval"].get(primary)
    line = (
        f"done: {report['model_dir']}  eval {primary} {number(final)}  "
        f"sparsity {100 * report['sparsity']['targets']:.2f}% of targets "
        f"({100 * report['sparsity']['model']:.2f}% of all weights)  {report['wall_seconds']:.0f} s"
    )
    if report.get("teacher"):
        line += f"  (dense teacher {number(report['teacher']['eval'].get(primary))})"
    if collapse:
        line += "  COLLAPSED (see the report)"
    click.echo(line)
    click.echo(f"report: {Path(report['model_dir']).parent / 'report.md'}")


def _keep_checkpoints(value: str) -> int | None:
    """``--keep-checkpoints``: ``last`` -> 1, ``N`` -> N, ``all`` -> None (every one)."""
    if value == "all":
        return None
    if value == "last":
        return 1
    if value.isdigit() and int(value) >= 1:
        return int(value)
    fail(f"--keep-checkpoints {value!r}: use last, a number of checkpoints (1, 2, ...) or all")


def _task_options(metric: str | None, task_kind: str | None, label_list: str | None) -> dict:
    """``RunConfig``'s task options from ``--metric``, ``--task-kind`` and ``--labels a,b,c``
    (checked by the task loader)."""
    labels = None if label_list is None else tuple(v.strip() for v in label_list.split(","))
    return {"metric": metric, "task_kind": task_kind, "labels": labels}


def _check_device(device: str) -> None:
    """Fails early when ``--device cuda`` has no CUDA device to run on."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            fail("--device cuda but no CUDA device is available")


def _sparse_backprop_min(flag: bool, least: float | None, device: str) -> float | None:
    """The minimum layer sparsity for the sparse kernels, or None; fails early where they cannot
    run. Builds recipec's kernels first (once per machine): now when --sparse-backprop needs
    them, else in the background while the run trains, so the first run leaves them built."""
    from recipec import distributed
    from recipec.kernels import sparse_backprop as sbp

    if not flag and least is None:
        if distributed.env_world_size() == 1:
            sbp.start_build()
        return None
    if device != "cpu":
        fail("--sparse-backprop runs recipec's CPU kernels: drop --device cuda")
    if distributed.env_world_size() > 1:
        fail("--sparse-backprop runs in a single process, not under torchrun / accelerate launch")
    sbp.backend()  # built here, before the model loads; the stage says if it will not be faster
    return sbp.DEFAULT_MIN_SPARSITY if least is None else least

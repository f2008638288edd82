"""``recipec apply`` end to end: recipe + model + task -> sparse checkpoint, metrics and report.

Run directory (see docs/contracts.md)::

    OUT/run.json              what was asked (for --resume checks)
    OUT/recipe.yaml           the resolved recipe
    OUT/checkpoints/NN-STAGE/ atomic training checkpoints per stage
    OUT/metrics.jsonl         loss, lr, sparsity per step; eval metrics at eval steps
    OUT/model/                HF folder: config, safetensors (exact zeros), tokenizer,
                              masks.safetensors, recipe.yaml
    OUT/report.json, OUT/report.md, OUT/*.png
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from recipec.recipe.schema import Recipe


class RunError(ValueError):
    """Bad input for a run (data, model, recipe/model mismatch, output folder): one clear message."""


@dataclass
class RunConfig:
    recipe_path: str
    overrides: Sequence[str] = ()
    model: str | None = None
    task: str | None = None
    data: Sequence[str] = ()
    teacher: str | None = None
    output: Path | None = None
    resume: bool = False
    overwrite: bool = False
    device: str = "cpu"
    max_train: int | None = None
    max_eval: int | None = None
    teacher_cache: Path | None = None
    checkpoint_every: int | None = None
    stop_after_step: int | None = None  # tests: end the (last) stage early
    # Minimum sparsity for SparseProp kernels once a stage's masks are fixed (None: dense kernels).
    sparse_backprop: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def default_output(recipe_path: str) -> Path:
    return Path("runs") / Path(recipe_path).stem


def teacher_cache_dir() -> Path:
    root = os.environ.get("RECIPEC_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "recipec"
    )
    return Path(root) / "teachers"


def _dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False)


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Reporter:
    """Console output: a rich progress bar on a terminal, plain lines otherwise."""

    def __init__(self, quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True, quiet=quiet)
        self.progress = None
        self.task = None

    def log(self, message: str) -> None:
        console = self.progress.console if self.progress is not None else self.console
        console.print(message, highlight=False, markup=False)

    def start(self, description: str, total: int, completed: int = 0) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.stop()
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, completed=completed, info="")
        self._last_plain = time.monotonic()
        self._description = description
        self._total = total

    def update(self, completed: int, info: str) -> None:
        if self.progress is None:
            return
        self.progress.update(self.task, completed=completed, info=info)
        if not self.console.is_terminal and (
            time.monotonic() - self._last_plain > 10 or completed == self._total
        ):
            self._last_plain = time.monotonic()
            self.console.print(
                f"{self._description}: step {completed}/{self._total} {info}",
                highlight=False,
                markup=False,
            )

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _step_info(record: dict[str, Any]) -> str:
    parts = [f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}"]
    if "sparsity" in record:
        parts.append(f"sparsity {100 * record['sparsity']:.1f}%")
    return "  ".join(parts)


def run(config: RunConfig, reporter: Reporter | None = None) -> dict[str, Any]:
    """Execute a run; returns the report dict. Raises RunError / TrainingError / Interrupted.

    Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1 in the environment) every
    rank calls this: it joins the process group (gloo on CPU, NCCL on CUDA with one GPU per
    local rank), trains with DDP over shards of each global batch, and only rank 0 prints and
    writes files; every rank returns the same report. Also raises
    :class:`recipec.distributed.DistributedError` (launch problems, a lost peer, ranks
    whose masks differ). See docs/distributed.md.
    """
    from recipec import distributed as dist_utils

    reporter = reporter or Reporter()
    with dist_utils.process_group(config.device) as device:
        if device != config.device:
            config = replace(config, device=device)
        if not dist_utils.is_main():
            reporter = Reporter(quiet=True)
        elif dist_utils.is_distributed():
            reporter.log(
                f"[distributed] {dist_utils.world_size()} ranks "
                f"({torch.distributed.get_backend()}), global batch split across them"
            )
        return _run(config, reporter)


def _agree(error: str | None, what: str) -> None:
    """Rank 0 checked something; raise its RunError (if any) on every rank."""
    from recipec import distributed as dist_utils

    error = dist_utils.broadcast_object(error, what=what)
    if error is not None:
        raise RunError(error)


def _run(config: RunConfig, reporter: Reporter) -> dict[str, Any]:
    from recipec import distributed as dist_utils
    from recipec.compiler import compile as compile_recipe
    from recipec.models import ModelLoadError, load_model_and_tokenizer, resolve_model_path
    from recipec.modifiers.base import CompileError
    from recipec.plan import PlanError, resolve_stage
    from recipec.recipe.load import load_recipe, resolve_recipe_path
    from recipec.tasks import TaskError, load_task
    from recipec.tasks.data import make_dataloader
    from recipec.train import resume as ckpt
    from recipec.train.loop import (
        MetricsLog,
        evaluate,
        make_optimizer,
        seed_everything,
        train_stage,
    )

    main_rank = dist_utils.is_main()
    world = dist_utils.world_size()
    started = time.perf_counter()
    _quiet_libraries()
    recipe_path = resolve_recipe_path(config.recipe_path)
    recipe = load_recipe(recipe_path, config.overrides)  # RecipeError is handled by the CLI
    out = Path(config.output or default_output(str(recipe_path)))
    run_json = out / "run.json"
    asked = {
        "recipe": _dump_recipe(recipe),
        "model": config.model,
        "task": config.task,
        "data": [str(Path(d).resolve()) for d in config.data],
        "teacher": config.teacher,
        "max_train": config.max_train,
        "max_eval": config.max_eval,
    }
    stages = recipe.resolved_stages()
    distills = [m for s in stages for m in s.modifiers if m.type == "distill"]
    teacher_spec = config.teacher or (distills[0].teacher if distills else None)
    if config.teacher and not distills:
        reporter.log("[warn] --teacher is ignored: the recipe has no distill modifier")
        teacher_spec = None
    if teacher_spec not in (None, "auto"):
        try:  # a missing local folder fails now, before any data or model is loaded
            resolve_model_path(teacher_spec)
        except ModelLoadError as exc:
            raise RunError(f"teacher: {exc}") from None
    inputs = [
        ("--model", config.model),
        ("--teacher", teacher_spec),
        ("--task", config.task),
        ("the recipe", recipe_path),
        *(("--data", d) for d in config.data),
    ]
    # Read-only first (a wrong --resume or a busy folder fails before any download); the folder
    # is created, or replaced, only once every input has loaded.
    replace, error = False, None
    if main_rank:  # only rank 0 touches the output folder (shared by all ranks)
        try:
            replace = _check_output(config, out, run_json, asked, inputs)
        except RunError as exc:
            if world == 1:
                raise
            error = str(exc)
    if world > 1:
        _agree(error, "checking the output folder")
    seed = recipe.training.seed
    try:
        task = load_task(
            config.task,
            list(config.data) or None,
            max_train=config.max_train,
            max_eval=config.max_eval,
            seed=seed,
        )
    except TaskError as exc:
        raise RunError(str(exc)) from None
    for note in task.notes:
        reporter.log(f"[data] {note}")
    info = task.info
    reporter.log(
        f"task {info.name} ({info.kind}): {len(task.train)} train / {len(task.eval)} eval examples"
    )
    # A new task head is initialised at random here: seeded, so the same command gives the same
    # run (torch seeds its default generator differently in every process).
    seed_everything(seed)
    try:
        model, tokenizer = load_model_and_tokenizer(config.model, info, device=config.device)
    except ModelLoadError as exc:
        raise RunError(str(exc)) from None

    def spe_for(training) -> int:
        n = len(task.train)
        return max(1, -(-n // training.batch_size))

    # Resolve every stage up front so schedule errors appear before any training.
    plans = []
    for stage in stages:
        training = recipe.stage_training(stage)
        try:
            plans.append(resolve_stage(recipe, stage, spe_for(training)))
        except PlanError as exc:
            raise RunError(
                f"the recipe does not fit this data ({len(task.train)} train examples): {exc}"
            ) from None

    if main_rank:  # every input is checked: only now is the output folder created (or replaced)
        _create_output(config, recipe, out, run_json, asked, replace, reporter)
    dist_utils.barrier("creating the output folder")
    metrics = MetricsLog(out / "metrics.jsonl" if main_rank else None)

    teacher_model = None
    teacher_report = None
    if teacher_spec is not None:
        if teacher_spec == "auto":
            # the teacher trains like the first stage that distils (not a prune-only stage before it)
            first = next(
                i
                for i, stage in enumerate(stages)
                if any(m is distills[0] for m in stage.modifiers)
            )
            teacher_model, teacher_report = _auto_teacher(
                config, recipe, distills[0], task, plans[first], reporter, out
            )
        else:
            teacher_model = teacher_spec

    seed_everything(seed)
    dist_utils.seed_rank(seed)
    ckpt_root = out / "checkpoints"
    resume_stage, resume_folder = 0, None
    if config.resume:
        found = None
        if main_rank:  # every rank resumes from the checkpoint rank 0 sees
            for i in range(len(stages) - 1, -1, -1):
                folder = ckpt.latest_checkpoint(ckpt_root / f"{i:02d}-{stages[i].name}")
                if folder is not None:
                    found = (i, str(folder))
                    break
        found = dist_utils.broadcast_object(found, what="choosing the checkpoint to resume from")
        if found is None:
            reporter.log("[resume] no checkpoint yet: starting from the beginning")
        else:
            resume_stage, resume_folder = found[0], Path(found[1])
            if not (resume_folder / "state.pt").is_file():
                raise RunError(
                    f"rank {dist_utils.rank()}: cannot read the checkpoint {resume_folder} "
                    "(distributed runs need --output on a file system shared by every node)"
                )
            reporter.log(f"[resume] continuing from {resume_folder}")
            metrics_state = torch.load(resume_folder / "state.pt", weights_only=False)
            saved_world = int(metrics_state.get("world_size", 1))
            if saved_world != world:
                reporter.log(
                    f"[resume] the checkpoint was written by {saved_world} rank(s), this run has {world}: "
                    "the global batches are the same, dropout streams are re-split"
                )
            metrics.truncate_after(metrics_state["stage"], int(metrics_state["step"]))
    elif main_rank and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()

    carried_masks = None
    results = []
    program = None
    for i, (stage, plan) in enumerate(zip(stages, plans)):
        if i < resume_stage:
            continue
        training = plan.training
        optimizer = make_optimizer(model, training.learning_rate, training.weight_decay)
        resume_state = None
        if resume_folder is not None and i == resume_stage:
            resume_state = ckpt.load_checkpoint(resume_folder, model)
            carried_masks = None  # the Program state holds the masks
        grad_counter = {"n": 0}

        def grad_batches(batch_size: int, _plan=plan, _counter=grad_counter):
            _counter["n"] += 1
            loader = make_dataloader(
                task.train,
                tokenizer,
                info,
                batch_size=batch_size,
                max_seq_length=_plan.training.max_seq_length,
                shuffle=True,
                seed=seed + 7919 * _counter["n"],
            )
            if world > 1:  # this rank's share of the same global mini-batches (see OBertModifier)
                return (
                    dist_utils.ShardBatch({k: v.to(config.device) for k, v in b.items()}, b.weight)
                    for b in dist_utils.sharded_batches(loader)
                )
            return (dict((k, v.to(config.device)) for k, v in b.items()) for b in loader)

        try:
            program = compile_recipe(
                recipe,
                model,
                optimizer,
                plan.steps_per_epoch,
                stage=stage.name,
                teacher=teacher_model
                if any(m.type == "distill" for m in stage.modifiers)
                else None,
                grad_batches=grad_batches,
                masks=carried_masks,
                progress=reporter.log,
            )
        except CompileError as exc:
            raise RunError(f"stage {stage.name!r}: {exc}") from None
        if plan.training.prune_only:
            reporter.log(
                f"stage {stage.name!r}: prune-only: evaluate, prune once (one-shot), evaluate; "
                f"{len(program.masks.params)} tensors in the model"
            )
        else:
            reporter.log(
                f"stage {stage.name!r}: {plan.total_steps} steps ({plan.steps_per_epoch}/epoch), "
                f"{len(program.masks.params)} tensors in the model"
            )
            completed = int(resume_state["step"]) if resume_state else 0
            reporter.start(f"{stage.name}", plan.total_steps, completed)
        is_last = i == len(stages) - 1
        try:
            result = train_stage(
                model=model,
                tokenizer=tokenizer,
                info=info,
                train_examples=task.train,
                eval_examples=task.eval,
                plan=plan,
                optimizer=optimizer,
                program=program,
                device=config.device,
                checkpoint_dir=ckpt_root / f"{i:02d}-{stage.name}",
                checkpoint_every=config.checkpoint_every
                or training.checkpoint_every_steps
                or _default_ckpt_every(plan),
                resume_state=resume_state,
                metrics=metrics,
                on_step=lambda s, rec: reporter.update(s, _step_info(rec)),
                stop_after_step=config.stop_after_step if is_last else None,
                sparse_backprop=config.sparse_backprop,
                # a prune-only stage after a stage evaluated at the same length: its model, already measured
                eval_before=results[-1][2].final_eval
                if plan.training.prune_only
                and results
                and results[-1][1].training.max_seq_length == training.max_seq_length
                else None,
            )
        finally:
            reporter.stop()
        if result.eval_before_pruning is not None:
            metric = info.primary_metric
            reporter.log(
                f"stage {stage.name!r}: {metric} {result.eval_before_pruning[metric]:.4f} before pruning, "
                f"{result.final_eval[metric]:.4f} after"
            )
        results.append((stage.name, plan, result, program))
        carried_masks = program.masks.state_dict()
        if result.final_eval is None:  # stopped early (tests)
            break

    # Final artefacts.
    final_eval = results[-1][2].final_eval
    if final_eval is None:
        final_eval = evaluate(
            model,
            task.eval,
            tokenizer,
            info,
            batch_size=64,
            max_seq_length=plans[-1].training.max_seq_length,
            device=config.device,
        )
    from recipec.train.report import write_outputs

    report = None
    if main_rank:
        report = write_outputs(
            out=out,
            model=model,
            tokenizer=tokenizer,
            recipe=recipe,
            recipe_text=_dump_recipe(recipe),
            info=info,
            task=task,
            results=results,
            final_eval=final_eval,
            teacher_report=teacher_report,
            seconds=time.perf_counter() - started,
            config=config,
        )
    return dist_utils.broadcast_object(report, what="sharing the report")


def _never_trained(out: Path) -> bool:
    """Whether ``out`` holds only what a run writes before its first training step: run.json,
    recipe.yaml and a metrics.jsonl without a training record (an earlier attempt that failed
    to start, e.g. on a target pattern that matched nothing)."""
    names = {p.name for p in out.iterdir()}
    if "run.json" not in names or not names <= {"run.json", "recipe.yaml", "metrics.jsonl"}:
        return False
    metrics = out / "metrics.jsonl"
    if not metrics.is_file():
        return True
    for line in metrics.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            return False  # not what a run writes: leave it alone
        if not isinstance(record, dict) or "loss" in record:
            return False
    return True


def _check_output(
    config: RunConfig,
    out: Path,
    run_json: Path,
    asked: dict[str, Any],
    inputs: list[tuple[str, object]],
) -> bool:
    """Check --resume / --overwrite against the output folder (rank 0, read-only); returns
    whether the folder is to be replaced."""
    from recipec.outputs import ReplaceError, check_output

    if config.resume:
        if not run_json.is_file():
            raise RunError(f"nothing to resume in {out} (no run.json); start without --resume")
        before = json.loads(run_json.read_text())
        changed = [k for k in asked if before.get(k) != asked[k]]
        if changed:
            raise RunError(
                f"--resume: the run in {out} was started with different {', '.join(changed)}; "
                "resume with the same arguments or use another --output"
            )
        return False
    reusable = out.is_dir() and not out.is_symlink() and _never_trained(out)
    try:
        return check_output(
            out,
            overwrite=config.overwrite,
            marker=run_json.name,
            written_by="a recipec run",
            busy="pass --resume to continue it, --overwrite to replace it, or --output for a new "
            "folder",
            inputs=inputs,
            reusable=reusable,
        )
    except ReplaceError as exc:
        raise RunError(str(exc)) from None


def _create_output(
    config: RunConfig,
    recipe: Recipe,
    out: Path,
    run_json: Path,
    asked: dict[str, Any],
    replace: bool,
    reporter: Reporter,
) -> None:
    """Replace (when :func:`_check_output` allowed it) and create the output folder (rank 0)."""
    from recipec.train import resume as ckpt

    if replace:
        if not config.overwrite:
            reporter.log(f"replacing {out}: an earlier run there stopped before training anything")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not config.resume:
        ckpt.write_text_atomic(run_json, json.dumps(asked, indent=2))
        ckpt.write_text_atomic(out / "recipe.yaml", _dump_recipe(recipe))


def _default_ckpt_every(plan) -> int:
    """About 10 checkpoints per stage, between every 50 and every 300 steps."""
    return min(300, max(50, plan.total_steps // 10))


def _quiet_libraries() -> None:
    """transformers' own progress bars would interleave with ours."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _auto_teacher(
    config: RunConfig, recipe: Recipe, distill, task, plan, reporter: Reporter, out: Path
):
    """Fine-tune (or reuse) the dense teacher for ``--teacher auto``.

    Distributed: every rank trains the teacher (DDP); rank 0 decides whether the cache holds
    one, writes it, and the others wait for it, then every rank loads it from the shared path.
    """
    from recipec import distributed as dist_utils
    from recipec.models import load_model_and_tokenizer
    from recipec.outputs import write_text_atomic
    from recipec.plan import StagePlan
    from recipec.train.loop import evaluate, make_optimizer, seed_everything, train_stage
    from recipec.train.resume import latest_checkpoint, load_checkpoint

    training = plan.training
    epochs = distill.teacher_epochs or (training.epochs if training.epochs is not None else None)
    total = max(1, round(epochs * plan.steps_per_epoch)) if epochs is not None else plan.total_steps
    key = _fingerprint(
        "teacher-v1",
        config.model or "embedded",
        task.info.to_dict(),
        len(task.train),
        len(task.eval),
        [e.text for e in task.train[:50]],
        config.max_train,
        config.max_eval,
        config.data,
        training.model_dump(mode="json"),
        total,
    )
    cache = Path(config.teacher_cache or teacher_cache_dir()) / key
    done = cache / "model"
    if dist_utils.broadcast_object(
        (done / "config.json").is_file(), what="checking the teacher cache"
    ):
        reporter.log(f"[teacher] reusing the fine-tuned dense teacher at {done}")
        report = (
            json.loads((cache / "teacher.json").read_text())
            if (cache / "teacher.json").is_file()
            else None
        )
        return str(done), report
    reporter.log(f"[teacher] fine-tuning a dense teacher for {total} steps (cached at {cache})")
    seed_everything(training.seed)
    dist_utils.seed_rank(training.seed)
    teacher, tokenizer = load_model_and_tokenizer(config.model, task.info, device=config.device)
    tplan = StagePlan(
        name="teacher",
        training=training,
        steps_per_epoch=plan.steps_per_epoch,
        total_steps=total,
        warmup_steps=plan.warmup_steps,
        eval_every=None,
        modifiers=(),
        targets=plan.targets,
        exclude=plan.exclude,
    )
    optimizer = make_optimizer(teacher, training.learning_rate, training.weight_decay)
    ckdir = cache / "checkpoints"
    folder = dist_utils.broadcast_object(
        latest_checkpoint(ckdir) if dist_utils.is_main() else None,
        what="finding the teacher checkpoint",
    )
    resume_state = load_checkpoint(folder, teacher) if folder is not None else None
    reporter.start("teacher", total, int(resume_state["step"]) if resume_state else 0)
    try:
        result = train_stage(
            model=teacher,
            tokenizer=tokenizer,
            info=task.info,
            train_examples=task.train,
            eval_examples=task.eval,
            plan=tplan,
            optimizer=optimizer,
            program=None,
            device=config.device,
            checkpoint_dir=ckdir,
            checkpoint_every=_default_ckpt_every(tplan),
            resume_state=resume_state,
            on_step=lambda s, rec: reporter.update(s, _step_info(rec)),
        )
    finally:
        reporter.stop()
    final = result.final_eval or evaluate(
        teacher,
        task.eval,
        tokenizer,
        task.info,
        batch_size=64,
        max_seq_length=training.max_seq_length,
        device=config.device,
    )
    report = {"eval": final, "steps": total, "seconds": result.seconds, "path": str(done)}
    if dist_utils.is_main():
        tmp = cache / ".model-tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        teacher.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, done)
        write_text_atomic(cache / "teacher.json", json.dumps(report, indent=2))
        shutil.rmtree(ckdir, ignore_errors=True)
    dist_utils.barrier("waiting for rank 0 to save the teacher")
    reporter.log(
        f"[teacher] dense teacher: {task.info.primary_metric} {final[task.info.primary_metric]:.4f}"
    )
    return str(done), report


def progress_printer(reporter: Reporter) -> Callable[[str], None]:
    return reporter.log

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

import fnmatch
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
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
    metric: str | None = None  # --metric: the primary metric
    task_kind: str | None = None  # --task-kind: how numeric labels are read
    labels: Sequence[str] | None = None  # --labels: every class, in id order
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
    # Minimum sparsity for the sparse kernels once a stage's masks are fixed (None: dense kernels).
    sparse_backprop: float | None = None
    # --keep-checkpoints: how many of the last stage's newest a finished run keeps (None: all)
    keep_checkpoints: int | None = 1
    # auto (bf16 autocast + TF32 on a CUDA device with bf16, else fp32), fp32 or bf16.
    precision: str = "auto"


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
    """Console output, every message once, on stderr (stdout gets the final result only): a rich
    progress bar on a terminal; elsewhere (a pipe, a log file) plain lines only, a progress
    line every 10 s and at the end of each stage (no bar to redraw, so nothing repeats)."""

    def __init__(self, quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True, quiet=quiet)
        self.progress = None
        self.task = None
        self._plain: tuple[str, int] | None = None  # (description, total) while a stage runs

    def log(self, message: str) -> None:
        console = self.progress.console if self.progress is not None else self.console
        # soft_wrap: a long path stays on one line (copyable), whatever the console's width
        console.print(message, highlight=False, markup=False, soft_wrap=True)

    def start(self, description: str, total: int, completed: int = 0) -> None:
        self.stop()
        if not self.console.is_terminal:
            self._plain = (description, total)
            self._last_plain = time.monotonic()
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

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
            redirect_stdout=False,  # stdout is the result's; nothing else is written there
            redirect_stderr=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, completed=completed, info="")

    def update(self, completed: int, info: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=completed, info=info)
            return
        if self._plain is None:
            return
        description, total = self._plain
        if time.monotonic() - self._last_plain > 10 or completed == total:
            self._last_plain = time.monotonic()
            self.log(f"{description}: step {completed}/{total} {info}")

    def stop(self) -> None:
        self._plain = None
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _step_info(record: dict[str, Any]) -> str:
    parts = [f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}"]
    if "sparsity" in record:
        parts.append(f"sparsity {100 * record['sparsity']:.1f}%")
    return "  ".join(parts)


def _eval_line(plan: Any, step: int, metrics: dict[str, float]) -> str:
    """``stage 'main' step 10/30 (epoch 1): eval accuracy 0.5000  f1 0.0000  loss 0.6931``."""
    from recipec.tasks.collapse import scores

    where = f"step {step}/{plan.total_steps}"
    if plan.total_steps:
        where += f" (epoch {step / plan.steps_per_epoch:.3g})"
    values = "  ".join(f"{k} {v:.4f}" for k, v in scores(metrics).items())
    return f"stage {plan.name!r} {where}: eval {values}"


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
        return ApplyRun(config, reporter).execute()


def _agree(error: str | None, what: str) -> None:
    """Rank 0 checked something; raise its RunError (if any) on every rank."""
    from recipec import distributed as dist_utils

    error = dist_utils.broadcast_object(error, what=what)
    if error is not None:
        raise RunError(error)


@dataclass
class StageOutcome:
    """One finished (or stopped) stage of a run: its plan, its Program and what it measured."""

    plan: Any  # recipec.plan.StagePlan
    program: Any  # recipec.program.Program
    result: Any  # recipec.train.loop.StageResult

    @property
    def name(self) -> str:
        return self.plan.name


class ApplyRun:
    """``recipec apply`` as named phases, in order: :meth:`prepare` (recipe, output folder
    checks, read-only), :meth:`load_inputs` (task, model), :meth:`plan_stages` (every schedule
    resolved before any training), :meth:`create_output`, :meth:`teacher`, :meth:`find_resume`,
    :meth:`run_stages` and :meth:`finish` (final evaluation, model folder and report)."""

    def __init__(self, config: RunConfig, reporter: Reporter):
        from recipec import distributed as dist_utils

        self.config = config
        self.reporter = reporter
        self.main_rank = dist_utils.is_main()
        self.world = dist_utils.world_size()
        self.started = time.perf_counter()
        self.outcomes: list[StageOutcome] = []
        self.lock: Any = None  # recipec.outputs.FolderLock of the output folder (rank 0)
        self.before: dict[str, Any] | None = None  # run.json of the run --resume continues
        self.changes: list[dict[str, Any]] = []  # recipe changes --resume makes (learning rates)
        self.plans_as_started: list[Any] | None = None
        self.resumes: list[dict[str, Any]] = []  # run.json's record of resumes, this one included
        self._resume_state: dict[str, Any] | None = None
        self._pending_resume: tuple[int, Path, list[str]] | None = None

    def execute(self) -> dict[str, Any]:
        """Every phase in order; the output folder's lock is released however the run ends.
        File-system errors (a full disk, a read-only folder) end as RunError before training
        and as TrainingError (the last checkpoint kept) once it started."""
        _quiet_libraries()
        try:
            with _file_errors(stopped=False):
                self.resolve_precision()
                self.prepare()
                self.load_inputs()
                self.plan_stages()
                self.create_output()
            with _file_errors(stopped=True):
                teacher_model, teacher_report = self._teacher_as_started()
            with _file_errors(stopped=False):
                resume_stage, resume_folder = self.find_resume()
            with _file_errors(stopped=True):
                self.run_stages(teacher_model, resume_stage, resume_folder)
                return self.finish(teacher_report)
        finally:
            if self.lock is not None:
                self.lock.release()

    # -- phases -------------------------------------------------------------------------------

    def resolve_precision(self) -> None:
        """The run's precision (``--precision``), said in the log and in report.json."""
        from recipec.train.loop import resolve_precision

        try:
            self.precision = resolve_precision(self.config.precision, self.config.device)
        except ValueError as exc:
            raise RunError(str(exc)) from None
        self.reporter.log(f"[precision] {self.precision.describe()}")

    def prepare(self) -> None:
        """Load the recipe; check the teacher folder and the output folder (nothing written)."""
        from recipec.models import ModelLoadError, resolve_model_path
        from recipec.recipe.load import load_recipe, resolve_recipe_path

        config = self.config
        self.recipe_path = resolve_recipe_path(config.recipe_path)
        recipe = self.recipe = load_recipe(self.recipe_path, config.overrides)
        self.out = Path(config.output or default_output(str(self.recipe_path)))
        self.run_json = self.out / "run.json"
        self.asked = {
            "recipe": _dump_recipe(recipe),
            "model": config.model,
            "task": config.task,
            "data": [str(Path(d).resolve()) for d in config.data],
            "metric": config.metric,  # None in run.json files older than these options
            "task_kind": config.task_kind,
            "labels": list(config.labels) if config.labels is not None else None,
            "teacher": config.teacher,
            "max_train": config.max_train,
            "max_eval": config.max_eval,
        }
        self.stages = recipe.resolved_stages()
        distills = [m for s in self.stages for m in s.modifiers if m.needs_teacher]
        self.distill = distills[0] if distills else None
        teacher_spec = config.teacher or (self.distill.teacher if self.distill else None)
        if config.teacher and not distills:
            self.reporter.log("[warn] --teacher is ignored: the recipe has no distill modifier")
            teacher_spec = None
        if teacher_spec not in (None, "auto"):
            try:  # a missing local folder fails now, before any data or model is loaded
                resolve_model_path(teacher_spec)
            except ModelLoadError as exc:
                raise RunError(f"teacher: {exc}") from None
        self.teacher_spec = teacher_spec
        inputs = [
            ("--model", config.model),
            ("--teacher", teacher_spec),
            ("--task", config.task),
            ("the recipe", self.recipe_path),
            *(("--data", d) for d in config.data),
        ]
        # Read-only first (a wrong --resume or a busy folder fails before any download); the
        # folder is created, or replaced, only once every input has loaded.
        self.inputs = inputs
        self.replace, error = False, None
        if self.main_rank:  # only rank 0 touches the output folder (shared by all ranks)
            try:
                self.replace = self._check_folder(lock=self.out.is_dir())
            except RunError as exc:
                if self.world == 1:
                    raise
                error = str(exc)
        if self.world > 1:
            from recipec import distributed as dist_utils

            _agree(error, "checking the output folder")
            self.before, self.changes = dist_utils.broadcast_object(
                (self.before, self.changes), what="sharing the run's record"
            )

    def _check_folder(self, lock: bool) -> bool:
        """(rank 0) Take the output folder's lock (when ``lock``), then check --resume /
        --overwrite against the folder; whether recipec's entries in it are deleted first."""
        from recipec.outputs import FolderLock, LockError

        if lock and (self.lock is None or not self.lock.held):
            self.lock = FolderLock(self.out)
            try:
                self.lock.acquire()
            except LockError as exc:
                raise RunError(str(exc)) from None
            gone = self.lock.taken_over
            if gone:
                self.reporter.log(
                    f"[lock] took over the lock of pid {gone.get('pid')} on {gone.get('host')} "
                    f"(since {gone.get('since')}): that process is no longer running"
                )
        replace, self.before, self.changes = _check_output(
            self.config, self.out, self.asked, self.inputs
        )
        return replace

    def load_inputs(self) -> None:
        """The task's examples, then the model (its new head seeded: the same command gives the
        same run, whatever torch's per-process seed)."""
        from recipec.models import ModelLoadError, load_model_and_tokenizer
        from recipec.tasks import TaskError, load_task
        from recipec.train.loop import seed_everything

        config, seed = self.config, self.recipe.training.seed
        try:
            task = load_task(
                config.task,
                list(config.data) or None,
                max_train=config.max_train,
                max_eval=config.max_eval,
                seed=seed,
                task_kind=config.task_kind,
                labels=config.labels,
                metric=config.metric,
            )
        except TaskError as exc:
            raise RunError(str(exc)) from None
        for note in task.notes:
            self.reporter.log(f"[data] {note}")
        info = task.info
        self.reporter.log(
            f"task {info.name} ({info.kind}): {len(task.train)} train / {len(task.eval)} eval examples"
        )
        seed_everything(seed)
        try:
            model, tokenizer = load_model_and_tokenizer(config.model, info, device=config.device)
        except ModelLoadError as exc:
            raise RunError(str(exc)) from None
        self.task, self.model, self.tokenizer = task, model, tokenizer
        from recipec.compiler import check_model
        from recipec.recipe.errors import RecipeError

        try:  # structured modifiers against this model, e.g. every head of a layer removed
            check_model(self.recipe_path, config.overrides, self.recipe, model)
        except RecipeError as exc:
            raise RunError(str(exc)) from None

    def plan_stages(self) -> None:
        """Resolve every stage up front, so that schedule errors and targets that select nothing
        or leave encoder linear layers silently dense appear before any training (the
        teacher's included) and before the output folder is created."""
        from recipec.plan import PlanError, resolve_stage
        from recipec.sparsity.selection import check_targets

        error = check_targets(self.model, self.recipe).error()
        if error is not None:
            raise RunError(f"the recipe's targets do not fit this model:\n{error}")
        self.plans = []
        n = len(self.task.train)
        for stage in self.stages:
            spe = max(1, -(-n // self.recipe.stage_training(stage).batch_size))
            try:
                self.plans.append(resolve_stage(self.recipe, stage, spe))
            except PlanError as exc:
                raise RunError(
                    f"the recipe does not fit this data ({n} train examples): {exc}"
                ) from None
        started = (self.before or {}).get("recipe")
        if self.teacher_spec == "auto" and started not in (None, self.asked["recipe"]):
            self.plans_as_started = self._plans_as_started(n)

    def _plans_as_started(self, n: int) -> list[Any] | None:
        """The plans of the recipe the run started with (its ``teacher: auto`` is found, or
        trained again, with the settings it was first trained with)."""
        from recipec.plan import PlanError, resolve_stage

        try:
            recipe = Recipe.model_validate(yaml.safe_load(self.before["recipe"]))
            return [
                resolve_stage(
                    recipe, stage, max(1, -(-n // recipe.stage_training(stage).batch_size))
                )
                for stage in recipe.resolved_stages()
            ]
        except (ValueError, PlanError, yaml.YAMLError):
            self.reporter.log(
                "[resume] [warn] the recipe in run.json does not load; the teacher "
                "is looked up with the recipe given now"
            )
            return None

    def _teacher_as_started(self) -> tuple[Any, dict[str, Any] | None]:
        """:meth:`teacher`, with the plans of the recipe as started when it differs now (a
        resume changed learning rates): the cached ``teacher: auto`` is keyed by its training
        settings, and the run goes on distilling from the teacher it started with."""
        if self.plans_as_started is None:
            return self.teacher()
        plans, self.plans = self.plans, self.plans_as_started
        try:
            return self.teacher()
        finally:
            self.plans = plans

    def create_output(self) -> None:
        """Every input is checked: only now is the output folder created (or replaced), under
        the folder's lock (taken now if the folder did not exist before; checked again)."""
        from recipec import distributed as dist_utils
        from recipec.train.loop import MetricsLog

        if self.main_rank:
            if self.lock is None or not self.lock.held:
                self.out.mkdir(parents=True, exist_ok=True)
                self.replace = self._check_folder(lock=True)
            _create_output(
                self.config,
                self.recipe,
                self.out,
                self.asked,
                self.replace,
                self.reporter,
            )
        dist_utils.barrier("creating the output folder")
        self.metrics = MetricsLog(self.out / "metrics.jsonl" if self.main_rank else None)

    def teacher(self) -> tuple[Any, dict[str, Any] | None]:
        """The distillation teacher, loaded and checked against the student (labels, task kind,
        tokenizer): a path, or (``auto``) a dense model fine-tuned here (or cached)."""
        if self.teacher_spec is None:
            return None, None
        if self.teacher_spec != "auto":
            return self._load_teacher(self.teacher_spec), None
        # the teacher trains like the first stage that distils (not a prune-only stage before it)
        first = next(
            i
            for i, stage in enumerate(self.stages)
            if any(m is self.distill for m in stage.modifiers)
        )
        path, report = self._auto_teacher(self.plans[first])
        return self._load_teacher(path, cache=Path(path).parent), report

    def _load_teacher(self, path: str, cache: Path | None = None) -> Any:
        """The teacher model at ``path``; a RunError says what does not fit (and, for a cached
        teacher, how to clear the cache)."""
        from recipec.models import ModelLoadError, load_teacher

        try:
            return load_teacher(path, self.model, tokenizer=self.tokenizer)
        except ModelLoadError as exc:
            hint = (
                f"; the cached teacher may be damaged: remove it (rm -r {cache}) and run again "
                "to fine-tune it anew"
                if cache is not None
                else ""
            )
            raise RunError(f"teacher: {exc}{hint}") from None

    def find_resume(self) -> tuple[int, Path | None]:
        """With --resume: the stage and checkpoint to continue from (rank 0 decides): the
        newest verified checkpoint, older ones when newer ones are damaged or missing (each
        skipped one is named); none at all starts over, and only unusable ones are an error."""
        from recipec import distributed as dist_utils
        from recipec.train import resume

        seed = self.recipe.training.seed
        _seed_run(seed)
        if not self.config.resume:
            self.metrics.clear()
            return 0, None
        found, error, skipped = None, None, []
        if self.main_rank:  # every rank resumes from the checkpoint rank 0 sees
            found, error, skipped = self._newest_checkpoint()
        _agree(error, "choosing the checkpoint to resume from")
        found = dist_utils.broadcast_object(found, what="choosing the checkpoint to resume from")
        if found is None:
            self.reporter.log("[resume] no checkpoint yet: starting from the beginning")
            self.metrics.clear()
            self._record_resume(None, self.stages[0].name, 0, skipped)
            return 0, None
        stage, folder = found[0], Path(found[1])
        if not (folder / f"{resume.STATE_STEM}.json").is_file():
            raise RunError(
                f"rank {dist_utils.rank()}: cannot read the checkpoint {folder} "
                "(distributed runs need --output on a file system shared by every node)"
            )
        self.reporter.log(f"[resume] continuing from {folder}")
        try:
            state = self._resume_state or resume.verify_checkpoint(folder)
        except resume.CheckpointStateError as exc:
            raise RunError(f"rank {dist_utils.rank()}: {exc}") from None
        self._resume_state = state
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.world:
            self.reporter.log(
                f"[resume] the checkpoint was written by {saved_world} rank(s), this run has "
                f"{self.world}: the global batches are the same, dropout streams are re-split"
            )
        # metrics.jsonl and run.json change once the checkpoint has loaded (a refused resume
        # changes nothing): see _resumed
        self._pending_resume = (stage, folder, skipped)
        return stage, folder

    def _resumed(self) -> None:
        """The checkpoint's state has loaded: drop the metrics records after it and record
        the resume in run.json."""
        stage, folder, skipped = self._pending_resume
        state = self._resume_state
        later = [s.name for s in self.stages[stage + 1 :]]
        self.metrics.truncate_after(state["stage"], int(state["step"]), later)
        self._record_resume(folder, state["stage"], int(state["step"]), skipped)

    def _newest_checkpoint(self) -> tuple[tuple[int, str] | None, str | None, list[str]]:
        """(rank 0) ``(stage index, folder)`` of the newest verified checkpoint of the latest
        stage that has one, an error when checkpoints exist but none can be used, and the
        skipped ones (``"FOLDER: why"``)."""
        from recipec.train import resume

        skipped: list[tuple[Path, str]] = []
        found = None
        for i in range(len(self.stages) - 1, -1, -1):
            newest = resume.find_checkpoint(self._checkpoint_dir(i), skipped)
            if newest is not None:
                found, self._resume_state = (i, str(newest[0])), newest[1]
                break
        notes = [f"{folder.name}: {why}" for folder, why in skipped]
        for note in notes:
            self.reporter.log(f"[resume] skipping checkpoint {note}")
        if found is None and skipped:
            listed = "; ".join(why for _, why in skipped[:3])
            more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
            return (
                None,
                (
                    f"--resume: no checkpoint in {self.out / 'checkpoints'} can be used: {listed}"
                    f"{more}. Start the run over with --overwrite instead of --resume"
                ),
                notes,
            )
        return found, None, notes

    def _record_resume(
        self, folder: Path | None, stage: str, step: int, skipped: list[str]
    ) -> None:
        """(rank 0) This resume in run.json: from where, what was skipped, what changed."""
        from recipec.outputs import write_text_atomic
        from recipec.train.runfolder import record_resume

        entry = {
            "from": str(folder) if folder is not None else None,
            "stage": stage,
            "step": step,
            "skipped": skipped,
            "changes": self.changes,
        }
        for change in self.changes:
            self.reporter.log(
                f"[resume] {change['field']}: {change['was']} -> {change['now']} "
                f"(from stage {stage!r} step {step})"
            )
        if self.main_rank and self.before is not None:
            text = _dump_recipe(self.recipe)
            self.resumes = record_resume(self.out, self.before, text, entry)
            if self.changes:
                write_text_atomic(self.out / "recipe.yaml", text)

    def run_stages(self, teacher: Any, resume_stage: int, resume_folder: Path | None) -> None:
        """Each stage in turn (from the resumed one); masks carry over from stage to stage."""
        from recipec.train import resume

        carried = None
        for i, (stage, plan) in enumerate(zip(self.stages, self.plans)):
            if i < resume_stage:
                continue
            checkpoint = None
            resuming = resume_folder is not None and i == resume_stage
            try:
                if resuming:
                    from recipec.compiler import prepare_stages

                    prepare_stages(self.plans[: i + 1], self.model)  # e.g. layers dropped earlier
                    checkpoint = resume.load_checkpoint(
                        resume_folder, self.model, state=self._resume_state
                    )
                    carried = None  # the Program state holds the masks
                outcome = self._run_stage(i, stage, plan, teacher, carried, checkpoint)
            except resume.CheckpointStateError as exc:
                if not resuming:
                    raise
                raise RunError(f"cannot resume from {resume_folder}: {exc}") from None
            self.outcomes.append(outcome)
            carried = outcome.program.masks.state_dict()
            if outcome.result.final_eval is None:  # stopped early (tests)
                break

    def finish(self, teacher_report: dict[str, Any] | None) -> dict[str, Any]:
        """The final evaluation, the model folder and the report (rank 0 writes)."""
        from recipec import distributed as dist_utils
        from recipec.train.loop import evaluate
        from recipec.train.report import write_outputs

        final_eval = self.outcomes[-1].result.final_eval
        if final_eval is None:
            final_eval = evaluate(
                self.model,
                self.task.eval,
                self.tokenizer,
                self.task.info,
                batch_size=64,
                max_seq_length=self.plans[-1].training.max_seq_length,
                device=self.config.device,
            )
        report = None
        if self.main_rank:
            report = write_outputs(
                out=self.out,
                model=self.model,
                tokenizer=self.tokenizer,
                recipe=self.recipe,
                recipe_text=_dump_recipe(self.recipe),
                info=self.task.info,
                task=self.task,
                outcomes=self.outcomes,
                final_eval=final_eval,
                teacher_report=teacher_report,
                seconds=time.perf_counter() - self.started,
                config=self.config,
                resumes=self.resumes,
            )
            report = _add_to_report(self.out, report, precision=self.precision.record())
            self._prune_checkpoints()
        return dist_utils.broadcast_object(report, what="sharing the report")

    def _prune_checkpoints(self) -> None:
        """A finished run keeps the last stage's final checkpoint only (``--resume`` of a
        finished run reads nothing else), or its newest N (``--keep-checkpoints N``); every
        one with ``--keep-checkpoints all``."""
        from recipec.train import resume

        last = self.outcomes[-1] if self.outcomes else None
        finished = last is not None and last.plan is self.plans[-1] and last.result.final_eval
        if self.config.keep_checkpoints is None or not finished:
            return
        roots = [self._checkpoint_dir(i) for i in range(len(self.stages))]
        deleted = resume.keep_last(roots, self.config.keep_checkpoints)
        if deleted:
            kept = resume.latest_checkpoint(roots[-1])
            self.reporter.log(
                f"checkpoints: kept {kept} (what --resume needs), deleted {len(deleted)} older "
                "ones (--keep-checkpoints all keeps every one)"
            )

    # -- one stage ----------------------------------------------------------------------------

    def _checkpoint_dir(self, index: int) -> Path:
        return self.out / "checkpoints" / f"{index:02d}-{self.stages[index].name}"

    def _run_stage(self, index, stage, plan, teacher, carried, checkpoint) -> StageOutcome:
        from recipec.compiler import compile_plan, prepare_model
        from recipec.modifiers.base import CompileError
        from recipec.train import resume
        from recipec.train.loop import StageRunner, make_optimizer

        config, reporter, training = self.config, self.reporter, plan.training
        distils = any(m.needs_teacher for m in stage.modifiers)
        try:
            # Layers dropped before the optimizer exists: it holds only the parameters that
            # train, as in a resumed run (which drops them before loading the checkpoint).
            carried = prepare_model(plan, self.model, carried)
            optimizer = make_optimizer(
                self.model, training.learning_rate, training.weight_decay, config.device
            )
            program = compile_plan(
                plan,
                self.recipe,
                self.model,
                optimizer,
                teacher=teacher if distils else None,
                grad_batches=self._grad_batches(plan),
                masks=carried,
                progress=reporter.log,
                own_lr=True,
                sparse_backprop=config.sparse_backprop,
            )
        except CompileError as exc:
            raise RunError(f"stage {stage.name!r}: {exc}") from None
        tensors = f"{len(program.masks.params)} tensors in the model"
        if training.prune_only:
            reporter.log(
                f"stage {stage.name!r}: prune-only: evaluate, prune once (one-shot), evaluate; {tensors}"
            )
        else:
            reporter.log(
                f"stage {stage.name!r}: {plan.total_steps} steps ({plan.steps_per_epoch}/epoch), {tensors}"
            )
            reporter.start(
                stage.name, plan.total_steps, int(checkpoint["step"]) if checkpoint else 0
            )
        runner = StageRunner(
            program,
            self._stage_data(),
            checkpoint_dir=self._checkpoint_dir(index),
            checkpoint_every=config.checkpoint_every
            or training.checkpoint_every_steps
            or _default_ckpt_every(plan),
            metrics=self.metrics,
            on_step=lambda s, rec: reporter.update(s, _step_info(rec)),
            on_eval=lambda s, metrics: self._log_eval(plan, s, metrics),
            stop_after_step=config.stop_after_step if index == len(self.stages) - 1 else None,
            eval_before=self._known_eval(plan),
            keep_checkpoints=None
            if config.keep_checkpoints is None
            else max(resume.KEEP, config.keep_checkpoints),
            precision=self.precision,
        )
        if checkpoint is not None:
            runner.on_resumed = self._resumed
        try:
            result = runner.run(checkpoint)
        finally:
            reporter.stop()
        if result.eval_before_pruning is not None:
            metric = self.task.info.primary_metric
            reporter.log(
                f"stage {stage.name!r}: {metric} {result.eval_before_pruning[metric]:.4f} before "
                f"pruning, {result.final_eval[metric]:.4f} after"
            )
        return StageOutcome(plan, program, result)

    def _log_eval(self, plan: Any, step: int, metrics: dict[str, float]) -> None:
        """An evaluation's scores on the console, and a warning when the model has collapsed."""
        from recipec.tasks.collapse import collapse_of

        self.reporter.log(_eval_line(plan, step, metrics))
        collapsed = collapse_of(self.task.info, metrics, len(self.task.eval))
        if collapsed:
            self.reporter.log(
                f"[warn] stage {plan.name!r} step {step}: collapsed: {collapsed} "
                "(see report.md when the run ends)"
            )

    def _stage_data(self, model: Any = None, tokenizer: Any = None) -> Any:
        from recipec.train.loop import StageData

        return StageData(
            model if model is not None else self.model,
            tokenizer if tokenizer is not None else self.tokenizer,
            self.task.info,
            self.task.train,
            self.task.eval,
            self.config.device,
        )

    def _known_eval(self, plan: Any) -> dict[str, float] | None:
        """A prune-only stage right after a stage evaluated at the same length: that stage's
        final evaluation is its model before pruning (no need to evaluate it again)."""
        if not plan.training.prune_only or not self.outcomes:
            return None
        last = self.outcomes[-1]
        if last.plan.training.max_seq_length != plan.training.max_seq_length:
            return None
        return last.result.final_eval

    def _grad_batches(self, plan: Any) -> Any:
        """``f(batch_size)`` -> fresh shuffled training batches, for oBERT's gradients."""
        from recipec import distributed as dist_utils
        from recipec.tasks.data import make_dataloader

        counter = {"n": 0}
        device, task, seed = self.config.device, self.task, self.recipe.training.seed

        def grad_batches(batch_size: int):
            counter["n"] += 1
            loader = make_dataloader(
                task.train,
                self.tokenizer,
                task.info,
                batch_size=batch_size,
                max_seq_length=plan.training.max_seq_length,
                shuffle=True,
                seed=seed + 7919 * counter["n"],
            )
            if self.world > 1:  # this rank's share of the same global mini-batches (see obert)
                return (
                    dist_utils.ShardBatch({k: v.to(device) for k, v in b.items()}, b.weight)
                    for b in dist_utils.sharded_batches(loader)
                )
            return ({k: v.to(device) for k, v in b.items()} for b in loader)

        return grad_batches

    def _auto_teacher(self, plan: Any) -> tuple[str, dict[str, Any]]:
        """Fine-tune (or reuse) the dense teacher for ``--teacher auto``, at the training
        settings of the first stage that distils, cached by everything that shapes it.

        Distributed: every rank trains the teacher (DDP); rank 0 decides whether the cache holds
        one, writes it, and the others wait for it, then every rank loads it from the shared path.
        """
        from recipec import distributed as dist_utils
        from recipec.models import load_model_and_tokenizer
        from recipec.train.loop import evaluate

        config, task, reporter, training = self.config, self.task, self.reporter, plan.training
        epochs = self.distill.teacher_epochs or training.epochs
        total = (
            max(1, round(epochs * plan.steps_per_epoch)) if epochs is not None else plan.total_steps
        )
        cache = Path(config.teacher_cache or teacher_cache_dir()) / self._teacher_key(plan, total)
        done = cache / "model"
        if dist_utils.broadcast_object(
            (done / "config.json").is_file(), what="checking the teacher cache"
        ):
            reporter.log(f"[teacher] reusing the fine-tuned dense teacher at {done}")
            return str(done), _cached_teacher_report(cache)
        reporter.log(f"[teacher] fine-tuning a dense teacher for {total} steps (cached at {cache})")
        _seed_run(training.seed)
        teacher, tokenizer = load_model_and_tokenizer(config.model, task.info, device=config.device)
        result = self._train_teacher(plan, total, teacher, tokenizer, cache / "checkpoints")
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
            _save_teacher(teacher, tokenizer, cache, done, report)
        dist_utils.barrier("waiting for rank 0 to save the teacher")
        metric = task.info.primary_metric
        reporter.log(f"[teacher] dense teacher: {metric} {final[metric]:.4f}")
        return str(done), report

    def _teacher_key(self, plan: Any, total: int) -> str:
        """The teacher cache's key: model, task data, training settings and length."""
        config, task = self.config, self.task
        return _fingerprint(
            "teacher-v1",
            config.model or "embedded",
            task.info.to_dict(),
            len(task.train),
            len(task.eval),
            [e.text for e in task.train[:50]],
            config.max_train,
            config.max_eval,
            config.data,
            plan.training.model_dump(mode="json"),
            total,
            *(["bf16"] if self.precision.autocast else []),  # fp32 keys as before
        )

    def _train_teacher(self, plan: Any, total: int, teacher, tokenizer, ckdir: Path) -> Any:
        """Plain fine-tuning: a Program with no modifiers, resumable from its own checkpoints."""
        from recipec import distributed as dist_utils
        from recipec.compiler import compile_plan
        from recipec.plan import StagePlan
        from recipec.train.loop import StageRunner, make_optimizer
        from recipec.train.resume import latest_checkpoint, load_checkpoint

        training = plan.training
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
        optimizer = make_optimizer(
            teacher, training.learning_rate, training.weight_decay, self.config.device
        )
        program = compile_plan(tplan, self.recipe, teacher, optimizer, own_lr=True)
        folder = dist_utils.broadcast_object(
            latest_checkpoint(ckdir) if dist_utils.is_main() else None,
            what="finding the teacher checkpoint",
        )
        checkpoint = load_checkpoint(folder, teacher) if folder is not None else None
        self.reporter.start("teacher", total, int(checkpoint["step"]) if checkpoint else 0)
        runner = StageRunner(
            program,
            self._stage_data(teacher, tokenizer),
            checkpoint_dir=ckdir,
            checkpoint_every=_default_ckpt_every(tplan),
            on_step=lambda s, rec: self.reporter.update(s, _step_info(rec)),
            log_sparsity=False,
            precision=self.precision,
        )
        try:
            return runner.run(checkpoint)
        finally:
            self.reporter.stop()


def _add_to_report(out: Path, report: dict[str, Any], **entries: Any) -> dict[str, Any]:
    """``entries`` added to the report and to ``report.json`` (rewritten atomically)."""
    from recipec.train.resume import write_text_atomic

    report = {**report, **entries}
    write_text_atomic(out / "report.json", json.dumps(report, indent=2))
    return report


def _seed_run(seed: int) -> None:
    """The run's seed on every generator, and each rank's own dropout stream."""
    from recipec import distributed as dist_utils
    from recipec.train.loop import seed_everything

    seed_everything(seed)
    dist_utils.seed_rank(seed)


def _cached_teacher_report(cache: Path) -> dict[str, Any] | None:
    """The cached teacher's ``teacher.json`` (its evaluation), None if absent."""
    saved = cache / "teacher.json"
    if not saved.is_file():
        return None
    try:
        report = json.loads(saved.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunError(
            f"{saved}: cannot read the cached teacher's report ({exc}); remove the cached "
            f"teacher (rm -r {cache}) and run again to fine-tune it anew"
        ) from None
    if not isinstance(report, dict) or not isinstance(report.get("eval"), dict):
        raise RunError(
            f"{saved}: not a teacher report written by recipec; remove the cached teacher "
            f"(rm -r {cache}) and run again to fine-tune it anew"
        )
    return report


def _save_teacher(teacher, tokenizer, cache: Path, done: Path, report: dict[str, Any]) -> None:
    """Write the fine-tuned teacher into the cache atomically (rank 0)."""
    from recipec.outputs import share_like_umask, write_text_atomic

    tmp = cache / ".model-tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    teacher.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    share_like_umask(tmp)
    os.replace(tmp, done)
    write_text_atomic(cache / "teacher.json", json.dumps(report, indent=2))
    shutil.rmtree(cache / "checkpoints", ignore_errors=True)


def _never_trained(out: Path) -> bool:
    """Whether ``out`` holds only what a run writes before its first training step: run.json,
    recipe.yaml and a metrics.jsonl without a training record (an earlier attempt that failed
    to start, e.g. on a target pattern that matched nothing), besides recipec's leftovers (the
    temporary files of interrupted writes, a lock file)."""
    from recipec.outputs import LOCK_NAME, TEMP_PATTERN

    names = {
        p.name
        for p in out.iterdir()
        if p.name != LOCK_NAME and not fnmatch.fnmatchcase(p.name, TEMP_PATTERN)
    }
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
    config: RunConfig, out: Path, asked: dict[str, Any], inputs: list[tuple[str, object]]
) -> tuple[bool, dict[str, Any] | None, list[dict[str, Any]]]:
    """Check --resume / --overwrite against the output folder (rank 0, read-only): whether
    recipec's entries in it are to be deleted first, and with --resume its run.json and the
    recipe changes (learning rates) this resume makes (:mod:`recipec.train.runfolder`)."""
    from recipec.outputs import RUN, ReplaceError, check_output
    from recipec.train.runfolder import RunFolderError, read_run_json, resume_changes

    if config.resume:
        if not out.is_dir() or not (out / RUN.marker).exists():
            raise RunError(f"nothing to resume in {out} (no run.json); start without --resume")
        try:
            before = read_run_json(out)
            return False, before, resume_changes(out, before, asked)
        except RunFolderError as exc:
            raise RunError(str(exc)) from None
    reusable = out.is_dir() and not out.is_symlink() and _never_trained(out)
    try:
        replace = check_output(
            out,
            overwrite=config.overwrite,
            marker=RUN.marker,
            written_by=RUN.written_by,
            busy="pass --resume to continue it, --overwrite to replace it, or --output for a new "
            "folder",
            inputs=inputs,
            reusable=reusable,
        )
    except ReplaceError as exc:
        raise RunError(str(exc)) from None
    return replace, None, []


def _create_output(
    config: RunConfig,
    recipe: Recipe,
    out: Path,
    asked: dict[str, Any],
    replace: bool,
    reporter: Reporter,
) -> None:
    """Clear recipec's entries (when :func:`_check_output` allowed it) and create the output
    folder (rank 0); nothing that recipec did not write is deleted."""
    from recipec.outputs import RUN, remove_owned, write_text_atomic
    from recipec.train.runfolder import write_run_json

    if replace:
        if not config.overwrite:
            reporter.log(f"clearing {out}: an earlier run there stopped before training anything")
        remove_owned(out, RUN.rule)
    out.mkdir(parents=True, exist_ok=True)
    if not config.resume:
        write_run_json(out, asked)
        write_text_atomic(out / "recipe.yaml", _dump_recipe(recipe))


@contextmanager
def _file_errors(stopped: bool) -> Iterator[None]:
    """A file-system error (a full disk, a read-only folder, a permission) as one message with
    what to do: :class:`RunError` before training, ``TrainingError`` once it ``stopped`` a run."""
    from recipec.outputs import as_os_error, describe_os_error, is_disk_full, is_write_problem
    from recipec.train.loop import TrainingError

    try:
        yield
    except Exception as error:  # an OSError, or a writer's error that reports one (safetensors)
        exc = as_os_error(error)
        if exc is None or isinstance(error, RunError | TrainingError):
            raise
        what = describe_os_error(exc)
        if stopped:
            fix = "free some space" if is_disk_full(exc) else "fix that"
            raise TrainingError(
                f"{what}; the run stopped. The last checkpoint is kept: {fix}, then run the same "
                "command with --resume"
            ) from None
        if is_disk_full(exc):
            fix = "free some space and run the command again"
        elif is_write_problem(exc):
            fix = "choose an --output you can write to"
        else:
            fix = "fix that and run the command again"
        raise RunError(f"{what}: {fix}") from None


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

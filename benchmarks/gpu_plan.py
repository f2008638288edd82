"""The device plan of issue 21: the most informative accuracy runs for one lent H200, in two
commands of under 10 minutes each. Run it through ``benchmarks/gpu_plan.sh OUTDIR 1|2`` (which
sets the machine up and holds the assumptions); this is its driver, built on ``accuracy.py``
(``run_config`` runs one configuration as `recipec apply`, resumable in its folder).

Command 1: the dense teachers, in parallel: SST-2 on all 67,349 training examples
  (``TEACHER_EPOCHS``) and CommonsenseQA on its 9,741; beside them, a probe (four processes
  timing command 2's distilling step for ``PROBE_S``: six training processes share the device,
  as in command 2), then the GPU tests (``--tests``), whose step times it keeps.
Command 2: six runs at once on the one GPU: the paper recipes ``downstream_gmp_80/90`` and
  ``obert_80/90`` on all of SST-2, and ``obert_80/90`` on CommonsenseQA, each distilling from
  command 1's teacher of its task at T = 5.5 (the recipes' default), init_sparsity 0.3 (the
  recipes' setting for 6-layer models such as MiniLM-L6).

Budget: the bundled schedules (GMP 10 / 12 epochs, oBERT 26 / 30 epochs; SST-2 has 2,105 steps
per epoch at batch 32, so oBERT 90 alone is 63,150 steps) do not fit one command: each run gets
the largest fraction ``f`` of its own schedule that the command's time fits (every epoch count
of the recipe times f, the pruning interval times f: the same number of pruning steps and the
same shapes of sparsity and learning-rate schedules, f times fewer steps between them), from
the step time measured by command 1's probe (x ``PROBE_MARGIN``), else its teachers' seconds
per step times the factors below, else the assumed step times times them. oBERT's gradient collection
(``NUM_GRADS`` per pruning step) is budgeted first. f is floored to a hundredth (then raised
until the schedule resolves), so a rerun with the same command 1 records plans the same runs.

Stopping: every job gets SIGINT at the command's deadline (recipec checkpoints at the end of
the current step and exits), SIGKILL ``GRACE_S`` later; the results file keeps what finished and,
for a stopped run, its last evaluation; a rerun resumes each unfinished run from its checkpoint
and skips finished ones. Results: OUTDIR/gpu_plan.json, OUTDIR/gpu_plan.md, OUTDIR/logs/.

    python benchmarks/gpu_plan.py OUTDIR --command 1 --data-root .gpu_data --device cuda
    python benchmarks/gpu_plan.py OUTDIR --command 2 --data-root .gpu_data --device cuda
    python benchmarks/gpu_plan.py OUTDIR --command 2 --tiny --device cpu   # CPU rehearsal
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import accuracy  # noqa: E402

TASKS = ("sst2", "csqa")
TRAIN_SIZE = {"sst2": 67_349, "csqa": 9_741}
PLAN_VERSION = "gpu-plan-v1"

# -- budget assumptions (the first real run corrects them; gpu_plan.sh's header explains) -----
LIMIT_S = {1: 240, 2: 480}  # each command's own time limit, machine set-up included
OVERHEAD_S = {1: 60, 2: 120}  # set-up, imports, data, model load, final evaluation, margin
GRACE_S = 30  # after the deadline's SIGINT: the step in flight, a checkpoint, the table
TEACHER_EPOCHS = {"sst2": 1.5, "csqa": 4}  # SST-2: 3,158 steps; CSQA: 1,220
ASSUMED_STEP_S = {"sst2": 0.025, "csqa": 0.040}  # dense step, batch 32, launch-bound H200
KD_FACTOR = 1.35  # a distilling step adds the teacher's forward (no backward)
CONTENTION = 2.5  # six runs sharing the GPU in command 2 against command 1's two (+ tests)
# The probe: command 2's step measured in command 1, as many training processes on the device
COMMAND2_SHAPES = ("sst2", "sst2", "sst2", "sst2", "csqa", "csqa")
PROBE_S = 15.0  # timed seconds per probe process, after start-up and 5 warm-up steps
PROBE_STARTUP_S = 60.0  # the most a probe may take to import, load and warm up
PROBE_MARGIN = 1.15  # what the probe leaves out: evaluations, checkpoints, the Program
TESTS_MIN_S = 100  # command 1 starts the GPU tests only with this much time left
TEACHER_CATCHUP_S = 120  # command 2 first finishes a teacher that command 1 had to stop
# tests/integration/test_gpu.py, the measurements first (a timeout keeps what ran)
GPU_TESTS = (
    "test_bf16_over_fp32_step_time_is_measured",
    "test_bf16_matches_fp32_on_cuda",
    "test_fused_adamw_and_pinned_batches_on_cuda",
    "test_apply_on_cuda_prunes_exactly_and_keeps_the_masks",
    "test_cram_then_a_prune_only_stage_on_cuda",
)
GRAD_FACTOR = 0.8  # one oBERT gradient (batch 16, forward + backward + teacher) per KD step
FISHER_S = 0.001  # one Woodbury update of MiniLM-L6's block Fisher inverse (~2.1 GB in/out)
NUM_GRADS = 256  # oBERT's m (published 1024; 1024 would take 4x the gradient budget)
INIT_SPARSITY = 0.3  # the recipes' first step for 6-layer models (MiniLM-L6)
KD_TEMPERATURE = 5.5

SPARSE = (
    ("sst2", "gmp_80", "downstream_gmp_80.yaml", 0.8),
    ("sst2", "gmp_90", "downstream_gmp_90.yaml", 0.9),
    ("sst2", "obert_80", "obert_80.yaml", 0.8),
    ("sst2", "obert_90", "obert_90.yaml", 0.9),
    ("csqa", "obert_80", "obert_80.yaml", 0.8),
    ("csqa", "obert_90", "obert_90.yaml", 0.9),
)
# The rehearsal (--tiny): a few examples, short sequences, tiny oBERT, one epoch per teacher.
TINY = {
    "max_train": 32,
    "max_eval": 16,
    "batch_size": 16,
    "max_seq_length": 32,
    "num_grads": 4,
    "teacher_epochs": {"sst2": 1, "csqa": 1},
    "limit_s": 600,
}


@dataclass
class Settings:
    outdir: Path
    data_root: Path
    device: str
    model: str | None
    precision: str
    batch_size: int = 32
    max_seq_length: int = 128
    max_train: int | None = None
    max_eval: int | None = None
    num_grads: int = NUM_GRADS
    teacher_epochs: dict = field(default_factory=lambda: dict(TEACHER_EPOCHS))
    limit_s: float | None = None  # the command's nominal limit, for the budget (None: LIMIT_S)
    time_left_s: float | None = None  # seconds this process may take (None: limit_s)
    tiny: bool = False
    tests: bool = False  # command 1 on CUDA: the GPU tests after the probe
    threads: int | None = None  # torch threads of a job (the parent: cores / jobs)
    fraction: float | None = None  # every sparse run's fraction of its schedule (None: fitted)

    def budget(self, command: int) -> dict:
        """What a record's numbers depend on besides its own schedule (records match on it)."""
        return {
            "plan": PLAN_VERSION,
            "command": command,
            "batch_size": self.batch_size,
            "max_seq_length": self.max_seq_length,
            "max_train": self.max_train,
            "max_eval": self.max_eval,
            "teacher_epochs": self.teacher_epochs,
            "num_grads": self.num_grads if command == 2 else None,
            "precision": self.precision,
            **({"fraction": self.fraction} if self.fraction is not None and command == 2 else {}),
        }

    def n_train(self, task: str) -> int:
        n = TRAIN_SIZE[task]
        return min(n, self.max_train) if self.max_train else n

    def steps_per_epoch(self, task: str) -> int:
        return max(1, math.ceil(self.n_train(task) / self.batch_size))

    def run_args(self) -> argparse.Namespace:
        """What ``accuracy.run_config`` reads."""
        return argparse.Namespace(
            batch_size=self.batch_size,
            max_seq_length=self.max_seq_length,
            data_root=str(self.data_root),
            max_train=self.max_train,
            max_eval=self.max_eval,
            device=self.device,
            precision=self.precision,
            model=self.model,
            quiet=True,
        )


@dataclass
class Job:
    command: int
    task: str
    name: str
    recipe: str  # "dense" or a recipe path
    sets: list[str]
    sparsity: float
    distil: bool
    note: str
    fraction: float | None = None  # of the recipe's own schedule (sparse runs)
    own_epochs: float | None = None
    epochs: float | None = None
    planned_steps: int | None = None
    teacher: str | None = None

    @property
    def key(self) -> str:
        return f"{self.task}_{self.name}"

    @property
    def folder(self) -> str:
        """The run folder's name: another fraction is another run."""
        return self.name if self.fraction in (None, 1.0) else f"{self.name}-f{self.fraction:.2f}"


# -- schedules ------------------------------------------------------------------------------


def _num(x: float) -> str:
    return repr(round(float(x), 12))


def recipe_path(name: str) -> Path:
    return ROOT / "recipes" / name


def scaled_sets(recipe: str, fraction: float, s: Settings, task: str) -> list[str]:
    """``--set`` overrides that run ``fraction`` of the recipe's own schedule: the dense,
    pruning-interval and fine-tuning lengths times ``fraction``, rounded to whole steps of this
    task's epochs, and the pruning window exactly the recipe's number of intervals (so every run
    has the recipe's pruning steps, evenly spaced; at 1, the recipe's own epochs); with the
    plan's first step, m and KD."""
    from recipec.recipe.load import load_recipe

    own = load_recipe(recipe_path(recipe)).variables
    spe = s.steps_per_epoch(task)
    interval = max(1, round(own["update_every"] * fraction * spe))
    intervals = round(own["pruning_epochs"] / own["update_every"])
    steps = {
        "dense_epochs": round(own["dense_epochs"] * fraction * spe),
        "pruning_epochs": intervals * interval,
        "finetune_epochs": max(1, round(own["finetune_epochs"] * fraction * spe)),
        "update_every": interval,
    }
    sets = [f"{var}={_num(n / spe)}" for var, n in steps.items()] if fraction < 1 else []
    sets += [f"init_sparsity={INIT_SPARSITY}", f"kd_temperature={KD_TEMPERATURE}"]
    if recipe.startswith("obert"):
        sets.append(f"num_grads={s.num_grads}")
    return sets


def resolve(recipe: str, sets: list[str], settings: Settings, task: str):
    """The recipe's (single) stage resolved to optimizer steps, as the run will see it."""
    from recipec.plan import resolve_stage
    from recipec.recipe.load import load_recipe

    loaded = load_recipe(
        recipe_path(recipe),
        sets + [f"training.batch_size={settings.batch_size}"],
    )
    (stage,) = loaded.resolved_stages()
    return resolve_stage(loaded, stage, settings.steps_per_epoch(task))


def _resolves(recipe: str, sets: list[str], settings: Settings, task: str) -> bool:
    from recipec.plan import PlanError
    from recipec.recipe.load import RecipeError

    try:
        resolve(recipe, sets, settings, task)
    except (PlanError, RecipeError, ValueError):
        return False
    return True


def _resolving(recipe: str, task: str, fraction: float, s: Settings) -> float:
    """``fraction``, raised by hundredths until the scaled schedule resolves (a tiny data set can
    make a pruning interval shorter than one step)."""
    while fraction < 1.0 and not _resolves(recipe, scaled_sets(recipe, fraction, s, task), s, task):
        fraction = round(fraction + 0.01, 2)
    return min(fraction, 1.0)


def fit_fraction(recipe: str, task: str, step_s: float, window_s: float, s: Settings):
    """The largest fraction (hundredths, at most 1) of the recipe's schedule whose estimated time
    at ``step_s`` per (distilling, shared-device) step fits ``window_s`` (``s.fraction`` when
    set), raised until the schedule resolves. Returns (fraction, estimate dict)."""
    full = resolve(recipe, scaled_sets(recipe, 1.0, s, task), s, task)
    prune_steps = sum(len(m.pruning_steps) for m in full.by_type("obert"))
    grad_s = step_s * GRAD_FACTOR + FISHER_S
    fixed = prune_steps * s.num_grads * grad_s
    raw = (window_s - fixed) / (full.total_steps * step_s)
    fraction = s.fraction if s.fraction is not None else math.floor(raw * 100) / 100
    fraction = _resolving(recipe, task, min(1.0, max(0.01, fraction)), s)
    estimate = {
        "step_s": step_s,
        "oBERT_gradients_s": fixed,
        "own_steps": full.total_steps,
        "estimated_s": fixed + fraction * full.total_steps * step_s,
    }
    return fraction, estimate


# -- the plan -------------------------------------------------------------------------------


def load_records(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def find(records: list[dict], task: str, name: str, budget: dict, complete: bool = True):
    for r in records:
        if r.get("task") == task and r.get("config") == name and r.get("budget") == budget:
            if not complete or r.get("status", "complete") == "complete":
                return r
    return None


def dense_step_seconds(records: list[dict], s: Settings) -> dict[str, tuple[float, str]]:
    """Per task: seconds per step of command 1's teacher (measured) or the assumption."""
    out = {}
    for task in TASKS:
        r = find(records, task, "dense", s.budget(1))
        if r and r.get("steps"):
            out[task] = (r["train_seconds"] / r["steps"], "measured in command 1")
        else:
            out[task] = (ASSUMED_STEP_S[task], "assumed")
    return out


def command2_step_seconds(records: list[dict], s: Settings) -> dict[str, tuple[float, str]]:
    """Per task: seconds per distilling step of a command 2 run sharing the device with five
    others: command 1's probe (x PROBE_MARGIN), else its teacher's step x KD_FACTOR x
    CONTENTION, else the assumed step x the same factors."""
    probe = find(records, "all", "probe", s.budget(1))
    dense = dense_step_seconds(records, s)
    out = {}
    for task in TASKS:
        if probe and task in probe["step_s"]:
            how = f"probed in command 1 with {probe['processes']} processes, x{PROBE_MARGIN}"
            out[task] = (probe["step_s"][task] * PROBE_MARGIN, how)
        else:
            value, how = dense[task]
            out[task] = (
                value * KD_FACTOR * CONTENTION,
                f"dense step {how} x{KD_FACTOR} x{CONTENTION}",
            )
    return out


def teacher_jobs(s: Settings) -> list[Job]:
    jobs = []
    for task in TASKS:
        epochs = s.teacher_epochs[task]
        jobs.append(
            Job(
                1,
                task,
                "dense",
                "dense",
                [f"training.epochs={epochs}"],
                0.0,
                False,
                "dense fine-tuned teacher",
                epochs=epochs,
                planned_steps=round(epochs * s.steps_per_epoch(task)),
            )
        )
    return jobs


def sparse_jobs(s: Settings, records: list[dict], window_s: float) -> list[Job]:
    steps = command2_step_seconds(records, s)
    jobs = []
    for task, name, recipe, sparsity in SPARSE:
        fraction, estimate = fit_fraction(recipe, task, steps[task][0], window_s, s)
        sets = scaled_sets(recipe, fraction, s, task)
        plan = resolve(recipe, sets, s, task)
        own = resolve(recipe, scaled_sets(recipe, 1.0, s, task), s, task)
        teacher = find(records, task, "dense", s.budget(1))
        family = "oBERT" if recipe.startswith("obert") else "GMP"
        jobs.append(
            Job(
                2,
                task,
                name,
                str(recipe_path(recipe)),
                sets,
                sparsity,
                True,
                f"paper {family} at {fraction:g} of its own schedule (est. "
                f"{estimate['estimated_s']:.0f} s)",
                fraction=fraction,
                own_epochs=round(own.training.epochs, 4),
                epochs=round(plan.training.epochs, 4),
                planned_steps=plan.total_steps,
                teacher=teacher["model_dir"] if teacher else None,
            )
        )
    return jobs


# -- running jobs ---------------------------------------------------------------------------


def _last_metrics(run_dir: Path) -> dict:
    """A stopped run's progress: its last training step and last evaluation."""
    out: dict = {"steps": 0}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in rec:
            out["steps"] = max(out["steps"], rec.get("step", 0))
        if "eval_accuracy" in rec:
            out["last_eval_accuracy"] = rec["eval_accuracy"]
            out["last_eval_step"] = rec.get("step")
            out["last_eval_sparsity"] = rec.get("sparsity")
    return out


def stopped_record(job: Job, s: Settings, status: str) -> dict:
    run_dir = s.outdir / "work" / job.task / job.folder
    return {
        "task": job.task,
        "config": job.name,
        "status": status,
        "note": job.note,
        "target_sparsity": job.sparsity,
        "planned_steps": job.planned_steps,
        "fraction": job.fraction,
        "epochs": job.epochs,
        "own_epochs": job.own_epochs,
        "budget": s.budget(job.command),
        **_last_metrics(run_dir),
    }


def run_one(s: Settings, spec: Path) -> int:
    """A child process: one job, its record written beside its spec."""
    import torch

    from recipec.train.loop import Interrupted

    job = Job(**json.loads(spec.read_text()))
    part = spec.with_suffix(".record.json")
    torch.set_num_threads(s.threads or torch.get_num_threads())  # the jobs share the cores
    workdir = s.outdir / "work" / job.task  # one per task: its dense.yaml is its own
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        record = accuracy.run_config(
            accuracy.Config(job.name, job.recipe, job.sparsity, job.sets, job.distil, job.note),
            job.task,
            s.run_args(),
            job.teacher,
            workdir,
            out=workdir / job.folder,
        )
    except (Interrupted, KeyboardInterrupt):
        part.write_text(json.dumps(stopped_record(job, s, "stopped")))
        return 130
    record.update(
        budget=s.budget(job.command),
        status="complete",
        fraction=job.fraction,
        epochs=job.epochs,
        own_epochs=job.own_epochs,
        planned_steps=job.planned_steps,
    )
    part.write_text(json.dumps(record))
    return 0


def _child_argv(s: Settings, spec: Path, jobs: int, probe: str | None = None) -> list[str]:
    """A child's command line: one job (``spec``), or a probe of ``probe``'s step (``spec``: its
    output); ``jobs``: how many processes share the cores."""
    argv = [sys.executable, str(Path(__file__).resolve()), str(s.outdir)]
    argv += ["--probe", probe, str(spec)] if probe else ["--run-job", str(spec)]
    argv += ["--threads", str(max(1, (os.cpu_count() or 1) // jobs))]
    argv += ["--data-root", str(s.data_root), "--device", s.device, "--precision", s.precision]
    if s.fraction is not None:
        argv += ["--fraction", str(s.fraction)]
    if s.model:
        argv += ["--model", s.model]
    return argv + (["--tiny"] if s.tiny else [])


@dataclass
class Running:
    job: Job
    proc: subprocess.Popen
    spec: Path
    log: object
    started: float


def _stop(running: list[Running], others: tuple[subprocess.Popen, ...] = ()) -> None:
    """SIGINT every job still running (recipec checkpoints after its current step) and each of
    ``others``, SIGKILL after GRACE_S."""
    procs = [r.proc for r in running] + list(others)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    end = time.monotonic() + GRACE_S
    while time.monotonic() < end and any(p.poll() is None for p in procs):
        time.sleep(0.5)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start_jobs(s: Settings, jobs: list[Job]) -> list[Running]:
    """Every job at once (they share the GPU), each in its own process, logging to logs/."""
    parts, logs = s.outdir / "parts", s.outdir / "logs"
    parts.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    running: list[Running] = []
    for job in jobs:
        spec = parts / f"{job.key}.json"
        spec.write_text(json.dumps(asdict(job)))
        spec.with_suffix(".record.json").unlink(missing_ok=True)
        log = open(logs / f"{job.key}.log", "a")
        print(f"[run] {job.task}/{job.name}: {job.note} (log logs/{job.key}.log)", flush=True)
        argv = _child_argv(s, spec, len(jobs))
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=_child_env())
        running.append(Running(job, proc, spec, log, time.monotonic()))
    return running


def _child_env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def wait_jobs(
    s: Settings,
    running: list[Running],
    records: list[dict],
    results: Path,
    deadline: float,
    others: tuple[subprocess.Popen, ...] = (),
) -> None:
    """Until every job (and each of ``others``) ends, or the deadline: then SIGINT, SIGKILL after
    GRACE_S; each job's record goes into ``results`` (complete, stopped or failed)."""
    procs = [r.proc for r in running] + list(others)
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(1)
    if any(r.proc.poll() is None for r in running):
        print(f"[deadline] stopping {sum(r.proc.poll() is None for r in running)} job(s)")
    _stop(running, others)
    for r in running:
        r.log.close()
        _collect(s, r, records, results)


def run_jobs(s: Settings, jobs: list[Job], records: list[dict], results: Path, deadline: float):
    """:func:`start_jobs`, then :func:`wait_jobs`."""
    wait_jobs(s, start_jobs(s, jobs), records, results, deadline)


def start_tests(s: Settings, deadline: float) -> subprocess.Popen | None:
    """The GPU tests (bf16 vs fp32, exact zeros, the step-time ratio), beside the teachers."""
    left = int(deadline - time.monotonic() - 5)
    if left < TESTS_MIN_S:
        print("[tests] skipped: too little time left")
        return None
    log = open(s.outdir / "logs" / "gpu_tests.log", "w")
    env = dict(_child_env(), RECIPEC_GPU_TIMINGS=str(s.outdir / "gpu_timings.jsonl"))
    argv = ["timeout", "-k", "5", str(left), sys.executable, "-m", "pytest"]
    argv += [f"tests/integration/test_gpu.py::{name}" for name in GPU_TESTS]
    argv += ["-m", "gpu", "-o", "addopts=", "-q", "-s"]
    print(f"[tests] the GPU tests, at most {left} s (log logs/gpu_tests.log)", flush=True)
    return subprocess.Popen(
        argv + ["-p", "no:cacheprovider"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env
    )


def _collect(s: Settings, r: Running, records: list[dict], results: Path) -> None:
    part = r.spec.with_suffix(".record.json")
    job = r.job
    if part.is_file():
        record = json.loads(part.read_text())
    else:
        status = "failed" if r.proc.returncode not in (130, -2, -9) else "stopped"
        record = stopped_record(job, s, status)
    record["exit"] = r.proc.returncode
    records[:] = [
        x
        for x in records
        if not (x.get("task") == job.task and x.get("config") == job.name)
        or x.get("budget") != record["budget"]
    ]
    records.append(record)
    results.write_text(json.dumps(records, indent=2))
    minutes = (time.monotonic() - r.started) / 60
    if record.get("status") == "complete":
        print(
            f"[done] {job.task}/{job.name}: accuracy {100 * record['accuracy']:.2f} sparsity "
            f"{100 * record['sparsity_targets']:.1f}% in {minutes:.1f} min",
            flush=True,
        )
    else:
        print(
            f"[{record['status']}] {job.task}/{job.name} (exit {r.proc.returncode}) at step "
            f"{record.get('steps', 0)}/{job.planned_steps} after {minutes:.1f} min; see "
            f"logs/{job.key}.log; a rerun resumes it",
            flush=True,
        )


# -- the contention probe (command 1) -------------------------------------------------------


def probe_step(s: Settings, task: str, seconds: float, out: Path) -> int:
    """A child process: command 2's training step (distilling, 80% masks, the run's precision
    and optimizer) on real batches of ``task``, timed for ``seconds`` after a warm-up, while the
    other probes and command 1's teachers share the device; writes ``out``."""
    import torch

    from recipec.models import load_model_and_tokenizer
    from recipec.modifiers.distill import distillation_loss
    from recipec.tasks.data import make_dataloader
    from recipec.tasks.load import load_task
    from recipec.train.loop import make_optimizer, prefetched, resolve_precision, to_device

    torch.set_num_threads(s.threads or torch.get_num_threads())
    data = load_task(
        None, [str(s.data_root / accuracy.DATA[task])], max_train=s.max_train or 2048, seed=0
    )
    model, tokenizer = load_model_and_tokenizer(s.model, data.info, device=s.device)
    teacher, _ = load_model_and_tokenizer(s.model, data.info, device=s.device)
    teacher.eval()
    precision = resolve_precision(s.precision, s.device)
    optimizer = make_optimizer(model, 1e-5, 0.0, s.device)
    g = torch.Generator(device="cpu").manual_seed(0)
    masked = [
        (p, (torch.rand(p.shape, generator=g) < 0.8).to(p.device))
        for n, p in model.named_parameters()
        if ".encoder." in n and n.endswith(".weight") and p.dim() == 2
    ]
    cuda = torch.device(s.device).type == "cuda"

    def batches():
        for epoch in range(10**6):
            yield from make_dataloader(
                data.train,
                tokenizer,
                data.info,
                batch_size=s.batch_size,
                max_seq_length=s.max_seq_length,
                shuffle=True,
                epoch=epoch,
                pin_memory=cuda,
            )

    def step(batch) -> None:
        batch = to_device(batch, s.device)
        with precision.forward():
            outputs = model(**batch)
            with torch.no_grad():
                t_logits = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
            loss = distillation_loss(outputs.loss, outputs.logits, t_logits, 1.0, KD_TEMPERATURE)
        float(loss.detach())  # the driver reads every step's loss
        loss.backward()
        with torch.no_grad():
            for p, keep in masked:
                p.grad.masked_fill_(~keep, 0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, keep in masked:
                p.masked_fill_(~keep, 0)

    it = prefetched(batches()) if cuda else batches()
    steps, started = 0, None
    print(f"[probe] {task}: loaded, stepping", flush=True)
    with precision.matmuls():
        for i, batch in enumerate(it):
            if i == 5:  # warm-up done
                if cuda:
                    torch.cuda.synchronize()
                started = time.perf_counter()
            step(batch)
            if started is not None:
                steps += 1
                if time.perf_counter() - started >= seconds:
                    break
        if cuda:
            torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    out.write_text(json.dumps({"task": task, "steps": steps, "seconds": elapsed}))
    return 0


def run_probe(s: Settings, records: list[dict], results: Path, teachers: list[str]) -> None:
    """Command 2's contention, measured: step-timing processes beside the running ``teachers``
    (their tasks), so that command 2's six training processes share the device; each task's
    median seconds per step becomes the ``probe`` record."""
    parts = s.outdir / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    seconds = PROBE_S if not s.tiny else 3.0
    shapes = list(COMMAND2_SHAPES)
    for task in teachers:  # a teacher stands for one of command 2's runs of its task
        shapes.remove(task)
    procs = []
    for i, task in enumerate(shapes):
        out = parts / f"probe_{i}.json"
        out.unlink(missing_ok=True)
        argv = _child_argv(s, out, len(shapes) + len(teachers), probe=task)
        log = open(s.outdir / "logs" / f"probe_{i}.log", "w")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=_child_env())
        procs.append((task, out, log, proc))
    # (the CPU rehearsal starts six processes on a few shared cores: give it time)
    end = time.monotonic() + seconds + (PROBE_STARTUP_S if not s.tiny else 300)
    while time.monotonic() < end and any(p.poll() is None for *_, p in procs):
        time.sleep(0.5)
    per_task: dict[str, list[float]] = {}
    for task, out, log, proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        if out.is_file():
            got = json.loads(out.read_text())
            if got["steps"]:
                per_task.setdefault(task, []).append(got["seconds"] / got["steps"])
    if not per_task:
        print("[probe] no measurement (see logs/probe_*.log): command 2 will use the teachers'")
        return
    record = {
        "task": "all",
        "config": "probe",
        "status": "complete",
        "budget": s.budget(1),
        "processes": len(shapes) + len(teachers),
        "step_s": {t: sorted(v)[len(v) // 2] for t, v in per_task.items()},
    }
    records[:] = [
        r for r in records if r.get("config") != "probe" or r.get("budget") != record["budget"]
    ]
    records.append(record)
    results.write_text(json.dumps(records, indent=2))
    print(
        "[probe] "
        + ", ".join(f"{t} {1e3 * v:.1f} ms/step" for t, v in record["step_s"].items())
        + f" with {record['processes']} training processes on the device",
        flush=True,
    )


# -- table ----------------------------------------------------------------------------------


def table(records: list[dict], s: Settings, timings: list[dict]) -> str:
    """The markdown table of this plan's records (both commands)."""
    ours = [
        r
        for r in records
        if r.get("budget") in (s.budget(1), s.budget(2)) and r.get("config") != "probe"
    ]
    steps = dense_step_seconds(records, s)
    data = "all" if s.max_train is None else f"at most {s.max_train}"
    lines = [
        "# recipec device plan (issue 21)",
        "",
        f"Data: {data} training examples (SST-2 {s.n_train('sst2')}, CommonsenseQA "
        f"{s.n_train('csqa')}), batch {s.batch_size}, sequences of at most {s.max_seq_length} "
        f"tokens; precision {s.precision}; oBERT m={s.num_grads}; KD T={KD_TEMPERATURE}, "
        f"init_sparsity {INIT_SPARSITY}; teachers: SST-2 {s.teacher_epochs['sst2']} epochs, "
        f"CommonsenseQA {s.teacher_epochs['csqa']} epochs.",
        "Dense step time (command 1's teachers): "
        + "; ".join(f"{t} {1e3 * v:.1f} ms ({how})" for t, (v, how) in steps.items())
        + ".",
        "Command 2's budget, per distilling step on the shared device: "
        + "; ".join(
            f"{t} {1e3 * v:.1f} ms ({how})"
            for t, (v, how) in command2_step_seconds(records, s).items()
        )
        + ".",
        "",
        "| task | config | schedule run | target | achieved (targets) | dev accuracy | kept vs "
        "dense | steps | train time (min) | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    dense = {r["task"]: r["accuracy"] for r in ours if r["config"] == "dense" and "accuracy" in r}
    for r in sorted(ours, key=lambda r: (r["budget"]["command"], r["task"], r["config"])):
        lines.append(_row(r, dense))
    if timings:
        lines += ["", "GPU tests' step times (MiniLM-L6, fwd + bwd + fused AdamW):", ""]
        lines += ["| batch x seq | fp32 ms | bf16 ms | bf16 / fp32 |", "|---|---|---|---|"]
        for t in timings:
            lines.append(
                f"| {t['batch']} x {t['seq']} | {t['fp32_ms']:.2f} | {t['bf16_ms']:.2f} | "
                f"{t['bf16_ms'] / t['fp32_ms']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def _row(r: dict, dense: dict) -> str:
    complete = r.get("status", "complete") == "complete"
    if r["config"] == "dense":
        schedule = f"{r.get('epochs')} epochs"
    else:
        schedule = (
            f"{r.get('epochs', 0):.3g} of {r.get('own_epochs', 0):g} epochs (f={r.get('fraction')})"
        )
    acc = r.get("accuracy") if complete else r.get("last_eval_accuracy")
    sparsity = r.get("sparsity_targets") if complete else r.get("last_eval_sparsity")
    kept = (
        f"{100 * acc / dense[r['task']]:.1f}%"
        if acc is not None and r["task"] in dense and r["config"] != "dense"
        else "-"
    )
    status = (
        "complete"
        if complete
        else f"{r.get('status')} at step {r.get('steps', 0)}/{r.get('planned_steps')} "
        f"(last eval at step {r.get('last_eval_step', '-')})"
    )
    minutes = f"{r.get('train_seconds', 0.0) / 60:.1f}" if complete else "-"
    return (
        f"| {r['task']} | {r['config']} | {schedule} | {100 * r['target_sparsity']:.0f}% | "
        + (f"{100 * sparsity:.1f}% | " if sparsity is not None else "- | ")
        + (f"{100 * acc:.2f} | " if acc is not None else "- | ")
        + f"{kept} | {r.get('steps', 0)} | {minutes} | {status} |"
    )


def read_timings(path: Path) -> list[dict]:
    rows: list[dict] = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows = json.loads(line).get("step_time", rows)  # the latest measurement
            except json.JSONDecodeError:
                continue
    return rows


# -- main -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--command", type=int, choices=[1, 2], default=None)
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--model", default=None, help="recipec apply --model (default embedded)")
    parser.add_argument(
        "--limit",
        type=float,
        default=None,
        help=f"the command's time limit in s, which sizes command 2's runs (default {LIMIT_S})",
    )
    parser.add_argument(
        "--time-left",
        type=float,
        default=None,
        help="seconds this process may take from now (default --limit): its jobs are stopped "
        "in time; the budget stays --limit's, so a rerun resumes the same runs",
    )
    parser.add_argument(
        "--num-grads", type=int, default=None, help=f"oBERT m (default {NUM_GRADS})"
    )
    parser.add_argument("--tiny", action="store_true", help="the CPU rehearsal's tiny budget")
    parser.add_argument(
        "--fraction",
        type=float,
        default=None,
        help="run this fraction of every sparse recipe's own schedule (default: the largest "
        "that fits the command's time)",
    )
    parser.add_argument("--run-job", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--probe", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--tests",
        action="store_true",
        help="command 1 on CUDA: run the GPU tests (tests/integration/test_gpu.py) after the probe",
    )
    parser.add_argument("--render", action="store_true", help="only rewrite the table")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    s = Settings(
        args.outdir.resolve(), args.data_root.resolve(), device, args.model, args.precision
    )
    if args.tiny:
        s.max_train, s.max_eval = TINY["max_train"], TINY["max_eval"]
        s.batch_size, s.max_seq_length = TINY["batch_size"], TINY["max_seq_length"]
        s.num_grads, s.teacher_epochs = TINY["num_grads"], dict(TINY["teacher_epochs"])
        s.limit_s = TINY["limit_s"]
    if args.num_grads:
        s.num_grads = args.num_grads
    s.tiny = args.tiny
    s.fraction = args.fraction
    if args.limit is not None:
        s.limit_s = args.limit
    s.time_left_s = args.time_left
    s.threads = args.threads
    s.tests = args.tests
    return s


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    s = settings_from(args)
    if args.run_job is not None:
        return run_one(s, args.run_job)
    if args.probe is not None:
        return probe_step(s, args.probe[0], PROBE_S if not s.tiny else 3.0, Path(args.probe[1]))
    s.outdir.mkdir(parents=True, exist_ok=True)
    results = s.outdir / "gpu_plan.json"
    records = load_records(results)
    timings = read_timings(s.outdir / "gpu_timings.jsonl")
    if not args.render:
        if args.command is None:
            raise SystemExit("--command 1 or 2 (or --render)")
        run_command(s, args.command, records, results)
    text = table(records, s, timings)
    (s.outdir / "gpu_plan.md").write_text(text)
    print(text)
    return 0


def run_command(s: Settings, command: int, records: list[dict], results: Path) -> None:
    started = time.monotonic()
    limit = s.limit_s if s.limit_s is not None else LIMIT_S[command]
    left = s.time_left_s if s.time_left_s is not None else limit
    deadline = started + left - GRACE_S - 5
    for task in TASKS:
        if not (s.data_root / accuracy.DATA[task]).is_dir():
            raise SystemExit(f"{s.data_root / accuracy.DATA[task]} is absent: pass --data-root")
    if command == 1:
        jobs = teacher_jobs(s)
    else:
        window = limit - (OVERHEAD_S[2] if not s.tiny else 0)
        window -= finish_teachers(s, records, results, deadline)
        jobs = sparse_jobs(s, records, window)
        for job in [j for j in jobs if j.teacher is None]:
            print(f"[wait] {job.task}/{job.name}: no {job.task} teacher yet: run command 1 first")
        jobs = [j for j in jobs if j.teacher is not None]
    todo = []
    for job in jobs:
        if find(records, job.task, job.name, s.budget(command)) is not None:
            print(f"[skip] {job.task}/{job.name}: done")
        else:
            todo.append(job)
    print(
        f"command {command}: {len(todo)} job(s) to run on {s.device}, deadline in "
        f"{deadline - started:.0f} s",
        flush=True,
    )
    running = start_jobs(s, todo)
    others = []
    if command == 1:
        probed = find(records, "all", "probe", s.budget(1)) is not None
        if not probed and deadline - time.monotonic() > PROBE_S + PROBE_STARTUP_S + 10:
            run_probe(s, records, results, [r.job.task for r in running])
        if s.tests and torch_cuda(s.device):  # after the probe; the teachers come first
            others = [p for p in [start_tests(s, deadline)] if p is not None]
    wait_jobs(s, running, records, results, deadline, tuple(others))
    for proc in others:
        print(f"[tests] exit {proc.returncode}: {_last_line(s.outdir / 'logs' / 'gpu_tests.log')}")
    print(f"command {command}: {time.monotonic() - started:.0f} s", flush=True)


def finish_teachers(s: Settings, records: list[dict], results: Path, deadline: float) -> float:
    """Command 2 after a command 1 stopped before a teacher finished: that teacher resumes from
    its checkpoint first, for at most TEACHER_CATCHUP_S; returns the seconds it took (command 2's
    runs get that much less). A teacher command 1 never started is left to command 1."""
    todo = [
        j
        for j in teacher_jobs(s)
        if find(records, j.task, "dense", s.budget(1)) is None
        and (s.outdir / "work" / j.task / j.folder / "run.json").is_file()
    ]
    if not todo:
        return 0.0
    started = time.monotonic()
    print(f"[teacher] finishing {', '.join(j.task for j in todo)} first", flush=True)
    wait_jobs(s, start_jobs(s, todo), records, results, min(deadline, started + TEACHER_CATCHUP_S))
    return time.monotonic() - started


def torch_cuda(device: str) -> bool:
    return device == "cuda" or device.startswith("cuda:")


def _last_line(path: Path) -> str:
    lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    return lines[-1] if lines else ""


if __name__ == "__main__":
    raise SystemExit(main())

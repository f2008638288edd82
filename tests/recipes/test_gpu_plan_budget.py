"""The device plan's budget (benchmarks/gpu_plan.py): every scaled schedule is the recipe's own,
shortened (same pruning steps, evenly spaced, same target), the fitted fractions are the ones
its header states, and a job is stopped at the deadline with its progress kept."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_plan  # noqa: E402


def settings(tmp_path=Path("/tmp/unused"), **kw) -> gpu_plan.Settings:
    s = gpu_plan.Settings(tmp_path, tmp_path, "cuda", None, "auto")
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def pruner(plan):
    (mod,) = plan.by_type("gmp", "obert")
    return mod


@pytest.mark.parametrize(("task", "name", "recipe", "target"), gpu_plan.SPARSE)
@pytest.mark.parametrize("fraction", [0.01, 0.07, 0.13, 0.4, 0.77])
def test_a_fraction_keeps_the_recipes_pruning_steps(task, name, recipe, target, fraction):
    from recipec.recipe.load import load_recipe

    s = settings()
    own = gpu_plan.resolve(recipe, gpu_plan.scaled_sets(recipe, 1.0, s, task), s, task)
    plan = gpu_plan.resolve(recipe, gpu_plan.scaled_sets(recipe, fraction, s, task), s, task)
    mod = pruner(plan)
    variables = load_recipe(ROOT / "recipes" / recipe).variables
    intervals = round(variables["pruning_epochs"] / variables["update_every"])  # 12/16, 5/6
    # (the bundled schedule on SST-2's 2,105 steps per epoch adds a stub step at the end of
    # GMP's window: 1,052-step intervals do not divide it; the scaled ones do)
    assert len(mod.pruning_steps) == intervals + 1
    gaps = {b - a for a, b in zip(mod.pruning_steps, mod.pruning_steps[1:])}
    assert len(gaps) == 1  # evenly spaced, no stub interval at the end
    assert mod.sparsities[0] == pytest.approx(gpu_plan.INIT_SPARSITY)
    assert mod.sparsities[-1] == pytest.approx(target)
    assert plan.total_steps / own.total_steps == pytest.approx(fraction, abs=0.01)
    if recipe.startswith("obert"):
        assert mod.spec.num_grads == s.num_grads


@pytest.mark.parametrize(("task", "name", "recipe", "target"), gpu_plan.SPARSE)
def test_the_whole_schedule_is_the_bundled_one(task, name, recipe, target):
    from recipec.recipe.load import load_recipe

    s = settings()
    plan = gpu_plan.resolve(recipe, gpu_plan.scaled_sets(recipe, 1.0, s, task), s, task)
    epochs = load_recipe(ROOT / "recipes" / recipe).training.epochs
    assert plan.total_steps == round(epochs * s.steps_per_epoch(task))


def test_the_fitted_fractions_are_the_headers():
    """With the assumed step times (no command 1 records) each run gets what gpu_plan.sh says."""
    s = settings()
    window = gpu_plan.LIMIT_S[2] - gpu_plan.OVERHEAD_S[2]
    jobs = gpu_plan.sparse_jobs(s, [], window)
    got = {(j.task, j.name): j.fraction for j in jobs}
    assert got == {
        ("sst2", "gmp_80"): 0.2,
        ("sst2", "gmp_90"): 0.16,
        ("sst2", "obert_80"): 0.05,
        ("sst2", "obert_90"): 0.04,
        ("csqa", "obert_80"): 0.17,
        ("csqa", "obert_90"): 0.13,
    }
    assert all(j.teacher is None for j in jobs)  # no command 1 yet
    header = " ".join((ROOT / "benchmarks" / "gpu_plan.sh").read_text().replace("#", " ").split())
    assert "GMP 80/90 0.20/0.16" in header and "oBERT 80/90 0.05/0.04" in header
    assert "CSQA oBERT 80/90 0.17/0.13" in header


def dense_record(task, seconds_per_step, s):
    return {
        "task": task,
        "config": "dense",
        "status": "complete",
        "budget": s.budget(1),
        "steps": 1000,
        "train_seconds": 1000 * seconds_per_step,
        "model_dir": f"/teachers/{task}",
        "accuracy": 0.9,
    }


def test_command_1_s_measured_step_times_size_command_2():
    s = settings()
    window = gpu_plan.LIMIT_S[2] - gpu_plan.OVERHEAD_S[2]
    fast = [dense_record("sst2", 0.010, s), dense_record("csqa", 0.020, s)]
    slow = [dense_record("sst2", 0.030, s), dense_record("csqa", 0.060, s)]
    a = {j.key: j for j in gpu_plan.sparse_jobs(s, fast, window)}
    b = {j.key: j for j in gpu_plan.sparse_jobs(s, slow, window)}
    assert all(b[k].fraction < a[k].fraction for k in a)
    assert a["sst2_gmp_90"].teacher == "/teachers/sst2" and a["csqa_obert_90"].teacher
    again = {j.key: j.fraction for j in gpu_plan.sparse_jobs(s, fast, window)}
    assert again == {k: j.fraction for k, j in a.items()}  # a rerun plans the same runs
    assert a["sst2_gmp_90"].folder == f"gmp_90-f{a['sst2_gmp_90'].fraction:.2f}"


def test_command_1_s_probe_sizes_command_2_before_the_teachers_step():
    s = settings()
    window = gpu_plan.LIMIT_S[2] - gpu_plan.OVERHEAD_S[2]
    teachers = [dense_record("sst2", 0.010, s), dense_record("csqa", 0.020, s)]
    probe = {
        "task": "all",
        "config": "probe",
        "status": "complete",
        "budget": s.budget(1),
        "processes": 6,
        "step_s": {"sst2": 0.050, "csqa": 0.080},
    }
    steps = gpu_plan.command2_step_seconds(teachers + [probe], s)
    assert steps["sst2"][0] == pytest.approx(0.050 * gpu_plan.PROBE_MARGIN)
    assert "probed" in steps["csqa"][1]
    without = gpu_plan.command2_step_seconds(teachers, s)
    k = gpu_plan.KD_FACTOR * gpu_plan.CONTENTION
    assert without["sst2"][0] == pytest.approx(0.010 * k)
    probed = {j.key: j.fraction for j in gpu_plan.sparse_jobs(s, teachers + [probe], window)}
    assert probed != {j.key: j.fraction for j in gpu_plan.sparse_jobs(s, teachers, window)}


def test_the_tiny_rehearsal_budget_resolves():
    s = settings(**{k: v for k, v in gpu_plan.TINY.items() if k != "limit_s"})
    for job in gpu_plan.sparse_jobs(s, [], 5.0):  # a window that fits almost nothing
        assert job.fraction >= 0.01 and job.planned_steps >= 1


def test_a_job_is_stopped_at_the_deadline_and_its_progress_kept(tmp_path, monkeypatch):
    """SIGINT at the deadline; the stopped run's last evaluation goes into the results."""
    s = settings(tmp_path)
    job = gpu_plan.Job(2, "sst2", "gmp_90", "x.yaml", [], 0.9, True, "test", 0.5, 12, 6, 100)
    run_dir = tmp_path / "work" / "sst2" / job.folder
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(
        json.dumps({"stage": "main", "step": 40, "loss": 0.5})
        + "\n"
        + json.dumps({"stage": "main", "step": 40, "eval_accuracy": 0.8, "sparsity": 0.7})
        + "\n"
    )
    sleeper = "import signal, sys, time\nsignal.signal(signal.SIGINT, lambda *a: sys.exit(130))\ntime.sleep(60)\n"
    monkeypatch.setattr(
        gpu_plan, "_child_argv", lambda s, spec, jobs: [sys.executable, "-c", sleeper]
    )
    monkeypatch.setattr(gpu_plan, "GRACE_S", 5)
    records: list[dict] = []
    results = tmp_path / "gpu_plan.json"
    started = time.monotonic()
    gpu_plan.run_jobs(s, [job], records, results, deadline=time.monotonic() + 2)
    assert time.monotonic() - started < 20
    (record,) = json.loads(results.read_text())
    assert record["status"] == "stopped" and record["exit"] == 130
    assert (record["steps"], record["last_eval_accuracy"], record["planned_steps"]) == (
        40,
        0.8,
        100,
    )
    row = gpu_plan.table(records, s, [])
    assert "stopped at step 40/100" in row and "| 80.00 |" in row


def test_command_1_runs_every_gpu_test():
    import ast

    tree = ast.parse((ROOT / "tests" / "integration" / "test_gpu.py").read_text())
    names = {
        n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")
    }
    assert set(gpu_plan.GPU_TESTS) == names


def test_command_2_first_finishes_a_teacher_command_1_had_to_stop(tmp_path, monkeypatch):
    s = settings(tmp_path)
    records = [dense_record("csqa", 0.02, s)]  # the SST-2 teacher was stopped
    (tmp_path / "work" / "sst2" / "dense").mkdir(parents=True)
    (tmp_path / "work" / "sst2" / "dense" / "run.json").write_text("{}")
    started = []

    def fake_wait(s_, running, records_, results, deadline, others=()):
        assert deadline <= time.monotonic() + gpu_plan.TEACHER_CATCHUP_S
        records_.append(dense_record("sst2", 0.01, s))

    monkeypatch.setattr(gpu_plan, "start_jobs", lambda s_, jobs: started.extend(jobs) or [])
    monkeypatch.setattr(gpu_plan, "wait_jobs", fake_wait)
    spent = gpu_plan.finish_teachers(s, records, tmp_path / "r.json", time.monotonic() + 400)
    assert [j.key for j in started] == ["sst2_dense"] and spent >= 0
    assert gpu_plan.find(records, "sst2", "dense", s.budget(1)) is not None
    started.clear()
    assert gpu_plan.finish_teachers(s, records, tmp_path / "r.json", time.monotonic() + 400) == 0.0
    assert not started

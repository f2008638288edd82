"""The device plan (benchmarks/gpu_plan.sh) rehearsed on CPU with its tiny budget (marked slow):
command 1 trains both teachers, command 2 stopped at its deadline keeps what it has, a second
command 2 resumes and finishes every run, a third is a no-op; the table and $OUT files appear.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_plan.sh"
SPARSE = {
    ("sst2", "gmp_80"),
    ("sst2", "gmp_90"),
    ("sst2", "obert_80"),
    ("sst2", "obert_90"),
    ("csqa", "obert_80"),
    ("csqa", "obert_90"),
}


def plan(outdir, *args, env, timeout=1800):
    done = subprocess.run(
        ["bash", str(SCRIPT), str(outdir), *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


def records(outdir):
    return json.loads((outdir / "gpu_plan.json").read_text())


def complete(outdir):
    return {(r["task"], r["config"]) for r in records(outdir) if r.get("status") == "complete"}


@pytest.mark.slow
def test_the_device_plan_rehearses_on_cpu(shared_data_dir, tiny_encoder, tmp_path):
    outdir, out = tmp_path / "plan", tmp_path / "OUT"
    out.mkdir()
    env = dict(os.environ, OUT=str(out), HF_HUB_OFFLINE="1", GPU_PLAN_TINY="1")
    common = ["--model", tiny_encoder, "--data-root", shared_data_dir]

    text = plan(outdir, 1, *common, env=env)
    assert complete(outdir) >= {("sst2", "dense"), ("csqa", "dense")}, text
    # the probe: command 2's step, measured beside the teachers, sizes command 2
    (probe,) = [r for r in records(outdir) if r["config"] == "probe"]
    assert probe["processes"] == 6 and set(probe["step_s"]) == {"sst2", "csqa"}, text
    table = (outdir / "gpu_plan.md").read_text()
    assert "measured in command 1" in table and "probed in command 1 with 6 processes" in table

    # The device may be lost, or the command stopped: the runs are stopped early (SIGINT: each
    # checkpoints), and the results file keeps what they reached.
    text = plan(outdir, 2, *common, "--stop-after", 100, env=env)
    assert "[deadline]" in text or complete(outdir) >= SPARSE, text
    assert {(r["task"], r["config"]) for r in records(outdir)} >= SPARSE  # a row for every run

    stopped = {r["config"] + r["task"]: r for r in records(outdir) if r.get("status") != "complete"}
    text = plan(outdir, 2, *common, env=env)  # resumes what was stopped: the same runs
    assert complete(outdir) >= SPARSE, text
    for r in records(outdir):
        if r["config"] + r["task"] in stopped:
            assert r["fraction"] == stopped[r["config"] + r["task"]]["fraction"]
    by = {(r["task"], r["config"]): r for r in records(outdir)}
    for key in SPARSE:
        r = by[key]
        assert r["sparsity_targets"] == pytest.approx(r["target_sparsity"], abs=1e-4), key
        assert 0 < r["fraction"] <= 1 and r["steps"] == r["planned_steps"], key

    before = records(outdir)
    text = plan(outdir, 2, *common, env=env)  # nothing left: a no-op
    assert "command 2: 0 job(s) to run" in text and text.count("[skip]") == 6, text
    assert records(outdir) == before

    table = (outdir / "gpu_plan.md").read_text()
    for task, name in SPARSE | {("sst2", "dense"), ("csqa", "dense")}:
        assert f"| {task} | {name} |" in table
    assert "| complete |" in table and table in text
    assert {p.name for p in out.iterdir()} >= {
        "gpu_plan.json",
        "gpu_plan.md",
        "logs_and_reports.tar.gz",
    }

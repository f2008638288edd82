"""`recipec apply` with untrusted run folders, interruptions and failing disks (issue #22):
nothing the user keeps is deleted, no traceback, no silent start-over, nothing left that blocks
a rerun, and resume stays bit-identical. See docs/safety.md for the promises these check."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
from run_helpers import (
    NEWEST,
    OLDER,
    apply,
    assert_clean,
    checkpoint_dir,
    copy_run,
    leftovers,
    same_weights,
)

# -- --overwrite ----------------------------------------------------------------------------------


def test_overwrite_with_a_run_json_that_is_not_recipecs_deletes_nothing(
    fast_recipe, tiny_model_dir, tmp_path
):
    """Issue #22 item 2: `{}` as run.json was enough for --overwrite to empty the folder."""
    out = tmp_path / "mine"
    (out / "photos").mkdir(parents=True)
    (out / "photos" / "cat.jpg").write_text("meow")
    (out / "thesis.tex").write_text("chapter 1")
    (out / "run.json").write_text("{}")
    result = apply(fast_recipe, tiny_model_dir, out, "--overwrite", quiet=True)
    assert_clean(result, 2)
    assert "not a recipec run" in result.output and str(out / "run.json") in result.output
    assert (out / "photos" / "cat.jpg").read_text() == "meow"
    assert (out / "thesis.tex").read_text() == "chapter 1"


def test_overwrite_refuses_a_run_holding_the_users_files_then_replaces_it_without(
    fast_run, fast_recipe, tiny_model_dir, tmp_path
):
    run = copy_run(fast_run, tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    (run / "model" / "calibration.bin").write_text("mine")
    result = apply(fast_recipe, tiny_model_dir, run, "--overwrite", quiet=True)
    assert_clean(result, 2)
    assert "notes.txt" in result.output and "model/calibration.bin" in result.output
    assert (run / "notes.txt").is_file() and (run / "model" / "calibration.bin").is_file()
    assert (run / "report.json").is_file() and (checkpoint_dir(run) / NEWEST).is_dir()
    (run / "notes.txt").unlink()
    (run / "model" / "calibration.bin").unlink()
    assert_clean(apply(fast_recipe, tiny_model_dir, run, "--overwrite", quiet=True), 0)
    assert same_weights(run, fast_run) and not leftovers(run)


# -- resume: the newest verified checkpoint, never a silent start-over ----------------------------


def _missing_latest(ckpt):
    (ckpt / "latest").write_text("main-step-00000099\n")


def _empty_latest(ckpt):
    (ckpt / "main-step-00000099").mkdir()
    (ckpt / "latest").write_text("main-step-00000099\n")


def _deleted_newest(ckpt):
    shutil.rmtree(ckpt / NEWEST)


def _truncated_newest(ckpt):
    model = ckpt / NEWEST / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])


@pytest.mark.parametrize(
    ("damage", "resumed_from", "skipped"),
    [
        (_missing_latest, NEWEST, None),
        (_empty_latest, NEWEST, "main-step-00000099"),
        (_deleted_newest, OLDER, None),
        (_truncated_newest, OLDER, f"{NEWEST}/model.safetensors"),
    ],
    ids=[
        "latest-names-a-missing-folder",
        "latest-names-an-empty-folder",
        "newest-deleted",
        "newest-truncated",
    ],
)
def test_resume_uses_the_newest_verified_checkpoint_and_says_which(
    fast_run, fast_recipe, tiny_model_dir, tmp_path, damage, resumed_from, skipped
):
    """Issue #22 item 4: these printed "no checkpoint yet: starting from the beginning"."""
    run = copy_run(fast_run, tmp_path / "run")
    damage(checkpoint_dir(run))
    result = apply(fast_recipe, tiny_model_dir, run, "--resume")
    assert_clean(result, 0)
    assert f"continuing from {checkpoint_dir(run) / resumed_from}" in result.output, result.output
    assert "starting from the beginning" not in result.output
    if skipped:
        assert f"skipping checkpoint {skipped.split('/')[0]}" in result.output
        assert skipped in result.output
    assert same_weights(run, fast_run) and not leftovers(run)
    record = json.loads((run / "run.json").read_text())["resumes"][-1]
    assert record["from"] == str(checkpoint_dir(run) / resumed_from)


def test_resume_with_only_unusable_checkpoints_is_refused_not_restarted(
    fast_run, fast_recipe, tiny_model_dir, tmp_path
):
    run = copy_run(fast_run, tmp_path / "run")
    for name in (NEWEST, OLDER):
        (checkpoint_dir(run) / name / "state.json").write_text("{")
    result = apply(fast_recipe, tiny_model_dir, run, "--resume", quiet=True)
    assert_clean(result, 2)
    assert str(checkpoint_dir(run) / NEWEST / "state.json") in result.output
    assert "--overwrite" in result.output
    assert (checkpoint_dir(run) / OLDER / "model.safetensors").is_file() and not leftovers(run)


def test_a_pickle_planted_in_a_run_folder_does_not_run(
    fast_run, fast_recipe, tiny_model_dir, tmp_path
):
    """Issue #22 item 1: --resume unpickled state.pt (torch.load(weights_only=False))."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'payload-ran'}",))

    run = copy_run(fast_run, tmp_path / "run")
    for name in (NEWEST, OLDER):
        folder = checkpoint_dir(run) / name
        (folder / "state.json").unlink()
        (folder / "state.pt").write_bytes(pickle.dumps({"step": 8, "payload": Payload()}))
    result = apply(fast_recipe, tiny_model_dir, run, "--resume", quiet=True)
    assert_clean(result, 2)
    assert "does not unpickle" in result.output and "state.pt" in result.output
    assert not (tmp_path / "payload-ran").exists()


def test_a_resume_before_the_first_checkpoint_logs_each_step_once(
    fast_run, fast_recipe, tiny_model_dir, tmp_path
):
    """Issue #22 item 8: metrics.jsonl repeated the steps of the attempt that left no checkpoint."""
    run = copy_run(fast_run, tmp_path / "run")
    shutil.rmtree(run / "checkpoints")
    result = apply(fast_recipe, tiny_model_dir, run, "--resume")
    assert_clean(result, 0)
    assert "starting from the beginning" in result.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))


# -- resume with a lower learning rate ----------------------------------------------------------


def test_the_advice_after_a_non_finite_loss_can_be_followed(
    fast_recipe, tiny_model_dir, tmp_path, monkeypatch
):
    """Issue #22 item 5: "lower the learning rate, then --resume" was refused as another recipe."""
    from recipec.train import loop

    real = loop.StageRunner.train_step

    def poisoned(self, batch, sigint):
        if self.step >= 5:
            raise loop.TrainingError(
                "stage 'main': the loss is nan at step 5; stopping. (test) --resume --set "
                "training.learning_rate=..."
            )
        return real(self, batch, sigint)

    run = tmp_path / "run"
    monkeypatch.setattr(loop.StageRunner, "train_step", poisoned)
    result = apply(fast_recipe, tiny_model_dir, run, quiet=True)
    assert_clean(result, 1)
    monkeypatch.undo()
    refused = apply(
        fast_recipe,
        tiny_model_dir,
        run,
        "--resume",
        "--set",
        "modifiers.0.final_sparsity=0.5",
        quiet=True,
    )
    assert_clean(refused, 2)
    assert "recipe field modifiers.0.final_sparsity (0.6 then, 0.5 now)" in refused.output
    refused = apply(fast_recipe, tiny_model_dir, run, "--resume", "--max-eval", "4", quiet=True)
    assert_clean(refused, 2)
    assert "--max-eval (8 then, 4 now)" in refused.output
    result = apply(
        fast_recipe,
        tiny_model_dir,
        run,
        "--resume",
        "--set",
        "training.learning_rate=5e-4",
        "--set",
        "modifiers.1.init_lr=5e-4",
    )
    assert_clean(result, 0)
    assert "modifiers.1.init_lr: 0.001 -> 0.0005 (from stage 'main' step 4)" in result.output
    record = json.loads((run / "run.json").read_text())
    assert [c["field"] for c in record["resumes"][-1]["changes"]] == [
        "training.learning_rate",
        "modifiers.1.init_lr",
    ]
    assert "init_lr: 0.0005" in record["recipe_now"] and "init_lr: 0.001" in record["recipe"]
    lrs = {
        r["step"]: r["lr"]
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if "lr" in r
    }
    assert lrs[4] == pytest.approx(1e-3) and lrs[5] == pytest.approx(
        5e-4
    )  # the new schedule from step 4
    assert "Changed on resume" in (run / "report.md").read_text()


# -- the lock: one process per run folder ---------------------------------------------------------


def test_a_second_process_on_the_same_run_folder_is_refused(
    fast_run, fast_recipe, tiny_model_dir, tmp_path
):
    from recipec.outputs import FolderLock

    run = copy_run(fast_run, tmp_path / "run")
    held = FolderLock(run).acquire()  # another recipec process, as far as the run can tell
    try:
        result = apply(fast_recipe, tiny_model_dir, run, "--resume", quiet=True)
        assert_clean(result, 2)
        assert f"is in use by another recipec process: pid {os.getpid()} on host " in result.output
        assert socket.gethostname() in result.output
        result = apply(fast_recipe, tiny_model_dir, run, "--overwrite", quiet=True)
        assert_clean(result, 2)
        assert (run / "report.json").is_file()
    finally:
        held.release()
    # A lock left by a process that no longer runs (SIGKILL) is taken over.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"pid": dead.pid, "host": socket.gethostname(), "since": "earlier"}
    (run / ".recipec.lock").write_text(json.dumps(stale))
    result = apply(fast_recipe, tiny_model_dir, run, "--resume")
    assert_clean(result, 0)
    assert f"took over the lock of pid {dead.pid}" in result.output
    assert not leftovers(run)


# -- leftovers of a failed write ------------------------------------------------------------------


def test_leftovers_of_failed_writes_do_not_block_a_rerun(fast_recipe, tiny_model_dir, tmp_path):
    """Issue #22 item 6: a 0-byte .run.json.tmp-PID blocked rerun, --overwrite and --resume."""
    out = tmp_path / "fresh"
    out.mkdir()
    (out / ".run.json.tmp-4242").write_text("")
    assert_clean(apply(fast_recipe, tiny_model_dir, out, quiet=True), 0)
    assert not leftovers(out)


@pytest.mark.slow
def test_leftovers_block_neither_resume_nor_overwrite(
    fast_run, fast_recipe, tiny_model_dir, tmp_path
):
    run = copy_run(fast_run, tmp_path / "run")
    (run / ".metrics.jsonl.tmp-4242").write_text("")
    (checkpoint_dir(run) / ".latest.tmp-4242").write_text("")
    (checkpoint_dir(run) / ".tmp-main-step-00000010-4242").mkdir()
    assert_clean(apply(fast_recipe, tiny_model_dir, run, "--resume", quiet=True), 0)
    assert_clean(apply(fast_recipe, tiny_model_dir, run, "--overwrite", quiet=True), 0)
    assert not leftovers(run) and same_weights(run, fast_run)


# -- full disk, read-only folder --------------------------------------------------------------------


def test_a_full_disk_stops_the_run_keeps_the_checkpoint_and_resume_finishes(
    fast_run, fast_recipe, tiny_model_dir, tmp_path, monkeypatch
):
    """Writes made to fail with ENOSPC (monkeypatched; test_a_real_full_disk uses a tmpfs)."""
    from recipec.train import resume

    real, calls = resume.save_file, {"n": 0}

    def fills_up(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 3:  # the second checkpoint (step 4) finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(resume, "save_file", fills_up)
    run = tmp_path / "run"
    result = apply(fast_recipe, tiny_model_dir, run, quiet=True)
    assert_clean(result, 1)
    assert "the disk is full" in result.output and "--resume" in result.output
    assert not leftovers(run)
    assert [p.name for p in resume.checkpoints(checkpoint_dir(run))] == ["main-step-00000002"]
    monkeypatch.undo()
    assert_clean(apply(fast_recipe, tiny_model_dir, run, "--resume", quiet=True), 0)
    assert same_weights(run, fast_run)


def _mount(*args) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MB tmpfs (room for one checkpoint of the tiny model, not two); skipped where this
    process cannot mount one (not root, or no mount permission in the container)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=20m", "tmpfs", str(disk)):
        pytest.skip("cannot mount a tmpfs here (test_a_full_disk_... covers it by monkeypatching)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_a_real_full_disk(fast_run, fast_recipe, tiny_model_dir, small_disk):
    run = small_disk / "run"
    result = apply(fast_recipe, tiny_model_dir, run, quiet=True)
    assert_clean(result, 1)
    assert "the disk is full" in result.output and "--resume" in result.output
    assert not leftovers(run)
    assert _mount("-o", "remount,size=200m", str(small_disk))  # space freed
    assert_clean(apply(fast_recipe, tiny_model_dir, run, "--resume", quiet=True), 0)
    assert same_weights(run, fast_run) and not leftovers(run)


@pytest.fixture
def read_only(tmp_path):
    """``read_only(folder)`` makes ``folder`` read-only for this process: a read-only bind mount
    when running as root (root ignores permission bits), else chmod; skipped when neither works."""
    mounted = []

    def make(folder):
        if os.geteuid() != 0:
            for path in [folder, *folder.rglob("*")]:
                if path.is_dir():
                    path.chmod(0o555)
            return
        if not (_mount("--bind", str(folder), str(folder)) and mounted.append(folder) is None):
            pytest.skip("cannot bind-mount here (test_an_unwritable_output covers it)")
        if not _mount("-o", "remount,bind,ro", str(folder)):
            pytest.skip("cannot remount read-only here")

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)
    for path in tmp_path.rglob("*"):
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)


def test_a_read_only_output_folder(fast_run, fast_recipe, tiny_model_dir, tmp_path, read_only):
    parent = tmp_path / "ro"
    parent.mkdir()
    run = copy_run(fast_run, parent / "run")
    read_only(parent)
    for out, args in ((run, ["--resume"]), (run, ["--overwrite"]), (parent / "new", [])):
        result = apply(fast_recipe, tiny_model_dir, out, *args, quiet=True)
        assert_clean(result, 2)
        assert "read-only" in result.output or "permission denied" in result.output, result.output
        assert "--output" in result.output
    assert (run / "report.json").is_file() and not (parent / "new").exists()


def test_an_unwritable_output(fast_recipe, tiny_model_dir, tmp_path, monkeypatch):
    """The same through a monkeypatched mkdir (read-only file system), wherever tests run."""
    from pathlib import Path

    real = Path.mkdir

    def read_only(self, *args, **kwargs):
        if tmp_path in self.parents or self == tmp_path / "out":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    result = apply(fast_recipe, tiny_model_dir, tmp_path / "out", quiet=True)
    assert_clean(result, 2)
    assert f"{tmp_path / 'out'}: the file system is read-only" in result.output


# -- Ctrl-C -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where",
    ["loading the model", pytest.param("after creating the folder", marks=pytest.mark.slow)],
)
def test_ctrl_c_while_starting_exits_130_and_leaves_a_folder_that_reruns(
    fast_recipe, tiny_model_dir, tmp_path, monkeypatch, where
):
    from recipec import models
    from recipec.train import run as run_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "loading the model":
        monkeypatch.setattr(models, "load_model_and_tokenizer", interrupted)
    else:
        monkeypatch.setattr(run_module.ApplyRun, "find_resume", interrupted)
    out = tmp_path / "run"
    result = apply(fast_recipe, tiny_model_dir, out, quiet=True)
    assert_clean(result, 130)
    assert "interrupted" in result.output and "--resume" in result.output
    assert not leftovers(out)
    monkeypatch.undo()
    if where == "after creating the folder":  # a folder that never trained: the rerun reuses it
        assert_clean(apply(fast_recipe, tiny_model_dir, out, quiet=True), 0)


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(
    fast_run, fast_recipe, tiny_model_dir, tmp_path, monkeypatch
):
    from recipec.train import loop, resume

    real = loop.StageRunner.train_step

    def twice(self, batch, sigint):
        if self.step == 5:
            os.kill(os.getpid(), signal.SIGINT)  # the first: finish the step, checkpoint
            os.kill(os.getpid(), signal.SIGINT)  # the second: stop now
        return real(self, batch, sigint)

    monkeypatch.setattr(loop.StageRunner, "train_step", twice)
    run = tmp_path / "run"
    result = apply(fast_recipe, tiny_model_dir, run, quiet=True)
    assert_clean(result, 130)
    assert "second Ctrl-C" in result.output and not leftovers(run)
    assert resume.latest_checkpoint(checkpoint_dir(run)).name == "main-step-00000004"
    monkeypatch.undo()
    assert_clean(apply(fast_recipe, tiny_model_dir, run, "--resume", quiet=True), 0)
    assert same_weights(run, fast_run)


@pytest.mark.slow
def test_a_resume_with_a_lower_learning_rate_keeps_its_auto_teacher(
    fast_recipe, tiny_model_dir, tmp_path, monkeypatch
):
    """The cached `teacher: auto` is keyed by its training settings, learning rate included: a
    resume that lowers the learning rate distils from the same teacher, not a new one."""
    from recipec.train import loop

    monkeypatch.setenv("RECIPEC_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "kd.yaml"
    recipe.write_text(fast_recipe.read_text() + "  - {type: distill, teacher: auto}\n")
    real = loop.StageRunner.train_step

    def poisoned(self, batch, sigint):
        if self.plan.name == "main" and self.step >= 5:
            raise loop.TrainingError("the loss is nan at step 5 (test)")
        return real(self, batch, sigint)

    monkeypatch.setattr(loop.StageRunner, "train_step", poisoned)
    run = tmp_path / "run"
    result = apply(recipe, tiny_model_dir, run)
    assert_clean(result, 1)
    assert "fine-tuning a dense teacher" in result.output
    monkeypatch.setattr(loop.StageRunner, "train_step", real)
    result = apply(recipe, tiny_model_dir, run, "--resume", "--set", "training.learning_rate=5e-4")
    assert_clean(result, 0)
    assert "reusing the fine-tuned dense teacher" in result.output, result.output
    assert "fine-tuning a dense teacher" not in result.output
    # and again with the recipe as the last session ran it (no change since, but not as started)
    result = apply(recipe, tiny_model_dir, run, "--resume", "--set", "training.learning_rate=5e-4")
    assert_clean(result, 0)
    assert "reusing the fine-tuned dense teacher" in result.output, result.output

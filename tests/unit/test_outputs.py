"""recipec.outputs: atomic writes that clean up, what --overwrite may delete, the folder lock."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys

import pytest

from recipec import outputs
from recipec.outputs import (
    EXPORT,
    LOCK_NAME,
    RUN,
    FolderLock,
    LockError,
    ReplaceError,
    check_output,
    foreign_entries,
    remove_owned,
    write_text_atomic,
)


def _check(out, **kwargs):
    return check_output(
        out,
        overwrite=kwargs.pop("overwrite", True),
        marker=kwargs.pop("marker", "run.json"),
        written_by="a recipec run",
        busy="pass --overwrite",
        **kwargs,
    )


def _run_folder(out):
    """A run folder as recipec leaves it (names only; the content does not matter here)."""
    (out / "model").mkdir(parents=True)
    (out / "checkpoints" / "00-main" / "main-step-00000008").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"format": outputs.RUN_FORMAT, "recipe": "x: 1"}))
    for name in ("recipe.yaml", "metrics.jsonl", "report.json", "report.md", "eval.png"):
        (out / name).write_text("")
    for name in ("config.json", "model.safetensors", "masks.safetensors", "tokenizer.json"):
        (out / "model" / name).write_text("")
    (out / "checkpoints" / "00-main" / "latest").write_text("main-step-00000008\n")
    for name in ("model.safetensors", "state.json", "state.safetensors"):
        (out / "checkpoints" / "00-main" / "main-step-00000008" / name).write_text("")
    return out


def test_a_failed_atomic_write_removes_its_temporary_file(tmp_path, monkeypatch):
    """A full disk (or Ctrl-C) mid-write leaves the old file and no .NAME.tmp-PID behind."""
    target = tmp_path / "run.json"
    target.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        write_text_atomic(target, "new")
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"] and target.read_text() == "old"


@pytest.mark.parametrize(
    "content",
    ["{}", "[]", "not json", '{"format": "recipec-run/9", "recipe": "x"}', "\xff\xfe"],
)
def test_overwrite_needs_a_run_json_recipec_wrote(tmp_path, content):
    """A run.json that is not recipec's (`{}`, another format, garbage) is no licence to delete."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(content, errors="surrogateescape")
    (out / "thesis.txt").write_text("mine")
    (out / "data").mkdir()
    with pytest.raises(ReplaceError, match="not a recipec run") as info:
        _check(out)
    assert str(out / "run.json") in str(info.value)
    assert (out / "thesis.txt").read_text() == "mine" and (out / "data").is_dir()


def test_a_run_json_of_an_older_recipec_is_recognised(tmp_path):
    out = _run_folder(tmp_path / "out")
    keys = ("recipe", "model", "task", "data", "teacher", "max_train", "max_eval")
    (out / "run.json").write_text(json.dumps(dict.fromkeys(keys, "x")))
    assert _check(out) is True


@pytest.mark.parametrize(
    "planted", ["notes.txt", "model/mine.bin", "checkpoints/backup/", "data/", "model/sub/"]
)
def test_overwrite_refuses_a_run_folder_holding_anything_else(tmp_path, planted):
    out = _run_folder(tmp_path / "out")
    path = out / planted
    if planted.endswith("/"):
        path.mkdir()
        (path / "x").write_text("mine")
    else:
        path.write_text("mine")
    with pytest.raises(ReplaceError) as info:
        _check(out)
    assert planted in str(info.value) and "deletes only recipec's own files" in str(info.value)
    assert foreign_entries(out, RUN.rule) == [planted]


def test_remove_owned_deletes_only_recipecs_entries(tmp_path):
    out = _run_folder(tmp_path / "out")
    (out / "notes.txt").write_text("mine")
    (out / "model" / "mine.bin").write_text("mine")
    (out / "link").symlink_to(tmp_path)
    (out / LOCK_NAME).write_text("{}")
    remove_owned(out, RUN.rule)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert left == [LOCK_NAME, "link", "model", "model/mine.bin", "notes.txt"]


def test_a_folder_of_leftovers_is_cleared_without_asking(tmp_path):
    """The 0-byte .run.json.tmp-PID of a write that failed blocks nothing."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".run.json.tmp-4242").write_text("")
    (out / LOCK_NAME).write_text("{}")
    assert _check(out, overwrite=False) is True
    remove_owned(out, RUN.rule)
    assert [p.name for p in out.iterdir()] == [LOCK_NAME]
    assert _check(out, overwrite=False) is False


def test_an_export_folder_is_recognised_by_its_format_marker(tmp_path):
    out = tmp_path / "onnx"
    out.mkdir()
    for name in ("model.onnx", "config.json", "tokenizer.json"):
        (out / name).write_text("")
    (out / "sparsity.json").write_text("{}")
    with pytest.raises(ReplaceError, match="not a recipec export"):
        _check(out, marker=EXPORT.marker)
    (out / "sparsity.json").write_text(json.dumps({"format": "recipec-sparsity/1"}))
    assert _check(out, marker=EXPORT.marker) is True
    (out / "results.csv").write_text("mine")
    with pytest.raises(ReplaceError, match="results.csv"):
        _check(out, marker=EXPORT.marker)


# -- the lock ------------------------------------------------------------------------------------


def test_a_second_lock_names_the_holder(tmp_path):
    held = FolderLock(tmp_path).acquire()
    try:
        with pytest.raises(LockError) as info:
            FolderLock(tmp_path).acquire()
        message = str(info.value)
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in message and "since" in message
    finally:
        held.release()
    assert not (tmp_path / LOCK_NAME).exists()
    FolderLock(tmp_path).acquire().release()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("flock", [True, False], ids=["flock", "no-flock"])
def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, monkeypatch, flock):
    if not flock:
        monkeypatch.setattr(outputs, "_flock", lambda fd: None)
    stale = {"pid": _dead_pid(), "host": socket.gethostname(), "since": "yesterday"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(stale))
    lock = FolderLock(tmp_path).acquire()
    assert lock.taken_over == stale
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_without_flock_a_live_or_remote_holder_refuses(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_flock", lambda fd: None)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for holder in (
            {"pid": live.pid, "host": socket.gethostname(), "since": "now"},
            {"pid": 1, "host": "another-host", "since": "now"},
        ):
            (tmp_path / LOCK_NAME).write_text(json.dumps(holder))
            with pytest.raises(LockError, match=f"pid {holder['pid']} on host {holder['host']}"):
                FolderLock(tmp_path).acquire()
            assert json.loads((tmp_path / LOCK_NAME).read_text()) == holder
    finally:
        live.kill()
        live.wait()


def test_a_lock_that_cannot_be_written_leaves_nothing(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError):
        FolderLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()

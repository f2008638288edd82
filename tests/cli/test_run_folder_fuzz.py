"""Fuzz-style: `recipec apply --resume` over corrupt checkpoints and run folders (truncated and
garbled safetensors and state files, `latest` pointing anywhere, planted pickles, missing files,
a run.json that is not recipec's). Whatever the damage: exit 0 (resumed from the newest intact
checkpoint, bit-identical), 2 (refused: the message names the file) or 1 (the run stopped), no
traceback, a refused command changes nothing, no payload runs, and nothing recipec leaves blocks
a rerun (no lock or temporary file; --overwrite would accept the folder unless it is not
recipec's). The inputs half of the fuzz (data files, models, ONNX) lives with the input tests.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil

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


def _garble(path, at=None, n=16, seed=0):
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    start = len(data) // 2 if at is None else at
    for i in range(start, min(len(data), start + n)):
        data[i] = rng.randrange(256)
    path.write_bytes(bytes(data))


def _set_json(path, change):
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def _rehash(folder):
    """Make state.json list the files as they are now (a consistent but foreign checkpoint)."""
    from recipec.train.resume import _digest

    _set_json(
        folder / "state.json",
        lambda d: d["files"].update({n: _digest(folder / n) for n in d["files"]}),
    )


class Payload:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _foreign_weights(folder):
    import torch
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3)}, str(folder / "model.safetensors"))
    _rehash(folder)


def _no_optimizer(folder):
    _set_json(folder / "state.json", lambda d: d["state"].pop("optimizer"))


# name -> (damage(run, tmp_path), exit code, what the output names (or resumes from))
CASES = {
    "garbled-model": (
        lambda r, t: _garble(checkpoint_dir(r) / NEWEST / "model.safetensors"),
        0,
        OLDER,
    ),
    "garbled-state-header": (
        lambda r, t: _garble(checkpoint_dir(r) / NEWEST / "state.safetensors", at=0),
        0,
        OLDER,
    ),
    "truncated-state-tensors": (
        lambda r, t: (checkpoint_dir(r) / NEWEST / "state.safetensors").write_bytes(b"\x08"),
        0,
        OLDER,
    ),
    "binary-state-json": (
        lambda r, t: (checkpoint_dir(r) / NEWEST / "state.json").write_bytes(bytes(range(256))),
        0,
        OLDER,
    ),
    "foreign-state-json": (
        lambda r, t: (checkpoint_dir(r) / NEWEST / "state.json").write_text('{"step": 8}'),
        0,
        OLDER,
    ),
    "nested-state-json": (
        lambda r, t: (checkpoint_dir(r) / NEWEST / "state.json").write_text("[" * 50000),
        0,
        OLDER,
    ),
    "unknown-object-in-state": (
        lambda r, t: _set_json(
            checkpoint_dir(r) / NEWEST / "state.json",
            lambda d: d["state"].update(rng={"$type": "pickle", "data": "gASV"}),
        ),
        0,
        OLDER,
    ),
    "planted-pickle-newest": (
        lambda r, t: (
            (checkpoint_dir(r) / NEWEST / "state.json").unlink(),
            (checkpoint_dir(r) / NEWEST / "state.pt").write_bytes(
                pickle.dumps({"step": 8, "x": Payload(t / "payload-ran")})
            ),
        ),
        0,
        OLDER,
    ),
    "latest-outside": (
        lambda r, t: (checkpoint_dir(r) / "latest").write_text("../../../../etc/passwd"),
        0,
        NEWEST,
    ),
    "latest-binary": (
        lambda r, t: (checkpoint_dir(r) / "latest").write_bytes(b"\xff\x00\xfe"),
        0,
        NEWEST,
    ),
    "symlinked-checkpoint": (
        lambda r, t: (checkpoint_dir(r) / "main-step-00000010").symlink_to(t),
        0,
        NEWEST,
    ),
    "users-file-among-checkpoints": (
        lambda r, t: (checkpoint_dir(r) / "notes.txt").write_text("mine"),
        0,
        NEWEST,
    ),
    "garbage-metrics-and-lock": (
        lambda r, t: (
            (r / "metrics.jsonl").open("ab").write(b'{"stage": "main", "st\x00\xff\n[1]\n'),
            (r / ".recipec.lock").write_bytes(b"\xff" * 10),
        ),
        0,
        NEWEST,
    ),
    "every-state-tensor-file-missing": (
        lambda r, t: [
            (checkpoint_dir(r) / n / "state.safetensors").unlink() for n in (NEWEST, OLDER)
        ],
        2,
        f"{NEWEST}/state.safetensors is missing",
    ),
    "foreign-but-consistent-weights": (
        lambda r, t: [_foreign_weights(checkpoint_dir(r) / n) for n in (NEWEST, OLDER)],
        2,
        f"{NEWEST}/model.safetensors does not fit this model",
    ),
    "state-without-optimizer": (
        lambda r, t: [(_no_optimizer(checkpoint_dir(r) / n)) for n in (NEWEST, OLDER)],
        2,
        f"{NEWEST}: its state does not fit stage 'main'",
    ),
    "checkpoint-folder-is-a-file": (
        lambda r, t: (
            shutil.rmtree(checkpoint_dir(r)),
            checkpoint_dir(r).write_text("not a folder"),
        ),
        1,
        "checkpoints/00-main",
    ),
    "run-json-empty-object": (lambda r, t: (r / "run.json").write_text("{}"), 2, "run.json"),
    "run-json-binary": (
        lambda r, t: (r / "run.json").write_bytes(b"\x89PNG\x00\xff"),
        2,
        "run.json",
    ),
    "run-json-foreign-format": (
        lambda r, t: _set_json(r / "run.json", lambda d: d.update(format="other/1")),
        2,
        "run.json",
    ),
    "run-json-nested": (lambda r, t: (r / "run.json").write_text("[" * 50000), 2, "run.json"),
    "run-json-recipe-not-yaml": (
        lambda r, t: _set_json(r / "run.json", lambda d: d.update(recipe="a: [b\n  c: {")),
        2,
        "run.json",
    ),
    "run-json-is-a-folder": (
        lambda r, t: ((r / "run.json").unlink(), (r / "run.json").mkdir()),
        2,
        "run.json",
    ),
}


NOT_RECIPECS = {  # what --overwrite must refuse after the case
    "symlinked-checkpoint",
    "users-file-among-checkpoints",
    "checkpoint-folder-is-a-file",
    "run-json-empty-object",
    "run-json-binary",
    "run-json-foreign-format",
    "run-json-nested",
    "run-json-is-a-folder",
}
# Slower cases (a resume that trains) whose damage the fast unit tests of
# tests/unit/train/test_resume_state.py also cover; the default suite runs one of each kind.
SLOW = {
    "garbled-state-header",
    "truncated-state-tensors",
    "binary-state-json",
    "foreign-state-json",
    "nested-state-json",
    "symlinked-checkpoint",
    "latest-binary",
    "checkpoint-folder-is-a-file",
}


def _listing(folder):
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_size if p.is_file() else -1)
        for p in folder.rglob("*")
        if not p.is_symlink()
    )


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES]
)
def test_resume_over_a_damaged_run_folder(fast_run, fast_recipe, tiny_model_dir, tmp_path, case):
    from recipec.outputs import ReplaceError, check_output

    damage, code, names = CASES[case]
    run = copy_run(fast_run, tmp_path / "run")
    damage(run, tmp_path)
    before = _listing(run)
    result = apply(fast_recipe, tiny_model_dir, run, "--resume")
    assert_clean(result, code)
    assert not (tmp_path / "payload-ran").exists()
    output = result.output.replace("\n", "")
    if code == 0:
        assert f"continuing from {checkpoint_dir(run) / names}" in output, result.output
        assert same_weights(run, fast_run)
    else:
        assert names in output, result.output
    if code == 2:
        assert _listing(run) == before  # a refused command changes nothing
    assert not leftovers(run)
    assert (checkpoint_dir(run) / "notes.txt").is_file() == (case == "users-file-among-checkpoints")
    # What is left blocks no rerun: --overwrite takes it, unless something in it is not recipec's.
    not_recipecs = case in NOT_RECIPECS
    try:
        check_output(run, overwrite=True, marker="run.json", written_by="a recipec run", busy="")
        assert not not_recipecs, "--overwrite would take a folder holding what is not recipec's"
    except ReplaceError as exc:
        assert not_recipecs, str(exc)

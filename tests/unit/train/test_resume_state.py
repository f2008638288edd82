"""Training checkpoints (recipec.train.resume): the state is JSON + safetensors, never a pickle;
a checkpoint is used only once verified, and resume falls back to the newest verified one."""

from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from recipec.train import resume


class Payload:
    """A pickle that runs code when loaded: it creates the file ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _state(model, optimizer):
    return {
        "stage": "main",
        "step": 4,
        "optimizer": optimizer.state_dict(),
        "program": {"masks": {"w": torch.rand(3, 4) > 0.5}, "modifiers": [{"history": []}]},
        "rng": resume.rng_state(),
        "eval_history": [{"stage": "main", "step": 2, "eval_accuracy": 0.5}],
        "seconds": 1.25,
        "complete": False,
    }


@pytest.fixture
def trained():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(torch.randn(5, 4)).sum().backward()
        optimizer.step()
    return model, optimizer


def _save(root, step, model, optimizer):
    state = dict(_state(model, optimizer), step=step)
    return resume.save_checkpoint(root, f"main-step-{step:08d}", model, state)


def test_the_state_round_trips_exactly(trained, tmp_path):
    """Optimizer moments and step, int-keyed dicts, tuples, every RNG and non-finite floats come
    back bit for bit, so a resumed run continues exactly."""
    model, optimizer = trained
    random.random(), np.random.rand(), torch.rand(1)
    state = _state(model, optimizer)
    state.update(nan=float("nan"), inf=float("-inf"), big=2**70, keys={1: "a", (2, 3): "b"})
    resume.write_state(tmp_path, "state", state)
    back = resume.read_state(tmp_path)
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    for index, moments in state["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(back["optimizer"]["state"][index][name], value), (index, name)
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    assert back["rng"]["python"] == state["rng"]["python"]
    np_back, np_saved = back["rng"]["numpy"], state["rng"]["numpy"]
    assert np_back[0] == np_saved[0] and np.array_equal(np_back[1], np_saved[1])
    assert np_back[1].dtype == np_saved[1].dtype and np_back[2:] == np_saved[2:]
    assert np.isnan(back["nan"]) and back["inf"] == float("-inf") and back["big"] == 2**70
    assert back["keys"] == {1: "a", (2, 3): "b"}
    assert torch.equal(back["program"]["masks"]["w"], state["program"]["masks"]["w"])
    resume.set_rng_state(back["rng"])
    optimizer.load_state_dict(back["optimizer"])
    doc = json.loads((tmp_path / "state.json").read_text())
    assert doc["format"] == "recipec-checkpoint-state" and doc["version"] == 1


def test_a_planted_pickle_is_refused_not_run(trained, tmp_path):
    """A run folder is untrusted input: a state.pt (the old pickle format, or a planted payload)
    is never unpickled; the message says what it is and what to do."""
    model, optimizer = trained
    folder = _save(tmp_path / "ckpt", 4, model, optimizer)
    for name in ("state.json", "state.safetensors"):
        (folder / name).unlink()
    ran = tmp_path / "payload-ran"
    (folder / "state.pt").write_bytes(pickle.dumps({"step": 4, "x": Payload(ran)}))
    with pytest.raises(resume.CheckpointStateError) as info:
        resume.read_state(folder)
    message = str(info.value)
    assert str(folder / "state.pt") in message and "does not unpickle" in message
    assert "--overwrite" in message and "recipec version that wrote it" in message
    assert not ran.exists()
    assert resume.latest_checkpoint(tmp_path / "ckpt") is None
    assert not ran.exists()


def _damage(kind, folder):
    model = folder / "model.safetensors"
    if kind == "truncated model":
        model.write_bytes(model.read_bytes()[:-100])
    elif kind == "garbled model":
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 0xFF
        model.write_bytes(bytes(data))
    elif kind == "garbled state tensors":
        (folder / "state.safetensors").write_bytes(b"\xff" * 64)
    elif kind == "truncated state.json":
        text = (folder / "state.json").read_text()
        (folder / "state.json").write_text(text[: len(text) // 2])
    elif kind == "foreign state.json":
        (folder / "state.json").write_text(json.dumps({"format": "someone-else", "step": 1}))
    elif kind == "newer state.json":
        doc = json.loads((folder / "state.json").read_text())
        (folder / "state.json").write_text(json.dumps(dict(doc, version=99)))
    elif kind == "deeply nested state.json":
        (folder / "state.json").write_text("[" * 100_000 + "]" * 100_000)
    elif kind == "unknown object":
        doc = json.loads((folder / "state.json").read_text())
        doc["state"]["step"] = {"$type": "pickle", "data": "..."}
        (folder / "state.json").write_text(json.dumps(doc))
    elif kind == "listed file outside":
        doc = json.loads((folder / "state.json").read_text())
        doc["files"]["../../../etc/passwd"] = {"bytes": 1, "sha256": "0"}
        (folder / "state.json").write_text(json.dumps(doc))
    elif kind == "missing model":
        model.unlink()
    elif kind == "empty folder":
        for path in folder.iterdir():
            path.unlink()
    else:  # pragma: no cover
        raise AssertionError(kind)


DAMAGES = [
    "truncated model",
    "garbled model",
    "garbled state tensors",
    "truncated state.json",
    "foreign state.json",
    "newer state.json",
    "deeply nested state.json",
    "unknown object",
    "listed file outside",
    "missing model",
    "empty folder",
]


@pytest.mark.parametrize("kind", DAMAGES)
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_verified(trained, tmp_path, kind):
    model, optimizer = trained
    root = tmp_path / "ckpt"
    _save(root, 2, model, optimizer)
    _save(root, 4, model, optimizer)
    newest = root / "main-step-00000004"
    _damage(kind, newest)
    with pytest.raises(resume.CheckpointStateError) as info:
        resume.verify_checkpoint(newest)
    assert str(newest) in str(info.value), str(info.value)
    skipped = []
    assert resume.latest_checkpoint(root, skipped) == root / "main-step-00000002"
    assert [folder for folder, _ in skipped] == [newest]


@pytest.mark.parametrize("pointer", [None, "", "main-step-00000009", "../../../../etc", "\x00"])
def test_latest_is_only_a_hint(trained, tmp_path, pointer):
    """`latest` naming nothing, a missing folder or a path outside: the newest verified folder
    is used all the same (a deleted newest checkpoint falls back to the one before)."""
    model, optimizer = trained
    root = tmp_path / "ckpt"
    _save(root, 2, model, optimizer)
    _save(root, 4, model, optimizer)
    if pointer is None:
        (root / "latest").unlink()
    else:
        (root / "latest").write_text(pointer)
    assert resume.latest_checkpoint(root) == root / "main-step-00000004"
    import shutil

    shutil.rmtree(root / "main-step-00000004")
    assert resume.latest_checkpoint(root) == root / "main-step-00000002"


def test_a_save_after_a_fallback_removes_the_abandoned_later_checkpoints(trained, tmp_path):
    model, optimizer = trained
    root = tmp_path / "ckpt"
    for step in (2, 4, 6):
        _save(root, step, model, optimizer)
    (root / "main-step-00000006" / "state.json").write_text("{")  # damaged: resume from 4
    _save(root, 5, model, optimizer)
    assert [p.name for p in resume.checkpoints(root)] == [
        "main-step-00000005",
        "main-step-00000004",
    ]


def test_a_failed_checkpoint_write_leaves_no_temporary_folder(trained, tmp_path, monkeypatch):
    import errno

    model, optimizer = trained
    root = tmp_path / "ckpt"
    _save(root, 2, model, optimizer)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(root / "x"))

    monkeypatch.setattr(resume, "write_state", full)
    with pytest.raises(OSError):
        _save(root, 4, model, optimizer)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "main-step-00000002"]
    assert resume.latest_checkpoint(root) == root / "main-step-00000002"


def test_a_checkpoint_that_does_not_fit_the_model_is_named(trained, tmp_path):
    model, optimizer = trained
    folder = _save(tmp_path / "ckpt", 2, model, optimizer)
    other = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2))
    with pytest.raises(resume.CheckpointStateError, match="does not fit this model"):
        resume.load_checkpoint(folder, other)
    assert os.path.isdir(folder)

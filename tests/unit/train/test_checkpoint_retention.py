"""Which training checkpoints are kept: two per stage while training, the final one after; and
with the umask's modes."""

import os

from torch import nn

from recipec.train import resume


def _save(root, stem, step, keep=resume.KEEP):
    label = f"{stem}-step-{step:08d}"
    return resume.save_checkpoint(root, label, nn.Linear(2, 2), {"step": step}, keep=keep)


def test_training_keeps_the_newest_two_and_keep_none_keeps_all(tmp_path):
    for step in (3, 6, 9, 12):
        _save(tmp_path / "a", "main", step)
        _save(tmp_path / "b", "main", step, keep=None)
    assert sorted(p.name for p in (tmp_path / "a").iterdir() if p.is_dir()) == [
        "main-step-00000009",
        "main-step-00000012",
    ]
    assert len([p for p in (tmp_path / "b").iterdir() if p.is_dir()]) == 4


def test_keep_last_leaves_only_the_last_stages_newest(tmp_path):
    stages = [tmp_path / "00-dense", tmp_path / "01-prune", tmp_path / "02-finetune"]
    for root in stages:
        for step in (5, 10):
            _save(root, root.name[3:], step)
    deleted = resume.keep_last(stages)
    assert len(deleted) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["02-finetune"]
    assert sorted(p.name for p in stages[2].iterdir()) == ["finetune-step-00000010", "latest"]
    assert resume.latest_checkpoint(stages[2]) == stages[2] / "finetune-step-00000010"
    assert resume.verify_checkpoint(stages[2] / "finetune-step-00000010")["step"] == 10


def test_keep_last_deletes_nothing_without_a_final_checkpoint(tmp_path):
    stages = [tmp_path / "00-a", tmp_path / "01-b"]
    _save(stages[0], "a", 5)
    assert resume.keep_last(stages) == []
    assert resume.latest_checkpoint(stages[0]) == stages[0] / "a-step-00000005"


def test_checkpoints_get_the_umasks_modes(tmp_path):
    previous = os.umask(0o027)
    try:
        folder = _save(tmp_path / "ck", "main", 1)
    finally:
        os.umask(previous)
    assert folder.stat().st_mode & 0o777 == 0o750
    modes = {f.name: f.stat().st_mode & 0o777 for f in folder.iterdir()}
    assert modes == {"model.safetensors": 0o640, "state.safetensors": 0o640, "state.json": 0o640}


def test_keep_last_n_keeps_the_last_stages_newest_n(tmp_path):
    stages = [tmp_path / "00-dense", tmp_path / "01-prune"]
    for root in stages:
        for step in (4, 8, 12):
            _save(root, root.name[3:], step, keep=None)
    resume.keep_last(stages, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["01-prune"]
    assert sorted(p.name for p in stages[1].iterdir() if p.is_dir()) == [
        "prune-step-00000008",
        "prune-step-00000012",
    ]

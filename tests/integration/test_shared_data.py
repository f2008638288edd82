"""The real SST-2 and CommonsenseQA files under ../shared/data load with the right counts.

Read by path (never copied into the repo); skipped when the folder is absent.
"""

from __future__ import annotations

from collections import Counter

import pytest

from recipec.tasks import load_task
from recipec.tasks.data import make_dataloader

pytestmark = pytest.mark.integration


def test_sst2_folder(shared_data_dir, embedded_tokenizer):
    folder = shared_data_dir / "sst2"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    td = load_task(data=[folder])
    assert td.info.name == "glue/sst2"
    assert td.info.kind == "classification" and td.info.num_labels == 2
    assert (len(td.train), len(td.eval)) == (67_349, 872)
    assert set(Counter(e.label for e in td.train)) == {0, 1}
    assert all(e.text and e.text_pair is None for e in td.train)
    assert any("test.tsv" in n for n in td.notes)  # the unlabelled test split is ignored
    batch = next(
        iter(
            make_dataloader(td.eval, embedded_tokenizer, td.info, batch_size=16, max_seq_length=128)
        )
    )
    assert batch["input_ids"].shape[0] == 16 and batch["input_ids"].shape[1] <= 128


def test_sst2_explicit_files(shared_data_dir):
    folder = shared_data_dir / "sst2"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    td = load_task("sst2", data=[folder / "train.tsv", folder / "dev.tsv"], max_train=1000)
    assert (len(td.train), len(td.eval)) == (1000, 872)


def test_csqa_folder(shared_data_dir, embedded_tokenizer):
    folder = shared_data_dir / "csqa"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    td = load_task(data=folder)
    assert td.info.name == "tau/commonsense_qa"
    assert td.info.kind == "multiple_choice" and td.info.num_choices == 5
    assert (len(td.train), len(td.eval)) == (9_741, 1_221)
    assert all(len(e.choices) == 5 and 0 <= e.label < 5 for e in td.train + td.eval)
    assert set(Counter(e.label for e in td.eval)) == set(range(5))
    assert any("test_rand_split_no_answers" in n for n in td.notes)
    loader = make_dataloader(td.eval, embedded_tokenizer, td.info, batch_size=4, max_seq_length=64)
    batch = next(iter(loader))
    assert batch["input_ids"].shape[:2] == (4, 5)
    assert batch["labels"].shape == (4,)

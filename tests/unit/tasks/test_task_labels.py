"""Labels that look accidental are refused, what was inferred is said, and bad bytes are named.

Issue #22 (silent wrong results, tracebacks on bad data files, GLUE's headerless CoLA) and
#24 (the metric followed the folder name).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipec.tasks import TaskError, load_task


def rows_tsv(path: Path, labels: list, header: str = "sentence\tlabel") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(f"sentence number {i}\t{lab}\n" for i, lab in enumerate(labels))
    path.write_text(f"{header}\n{body}", encoding="utf-8")
    return path


BINARY = [i % 2 for i in range(40)]


@pytest.fixture
def dev(tmp_path):
    return rows_tsv(tmp_path / "dev.tsv", BINARY[:10])


# ---------------------------------------------------------------------- accidental labels


def test_a_stray_class_id_is_refused_not_an_8_class_head(tmp_path, dev):
    train = rows_tsv(tmp_path / "train.tsv", [*BINARY, 7])
    with pytest.raises(TaskError) as info:
        load_task(data=[train, dev])
    message = str(info.value)
    assert message.startswith(f"{train}:42: class ids 0-1, 7 skip 2-6"), message
    assert "--labels" in message


def test_listing_the_classes_accepts_them(tmp_path, dev):
    train = rows_tsv(tmp_path / "train.tsv", [*BINARY, 7])
    td = load_task(data=[train, dev], labels=["0", "1", "7"])
    assert td.info.num_labels == 3 and td.info.label_names == ("0", "1", "7")
    assert [e.label for e in td.train][-1] == 2
    with pytest.raises(TaskError, match=r"train\.tsv:42: label '7' is not one of --labels"):
        load_task(data=[train, dev], labels=["0", "1"])


def test_one_float_among_integers_is_refused_not_regression(tmp_path, dev):
    train = rows_tsv(tmp_path / "train.tsv", [*BINARY, 0.5])
    with pytest.raises(TaskError) as info:
        load_task(data=[train, dev])
    message = str(info.value)
    assert message.startswith(f"{train}:42: label 0.5 is a decimal, but 50 of the 51"), message
    assert "--task-kind classification" in message and "--task-kind regression" in message
    td = load_task(data=[train, dev], task_kind="regression")
    assert td.info.kind == "regression" and td.train[-1].label == 0.5
    with pytest.raises(TaskError, match=r"train\.tsv:42: label '0.5' should be a class id"):
        load_task(data=[train, dev], task_kind="classification")


def test_decimals_alone_are_regression_and_integers_alone_classes(tmp_path):
    scores = rows_tsv(tmp_path / "s" / "train.tsv", [f"{i / 8:.3f}" for i in range(40)])
    sdev = rows_tsv(tmp_path / "s" / "dev.tsv", ["1.250", "3.000"])
    assert load_task(data=[scores, sdev]).info.kind == "regression"
    ids = rows_tsv(tmp_path / "c" / "train.tsv", [i % 3 for i in range(40)])
    cdev = rows_tsv(tmp_path / "c" / "dev.tsv", [0, 1, 2])
    td = load_task(data=[ids, cdev])
    assert td.info.kind == "classification" and td.info.num_labels == 3


def test_dev_labels_unseen_in_train_are_refused(tmp_path):
    train = rows_tsv(tmp_path / "train.tsv", BINARY)
    dev = rows_tsv(tmp_path / "dev.tsv", [0, 1, 2])
    with pytest.raises(TaskError, match=r"dev\.tsv:4: class 2 is in the eval file but not in"):
        load_task(data=[train, dev])
    names = rows_tsv(tmp_path / "n" / "train.tsv", ["neg", "pos"] * 20)
    ndev = rows_tsv(tmp_path / "n" / "dev.tsv", ["neg", "pos", "neutral"])
    with pytest.raises(TaskError, match=r"class neutral is in the eval file"):
        load_task(data=[names, ndev])


def test_a_train_file_with_one_class_is_refused(tmp_path, dev):
    train = rows_tsv(tmp_path / "train.tsv", [1] * 40)
    with pytest.raises(TaskError, match=r"train\.tsv: every train example has the label '1'"):
        load_task(data=[train, dev])


def test_a_class_seen_once_is_refused_as_a_likely_typo(tmp_path):
    train = rows_tsv(tmp_path / "train.tsv", ["negative", "positive"] * 20 + ["positve"])
    dev = rows_tsv(tmp_path / "dev.tsv", ["negative", "positive"])
    with pytest.raises(TaskError, match=r"train\.tsv:42: class 'positve' appears in this row"):
        load_task(data=[train, dev])
    td = load_task(data=[train, dev], labels=["negative", "positive", "positve"])
    assert td.info.num_labels == 3


def test_ids_counting_from_one_leave_a_gap_at_zero(tmp_path):
    train = rows_tsv(tmp_path / "train.tsv", [1 + i % 5 for i in range(40)])
    dev = rows_tsv(tmp_path / "dev.tsv", [1, 2, 3, 4, 5])
    with pytest.raises(TaskError, match=r"class ids 1-5 skip 0"):
        load_task(data=[train, dev])
    td = load_task(data=[train, dev], labels=[str(i) for i in range(1, 6)])
    assert td.info.num_labels == 5 and min(e.label for e in td.train) == 0


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("9" * 5000, r"class id 9{20}\.\.\. is too large"),
        ("123456789", r"class id 123456789 is too large"),
        ("1e999", r"label 1e999 is not a finite number"),
    ],
    ids=["5000-digit id", "9-digit id", "infinite score"],
)
def test_huge_numbers_in_labels_are_refused(tmp_path, dev, label, message):
    labels = [*BINARY, label] if label != "1e999" else [*(f"{i}.5" for i in range(40)), label]
    train = rows_tsv(tmp_path / "train.tsv", labels)
    with pytest.raises(TaskError, match=rf"train\.tsv:42: {message}"):
        load_task(data=[train, dev] if label != "1e999" else [train, train])


def test_huge_integers_in_json_labels_are_refused(tmp_path):
    train = tmp_path / "train.jsonl"
    rows = [json.dumps({"text": f"t{i}", "label": i % 2}) for i in range(30)]
    train.write_text("\n".join([*rows, '{"text": "big", "label": ' + "7" * 5000 + "}"]) + "\n")
    with pytest.raises(TaskError, match=r"train\.jsonl:31: unreadable JSON value"):
        load_task(data=[train, train])
    train.write_text("\n".join([*rows, '{"text": "big", "label": ' + "7" * 100 + "}"]) + "\n")
    with pytest.raises(TaskError, match=r"train\.jsonl:31: class id 7+ is too large"):
        load_task(data=[train, train])


def test_a_label_that_is_a_json_object_is_refused(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": {"x": [1]}}\n')
    with pytest.raises(TaskError, match=r"train\.jsonl:2: the label must be a number or a string"):
        load_task(data=[train, train])


# ---------------------------------------------------------------------- what was inferred


def test_the_inferred_task_labels_and_counts_are_in_the_notes(tmp_path, dev):
    train = rows_tsv(tmp_path / "reviews" / "train.tsv", BINARY)
    td = load_task(data=[train, dev])
    notes = "\n".join(td.notes)
    assert "task 'reviews' (the data folder's name): not a known task name" in notes
    assert "classification, 2 classes (integer labels: class ids)" in notes
    assert "labels: train {0: 20, 1: 20}, eval {0: 5, 1: 5}" in notes
    assert "primary metric accuracy: the default for classification data" in notes


def _mrpc(folder: Path) -> Path:
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    for split, n in (("train", 30), ("dev", 9)):
        body = "".join(
            f"{int(i % 3 != 0)}\t{i}\t{i + 1}\tfirst {i}\tsecond {i}\n" for i in range(n)
        )
        (folder / f"{split}.tsv").parent.mkdir(parents=True, exist_ok=True)
        (folder / f"{split}.tsv").write_text(f"{header}\n{body}")
    return folder


def test_the_metric_says_why_and_metric_chooses(tmp_path):
    """#24: the same MRPC files in folders named mrpc and microsoft_original."""
    by_name = load_task(data=_mrpc(tmp_path / "mrpc"))
    assert by_name.info.primary_metric == "f1"
    notes = "\n".join(by_name.notes)
    assert "task glue/mrpc: the data folder is named 'mrpc', like this known task" in notes
    assert "primary metric f1: glue/mrpc's standard metric" in notes
    other = load_task(data=_mrpc(tmp_path / "microsoft_original"))
    assert other.info.primary_metric == "accuracy"
    assert "primary metric accuracy: the default for classification" in "\n".join(other.notes)
    chosen = load_task(data=tmp_path / "microsoft_original", metric="f1")
    assert chosen.info.primary_metric == "f1" and "primary metric f1 (--metric)" in chosen.notes
    mcc = load_task(data=tmp_path / "mrpc", metric="mcc")
    assert mcc.info.primary_metric == "mcc" and "mcc" in mcc.info.metrics
    with pytest.raises(TaskError, match="--metric spearman: a classification task is scored"):
        load_task(data=tmp_path / "mrpc", metric="spearman")
    assert load_task(metric="mcc").info.primary_metric == "mcc"  # the built-in task too


# ---------------------------------------------------------------------- bytes and layouts


def test_non_utf8_bytes_name_the_file_line_and_offset(tmp_path, dev):
    train = tmp_path / "train.tsv"
    train.write_bytes(b"sentence\tlabel\ngood\t1\ncaf\xe9\t0\n")
    with pytest.raises(TaskError) as info:
        load_task(data=[train, dev])
    assert str(info.value) == (
        f"{train}:3: not UTF-8 text (byte 0xe9 at byte offset 25); save the file as UTF-8"
    )


def test_binary_and_utf16_files_are_named(tmp_path, dev):
    binary = tmp_path / "train.tsv"
    binary.write_bytes(b"sentence\tlabel\n\x89PNG\x00\x00\x01")
    with pytest.raises(TaskError, match=r"train\.tsv:2: not a text file \(a NUL byte at byte"):
        load_task(data=[binary, dev])
    utf16 = tmp_path / "u.tsv"
    utf16.write_bytes("sentence\tlabel\na\t1\n".encode("utf-16"))
    with pytest.raises(TaskError, match=r"u\.tsv: the file is UTF-16 text; save it as UTF-8"):
        load_task(data=[utf16, dev])


def test_deeply_nested_json_is_a_clear_error(tmp_path):
    array = tmp_path / "train.json"
    array.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(TaskError, match=r"train\.json: JSON nested too deeply"):
        load_task(data=[array, array])
    lines = tmp_path / "train.jsonl"
    lines.write_text('{"text": "a", "label": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(TaskError, match=r"train\.jsonl:1: JSON nested too deeply"):
        load_task(data=[lines, lines])


COLA = [
    "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.",
    "gj04\t1\t\tOne more pseudo generalization and I'm giving up.",
    "gj04\t0\t*\tThey drank the pub.",
    "bc01\t0\t*\tThe more we study verbs, the crazier they get get.",
    "clc95\t1\t\tDay by day the facts are getting murkier.",
]


def test_glue_cola_headerless_tsv_is_recognised(tmp_path):
    folder = tmp_path / "CoLA"
    folder.mkdir()
    (folder / "train.tsv").write_text("\n".join(COLA) + "\n")
    (folder / "dev.tsv").write_text("\n".join(COLA[2:]) + "\n")
    td = load_task(data=folder)
    assert td.info.name == "glue/cola" and td.info.primary_metric == "mcc"
    assert td.train[0].text.startswith("Our friends won't buy") and td.train[0].label == 1
    assert [e.label for e in td.train] == [1, 1, 0, 0, 1] and len(td.eval) == 3
    assert any("no header; read as GLUE CoLA" in n for n in td.notes)


def test_a_headerless_file_of_another_layout_says_to_add_a_header(tmp_path, dev):
    train = tmp_path / "train.tsv"
    train.write_text("a fine film\t1\na dull film\t0\n")
    with pytest.raises(TaskError, match=r"train\.tsv:1: the first line looks like data"):
        load_task(data=[train, dev])


def test_messages_show_the_command_line_form_of_data(tmp_path):
    train = rows_tsv(tmp_path / "train.tsv", BINARY)
    with pytest.raises(TaskError) as info:
        load_task(data=[train])
    assert "--data TRAIN EVAL" in str(info.value) and "data=[" not in str(info.value)
    with pytest.raises(TaskError, match="got 3 paths: --data TRAIN EVAL"):
        load_task(data=[train, train, train])

"""Task loading (local formats, errors, faked hub, built-in task) and batching (recipec.tasks.data)."""

from __future__ import annotations

import json
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from recipec.tasks import (
    Example,
    TaskError,
    TaskInfo,
    known_tasks,
    load_task,
    resolve_task_name,
)
from recipec.tasks import builtin as builtin_task
from recipec.tasks.data import Collator, epoch_permutation, make_dataloader


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


SST_TRAIN = "sentence\tlabel\na bright and lively picture \t1\nslow , muddled and far too long \t0\nwarm \t1\n"
SST_DEV = "sentence\tlabel\nthe cast seems bored \t0\na quiet triumph \t1\n"


# ------------------------------------------------------------------------------------------
# Local text formats
# ------------------------------------------------------------------------------------------


def test_tsv_folder_sst2_layout(tmp_path):
    d = tmp_path / "mydata"
    write(d / "train.tsv", SST_TRAIN)
    write(d / "dev.tsv", SST_DEV)
    write(d / "test.tsv", "index\tsentence\n0\tnothing to see here\n")
    td = load_task(data=[str(d)])
    assert td.info.name == "mydata"
    assert td.info.kind == "classification" and td.info.num_labels == 2
    assert td.train[0] == Example("a bright and lively picture", None, 1)
    assert [e.label for e in td.train] == [1, 0, 1]
    assert len(td.eval) == 2
    assert any("test.tsv" in n for n in td.notes), td.notes


def test_folder_named_like_known_task_gets_its_metrics(tmp_path):
    d = tmp_path / "sst2"
    write(d / "train.tsv", SST_TRAIN)
    write(d / "dev.tsv", SST_DEV)
    td = load_task(data=d)
    assert td.info.name == "glue/sst2"
    assert td.info.primary_metric == "accuracy"


def test_task_given_as_a_path(tmp_path):
    d = tmp_path / "reviews"
    write(d / "train.tsv", SST_TRAIN)
    write(d / "validation.tsv", SST_DEV)
    assert len(load_task(str(d)).train) == 3


def test_tsv_pairs_with_string_labels(tmp_path):
    train = write(
        tmp_path / "train.tsv",
        "index\tsentence1\tsentence2\tlabel\n"
        "0\tthe dog sleeps\ta dog is asleep\tentailment\n"
        "1\tthe cup is empty\tthe cup is full\tcontradiction\n"
        "2\ttwo birds sing\tit rains\tneutral\n",
    )
    dev = write(
        tmp_path / "dev.tsv",
        "index\tsentence1\tsentence2\tlabel\n0\ta man runs\tsomeone moves\tentailment\n",
    )
    td = load_task("nli", data=[train, dev])
    assert td.info.name == "nli"
    assert td.info.label_names == ("contradiction", "entailment", "neutral")
    assert td.train[0] == Example("the dog sleeps", "a dog is asleep", 1)
    assert td.eval[0].label == 1


def test_known_task_fixes_label_order(tmp_path):
    header = "index\tsentence1\tsentence2\tlabel\n"
    train = write(tmp_path / "train.tsv", header + "0\ta\tb\tnot_entailment\n1\tc\td\tentailment\n")
    dev = write(tmp_path / "dev.tsv", header + "0\te\tf\tnot_entailment\n")
    td = load_task("rte", data=[train, dev])
    assert td.info.label_names == ("entailment", "not_entailment")
    assert [e.label for e in td.train] == [1, 0]


def test_tsv_question_sentence_columns(tmp_path):
    header = "index\tquestion\tsentence\tlabel\n"
    train = write(
        tmp_path / "t.tsv",
        header + "0\twho baked it?\tmy aunt baked the bread.\t0\n1\twhen?\tat noon.\t1\n",
    )
    dev = write(tmp_path / "d.tsv", header + "0\twhere?\tin the hall.\t1\n")
    td = load_task(data=[train, dev])
    assert (
        td.train[0].text == "who baked it?" and td.train[0].text_pair == "my aunt baked the bread."
    )


def test_tsv_float_scores_are_regression(tmp_path):
    header = "sentence1\tsentence2\tscore\n"
    train = write(tmp_path / "train.tsv", header + "a cat\ta kitten\t4.200\nred\tblue\t0.500\n")
    dev = write(tmp_path / "dev.tsv", header + "run\tjog\t3.750\n")
    td = load_task(data=[train, dev])
    assert td.info.kind == "regression" and td.info.num_labels == 1
    assert td.info.primary_metric in td.info.metrics
    assert td.train[0].label == pytest.approx(4.2)
    assert isinstance(td.eval[0].label, float)


def test_csv_with_quotes(tmp_path):
    train = write(
        tmp_path / "train.csv",
        'text,label\n"fine, really fine",1\n"she said ""no"" twice",0\nplain,2\n',
    )
    dev = write(tmp_path / "dev.csv", "text,label\nother,0\n")
    td = load_task(data=[train, dev])
    assert td.train[0].text == "fine, really fine"
    assert td.train[1].text == 'she said "no" twice'
    assert td.info.num_labels == 3
    assert "f1" in td.info.metrics


def test_jsonl_text_pairs_and_float_labels(tmp_path):
    train = jsonl(
        tmp_path / "train.jsonl",
        [
            {"text": "a", "text_pair": "b", "label": 0.5},
            {"text": "c", "text_pair": "d", "label": 2.0},
        ],
    )
    dev = jsonl(tmp_path / "dev.jsonl", [{"text": "e", "text_pair": "f", "label": 1.25}])
    td = load_task(data=[train, dev])
    assert td.info.kind == "regression"
    assert td.train[1] == Example("c", "d", 2.0)


def test_jsonl_sentence_int_labels(tmp_path):
    train = jsonl(
        tmp_path / "train.jsonl", [{"sentence": "x", "label": 1}, {"sentence": "y", "label": 0}]
    )
    dev = jsonl(tmp_path / "dev.jsonl", [{"sentence": "z", "label": 1}])
    td = load_task(data=[train, dev])
    assert td.info.kind == "classification" and td.train[0] == Example("x", None, 1)


def _csqa_row(stem: str, texts: list[str], key: str | None) -> dict:
    row = {
        "id": stem[:4],
        "question": {
            "question_concept": "thing",
            "stem": stem,
            "choices": [{"label": lab, "text": t} for lab, t in zip("ABCDE", texts)],
        },
    }
    if key is not None:
        row["answerKey"] = key
    return row


def test_commonsenseqa_folder(tmp_path):
    d = tmp_path / "csqa"
    five = ["kitchen", "garage", "moon", "shoe", "river"]
    jsonl(
        d / "train_rand_split.jsonl",
        [_csqa_row("where is a pan kept?", five, "A"), _csqa_row("what rolls?", five, "E")],
    )
    jsonl(d / "dev_rand_split.jsonl", [_csqa_row("what is round?", five, "C")])
    jsonl(d / "test_rand_split_no_answers.jsonl", [_csqa_row("unlabelled?", five, None)])
    td = load_task(data=d)
    assert td.info.name == "tau/commonsense_qa"
    assert td.info.kind == "multiple_choice" and td.info.num_choices == 5
    assert td.train[0] == Example("where is a pan kept?", None, 0, tuple(five))
    assert td.train[1].label == 4 and td.eval[0].label == 2
    assert any("test_rand_split_no_answers" in n for n in td.notes)


def test_winogrande_jsonl(tmp_path):
    rows = [
        {
            "sentence": "the jar broke the box because _ was heavy.",
            "option1": "the jar",
            "option2": "the box",
            "answer": "1",
        },
        {
            "sentence": "anna thanked mia since _ got help.",
            "option1": "anna",
            "option2": "mia",
            "answer": "2",
        },
    ]
    train = jsonl(tmp_path / "train_xs.jsonl", rows)
    dev = jsonl(tmp_path / "dev.jsonl", rows[:1])
    td = load_task(data=[train, dev])
    assert td.info.kind == "multiple_choice" and td.info.num_choices == 2
    ex = td.train[0]
    assert ex.text == "the jar broke the box because"
    assert ex.choices == ("the jar was heavy.", "the box was heavy.")
    assert ex.label == 0 and td.train[1].label == 1


def test_max_train_subsamples_deterministically(tmp_path):
    lines = "".join(f"sentence number {i}\t{i % 2}\n" for i in range(50))
    d = tmp_path / "big"
    write(d / "train.tsv", "sentence\tlabel\n" + lines)
    write(d / "dev.tsv", "sentence\tlabel\n" + lines)
    a = load_task(data=d, max_train=10, max_eval=5, seed=3)
    b = load_task(data=d, max_train=10, max_eval=5, seed=3)
    c = load_task(data=d, max_train=10, max_eval=5, seed=4)
    assert len(a.train) == 10 and len(a.eval) == 5
    assert a.train == b.train and a.train != c.train
    numbers = [int(e.text.split()[-1]) for e in a.train]
    assert numbers == sorted(numbers)  # original order kept
    assert any("max_train" in n for n in a.notes)


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(TaskError, match="no such file"):
        load_task(data=[tmp_path / "nope.tsv", tmp_path / "dev.tsv"])


def test_missing_directory(tmp_path):
    with pytest.raises(TaskError, match="no such file or directory"):
        load_task(data=[tmp_path / "absent"])


def test_bad_tsv_row_names_file_and_line(tmp_path):
    train = write(tmp_path / "train.tsv", "sentence\tlabel\ngood\t1\nthis row lacks a label\n")
    dev = write(tmp_path / "dev.tsv", SST_DEV)
    with pytest.raises(TaskError, match=r"train\.tsv:3: expected 2 tab-separated fields"):
        load_task(data=[train, dev])


def test_bad_json_line_names_file_and_line(tmp_path):
    train = write(tmp_path / "train.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": \n')
    dev = jsonl(tmp_path / "dev.jsonl", [{"text": "c", "label": 0}])
    with pytest.raises(TaskError, match=r"train\.jsonl:2: invalid JSON"):
        load_task(data=[train, dev])


def test_mixed_label_types_name_the_line(tmp_path):
    train = write(tmp_path / "train.tsv", "sentence\tlabel\na\t1\nb\t0\nc\tmaybe\n")
    dev = write(tmp_path / "dev.tsv", SST_DEV)
    with pytest.raises(TaskError, match=r"train\.tsv:4: label 'maybe'"):
        load_task(data=[train, dev])


def test_empty_label_names_the_line(tmp_path):
    train = jsonl(
        tmp_path / "train.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": None}]
    )
    dev = jsonl(tmp_path / "dev.jsonl", [{"text": "c", "label": 0}])
    with pytest.raises(TaskError, match=r"train\.jsonl:2: row has no label"):
        load_task(data=[train, dev])


def test_bad_answer_key(tmp_path):
    five = ["a", "b", "c", "d", "e"]
    train = jsonl(tmp_path / "train.jsonl", [_csqa_row("q?", five, "Z")])
    dev = jsonl(tmp_path / "dev.jsonl", [_csqa_row("q?", five, "A")])
    with pytest.raises(TaskError, match=r"train\.jsonl:1: answerKey 'Z'"):
        load_task(data=[train, dev])


def test_unlabelled_test_split_is_rejected(tmp_path):
    train = write(tmp_path / "train.tsv", SST_TRAIN)
    test = write(tmp_path / "test.tsv", "index\tsentence\n0\tno label here\n")
    with pytest.raises(TaskError, match="no labels found"):
        load_task(data=[train, test])


def test_header_only_file_is_empty(tmp_path):
    train = write(tmp_path / "train.tsv", "sentence\tlabel\n")
    dev = write(tmp_path / "dev.tsv", SST_DEV)
    with pytest.raises(TaskError, match="no examples"):
        load_task(data=[train, dev])


def test_unrecognised_header(tmp_path):
    train = write(tmp_path / "train.tsv", "foo\tbar\n1\t2\n")
    dev = write(tmp_path / "dev.tsv", SST_DEV)
    with pytest.raises(TaskError, match=r"train\.tsv:1: header"):
        load_task(data=[train, dev])


def test_folder_without_dev_file(tmp_path):
    write(tmp_path / "d" / "train.tsv", SST_TRAIN)
    with pytest.raises(TaskError, match="no dev/validation file"):
        load_task(data=tmp_path / "d")


def test_unknown_task_lists_known_names():
    with pytest.raises(TaskError) as info:
        load_task("glue/not-a-task")
    message = str(info.value)
    assert "Unknown task 'glue/not-a-task'" in message
    for name in ("builtin", "glue/sst2", "tau/commonsense_qa"):
        assert name in message


def test_known_task_kind_mismatch(tmp_path):
    train = write(tmp_path / "train.tsv", SST_TRAIN)
    dev = write(tmp_path / "dev.tsv", SST_DEV)
    with pytest.raises(TaskError, match="multiple-choice task"):
        load_task("csqa", data=[train, dev])


def test_resolve_task_name_aliases():
    assert resolve_task_name("SST-2") == "glue/sst2"
    assert resolve_task_name("glue/sst2") == "glue/sst2"
    assert resolve_task_name("sts-b") == "glue/stsb"
    assert resolve_task_name("csqa") == "tau/commonsense_qa"
    assert resolve_task_name("winogrande") == "allenai/winogrande"
    assert resolve_task_name("built-in") == "builtin"
    assert resolve_task_name("imdb") is None
    assert known_tasks()[0] == "builtin"


# ------------------------------------------------------------------------------------------
# Hub path (faked datasets module; the real one is an optional extra)
# ------------------------------------------------------------------------------------------


def test_hub_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(TaskError, match=r"recipec\[hub\]") as info:
        load_task("glue/sst2")
    assert "local files" in str(info.value)


def _fake_datasets(monkeypatch, splits: dict | Exception) -> list:
    calls: list = []

    def load_dataset(path, name=None):
        calls.append((path, name))
        if isinstance(splits, Exception):
            raise splits
        return splits

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hub_unreachable(monkeypatch):
    _fake_datasets(monkeypatch, ConnectionError("no route to host"))
    with pytest.raises(TaskError, match="may be offline"):
        load_task("mrpc")


def test_hub_glue_rows(monkeypatch):
    calls = _fake_datasets(
        monkeypatch,
        {
            "train": [
                {"sentence": "nice", "label": 1, "idx": 0},
                {"sentence": "meh", "label": 0, "idx": 1},
            ],
            "validation": [{"sentence": "ok", "label": 1, "idx": 0}],
            "test": [{"sentence": "?", "label": -1, "idx": 0}],
        },
    )
    td = load_task("sst2")
    assert calls == [("nyu-mll/glue", "sst2")]
    assert td.info.name == "glue/sst2" and td.info.source.startswith("hf:")
    assert td.train[0] == Example("nice", None, 1) and len(td.eval) == 1


def test_hub_stsb_is_regression(monkeypatch):
    _fake_datasets(
        monkeypatch,
        {
            "train": [{"sentence1": "a", "sentence2": "b", "label": 3.0}],
            "validation": [{"sentence1": "c", "sentence2": "d", "label": 1.5}],
        },
    )
    td = load_task("glue/stsb")
    assert td.info.kind == "regression" and td.train[0] == Example("a", "b", 3.0)


def test_hub_commonsense_qa_flat_layout(monkeypatch):
    choices = {"label": list("ABCDE"), "text": ["w", "x", "y", "z", "v"]}
    _fake_datasets(
        monkeypatch,
        {
            "train": [
                {
                    "id": "1",
                    "question": "pick y",
                    "question_concept": "c",
                    "choices": choices,
                    "answerKey": "C",
                }
            ],
            "validation": [
                {
                    "id": "2",
                    "question": "pick w",
                    "question_concept": "c",
                    "choices": choices,
                    "answerKey": "A",
                }
            ],
        },
    )
    td = load_task("tau/commonsense_qa")
    assert td.info.num_choices == 5
    assert td.train[0] == Example("pick y", None, 2, ("w", "x", "y", "z", "v"))


def test_hub_winogrande(monkeypatch):
    calls = _fake_datasets(
        monkeypatch,
        {
            "train": [{"sentence": "_ won.", "option1": "ada", "option2": "bo", "answer": "2"}],
            "validation": [
                {"sentence": "it was _.", "option1": "red", "option2": "tall", "answer": "1"}
            ],
        },
    )
    td = load_task("winogrande")
    assert calls == [("allenai/winogrande", "winogrande_xl")]
    assert td.train[0] == Example("", None, 1, ("ada won.", "bo won."))


# ------------------------------------------------------------------------------------------
# Built-in task
# ------------------------------------------------------------------------------------------


def test_builtin_defaults_and_determinism():
    a = load_task()
    b = load_task("builtin")
    assert (len(a.train), len(a.eval)) == (
        builtin_task.DEFAULT_TRAIN_SIZE,
        builtin_task.DEFAULT_EVAL_SIZE,
    )
    assert a.train == b.train and a.eval == b.eval
    assert a.info.kind == "classification" and a.info.num_labels == 2
    c = load_task(seed=1)
    assert [e.text for e in c.train] != [e.text for e in a.train]


def test_builtin_sizes_balance_and_disjoint_splits():
    td = load_task(max_train=300, max_eval=101, seed=5)
    assert len(td.train) == 300 and len(td.eval) == 101
    assert Counter(e.label for e in td.train) == {0: 150, 1: 150}
    assert abs(sum(e.label for e in td.eval) - 50.5) <= 0.5
    assert not {e.text for e in td.eval} & {e.text for e in td.train}


def test_builtin_not_solvable_by_one_token():
    td = load_task()
    examples = td.train
    vocab = {w for e in examples for w in e.text.replace(",", " ").split()}
    best = 0.0
    for word in vocab:
        has = [word in e.text.replace(",", " ").split() for e in examples]
        # best rule "label = c if word present else 1 - c" (or constant)
        hits = sum(h == bool(e.label) for h, e in zip(has, examples)) / len(examples)
        best = max(best, hits, 1 - hits)
    assert best < 0.6, f"a single token predicts {best:.0%} of labels"


def test_builtin_every_adjective_occurs_with_both_labels():
    seen: dict[str, set[int]] = {}
    for e in load_task().train:
        for w in e.text.replace(",", " ").split():
            if w in builtin_task.POSITIVE_WORDS + builtin_task.NEGATIVE_WORDS:
                seen.setdefault(w, set()).add(e.label)
    assert len(seen) == len(builtin_task.POSITIVE_WORDS) + len(builtin_task.NEGATIVE_WORDS)
    assert all(labels == {0, 1} for labels in seen.values())


def test_builtin_negation_flips_label():
    plain, y_plain = builtin_task.compose("soup", "great", verb="was")
    negated, y_neg = builtin_task.compose("soup", "great", negated_verb="was not")
    double, y_double = builtin_task.compose(
        "soup", "great", negated_verb="was not", outer_negation="it is not true that"
    )
    assert (plain, y_plain) == ("the soup was great", 1)
    assert (negated, y_neg) == ("the soup was not great", 0)
    assert (double, y_double) == ("it is not true that the soup was not great", 1)


def test_builtin_contrast_clause_does_not_change_label():
    for template in builtin_task.CONTRAST_BEFORE + builtin_task.CONTRAST_AFTER:
        text, label = builtin_task.compose(
            "movie", "dull", contrast="the menu was lovely", contrast_template=template
        )
        assert label == 0 and "lovely" in text and "dull" in text


def test_builtin_sentences_are_short(embedded_tokenizer):
    td = load_task()
    lengths = [len(embedded_tokenizer(e.text)["input_ids"]) for e in td.train + td.eval]
    assert max(lengths) <= 32  # including [CLS] and [SEP]
    assert max(len(e.text.split()) for e in td.train + td.eval) <= 24


@pytest.mark.slow
def test_builtin_is_learnable_by_minilm():
    """MiniLM reaches > 85% dev accuracy within 150 steps of batch 32 (a few minutes on CPU)."""
    import torch

    from recipec.models import load_model_and_tokenizer
    from recipec.tasks.data import make_dataloader
    from recipec.tasks.metrics import compute_metrics

    torch.manual_seed(0)
    td = load_task(max_eval=200)
    model, tok = load_model_and_tokenizer(None, td.info)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    loader = make_dataloader(td.train, tok, td.info, batch_size=32, shuffle=True, seed=0)
    model.train()
    step = 0
    while step < 150:
        for batch in loader:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
            step += 1
            if step == 150:
                break
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in make_dataloader(td.eval, tok, td.info, batch_size=100):
            logits.append(model(**batch).logits)
            labels.append(batch["labels"])
    acc = compute_metrics(td.info, torch.cat(logits), torch.cat(labels))["accuracy"]
    assert acc > 0.85


# ------------------------------------------------------------------------------------------
# Batching (recipec.tasks.data): dynamic padding, multiple-choice shapes, exact resume
# ------------------------------------------------------------------------------------------
CLS = TaskInfo("t", "classification", 2)
REG = TaskInfo("r", "regression", 1, metrics=("pearson",), primary_metric="pearson")
MC = TaskInfo("m", "multiple_choice", 3, num_choices=3)


def sentences(n: int) -> list[Example]:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    return [Example(" ".join(words[: 1 + (i * 7) % 10]), None, i % 2) for i in range(n)]


class CountingTokenizer:
    """Wraps a tokenizer and counts how many texts it has been asked to encode."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.texts = 0

    def __call__(self, first, *args, **kwargs):
        self.texts += len(first)
        return self.tokenizer(first, *args, **kwargs)


def test_epoch_permutation_is_deterministic_and_differs_per_epoch():
    a = epoch_permutation(100, seed=7, epoch=0)
    assert sorted(a.tolist()) == list(range(100))
    np.testing.assert_array_equal(a, epoch_permutation(100, seed=7, epoch=0))
    assert not np.array_equal(a, epoch_permutation(100, seed=7, epoch=1))
    assert not np.array_equal(a, epoch_permutation(100, seed=8, epoch=0))


def test_dynamic_padding(embedded_tokenizer):
    examples = [
        Example("short one", None, 0),
        Example("a clearly much longer sentence than the other", None, 1),
    ]
    loader = make_dataloader(examples, embedded_tokenizer, CLS, batch_size=2, max_seq_length=128)
    (batch,) = list(loader)
    longest = max(len(embedded_tokenizer(e.text)["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == (2, longest)
    assert batch["attention_mask"].sum(1).tolist() == [4, longest]
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [0, 1]


def test_truncation_to_max_seq_length(embedded_tokenizer):
    examples = [Example("word " * 100, "other " * 100, 0)]
    batch = Collator(embedded_tokenizer, CLS, max_seq_length=16)(examples)
    assert batch["input_ids"].shape == (1, 16)
    assert "token_type_ids" in batch and batch["token_type_ids"][0, -2] == 1


def test_regression_labels_are_float(embedded_tokenizer):
    batch = Collator(embedded_tokenizer, REG)([Example("a", "b", 2.5), Example("c", "d", 0.0)])
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == [2.5, 0.0]


def test_unlabelled_batch_has_no_labels(embedded_tokenizer):
    batch = Collator(embedded_tokenizer, CLS)([Example("a"), Example("b")])
    assert "labels" not in batch


def test_multiple_choice_shape(embedded_tokenizer):
    examples = [
        Example("where do fish live?", None, 1, ("in trees", "in the sea", "on the moon today")),
        Example("what is cold?", None, 0, ("ice", "fire", "sun")),
    ]
    batch = Collator(embedded_tokenizer, MC, max_seq_length=64)(examples)
    seq = batch["input_ids"].shape[-1]
    assert batch["input_ids"].shape == (2, 3, seq)
    assert batch["attention_mask"].shape == (2, 3, seq)
    assert batch["labels"].tolist() == [1, 0]
    # each row is [CLS] question [SEP] choice [SEP]
    decoded = embedded_tokenizer.decode(batch["input_ids"][0, 1], skip_special_tokens=True)
    assert decoded == "where do fish live? in the sea"


def test_multiple_choice_wrong_choice_count(embedded_tokenizer):
    with pytest.raises(ValueError, match="expected 3 choices"):
        Collator(embedded_tokenizer, MC)([Example("q", None, 0, ("a", "b"))])


def test_multiple_choice_runs_through_tiny_model(embedded_tokenizer, make_tiny_bert):
    model = make_tiny_bert("multiple_choice")
    examples = [
        Example("q one", None, 2, ("x", "y", "z")),
        Example("q two", None, 0, ("u", "v", "w")),
    ]
    out = model(**Collator(embedded_tokenizer, MC)(examples))
    assert out.logits.shape == (2, 3) and out.loss.ndim == 0


def test_loader_covers_every_example_once(embedded_tokenizer):
    loader = make_dataloader(
        sentences(23), embedded_tokenizer, CLS, batch_size=5, shuffle=True, seed=1
    )
    assert len(loader) == loader.batches_per_epoch == 5
    indices = np.concatenate(loader.batch_indices())
    assert sorted(indices.tolist()) == list(range(23))
    assert [b["input_ids"].shape[0] for b in loader] == [5, 5, 5, 5, 3]


def test_drop_last(embedded_tokenizer):
    loader = make_dataloader(sentences(23), embedded_tokenizer, CLS, batch_size=5, drop_last=True)
    assert len(loader) == 4


def test_start_batch_resumes_the_same_batches_without_tokenising_skipped(embedded_tokenizer):
    examples = sentences(40)
    full = list(
        make_dataloader(
            examples, embedded_tokenizer, CLS, batch_size=6, shuffle=True, seed=3, epoch=2
        )
    )
    counting = CountingTokenizer(embedded_tokenizer)
    resumed = make_dataloader(
        examples, counting, CLS, batch_size=6, shuffle=True, seed=3, epoch=2, start_batch=4
    )
    assert len(resumed) == len(full) - 4
    rest = list(resumed)
    assert len(rest) == len(full) - 4
    for a, b in zip(full[4:], rest):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert counting.texts == 40 - 4 * 6  # skipped batches were never tokenised


def test_passes_advance_the_epoch(embedded_tokenizer):
    examples = sentences(12)
    loader = make_dataloader(
        examples, embedded_tokenizer, CLS, batch_size=4, shuffle=True, seed=0, start_batch=1
    )
    first = [b["input_ids"] for b in loader]
    assert len(first) == 2 and loader.epoch == 1 and loader.start_batch == 0
    second = [b["input_ids"] for b in loader]
    fresh = make_dataloader(
        examples, embedded_tokenizer, CLS, batch_size=4, shuffle=True, seed=0, epoch=1
    )
    assert len(second) == 3
    assert all(torch.equal(a, b["input_ids"]) for a, b in zip(second, fresh, strict=True))
    loader.set_epoch(0, start_batch=1)
    assert all(torch.equal(a, b["input_ids"]) for a, b in zip(first, loader, strict=True))


def test_unshuffled_order_is_original(embedded_tokenizer):
    loader = make_dataloader(sentences(7), embedded_tokenizer, CLS, batch_size=3)
    assert [i.tolist() for i in loader.batch_indices()] == [[0, 1, 2], [3, 4, 5], [6]]


def test_bad_start_batch(embedded_tokenizer):
    with pytest.raises(ValueError, match="start_batch"):
        make_dataloader(sentences(7), embedded_tokenizer, CLS, batch_size=3, start_batch=4)

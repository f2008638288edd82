"""Model loading: the embedded model offline, path resolution, and clear errors."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from recipec.models import (
    ModelLoadError,
    embedded_model_dir,
    load_model_and_tokenizer,
    resolve_model_path,
)
from recipec.tasks import TaskInfo

CLS3 = TaskInfo("t", "classification", 3, label_names=("a", "b", "c"))
REG = TaskInfo("r", "regression", 1, metrics=("pearson",), primary_metric="pearson")
MC = TaskInfo("m", "multiple_choice", 4, num_choices=4)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_embedded_model_dir():
    d = embedded_model_dir()
    assert (d / "config.json").is_file() and (d / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "name", [None, "embedded", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"]
)
def test_resolve_embedded_aliases(name):
    assert resolve_model_path(name) == embedded_model_dir()


def test_resolve_local_dir_and_hub_name(tmp_path):
    assert resolve_model_path(str(tmp_path)) == tmp_path.resolve()
    assert resolve_model_path("bert-base-uncased") == "bert-base-uncased"
    assert resolve_model_path("org/some-model") == "org/some-model"


def test_resolve_bad_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model folder"):
        resolve_model_path(str(tmp_path / "missing"))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="got a file"):
        resolve_model_path(f)


def test_embedded_model_classification_offline(embedded_tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="recipec.models"):
        model, tok = load_model_and_tokenizer(None, CLS3)
    assert model.config.num_labels == 3
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert model.config.problem_type == "single_label_classification"
    assert any("new classification head" in r.getMessage() for r in caplog.records)
    batch = tok(["a fine day", "rain again today"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (2, 3)


def test_embedded_model_regression_offline():
    model, _ = load_model_and_tokenizer("embedded", REG)
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"


def test_embedded_model_multiple_choice_offline(embedded_tokenizer):
    model, tok = load_model_and_tokenizer("embedded", MC)
    assert type(model).__name__.endswith("ForMultipleChoice")
    enc = tok(["q"] * 4, ["w", "x", "y", "z"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**{k: v.unsqueeze(0) for k, v in enc.items()})
    assert out.logits.shape == (1, 4)


def test_local_saved_tiny_model(tmp_path, tiny_bert, embedded_tokenizer):
    tiny_bert.save_pretrained(tmp_path)
    embedded_tokenizer.save_pretrained(tmp_path)
    model, _ = load_model_and_tokenizer(str(tmp_path), TaskInfo("t", "classification", 2))
    assert model.config.hidden_size == 32
    assert torch.equal(model.classifier.weight, tiny_bert.classifier.weight)


def test_local_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="Could not load the model config from"):
        load_model_and_tokenizer(str(tmp_path), CLS3)


def test_unreachable_hub_name_fails_fast():
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        load_model_and_tokenizer("no-such-org/no-such-model-recipec", CLS3)
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "no-such-org/no-such-model-recipec" in message
    assert "offline" in message and "Local paths work" in message


# ---------------------------------------------------------------------------- the head rule


def test_head_rule_explicit_then_task_then_architectures():
    from types import SimpleNamespace

    from recipec.models import head_for

    mc_config = SimpleNamespace(architectures=["BertForMultipleChoice"])
    assert head_for(mc_config) == "multiple-choice"
    assert head_for(SimpleNamespace(architectures=["BertModel"])) == "sequence-classification"
    assert head_for(None) == "sequence-classification"
    assert head_for(mc_config, task=CLS3) == "sequence-classification"  # the task decides
    assert head_for(None, task=MC) == "multiple-choice"
    assert head_for(mc_config, task=MC, head="sequence-classification") == (
        "sequence-classification"
    )
    with pytest.raises(ModelLoadError, match="unknown task 'tokens'"):
        head_for(None, head="tokens")


def test_teacher_gets_the_students_head_and_needs_all_its_weights(tmp_path, tiny_bert):
    from transformers import BertForMultipleChoice

    from recipec.models import head_of_model, load_teacher

    tiny_bert.save_pretrained(tmp_path / "cls")
    teacher = load_teacher(str(tmp_path / "cls"), tiny_bert)
    assert type(teacher).__name__ == "BertForSequenceClassification"
    assert torch.equal(teacher.classifier.weight, tiny_bert.classifier.weight)
    student = BertForMultipleChoice(tiny_bert.config)
    assert head_of_model(student) == "multiple-choice"
    tiny_bert.bert.save_pretrained(tmp_path / "headless")
    with pytest.raises(ModelLoadError, match="has no trained task head") as info:
        load_teacher(str(tmp_path / "headless"), tiny_bert)
    assert "classifier.weight" in str(info.value) and "--teacher auto" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="cannot load the teacher from"):
        load_teacher(str(tmp_path / "empty"), tiny_bert)

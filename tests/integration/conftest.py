"""Fixtures of the integration tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def save_tiny_bert(tiny_bert_config, embedded_tokenizer):
    """``save_tiny_bert(folder, head=False, **config)``: the suite's tiny random BERT
    (``tiny_bert_config``: dropout off unless ``config`` says otherwise; seed 0) saved with the
    real tokenizer; ``head``: with its 2-label classification head."""

    def save(folder, *, head: bool = False, **overrides):
        import torch
        from transformers import BertForSequenceClassification, BertModel

        config = tiny_bert_config.__class__.from_dict({**tiny_bert_config.to_dict(), **overrides})
        torch.manual_seed(0)
        (BertForSequenceClassification if head else BertModel)(config).save_pretrained(folder)
        embedded_tokenizer.save_pretrained(folder)
        return folder

    return save


@pytest.fixture
def tiny_encoder(tmp_path, save_tiny_bert):
    """A tiny BERT encoder without a task head (each task adds its own), with the real tokenizer
    (dropout 0.1, as a pretrained encoder has)."""
    return save_tiny_bert(
        tmp_path / "tiny-encoder", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1
    )

"""Fixtures of the integration tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def save_tiny_bert(embedded_tokenizer):
    """``save_tiny_bert(folder, head=False, **config)``: a tiny random BERT (2 layers, hidden 32,
    seed 0) saved with the real tokenizer; ``head``: with a 2-label classification head."""

    def save(folder, *, head: bool = False, **overrides):
        import torch
        from transformers import BertConfig, BertForSequenceClassification, BertModel

        config = BertConfig(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            **overrides,
        )
        torch.manual_seed(0)
        (BertForSequenceClassification if head else BertModel)(config).save_pretrained(folder)
        embedded_tokenizer.save_pretrained(folder)
        return folder

    return save


@pytest.fixture
def tiny_encoder(tmp_path, save_tiny_bert):
    """A tiny BERT encoder without a task head (each task adds its own), with the real tokenizer."""
    return save_tiny_bert(tmp_path / "tiny-encoder")

"""Fixtures of the integration tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def tiny_encoder(tmp_path, embedded_tokenizer):
    """A tiny BERT encoder without a task head (each task adds its own), with the real tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    folder = tmp_path / "tiny-encoder"
    BertModel(config).save_pretrained(folder)
    embedded_tokenizer.save_pretrained(folder)
    return folder

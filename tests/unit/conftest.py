"""Fixtures shared by the unit tests of several layers."""

from __future__ import annotations

import json

import pytest
import torch

from recipec.checkpoint import magnitude_masks, write_checkpoint
from recipec.export.onnx import export
from recipec.quant.fake import install
from recipec.quant.files import QUANT_FILE, quant_record


@pytest.fixture(scope="session")
def quantized_run(tmp_path_factory, embedded_tokenizer):
    """A run folder: a tiny BERT pruned to 80%, calibrated on random batches, exported."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    model = BertForSequenceClassification(config).eval()
    masks = magnitude_masks(model, 0.8)
    run = tmp_path_factory.mktemp("int8") / "run"
    write_checkpoint(model, run / "model", masks, embedded_tokenizer)
    quant = install(model, list(masks))
    quant.enable()
    with torch.no_grad():
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            model(input_ids=torch.randint(0, 30522, (4, 16), generator=g))
    quant.freeze()
    (run / "model" / QUANT_FILE).write_text(json.dumps(quant_record(quant)))
    result = export(run)
    return run, masks, result

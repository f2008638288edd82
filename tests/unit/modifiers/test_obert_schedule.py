"""The obert modifier on a tiny BERT reaches the planned sparsity at each pruning step."""

from __future__ import annotations

import pytest
import torch
import yaml
from modifier_helpers import count_zeros

import recipec
from recipec.recipe.load import load_recipe_text


def test_obert_modifier_reaches_the_planned_sparsity_at_each_step():
    pytest.importorskip(
        "recipec.sparsity.obs", reason="oBERT's obert_prune_step is not importable yet"
    )
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    calls = []

    def grad_batches(batch_size: int):
        g = torch.Generator().manual_seed(len(calls))
        calls.append(batch_size)
        while True:
            yield {
                "input_ids": torch.randint(0, 64, (batch_size, 12), generator=g),
                "labels": torch.randint(0, 2, (batch_size,), generator=g),
            }

    spec = {
        "type": "obert",
        "init_sparsity": 0.3,
        "final_sparsity": 0.6,
        "start_step": 0,
        "end_step": 4,
        "update_every_steps": 2,
        "num_grads": 4,
        "fisher_block_size": 16,
        "grad_batch_size": 3,
        "damp": 1e-4,
        "targets": None,
    }
    recipe = load_recipe_text(yaml.safe_dump({"training": {"steps": 6}, "modifiers": [spec]}))
    program = recipec.compile(
        recipe, model, optimizer, steps_per_epoch=6, grad_batches=grad_batches
    )
    (obert,) = program.modifiers
    total = sum(p.numel() for p in obert.targets.values())
    assert total == 2 * (4 * 32 * 32 + 2 * 32 * 64)
    targets = dict((s, sp) for s, _, sp in program.plan.pruning_events())
    current = 0.0
    for step in range(6):
        program.step_start(step)
        current = targets.get(step, current)
        zeros = sum(count_zeros(p) for p in obert.targets.values())
        assert zeros == round(current * total), step
        batch = {"input_ids": torch.randint(0, 64, (4, 12)), "labels": torch.randint(0, 2, (4,))}
        model.train()
        out = model(**batch)
        program.loss(out.loss, batch=batch, outputs=out).backward()
        program.before_optimizer_step(step)
        optimizer.step()
        program.after_optimizer_step(step)
        optimizer.zero_grad()
    program.finalize()
    assert sum(count_zeros(p) for p in obert.targets.values()) == round(0.6 * total)
    assert [h["step"] for h in program.history()] == [0, 2, 4]
    assert calls and set(calls) == {3}  # gradient batches of grad_batch_size
    assert model.training  # restored after the eval-mode gradient collection
    for p in model.parameters():
        assert p.grad is None  # the collected gradients do not leak into training

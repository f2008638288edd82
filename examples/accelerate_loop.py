"""Prune and distil with a recipec recipe in a Hugging Face ``accelerate`` training loop.

    python examples/accelerate_loop.py --output runs/accelerate --cpu
    accelerate launch --num_processes 2 --cpu examples/accelerate_loop.py --output runs/accelerate-ddp

A tiny random BERT student and teacher on random tokens, so it runs anywhere in seconds: swap
in your model, data and recipe. What matters is :func:`train`, the Program's hooks in the
documented order (docs/contracts.md, docs/frameworks.md):

- ``accelerator.prepare`` first, then ``recipec.compile`` on the unwrapped model and the
  prepared optimizer's inner optimizer, with ``steps_per_epoch`` counted in optimizer steps of
  the prepared (per-process) dataloader: ``ceil(len(loader) / gradient_accumulation_steps)``,
  since accelerate also steps on an epoch's last batch;
- inside ``accelerator.accumulate(model)``, ``program.step_start(step)`` on the first
  micro-batch of each optimizer step, ``program.loss`` (distillation) on every micro-batch,
  ``accelerator.backward``, and on the micro-batch that steps (``accelerator.sync_gradients``)
  ``program.before_optimizer_step(step)`` before clipping and
  ``program.after_optimizer_step(step)`` after ``optimizer.step()``; ``step`` counts optimizer
  steps only;
- ``program.finalize()`` at the end, ``program.close()`` however the loop ends.

The recipe owns the learning rate (it has an ``lr`` modifier); no scheduler is needed.
``accelerator.register_for_checkpointing(program)`` puts the Program's state (masks, modifier
state) into ``accelerator.save_state`` / ``load_state``.

``--output DIR`` gets ``result.json`` (the pruning steps planned and run, the sparsity) and
``model.pt`` (the trained weights) from the main process, ``masks-rank<R>.pt`` from every
process, and ``state/`` (``accelerator.save_state``; the Program's state is its
``custom_checkpoint_0.pkl``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import BertConfig, BertForSequenceClassification

import recipec

RECIPE = """
training: {epochs: 4}
modifiers:
  - {type: gmp, init_sparsity: 0.3, final_sparsity: 0.8, start_epoch: 1, end_epoch: 3,
     update_every_epochs: 1}
  - {type: lr, schedule: linear, init_lr: 2e-3, final_lr: 0.0}
  - {type: distill, teacher: given, hardness: 0.7, temperature: 2.0}
"""
N_EXAMPLES, BATCH_SIZE, SEQ_LEN, VOCAB = 48, 4, 10, 64


def tiny_bert(seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def dataset(seed: int = 11) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(0, VOCAB, (SEQ_LEN,), generator=g),
            "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long),
            "labels": torch.randint(0, 2, (), generator=g),
        }
        for _ in range(N_EXAMPLES)
    ]


def train(accelerator, model, optimizer, loader, program, max_grad_norm: float = 1.0) -> int:
    """The stage's optimizer steps in the Program's hook order; returns the steps taken."""
    epochs = math.ceil(program.plan.total_steps / program.plan.steps_per_epoch)
    step, started = 0, None  # optimizer steps taken; the step whose step_start ran
    model.train()
    try:
        for _ in range(epochs):
            for batch in loader:
                if step >= program.plan.total_steps:
                    break
                with accelerator.accumulate(model):
                    if started != step:  # the first micro-batch of this optimizer step
                        program.step_start(step)  # LR written, pruning steps
                        started = step
                    outputs = model(**batch)
                    loss = program.loss(outputs.loss, batch=batch, outputs=outputs)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        program.before_optimizer_step(step)  # pruned weights' gradients -> 0
                        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                    optimizer.step()  # a no-op while accumulating
                    optimizer.zero_grad()
                    if accelerator.sync_gradients:
                        program.after_optimizer_step(step)  # masks re-applied: exact zeros
                        step += 1
        program.finalize()
    finally:
        program.close()
    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=2)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")
    args = parser.parse_args(argv)

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, cpu=args.cpu
    )
    set_seed(0)
    model, teacher = tiny_bert(seed=0), tiny_bert(seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    loader = torch.utils.data.DataLoader(dataset(), batch_size=BATCH_SIZE)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    steps_per_epoch = math.ceil(len(loader) / accelerator.gradient_accumulation_steps)
    program = recipec.compile(
        recipec.load_recipe_text(RECIPE),
        accelerator.unwrap_model(model),
        optimizer.optimizer,  # the torch optimizer inside accelerate's wrapper
        steps_per_epoch=steps_per_epoch,
        teacher=teacher.to(accelerator.device),
    )
    accelerator.register_for_checkpointing(program)  # save_state/load_state hold its state
    steps = train(accelerator, model, optimizer, loader, program)

    args.output.mkdir(parents=True, exist_ok=True)
    accelerator.save_state(args.output / "state")  # model, optimizer, RNG and the Program
    torch.save(
        program.masks.state_dict(), args.output / f"masks-rank{accelerator.process_index}.pt"
    )
    if accelerator.is_main_process:
        result = {
            "processes": accelerator.num_processes,
            "steps": steps,
            "steps_per_epoch": steps_per_epoch,
            "planned_pruning_steps": sorted(program.modifiers[0].resolved.pruning_steps),
            "pruning_steps": [h["step"] for h in program.history()],
            "sparsity": program.sparsity()[0],
        }
        torch.save(accelerator.unwrap_model(model).state_dict(), args.output / "model.pt")
        (args.output / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"{steps} optimizer steps, encoder sparsity {result['sparsity']:.3f}")
    accelerator.end_training()


if __name__ == "__main__":
    main()

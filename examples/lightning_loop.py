"""Prune and distil with a recipec recipe in PyTorch Lightning (``pip install 'recipec[lightning]'``).

    python examples/lightning_loop.py --output runs/lightning
    python examples/lightning_loop.py --output runs/lightning-ddp --devices 2   # DDP, 2 CPU processes

A tiny random BERT student and teacher on random tokens, so it runs anywhere in seconds: swap
in your model, data and recipe. ``RecipecCallback`` calls the Program's hooks on Lightning's
events, ``RecipecLossMixin.recipec_loss`` applies the Program's loss (distillation) in
``training_step``, and every Lightning checkpoint holds the Program's state
(docs/frameworks.md). With ``--devices 2`` Lightning starts the second process itself (the DDP
strategy, gloo on CPU); each process trains on its half of every epoch, so the optimizer steps
per epoch are counted from the per-process batches.

``--output DIR`` gets ``result.json`` (the pruning steps planned and run, the sparsity) from
the first process, ``masks-rank<R>.pt`` from every process, and Lightning's checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import BertConfig, BertForSequenceClassification

import recipec
from recipec.train.lightning import RecipecCallback, RecipecLossMixin

RECIPE = """
training: {epochs: 4}
modifiers:
  - {type: gmp, init_sparsity: 0.3, final_sparsity: 0.8, start_epoch: 1, end_epoch: 3,
     update_every_epochs: 1}
  - {type: lr, schedule: linear, init_lr: 2e-3, final_lr: 0.0}
  - {type: distill, teacher: given, hardness: 0.7, temperature: 2.0}
"""
N_EXAMPLES, BATCH_SIZE, ACCUMULATE, SEQ_LEN, VOCAB = 48, 4, 2, 10, 64


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


class Module(RecipecLossMixin, L.LightningModule):
    def __init__(self, model, optimizer):
        super().__init__()
        self.model, self.optimizer = model, optimizer

    def training_step(self, batch, batch_idx):
        outputs = self.model(**batch)
        return self.recipec_loss(outputs.loss, batch=batch, outputs=outputs)

    def configure_optimizers(self):
        return self.optimizer  # the optimizer the recipe was compiled with


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (DDP when > 1)")
    args = parser.parse_args(argv)

    model, teacher = tiny_bert(seed=0), tiny_bert(seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    loader = torch.utils.data.DataLoader(dataset(), batch_size=BATCH_SIZE)
    batches = math.ceil(N_EXAMPLES / args.devices / BATCH_SIZE)  # per process (DistributedSampler)
    steps_per_epoch = math.ceil(batches / ACCUMULATE)
    recipe = recipec.load_recipe_text(RECIPE)
    program = recipec.compile(
        recipe, model, optimizer, steps_per_epoch=steps_per_epoch, teacher=teacher
    )
    trainer = L.Trainer(
        max_epochs=math.ceil(program.plan.total_steps / steps_per_epoch),
        accumulate_grad_batches=ACCUMULATE,
        gradient_clip_val=1.0,
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(args.output),
        callbacks=[RecipecCallback(program), ModelCheckpoint(every_n_epochs=1, save_top_k=-1)],
    )
    trainer.fit(Module(model, optimizer), loader)

    args.output.mkdir(parents=True, exist_ok=True)
    torch.save(program.masks.state_dict(), args.output / f"masks-rank{trainer.global_rank}.pt")
    if trainer.is_global_zero:
        result = {
            "processes": trainer.world_size,
            "steps": trainer.global_step,
            "steps_per_epoch": steps_per_epoch,
            "planned_pruning_steps": sorted(program.modifiers[0].resolved.pruning_steps),
            "pruning_steps": [h["step"] for h in program.history()],
            "sparsity": program.sparsity()[0],
        }
        torch.save(model.state_dict(), args.output / "model.pt")
        (args.output / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"{trainer.global_step} optimizer steps, encoder sparsity {result['sparsity']:.3f}")


if __name__ == "__main__":
    main()

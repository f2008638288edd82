"""The PyTorch Lightning path (RecipecCallback + RecipecLossMixin) against the plain loop."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip(
    "lightning", reason="recipec.train.lightning needs lightning (pip install 'recipec[lightning]')"
)

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

import recipec  # noqa: E402
from recipec.recipe.load import load_recipe_text  # noqa: E402
from recipec.train.lightning import RecipecCallback, RecipecLossMixin  # noqa: E402

N_EXAMPLES, BATCH, SEQ = 24, 4, 10
BATCHES_PER_EPOCH = N_EXAMPLES // BATCH  # 6
EPOCHS = 2

GMP = {
    "type": "gmp",
    "init_sparsity": 0.3,
    "final_sparsity": 0.8,
    "start_step": 1,
    "end_step": 9,
    "update_every_steps": 2,
}
LR = [
    {
        "type": "lr",
        "schedule": "cyclic_linear",
        "init_lr": 3e-3,
        "final_lr": 3e-4,
        "cycle_steps": 2,
        "end_step": 10,
    },
    {"type": "lr", "schedule": "linear", "init_lr": 1e-3, "final_lr": 0.0, "start_step": 10},
]
DISTILL = {"type": "distill", "teacher": "given", "hardness": 0.7, "temperature": 2.0}
CRAM = {"type": "cram", "sparsities": [0.5, 0.7], "rho": 0.05}


def _recipe(modifiers, **training):
    training = training or {"epochs": EPOCHS}
    return load_recipe_text(yaml.safe_dump({"training": training, "modifiers": modifiers}))


def _model(seed: int = 0, dropout: float = 0.0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification(config)


def _dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    return [
        {
            "input_ids": torch.randint(0, 64, (SEQ,), generator=g),
            "attention_mask": torch.ones(SEQ, dtype=torch.long),
            "labels": torch.randint(0, 2, (), generator=g),
        }
        for _ in range(N_EXAMPLES)
    ]


def _loader(data):
    return torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False)


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)


class Module(RecipecLossMixin, L.LightningModule):
    """The documented module: the HF model, the recipe's optimizer, the Program's loss."""

    def __init__(self, model, optimizer, use_program_loss: bool = True):
        super().__init__()
        self.model = model
        self.optimizer = optimizer
        self.use_program_loss = use_program_loss

    def training_step(self, batch, batch_idx):
        outputs = self.model(**batch)
        if not self.use_program_loss:
            return outputs.loss
        return self.recipec_loss(outputs.loss, batch=batch, outputs=outputs)

    def configure_optimizers(self):
        return self.optimizer


class RecordLR(L.Callback):
    def __init__(self):
        self.lrs = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def _trainer(tmp_path, callbacks, **overrides) -> L.Trainer:
    kwargs = dict(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def _plain_loop(model, program, optimizer, data, *, accumulate=1, max_grad_norm=None):
    """The contract's driver with gradient accumulation as Lightning does it: groups of
    ``accumulate`` batches (the last group of an epoch may be shorter), each loss divided by
    ``accumulate``; per optimizer step: step_start, (forward, loss, backward) per micro-batch,
    before (mask), clip, step, after. Returns the LR of every step."""
    lrs, step = [], 0
    model.train()
    for _ in range(EPOCHS):
        batches = list(_loader(data))
        for start in range(0, len(batches), accumulate):
            program.step_start(step)
            for batch in batches[start : start + accumulate]:
                outputs = model(**batch)
                loss = program.loss(outputs.loss, batch=batch, outputs=outputs)
                (loss / accumulate).backward()
            program.before_optimizer_step(step)
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            program.after_optimizer_step(step)
            optimizer.zero_grad(set_to_none=True)
            step += 1
    program.finalize()
    return lrs


def _assert_same_run(program, model, ref_program, ref_model, rtol=1e-6, atol=1e-8):
    assert [h["step"] for h in program.history()] == [h["step"] for h in ref_program.history()]
    assert set(program.masks.masks) == set(ref_program.masks.masks)
    for name, mask in ref_program.masks.masks.items():
        assert torch.equal(program.masks.masks[name], mask), name
    ref_params = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(
            p.detach(), ref_params[name].detach(), rtol=rtol, atol=atol, msg=name
        )


def _assert_masks_exact(program, model):
    params = dict(model.named_parameters())
    for name, mask in program.masks.masks.items():
        assert not bool((params[name].detach()[~mask] != 0).any()), name


def _run_plain(base, recipe, data, teacher=None, **loop):
    model = copy.deepcopy(base)
    optimizer = _optimizer(model)
    spe = math.ceil(BATCHES_PER_EPOCH / loop.get("accumulate", 1))
    program = recipec.compile(recipe, model, optimizer, steps_per_epoch=spe, teacher=teacher)
    lrs = _plain_loop(model, program, optimizer, data, **loop)
    return model, program, lrs


def _run_lightning(tmp_path, base, recipe, data, teacher=None, accumulate=1, **trainer_kwargs):
    model = copy.deepcopy(base)
    optimizer = _optimizer(model)
    spe = math.ceil(BATCHES_PER_EPOCH / accumulate)
    program = recipec.compile(recipe, model, optimizer, steps_per_epoch=spe, teacher=teacher)
    recorder = RecordLR()
    trainer = _trainer(
        tmp_path,
        [RecipecCallback(program), recorder],
        accumulate_grad_batches=accumulate,
        **trainer_kwargs,
    )
    trainer.fit(Module(model, optimizer), _loader(data))
    return model, program, recorder.lrs, trainer


@pytest.mark.parametrize("clip", [0.05, None], ids=["clip", "noclip"])
def test_lightning_and_plain_loop_give_identical_masks_and_weights(tmp_path, clip):
    data, base, recipe = _dataset(), _model(), _recipe([GMP, *LR])
    ref_model, ref_program, ref_lrs = _run_plain(base, recipe, data, max_grad_norm=clip)
    model, program, lrs, trainer = _run_lightning(
        tmp_path, base, recipe, data, gradient_clip_val=clip
    )
    total = BATCHES_PER_EPOCH * EPOCHS
    assert trainer.global_step == total and program.finalized
    assert [h["step"] for h in program.history()] == [1, 3, 5, 7, 9]  # the planned steps
    assert lrs == ref_lrs == [program.plan.lr_at(s) for s in range(total)]  # the recipe's LR
    _assert_same_run(program, model, ref_program, ref_model)
    _assert_masks_exact(program, model)
    assert program.sparsity()[0] == pytest.approx(0.8, abs=1e-3)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    """4 micro-batches per step over 6 batches per epoch: groups of 4 and 2 (Lightning steps on
    an epoch's last batch), so 2 optimizer steps per epoch; Lightning divides every micro-batch
    loss by 4, the short group's too (the reference loop does the same)."""
    data, base = _dataset(), _model()
    gmp = dict(GMP, start_step=1, end_step=3, update_every_steps=1, init_sparsity=0.5)
    recipe = _recipe([gmp, {"type": "lr", "schedule": "linear", "init_lr": 2e-3, "final_lr": 0}])
    ref_model, ref_program, ref_lrs = _run_plain(base, recipe, data, accumulate=4)
    model, program, lrs, trainer = _run_lightning(tmp_path, base, recipe, data, accumulate=4)
    assert trainer.global_step == program.plan.total_steps == 4
    assert [h["step"] for h in program.history()] == [1, 2, 3]
    assert lrs == ref_lrs and len(lrs) == 4
    _assert_same_run(program, model, ref_program, ref_model)
    assert program.sparsity()[0] == pytest.approx(0.8, abs=1e-3)


def test_event_order_with_gradient_accumulation(tmp_path):
    model = _model()
    optimizer = _optimizer(model)
    recipe = _recipe([LR[0]], steps=3)
    program = recipec.compile(recipe, model, optimizer, steps_per_epoch=3)
    events = []
    for hook in ("step_start", "before_optimizer_step", "after_optimizer_step"):
        original = getattr(program, hook)

        def spy(step, _original=original, _hook=hook):
            events.append((_hook, step))
            return _original(step)

        setattr(program, hook, spy)
    original_loss, original_finalize = program.loss, program.finalize

    def loss_spy(loss, batch=None, outputs=None):
        events.append(("loss", program.step))
        return original_loss(loss, batch=batch, outputs=outputs)

    program.loss = loss_spy
    program.finalize = lambda: (events.append(("finalize", None)), original_finalize())[1]
    trainer = _trainer(
        tmp_path, [RecipecCallback(program)], max_epochs=1, accumulate_grad_batches=2
    )
    trainer.fit(Module(model, optimizer), _loader(_dataset()))
    expected = []
    for k in range(3):  # 6 batches / 2 = 3 optimizer steps
        expected += [("step_start", k), ("loss", k), ("loss", k)]
        expected += [("before_optimizer_step", k), ("after_optimizer_step", k)]
    assert events == expected + [("finalize", None)]


def test_distillation_through_the_mixin_equals_the_plain_loop(tmp_path):
    data, base = _dataset(), _model()
    teacher = _model(seed=1, dropout=0.3)
    recipe = _recipe([GMP, DISTILL])
    ref_model, ref_program, _ = _run_plain(base, recipe, data, teacher=teacher)
    model, program, _, _ = _run_lightning(tmp_path, base, recipe, data, teacher=teacher)
    _assert_same_run(program, model, ref_program, ref_model)
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())
    # ... and it is not plain training.
    plain_model, _, _ = _run_plain(base, _recipe([GMP]), data)
    assert not torch.allclose(plain_model.classifier.weight, model.classifier.weight)


def test_cram_through_lightning_equals_the_plain_loop(tmp_path):
    data, base, recipe = _dataset(), _model(), _recipe([CRAM, LR[1]])
    ref_model, ref_program, _ = _run_plain(base, recipe, data, max_grad_norm=0.05)
    model, program, _, _ = _run_lightning(tmp_path, base, recipe, data, gradient_clip_val=0.05)
    assert sum(program.modifiers[0].counts.values()) == BATCHES_PER_EPOCH * EPOCHS
    _assert_same_run(program, model, ref_program, ref_model, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("modifier", [DISTILL, CRAM], ids=["distill", "cram"])
def test_a_loss_that_skips_the_program_is_refused(tmp_path, modifier):
    model = _model()
    optimizer = _optimizer(model)
    program = recipec.compile(
        _recipe([modifier]), model, optimizer, steps_per_epoch=6, teacher=_model(1)
    )
    closed = []
    original_close = program.close
    program.close = lambda: (closed.append(True), original_close())[1]
    trainer = _trainer(tmp_path, [RecipecCallback(program)])
    with pytest.raises(ValueError, match="recipec_loss"):
        trainer.fit(Module(model, optimizer, use_program_loss=False), _loader(_dataset()))
    assert closed  # close() however training ends


def test_resume_from_a_mid_run_checkpoint_equals_an_uninterrupted_run(tmp_path):
    """The epoch-0 checkpoint (step 6 of 12, pruning at 1..9 under way) holds the Program's
    state; ``trainer.fit(ckpt_path=...)`` continues the schedule and the masks."""
    data, base, recipe = _dataset(), _model(), _recipe([GMP, *LR])
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    ref_model = copy.deepcopy(base)
    ref_optimizer = _optimizer(ref_model)
    ref_program = recipec.compile(recipe, ref_model, ref_optimizer, steps_per_epoch=6)
    _trainer(tmp_path, [RecipecCallback(ref_program), saver], enable_checkpointing=True).fit(
        Module(ref_model, ref_optimizer), _loader(data)
    )
    (checkpoint,) = sorted((tmp_path / "ckpt").glob("epoch=0-*.ckpt"))
    saved = torch.load(checkpoint, weights_only=True)
    state = saved["callbacks"][RecipecCallback(ref_program).state_key]
    assert state["step"] == 5 and len(state["masks"]) == 12  # after step 5, pruned at 1, 3, 5

    model = copy.deepcopy(base)
    optimizer = _optimizer(model)
    program = recipec.compile(recipe, model, optimizer, steps_per_epoch=6)
    started = []
    original = program.step_start
    program.step_start = lambda step: (started.append(step), original(step))[1]
    trainer = _trainer(tmp_path, [RecipecCallback(program)])
    trainer.fit(Module(model, optimizer), _loader(data), ckpt_path=str(checkpoint))
    assert started == list(range(6, 12)) and trainer.global_step == 12
    assert [h["step"] for h in program.history()] == [1, 3, 5, 7, 9]
    _assert_same_run(program, model, ref_program, ref_model)
    assert program.finalized and program.sparsity()[0] == pytest.approx(0.8, abs=1e-3)

    # Without the Program's state, resuming is refused rather than letting pruned weights regrow.
    del saved["callbacks"][RecipecCallback(ref_program).state_key]
    torch.save(saved, tmp_path / "no-program.ckpt")
    model = copy.deepcopy(base)
    optimizer = _optimizer(model)
    program = recipec.compile(recipe, model, optimizer, steps_per_epoch=6)
    trainer = _trainer(tmp_path, [RecipecCallback(program)])
    with pytest.raises(RuntimeError, match="pruned weights would grow back"):
        trainer.fit(Module(model, optimizer), _loader(data), ckpt_path=tmp_path / "no-program.ckpt")


def test_wrong_model_optimizer_or_setup_is_refused(tmp_path):
    model = _model()
    optimizer = _optimizer(model)
    program = recipec.compile(_recipe([GMP]), model, optimizer, steps_per_epoch=6)
    loader = _loader(_dataset())
    cases = [
        (Module(model, _optimizer(model)), "configure_optimizers"),
        (Module(_model(3), optimizer), "does not hold the model"),
    ]
    manual = Module(model, optimizer)
    manual.automatic_optimization = False
    cases.append((manual, "automatic_optimization"))
    for module, message in cases:
        with pytest.raises(ValueError, match=message):
            _trainer(tmp_path, [RecipecCallback(program)]).fit(module, loader)
    assert program.sparsity()[0] == 0.0

    prune_only = recipec.compile(
        _recipe([dict(GMP, start_step=0, end_step=0, init_sparsity=0.5)], steps=0),
        model,
        optimizer,
        steps_per_epoch=6,
    )
    with pytest.raises(ValueError, match=r"prune-only .* program.step_start\(0\)"):
        _trainer(tmp_path, [RecipecCallback(prune_only)]).fit(Module(model, optimizer), loader)


def test_cram_is_refused_with_fp16_or_sharded_strategies():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    model = _model()
    optimizer = _optimizer(model)
    program = recipec.compile(_recipe([CRAM]), model, optimizer, steps_per_epoch=6)
    callback = RecipecCallback(program)
    module = Module(model, optimizer)
    for trainer, message in [
        (SimpleNamespace(optimizers=[optimizer], precision="16-mixed"), "not loss-scaled"),
        (
            SimpleNamespace(optimizers=[optimizer], precision="32-true", strategy=FSDPStrategy()),
            "FSDPStrategy shards",
        ),
    ]:
        with pytest.raises(ValueError, match=message):
            callback.on_fit_start(trainer, module)


def test_step_count_mismatch_warns(tmp_path):
    model = _model()
    optimizer = _optimizer(model)
    program = recipec.compile(_recipe([GMP]), model, optimizer, steps_per_epoch=6)
    trainer = _trainer(tmp_path, [RecipecCallback(program)], max_steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Module(model, optimizer), _loader(_dataset()))
    assert any(
        "run 3 optimizer steps but the recipe stage 'main' is planned for 12" in str(w.message)
        for w in caught
    )


@pytest.mark.slow
def test_the_lightning_example_under_ddp_with_two_cpu_processes(tmp_path):
    """docs/frameworks.md's command: examples/lightning_loop.py with --devices 2 (Lightning
    starts the second process; DDP over gloo)."""
    root = Path(__file__).resolve().parents[3]
    doc = (root / "docs" / "frameworks.md").read_text(encoding="utf-8")
    (line,) = [c for c in re.findall(r"^python examples/lightning_loop\.py .*$", doc, re.M)]
    args = shlex.split(line)
    output = tmp_path / "ddp"
    args[args.index("--output") + 1] = str(output)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    )
    run = subprocess.run(
        [sys.executable, *args[1:]], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, f"{line}\n{run.stdout}\n{run.stderr[-4000:]}"
    result = json.loads((output / "result.json").read_text())
    # 48 examples over 2 processes: 6 batches each per epoch, 3 optimizer steps of 2.
    assert result["processes"] == 2 and result["steps_per_epoch"] == 3 and result["steps"] == 12
    assert result["pruning_steps"] == result["planned_pruning_steps"] == [3, 6, 9]
    assert result["sparsity"] == pytest.approx(0.8, abs=1e-3)
    masks = [torch.load(output / f"masks-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert len(masks[0]) == 12 and masks[0].keys() == masks[1].keys()
    for name in masks[0]:
        assert torch.equal(masks[0][name], masks[1][name]), name
    weights = torch.load(output / "model.pt", weights_only=True)
    for name, mask in masks[0].items():
        assert not bool((weights[name][~mask] != 0).any()), name


def test_qat_with_distillation_through_lightning_equals_the_plain_loop(tmp_path):
    """Pruning, then int8 fake-quant (observed from step 7, frozen at 9) with KD, inside
    Lightning's steps: the plain loop's weights and input ranges; pruned weights exact zeros."""
    from recipec.quant.fake import quant_of

    data, base = _dataset(), _model()
    teacher = _model(seed=1)
    gmp = dict(GMP, end_step=6, update_every_steps=2)
    quantize = {"type": "quantize", "start_step": 7, "freeze_observers_at_step": 9}
    recipe = _recipe([gmp, quantize, DISTILL])
    ref_model, ref_program, _ = _run_plain(base, recipe, data, teacher=teacher)
    model, program, _, _ = _run_lightning(tmp_path, base, recipe, data, teacher=teacher)
    _assert_same_run(program, model, ref_program, ref_model, rtol=1e-5, atol=1e-7)
    _assert_masks_exact(program, model)
    quant, ref_quant = quant_of(model), quant_of(ref_model)
    assert quant.frozen and len(quant.layers) == len(program.masks.masks)
    for name, layer in quant.layers.items():
        other = ref_quant.layers[name]
        assert layer.enabled and layer.seen == other.seen == 9 - 7  # steps 7 and 8
        assert (layer.lo, layer.hi) == pytest.approx((other.lo, other.hi), rel=1e-5)

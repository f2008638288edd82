"""The Hugging Face Trainer path (RecipecTrainer + RecipecCallback) against the plain loop."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

pytest.importorskip(
    "accelerate", reason="transformers' Trainer needs accelerate>=1.1 (pip install accelerate)"
)

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import recipec  # noqa: E402
from recipec.recipe.load import load_recipe_text  # noqa: E402
from recipec.train.hf import PROGRAM_STATE_NAME, RecipecCallback, RecipecTrainer  # noqa: E402

N_EXAMPLES, BATCH, SEQ = 24, 4, 10
STEPS_PER_EPOCH = N_EXAMPLES // BATCH  # 6
EPOCHS = 2
TOTAL = STEPS_PER_EPOCH * EPOCHS  # 12

GMP_LR = [
    {
        "type": "gmp",
        "init_sparsity": 0.3,
        "final_sparsity": 0.8,
        "start_step": 1,
        "end_step": 9,
        "update_every_steps": 2,
    },
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


def _recipe(modifiers):
    return load_recipe_text(
        yaml.safe_dump({"training": {"epochs": EPOCHS}, "modifiers": modifiers})
    )


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


def _batches(data):
    for start in range(0, len(data), BATCH):
        chunk = data[start : start + BATCH]
        yield {k: torch.stack([ex[k] for ex in chunk]) for k in chunk[0]}


def _args(tmp_path, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=BATCH,
        num_train_epochs=EPOCHS,
        max_grad_norm=1.0,
        weight_decay=0.0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)


def _plain_loop(model, program, optimizer, data, max_grad_norm: float | None = 1.0):
    """The contract's driver: step_start, forward, loss, backward, before (mask), clip, step, after."""
    lrs = []
    step = 0
    model.train()
    for _ in range(EPOCHS):
        for batch in _batches(data):
            program.step_start(step)
            outputs = model(**batch)
            loss = program.loss(outputs.loss, batch=batch, outputs=outputs)
            loss.backward()
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


class _RecordLR(TrainerCallback):
    def __init__(self):
        self.lrs = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("max_grad_norm", [0.05, 0.0], ids=["clip", "noclip"])
def test_trainer_and_plain_loop_give_identical_masks_and_weights(tmp_path, max_grad_norm):
    data = _dataset()
    recipe = _recipe(GMP_LR)
    base = _model()

    plain_model = copy.deepcopy(base)
    plain_opt = _optimizer(plain_model)
    plain_program = recipec.compile(recipe, plain_model, plain_opt, steps_per_epoch=STEPS_PER_EPOCH)
    plain_lrs = _plain_loop(plain_model, plain_program, plain_opt, data, max_grad_norm)

    hf_model = copy.deepcopy(base)
    hf_opt = _optimizer(hf_model)
    hf_program = recipec.compile(recipe, hf_model, hf_opt, steps_per_epoch=STEPS_PER_EPOCH)
    recorder = _RecordLR()
    # optimizers=(opt, None): the Trainer adds its own linear scheduler; the recipe's LR must win.
    trainer = RecipecTrainer(
        model=hf_model,
        args=_args(tmp_path, max_grad_norm=max_grad_norm),
        train_dataset=data,
        program=hf_program,
        callbacks=[recorder],
    )
    assert trainer.optimizer is hf_opt
    trainer.train()

    assert hf_program.finalized
    assert (
        [h["step"] for h in hf_program.history()]
        == [h["step"] for h in plain_program.history()]
        == [1, 3, 5, 7, 9]
    )
    assert recorder.lrs == plain_lrs == [plain_program.plan.lr_at(s) for s in range(TOTAL)]
    assert (
        set(hf_program.masks.masks) == set(plain_program.masks.masks) and plain_program.masks.masks
    )
    for name, mask in plain_program.masks.masks.items():
        assert torch.equal(hf_program.masks.masks[name], mask), name
    plain_params = dict(plain_model.named_parameters())
    for (
        name,
        p,
    ) in hf_model.named_parameters():  # the same ops in the same order: equal up to rounding
        torch.testing.assert_close(
            p.detach(), plain_params[name].detach(), rtol=1e-6, atol=1e-8, msg=name
        )
    assert hf_program.sparsity()[0] == pytest.approx(plain_program.sparsity()[0])
    assert 0.79 < hf_program.sparsity()[0] < 0.81


def test_pruned_gradients_are_zero_when_the_trainer_clips(tmp_path):
    # The Trainer clips before on_pre_optimizer_step; RecipecTrainer masks right after backward,
    # so the clipping norm never counts pruned weights (as in the plain loop: mask, clip, step).
    model = _model()
    optimizer = _optimizer(model)
    program = recipec.compile(_recipe(GMP_LR), model, optimizer, steps_per_epoch=STEPS_PER_EPOCH)
    trainer = RecipecTrainer(
        model=model,
        args=_args(tmp_path, max_grad_norm=0.05),
        train_dataset=_dataset(),
        program=program,
    )
    params = dict(model.named_parameters())
    clip = trainer.accelerator.clip_grad_norm_
    checked = []

    def spy(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        for name, mask in program.masks.masks.items():
            checked.append(not bool((params[name].grad[~mask] != 0).any()))
        return clip(parameters, max_norm, *args, **kwargs)

    trainer.accelerator.clip_grad_norm_ = spy
    trainer.train()
    assert len(checked) == 12 * (TOTAL - 1)  # 12 pruned tensors from step 1 on
    assert all(checked)


def test_callback_event_order_and_steps_with_gradient_accumulation(tmp_path):
    model = _model()
    optimizer = _optimizer(model)
    recipe = load_recipe_text(yaml.safe_dump({"training": {"steps": 3}, "modifiers": [GMP_LR[1]]}))
    program = recipec.compile(recipe, model, optimizer, steps_per_epoch=3)
    events = []
    for hook in ("step_start", "before_optimizer_step", "after_optimizer_step"):
        original = getattr(program, hook)

        def spy(step, _original=original, _hook=hook):
            events.append((_hook, step))
            return _original(step)

        setattr(program, hook, spy)
    original_loss = program.loss

    def loss_spy(loss, batch=None, outputs=None):
        events.append(("loss", program.step))
        return original_loss(loss, batch=batch, outputs=outputs)

    program.loss = loss_spy
    original_finalize = program.finalize
    program.finalize = lambda: (events.append(("finalize", None)), original_finalize())[1]
    args = _args(
        tmp_path, num_train_epochs=1, gradient_accumulation_steps=2, per_device_train_batch_size=4
    )
    RecipecTrainer(model=model, args=args, train_dataset=_dataset(), program=program).train()
    expected = []
    for k in range(3):  # 24 examples / (4 x 2) = 3 optimizer steps, 2 micro-batches each
        expected += [
            ("step_start", k),
            ("loss", k),
            ("loss", k),
            ("before_optimizer_step", k),
            ("after_optimizer_step", k),
        ]
    assert events == expected + [("finalize", None)]


def test_distill_recipe_trainer_loss_equals_program_loss(tmp_path):
    data = _dataset()
    student = _model(seed=0)
    teacher = _model(seed=1, dropout=0.3)
    optimizer = _optimizer(student)
    recipe = _recipe(
        [GMP_LR[0], {"type": "distill", "teacher": "given", "hardness": 0.7, "temperature": 2.0}]
    )
    program = recipec.compile(
        recipe, student, optimizer, steps_per_epoch=STEPS_PER_EPOCH, teacher=teacher
    )
    trainer = RecipecTrainer(
        model=student, args=_args(tmp_path), train_dataset=data, program=program
    )

    batch = next(_batches(data))
    student.train()
    program.step_start(0)
    got = trainer.compute_loss(student, dict(batch))
    outputs = student(**batch)
    expected = program.loss(outputs.loss, batch=batch, outputs=outputs)
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)
    assert abs(got.item() - outputs.loss.item()) > 1e-4  # not just the task loss
    # Evaluation reports the plain task loss.
    student.eval()
    eval_loss, _ = trainer.compute_loss(student, dict(batch), return_outputs=True)
    assert eval_loss.item() == pytest.approx(student(**batch).loss.item(), abs=1e-6)

    # Training through the Trainer backpropagates the same loss as the plain loop.
    student2 = copy.deepcopy(student)
    student2.load_state_dict(student.state_dict())
    seen = []

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            seen.append(state.global_step)

    trainer.add_callback(Record())
    student.train()
    result = trainer.train()
    assert seen == list(range(TOTAL)) and result.global_step == TOTAL
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training


def test_a_plain_trainer_with_the_callback_refuses_a_distill_recipe(tmp_path):
    student, teacher = _model(0), _model(1)
    optimizer = _optimizer(student)
    recipe = _recipe([{"type": "distill", "teacher": "given"}])
    program = recipec.compile(
        recipe, student, optimizer, steps_per_epoch=STEPS_PER_EPOCH, teacher=teacher
    )
    trainer = Trainer(
        model=student,
        args=_args(tmp_path),
        train_dataset=_dataset(),
        optimizers=(optimizer, None),
        callbacks=[RecipecCallback(program)],
    )
    with pytest.raises(ValueError, match="RecipecTrainer"):
        trainer.train()


def test_a_plain_trainer_with_the_callback_runs_a_pruning_recipe(tmp_path):
    model = _model()
    optimizer = _optimizer(model)
    program = recipec.compile(_recipe(GMP_LR), model, optimizer, steps_per_epoch=STEPS_PER_EPOCH)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=_dataset(),
        optimizers=(optimizer, None),
        callbacks=[RecipecCallback(program)],
    )
    trainer.train()
    assert program.finalized and 0.79 < program.sparsity()[0] < 0.81
    for name, mask in program.masks.masks.items():
        assert not bool((dict(model.named_parameters())[name].detach()[~mask] != 0).any())


def test_wrong_optimizer_or_model_is_refused(tmp_path):
    model = _model()
    optimizer = _optimizer(model)
    program = recipec.compile(_recipe(GMP_LR), model, optimizer, steps_per_epoch=STEPS_PER_EPOCH)
    with pytest.raises(ValueError, match="not the optimizer the recipe was compiled with"):
        RecipecTrainer(
            model=model,
            args=_args(tmp_path),
            train_dataset=_dataset(),
            program=program,
            optimizers=(_optimizer(model), None),
        )
    trainer = Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=_dataset(),
        callbacks=[RecipecCallback(program)],
    )  # lets the Trainer build its own optimizer
    with pytest.raises(ValueError, match="different optimizer"):
        trainer.train()
    other = _model(seed=3)
    trainer = Trainer(
        model=other,
        args=_args(tmp_path),
        train_dataset=_dataset(),
        optimizers=(optimizer, None),
        callbacks=[RecipecCallback(program)],
    )
    with pytest.raises(ValueError, match="not the model"):
        trainer.train()


def test_step_count_mismatch_warns(tmp_path):
    model = _model()
    optimizer = _optimizer(model)
    program = recipec.compile(_recipe(GMP_LR), model, optimizer, steps_per_epoch=STEPS_PER_EPOCH)
    trainer = RecipecTrainer(
        model=model, args=_args(tmp_path, max_steps=3), train_dataset=_dataset(), program=program
    )
    with pytest.warns(
        UserWarning, match="run 3 optimizer steps but the recipe stage 'main' is planned for 12"
    ):
        trainer.train()


def test_trainer_checkpoint_resume_restores_the_program(tmp_path):
    data = _dataset()
    recipe = _recipe(GMP_LR)
    base = _model()

    ref_model = copy.deepcopy(base)
    ref_opt = _optimizer(ref_model)
    ref_program = recipec.compile(recipe, ref_model, ref_opt, steps_per_epoch=STEPS_PER_EPOCH)
    args = _args(tmp_path, save_strategy="steps", save_steps=4)
    RecipecTrainer(model=ref_model, args=args, train_dataset=data, program=ref_program).train()
    checkpoint = tmp_path / "hf" / "checkpoint-4"
    assert (checkpoint / PROGRAM_STATE_NAME).is_file()

    model = copy.deepcopy(base)
    optimizer = _optimizer(model)
    program = recipec.compile(recipe, model, optimizer, steps_per_epoch=STEPS_PER_EPOCH)
    trainer = RecipecTrainer(model=model, args=_args(tmp_path), train_dataset=data, program=program)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert [h["step"] for h in program.history()] == [1, 3, 5, 7, 9]
    for name, mask in ref_program.masks.masks.items():
        assert torch.equal(program.masks.masks[name], mask), name
    ref_params = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(
            p.detach(), ref_params[name].detach(), rtol=1e-5, atol=1e-6, msg=name
        )

    # Without the program's file, resuming is refused rather than letting pruned weights regrow.
    (checkpoint / PROGRAM_STATE_NAME).unlink()
    model = copy.deepcopy(base)
    optimizer = _optimizer(model)
    program = recipec.compile(recipe, model, optimizer, steps_per_epoch=STEPS_PER_EPOCH)
    trainer = RecipecTrainer(model=model, args=_args(tmp_path), train_dataset=data, program=program)
    with pytest.raises(FileNotFoundError, match="pruned weights would grow back"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_the_callback_refuses_a_planted_program_state(tmp_path):
    """The callback's resume reads recipec_program.json + .safetensors; a planted (or old)
    recipec_program.pt is refused with a message, never unpickled (the Trainer path: below)."""
    import pickle
    from types import SimpleNamespace

    from recipec.train.hf import read_program_state
    from recipec.train.resume import CheckpointStateError

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "payload-ran"), "w"))

    model = _model()
    program = recipec.compile(_recipe(GMP_LR), model, _optimizer(model), steps_per_epoch=6)
    callback = RecipecCallback(program)
    folder = tmp_path / "hf" / "checkpoint-4"
    folder.mkdir(parents=True)
    args = SimpleNamespace(output_dir=str(tmp_path / "hf"), should_save=True)
    callback.on_save(args, SimpleNamespace(global_step=4), None)
    assert read_program_state(folder)["step"] == program.state_dict()["step"]
    for name in ("recipec_program.json", "recipec_program.safetensors"):
        (folder / name).unlink()
    (folder / "recipec_program.pt").write_bytes(pickle.dumps({"masks": Payload()}))
    with pytest.raises(CheckpointStateError, match="does not unpickle") as info:
        callback._resume(args, SimpleNamespace(global_step=4))
    assert str(folder / "recipec_program.pt") in str(info.value)
    assert not (tmp_path / "payload-ran").exists()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:the Trainer will run")
def test_a_planted_program_state_is_refused_not_unpickled(tmp_path):
    """The Trainer checkpoint's Program state is JSON + safetensors: a pickle planted as
    recipec_program.pt (or left by an older recipec) is refused with a message, never loaded."""
    import pickle

    from recipec.train.resume import CheckpointStateError

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "payload-ran"), "w"))

    data, recipe, base = _dataset(), _recipe(GMP_LR), _model()
    model = copy.deepcopy(base)
    program = recipec.compile(recipe, model, _optimizer(model), steps_per_epoch=STEPS_PER_EPOCH)
    args = _args(tmp_path, save_strategy="steps", save_steps=4, max_steps=4)
    RecipecTrainer(model=model, args=args, train_dataset=data, program=program).train()
    checkpoint = tmp_path / "hf" / "checkpoint-4"
    for name in ("recipec_program.json", "recipec_program.safetensors"):
        (checkpoint / name).unlink()
    (checkpoint / "recipec_program.pt").write_bytes(pickle.dumps({"masks": Payload()}))
    model = copy.deepcopy(base)
    program = recipec.compile(recipe, model, _optimizer(model), steps_per_epoch=STEPS_PER_EPOCH)
    trainer = RecipecTrainer(model=model, args=_args(tmp_path), train_dataset=data, program=program)
    with pytest.raises(CheckpointStateError, match="does not unpickle"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert not (tmp_path / "payload-ran").exists()


CRAM_LR = [
    {"type": "cram", "sparsities": [0.5, 0.7], "rho": 0.05},
    {"type": "lr", "schedule": "linear", "init_lr": 1e-3, "final_lr": 0.0},
]


@pytest.mark.parametrize("max_grad_norm", [0.05, 0.0], ids=["clip", "noclip"])
def test_cram_through_the_trainer_equals_the_plain_loop(tmp_path, max_grad_norm):
    """CrAM's second forward/backward runs inside Trainer's step as in the plain loop, and the
    Trainer clips CrAM's gradient (not the ordinary one it replaces)."""
    data = _dataset()
    recipe = _recipe(CRAM_LR)
    base = _model()
    plain_model, hf_model = copy.deepcopy(base), copy.deepcopy(base)
    plain_opt, hf_opt = _optimizer(plain_model), _optimizer(hf_model)
    plain_program = recipec.compile(recipe, plain_model, plain_opt, steps_per_epoch=STEPS_PER_EPOCH)
    _plain_loop(plain_model, plain_program, plain_opt, data, max_grad_norm=max_grad_norm)
    hf_program = recipec.compile(recipe, hf_model, hf_opt, steps_per_epoch=STEPS_PER_EPOCH)
    RecipecTrainer(
        model=hf_model,
        args=_args(tmp_path, max_grad_norm=max_grad_norm),
        train_dataset=data,
        program=hf_program,
    ).train()
    assert (
        sum(plain_program.modifiers[0].counts.values())
        == sum(hf_program.modifiers[0].counts.values())
        == TOTAL
    )
    plain_params = dict(plain_model.named_parameters())
    for name, p in hf_model.named_parameters():
        torch.testing.assert_close(
            p.detach(), plain_params[name].detach(), rtol=1e-5, atol=1e-7, msg=name
        )
    # ... and it is not plain training.
    other = copy.deepcopy(base)
    other_opt = _optimizer(other)
    _plain_loop(
        other,
        recipec.compile(_recipe(CRAM_LR[1:]), other, other_opt, steps_per_epoch=STEPS_PER_EPOCH),
        other_opt,
        data,
        max_grad_norm=max_grad_norm,
    )
    assert not torch.allclose(other.classifier.weight, hf_model.classifier.weight)


def test_a_plain_trainer_with_the_callback_refuses_a_cram_recipe(tmp_path):
    model = _model()
    optimizer = _optimizer(model)
    program = recipec.compile(_recipe(CRAM_LR), model, optimizer, steps_per_epoch=STEPS_PER_EPOCH)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=_dataset(),
        optimizers=(optimizer, None),
        callbacks=[RecipecCallback(program)],
    )
    with pytest.raises(ValueError, match="CrAM"):
        trainer.train()


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"fp16": True}, "not loss-scaled"),
        ({"n_gpu": 2}, "torchrun"),
        ({"fsdp": "full_shard"}, "FSDP"),
        ({"deepspeed": "ds.json"}, "FSDP"),
    ],
)
def test_cram_is_refused_with_fp16_or_data_parallel(setting, message):
    """fp16 (the second pass is not loss-scaled), DataParallel, FSDP and DeepSpeed (it runs on the
    bare, whole model) are refused before any step; torchrun's DDP is not
    (tests/integration/test_distributed.py)."""
    from types import SimpleNamespace

    model = _model()
    optimizer = _optimizer(model)
    program = recipec.compile(_recipe(CRAM_LR), model, optimizer, steps_per_epoch=STEPS_PER_EPOCH)
    callback = RecipecCallback(program)
    callback.loss_hooked = True  # as RecipecTrainer sets it
    args = SimpleNamespace(
        **{"fp16": False, "n_gpu": 1, "world_size": 1, "fsdp": "", "deepspeed": None, **setting}
    )
    state = SimpleNamespace(global_step=0, max_steps=TOTAL)
    with pytest.raises(ValueError, match=message):
        callback.on_train_begin(args, state, None, model=model, optimizer=optimizer)
    callback.on_train_begin(
        SimpleNamespace(fp16=False, n_gpu=1, world_size=2, fsdp="", deepspeed=None),
        state,
        None,
        model=model,
        optimizer=optimizer,
    )  # several processes (DDP): accepted


def test_a_prune_only_stage_is_refused_by_the_trainer(tmp_path):
    model = _model()
    optimizer = _optimizer(model)
    recipe = load_recipe_text(
        yaml.safe_dump(
            {
                "training": {"steps": 0},
                "modifiers": [{"type": "gmp", "init_sparsity": 0.5, "final_sparsity": 0.5}],
            }
        )
    )
    program = recipec.compile(recipe, model, optimizer, steps_per_epoch=STEPS_PER_EPOCH)
    trainer = RecipecTrainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=_dataset(),
        program=program,
        optimizers=(optimizer, None),
    )
    with pytest.raises(ValueError, match=r"prune-only .* program.step_start\(0\)"):
        trainer.train()
    assert program.sparsity()[0] == 0.0


GMP_QAT = [
    {**GMP_LR[0], "end_step": 6, "update_every_steps": 2},
    {"type": "quantize", "start_step": 7, "freeze_observers_at_step": 9},
    {"type": "lr", "schedule": "linear", "init_lr": 3e-3, "final_lr": 0.0},
]


def test_qat_through_the_trainer_equals_the_plain_loop(tmp_path):
    """Pruning then int8 fake-quant (observed, frozen at step 9) inside Trainer's steps gives
    the plain loop's weights and input ranges; pruned weights stay exact zeros."""
    from recipec.quant.fake import quant_of

    data = _dataset()
    recipe = _recipe(GMP_QAT)
    base = _model()
    plain_model, hf_model = copy.deepcopy(base), copy.deepcopy(base)
    plain_opt, hf_opt = _optimizer(plain_model), _optimizer(hf_model)
    plain_program = recipec.compile(recipe, plain_model, plain_opt, steps_per_epoch=STEPS_PER_EPOCH)
    _plain_loop(plain_model, plain_program, plain_opt, data)
    plain_program.finalize()
    hf_program = recipec.compile(recipe, hf_model, hf_opt, steps_per_epoch=STEPS_PER_EPOCH)
    RecipecTrainer(
        model=hf_model, args=_args(tmp_path), train_dataset=data, program=hf_program
    ).train()
    plain_params = dict(plain_model.named_parameters())
    for name, p in hf_model.named_parameters():
        torch.testing.assert_close(
            p.detach(), plain_params[name].detach(), rtol=1e-5, atol=1e-7, msg=name
        )
    plain_q, hf_q = quant_of(plain_model), quant_of(hf_model)
    assert hf_q.frozen and hf_q.state_dict().keys() == plain_q.state_dict().keys()
    for name, layer in hf_q.layers.items():
        other = plain_q.layers[name]
        assert layer.enabled and layer.seen == other.seen == 9 - 7  # steps 7 and 8
        assert (layer.lo, layer.hi) == pytest.approx((other.lo, other.hi), rel=1e-5)
        assert not hf_model.get_parameter(name)[~hf_program.masks.masks[name]].any()

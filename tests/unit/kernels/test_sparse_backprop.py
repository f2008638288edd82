"""Sparse backprop (SparseProp kernels once masks are fixed): the autograd function against
F.linear, the layer swap, when a stage turns it on, and `recipec apply --sparse-backprop`
against the same run on dense kernels."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file
from torch import nn

from recipec.cli import main
from recipec.kernels import sparse_backprop as sbp
from recipec.recipe.load import load_recipe_text

needs_sparseprop = pytest.mark.skipif(
    sbp.backend() is None,
    reason=f"the optional sparseprop package is not installed ({sbp.INSTALL_HINT})",
)


def _mask(shape, keep: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen) < keep


def test_layout_is_the_csr_pattern_of_the_mask():
    mask = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    layout = sbp.Layout.from_mask(mask)
    assert layout.indptr.tolist() == [0, 2, 2, 5]
    assert layout.indices.tolist() == [0, 3, 1, 2, 3]
    assert layout.flat.tolist() == [0, 3, 9, 10, 11]
    assert layout.indptr.dtype == layout.indices.dtype == torch.int32
    assert layout.nnz == 5 and layout.sparsity == 1 - 5 / 12
    reference = mask.float().to_sparse_csr()
    assert layout.indptr.tolist() == reference.crow_indices().tolist()
    assert layout.indices.tolist() == reference.col_indices().tolist()


@needs_sparseprop
@pytest.mark.parametrize(
    "x_shape", [(4, 8, 32), (5, 7, 32), (3, 32)]
)  # tokens a multiple of 16 or not
@pytest.mark.parametrize("bias", [True, False])
def test_function_matches_f_linear_on_the_masked_weight(x_shape, bias):
    torch.manual_seed(0)
    mask = _mask((48, 32), keep=0.15)
    weight = (torch.randn(48, 32) * mask).requires_grad_()
    b = torch.randn(48, requires_grad=True) if bias else None
    x = torch.randn(*x_shape, requires_grad=True)
    grad_out = torch.randn(*x_shape[:-1], 48)

    y_ref = F.linear(x, weight, b)
    gx_ref, gw_ref, *gb_ref = torch.autograd.grad(
        y_ref, [x, weight] + ([b] if bias else []), grad_out
    )
    y = sbp.MaskedSparseLinear.apply(x, weight, b, sbp.Layout.from_mask(mask))
    gx, gw, *gb = torch.autograd.grad(y, [x, weight] + ([b] if bias else []), grad_out)

    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        gw, gw_ref * mask, rtol=1e-5, atol=1e-5
    )  # the dense path's masked gradient
    assert torch.all(gw[~mask] == 0)  # exactly zero off the mask
    if bias:
        torch.testing.assert_close(gb[0], gb_ref[0], rtol=1e-5, atol=1e-5)


@needs_sparseprop
def test_function_ignores_weights_off_the_mask():
    """The kernel reads only the mask's positions: what sits elsewhere has no effect."""
    mask = _mask((16, 16), keep=0.2, seed=1)
    weight = torch.randn(16, 16)
    x = torch.randn(8, 16)
    y = sbp.MaskedSparseLinear.apply(x, weight, None, sbp.Layout.from_mask(mask))
    torch.testing.assert_close(y, F.linear(x, weight * mask), rtol=1e-5, atol=1e-5)


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 16)
        self.c = nn.Linear(16, 16)
        self.emb = nn.Embedding(10, 32)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


@needs_sparseprop
def test_refresh_swaps_exactly_the_linear_layers_at_the_threshold_and_remove_restores_them():
    torch.manual_seed(0)
    model = _Two()
    masks = {
        "a.weight": _mask((32, 32), keep=0.5),
        "b.weight": _mask((16, 32), keep=0.08),
        "c.weight": torch.ones(16, 16, dtype=torch.bool),
        "emb.weight": _mask((10, 32), keep=0.01),
    }
    masks["c.weight"][:, 1:] = False  # 1 of 16 kept per row: 93.75% zeros
    with torch.no_grad():
        for name, mask in masks.items():
            model.get_parameter(name).mul_(mask)
    keys = list(model.state_dict())
    x = torch.randn(4, 32)
    dense = model(x)

    kernels = sbp.SparseBackprop(model, min_sparsity=0.9)
    assert kernels.refresh(masks, version=1)
    assert sorted(kernels.layers) == ["b.weight", "c.weight"]  # not a (50%), not the embedding
    assert (
        "forward" in model.b.__dict__
        and "forward" in model.c.__dict__
        and "forward" not in model.a.__dict__
    )
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), dense, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # evaluation
        torch.testing.assert_close(model(x), dense, rtol=1e-5, atol=1e-5)
    assert not kernels.refresh(masks, version=1)  # same masks: nothing rebuilt
    masks["a.weight"] = masks["a.weight"] & _mask((32, 32), keep=0.1, seed=3)
    assert kernels.refresh(masks, version=2)
    assert sorted(kernels.layers) == ["a.weight", "b.weight", "c.weight"]
    kernels.remove()
    assert not kernels.active
    assert all("forward" not in m.__dict__ for m in (model.a, model.b, model.c))


@needs_sparseprop
def test_double_backward_is_refused():
    mask = _mask((16, 16), keep=0.1)
    weight = (torch.randn(16, 16) * mask).requires_grad_()
    x = torch.randn(4, 16, requires_grad=True)
    y = sbp.MaskedSparseLinear.apply(x, weight, None, sbp.Layout.from_mask(mask))
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


@needs_sparseprop
def test_a_layer_with_someone_elses_forward_is_left_alone():
    model = _Two()
    foreign = model.b.forward
    model.b.forward = foreign  # e.g. an accelerate hook
    kernels = sbp.SparseBackprop(model, min_sparsity=0.5)
    kernels.refresh(
        {"b.weight": _mask((16, 32), keep=0.05), "c.weight": _mask((16, 16), keep=0.05)}, version=1
    )
    assert sorted(kernels.layers) == ["c.weight"]
    kernels.remove()
    assert model.b.__dict__["forward"] is foreign and "forward" not in model.c.__dict__


@needs_sparseprop
def test_a_deepcopy_of_a_patched_model_computes_with_its_own_weights():
    import copy

    model = _Two()
    masks = {"c.weight": _mask((16, 16), keep=0.05)}
    with torch.no_grad():
        model.c.weight.mul_(masks["c.weight"])
    kernels = sbp.SparseBackprop(model, min_sparsity=0.5)
    kernels.refresh(masks, version=1)
    twin = copy.deepcopy(model)  # e.g. an EMA copy taken during training
    with torch.no_grad():
        twin.c.weight.mul_(2.0)
        twin.c.bias.zero_()
    x = torch.randn(3, 32)
    torch.testing.assert_close(
        twin(x), F.linear(twin.b(twin.a(x)), twin.c.weight, twin.c.bias), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        model(x), F.linear(model.b(model.a(x)), model.c.weight, model.c.bias), rtol=1e-5, atol=1e-5
    )


def test_the_report_line_says_when_a_stage_was_resumed():
    from recipec.train.report import _sparse_line

    line = _sparse_line({"min_sparsity": 0.9, "from_step": 7, "layers": 12, "resumed": True})
    assert (
        "from step 7 (of the last session: the stage was resumed)" in line
        and "(12 at the end" in line
    )
    assert "resumed" not in _sparse_line({"min_sparsity": 0.9, "from_step": 7, "layers": 12})


@needs_sparseprop
def test_the_loop_removes_the_kernels_however_the_stage_ends(tiny_bert, embedded_tokenizer):
    import recipec
    from recipec.tasks import TaskInfo, builtin
    from recipec.train.loop import StageData, StageRunner

    text = "training: {epochs: 1, batch_size: 4, max_seq_length: 16}\nmodifiers:\n  - {type: gmp, init_sparsity: 0.95, final_sparsity: 0.95, start_step: 0, end_step: 0}\n"
    program = recipec.compile(
        load_recipe_text(text),
        tiny_bert,
        torch.optim.AdamW(tiny_bert.parameters()),
        10,
        sparse_backprop=0.9,
    )
    program.step_start(0)
    assert sum("forward" in m.__dict__ for m in tiny_bert.modules()) == 12
    program.close()
    assert not any("forward" in m.__dict__ for m in tiny_bert.modules())

    # a stage that raises inside a training step: the runner puts every layer back
    seen = []

    def boom(*args, **kwargs):
        seen.append(sum("forward" in m.__dict__ for m in tiny_bert.modules() if m is not tiny_bert))
        raise RuntimeError("boom")

    tiny_bert.forward = boom
    info = TaskInfo("t", "classification", 2)
    train, dev = builtin.generate_splits(8, 4, 0)
    data = StageData(tiny_bert, embedded_tokenizer, info, train, dev)
    with pytest.raises(RuntimeError, match="boom"):
        StageRunner(program, data).run()
    del tiny_bert.forward  # the class's forward again
    assert seen == [12]  # the kernels were on inside the step
    assert not any("forward" in m.__dict__ for m in tiny_bert.modules())
    prune_only = recipec.compile(
        load_recipe_text(text.replace("epochs: 1", "steps: 0")),
        tiny_bert,
        None,
        10,
        sparse_backprop=0.9,
    )
    assert prune_only.kernels is None  # no training step to speed up, and no report line


@needs_sparseprop
def test_a_model_off_the_cpu_is_refused():
    with pytest.raises(sbp.SparseBackpropError, match="on the CPU in a single process"):
        sbp.SparseBackprop(nn.Sequential(nn.Linear(4, 4, device="meta")))


@pytest.mark.parametrize(
    "modifiers, expected",
    [
        (
            "[{type: gmp, init_sparsity: 0.3, final_sparsity: 0.9, start_epoch: 1, end_epoch: 2, update_every_steps: 2}]",
            {10, 12, 14, 16, 18, 20},
        ),
        ("[{type: constant, start_epoch: 0.5}]", {5}),
        (
            "[{type: lr, schedule: linear, init_lr: 1e-3, final_lr: 0}]",
            set(),
        ),  # masks carried from an earlier stage
        (
            "[{type: gmp, init_sparsity: 0.3, final_sparsity: 0.9, start_epoch: 2, end_epoch: 3, update_every_steps: 5}]",
            {20, 25, 30},
        ),  # the last one at the stage's end (finalize)
        ("[{type: cram, sparsities: [0.5, 0.7]}]", None),
    ],
)
@needs_sparseprop
def test_mask_change_steps(modifiers, expected, tiny_bert):
    import recipec

    recipe = load_recipe_text(f"training: {{epochs: 3}}\nmodifiers: {modifiers}\n")
    optimizer = torch.optim.AdamW(tiny_bert.parameters())
    program = recipec.compile(recipe, tiny_bert, optimizer, 10, sparse_backprop=0.9)
    if expected is None:
        assert program.kernels is None
    else:
        assert program.kernels.change_steps == frozenset(expected)


RECIPE = """\
training: {epochs: 3, batch_size: 16, learning_rate: 1e-3, max_seq_length: 32, seed: 1, eval_every_epochs: 1}
modifiers:
  - {type: gmp, init_sparsity: 0.5, final_sparsity: 0.92, start_epoch: 0, end_epoch: 1, update_every_steps: 5}
"""
# Every layer at >= 90% from the first pruning step: the kernels run between pruning steps too.
EARLY = RECIPE.replace("init_sparsity: 0.5", "init_sparsity: 0.9").replace("0.92", "0.95")


def _apply(recipe, model, out, *extra):
    args = [
        "apply",
        str(recipe),
        "--model",
        str(model),
        "--max-train",
        160,
        "--max-eval",
        48,
        "--output",
        str(out),
        "--quiet",
        *extra,
    ]
    return CliRunner().invoke(main, [str(a) for a in args])


@needs_sparseprop
@pytest.mark.parametrize(
    "text, from_step", [(RECIPE, 10), (EARLY, 0)], ids=["dense_until_step_10", "sparse_from_step_0"]
)
def test_apply_with_sparse_backprop_matches_the_dense_kernels(
    tiny_model_dir, tmp_path, monkeypatch, text, from_step
):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    dense = _apply(recipe, tiny_model_dir, tmp_path / "dense")
    assert dense.exit_code == 0, dense.output
    calls = []
    original = sbp.MaskedSparseLinear.forward

    def counted(ctx, *args):
        calls.append(1)
        return original(ctx, *args)

    monkeypatch.setattr(sbp.MaskedSparseLinear, "forward", staticmethod(counted))
    sparse = _apply(recipe, tiny_model_dir, tmp_path / "sparse", "--sparse-backprop")
    assert sparse.exit_code == 0, sparse.output

    report = json.loads((tmp_path / "sparse" / "report.json").read_text())
    used = report["stages"][0]["sparse_backprop"]
    assert used == {
        "min_sparsity": 0.9,
        "from_step": from_step,
        "layers": 12,
    }  # all 12 linears at the end
    # every training step from there x 12 layers, plus the evaluation forwards
    assert len(calls) >= (30 - from_step) * 12
    assert (
        f"Sparse backprop: from step {from_step},"
        in (tmp_path / "sparse" / "report.md").read_text()
    )
    a = load_file(str(tmp_path / "dense" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "sparse" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((b[name] - a[name]).abs().max()) for name in a)
    assert worst < 1e-7, worst  # float rounding only (a bias off by 0.1% moves them by 2e-7)
    masks_a = load_file(str(tmp_path / "dense" / "model" / "masks.safetensors"))
    masks_b = load_file(str(tmp_path / "sparse" / "model" / "masks.safetensors"))
    assert masks_a.keys() == masks_b.keys() and len(masks_a) == 12
    for name, mask in masks_b.items():
        assert torch.equal(mask, masks_a[name]), name
        assert torch.equal(b[name] == 0, mask == 0), name  # exact zeros where pruned, nowhere else
    records = [
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("dense", "sparse")
    ]
    assert [sorted(r) for r in records[0]] == [sorted(r) for r in records[1]]
    for ra, rb in zip(*records):
        if "loss" in ra:
            assert abs(ra["loss"] - rb["loss"]) < 1e-6, (ra, rb)
    # the evaluation after step 20 ran on the sparse kernels too: same predictions
    evals = [[r for r in run if "eval_accuracy" in r] for run in records]
    assert [r["step"] for r in evals[1]] == [10, 20, 30]
    assert [r["eval_accuracy"] for r in evals[0]] == [r["eval_accuracy"] for r in evals[1]]


@needs_sparseprop
def test_a_threshold_above_every_layer_keeps_dense_kernels_and_says_so(tiny_model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    result = _apply(recipe, tiny_model_dir, tmp_path / "run", "--sparse-backprop-min", 0.99)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["stages"][0]["sparse_backprop"] == {
        "min_sparsity": 0.99,
        "from_step": None,
        "layers": 0,
    }
    assert (
        "no pruned linear layer reached >= 99% zeros"
        in (tmp_path / "run" / "report.md").read_text()
    )


@needs_sparseprop
def test_pruning_steps_and_obert_gradients_see_the_dense_layers(
    tiny_model_dir, tmp_path, monkeypatch
):
    from recipec.modifiers.obert import OBertModifier

    seen = []
    original = OBertModifier.compute

    def compute(self, step, sparsity):
        patched = [n for n, m in self.ctx.model.named_modules() if "forward" in m.__dict__]
        seen.append((step, patched))
        return original(self, step, sparsity)

    monkeypatch.setattr(OBertModifier, "compute", compute)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        EARLY.replace(
            "type: gmp", "type: obert, num_grads: 4, grad_batch_size: 4, fisher_block_size: 8"
        )
    )
    result = _apply(recipe, tiny_model_dir, tmp_path / "run", "--sparse-backprop")
    assert result.exit_code == 0, result.output
    assert [step for step, _ in seen] == [0, 5, 10]
    assert all(patched == [] for _, patched in seen), seen
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["stages"][0]["sparse_backprop"] == {
        "min_sparsity": 0.9,
        "from_step": 0,
        "layers": 12,
    }


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sparse-backprop", "--device", "cuda"], "drop --device cuda"),
        (["--sparse-backprop-min", "1.5"], "1.5 is not in the range"),
    ],
)
def test_bad_sparse_backprop_options(tiny_model_dir, tmp_path, extra, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    result = _apply(recipe, tiny_model_dir, tmp_path / "run", *extra)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "run").exists()


def test_sparse_backprop_without_the_package_names_the_install(
    tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(sbp, "backend", lambda: None)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    result = _apply(recipe, tiny_model_dir, tmp_path / "run", "--sparse-backprop")
    assert (
        result.exit_code == 2 and "pip install --no-build-isolation sparseprop" in result.output
    ), result.output
    assert not (tmp_path / "run").exists()


@needs_sparseprop
def test_the_benchmark_runs_end_to_end_on_a_tiny_model(load_benchmark, tmp_path):
    bench = load_benchmark("sparse_backprop")
    code = bench.main(
        [
            "--model",
            "tiny",
            "--sparsities",
            "0.9",
            "--rounds",
            "1",
            "--block",
            "1",
            "--warmup",
            "1",
            "--batch-size",
            "4",
            "--seq-len",
            "32",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "sparse_backprop.json").read_text())
    (row,) = report["results"]
    assert row["sparse_layers"] == row["pruned_tensors"] == 12
    assert row["max_weight_difference"] < 1e-6  # same batches, same dropout: rounding only
    assert (
        row["speedup"] > 0 and "| 90% | 12 of 12 |" in (tmp_path / "sparse_backprop.md").read_text()
    )
    assert [part["shape"] for part in report["layer_breakdown"]] == [[64, 64], [128, 64], [64, 128]]
    assert all(
        part["forward kernel"] > 0 and part["backward kernel"] > 0
        for part in report["layer_breakdown"]
    )


@needs_sparseprop
def test_recipec_trainer_with_sparse_backprop_matches_the_dense_kernels(tmp_path):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    import copy

    import yaml
    from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

    import recipec
    from recipec.train.hf import RecipecTrainer

    recipe = load_recipe_text(
        yaml.safe_dump(
            {
                "training": {"epochs": 2},
                "modifiers": [
                    {
                        "type": "gmp",
                        "init_sparsity": 0.9,
                        "final_sparsity": 0.95,
                        "start_step": 1,
                        "end_step": 5,
                        "update_every_steps": 2,
                    }
                ],
            }
        )
    )
    torch.manual_seed(0)
    base = BertForSequenceClassification(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )
    gen = torch.Generator().manual_seed(1)
    data = [
        {
            "input_ids": torch.randint(0, 64, (12,), generator=gen),
            "attention_mask": torch.ones(12, dtype=torch.long),
            "labels": torch.randint(0, 2, (), generator=gen),
        }
        for _ in range(24)
    ]

    def train(sparse):
        model = copy.deepcopy(base)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        program = recipec.compile(recipe, model, optimizer, steps_per_epoch=6)
        args = TrainingArguments(
            output_dir=str(tmp_path / f"hf{sparse}"),
            per_device_train_batch_size=4,
            num_train_epochs=2,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            use_cpu=True,
            train_sampling_strategy="sequential",
            seed=0,
        )
        trainer = RecipecTrainer(
            model=model,
            args=args,
            train_dataset=data,
            program=program,
            sparse_backprop=0.9 if sparse else None,
        )
        trainer.train()
        return model, program, trainer.recipec_callback

    dense_model, dense_program, _ = train(False)
    model, program, callback = train(True)
    # a training that raises leaves no kernels behind either
    from transformers import TrainerCallback

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise RuntimeError("boom")

    broken = copy.deepcopy(base)
    optimizer = torch.optim.AdamW(broken.parameters(), lr=1e-3)
    trainer = RecipecTrainer(
        model=broken,
        program=recipec.compile(recipe, broken, optimizer, steps_per_epoch=6),
        train_dataset=data,
        args=TrainingArguments(
            output_dir=str(tmp_path / "boom"),
            per_device_train_batch_size=4,
            num_train_epochs=2,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            use_cpu=True,
            seed=0,
        ),
        sparse_backprop=0.9,
        callbacks=[Boom()],
    )
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert (
        trainer.recipec_callback.sparse_backprop_record()["layers"] > 0
    )  # they were on when it raised
    assert not any("forward" in m.__dict__ for m in broken.modules())
    assert callback.sparse_backprop_record() == {"min_sparsity": 0.9, "from_step": 1, "layers": 12}
    assert not any("forward" in m.__dict__ for m in model.modules())  # put back at the end
    for name, mask in dense_program.masks.masks.items():
        assert torch.equal(program.masks.masks[name], mask), name
    dense_params = dict(dense_model.named_parameters())
    worst = max(
        float((p.detach() - dense_params[n].detach()).abs().max())
        for n, p in model.named_parameters()
    )
    assert worst < 1e-4, (
        worst
    )  # rounding; AdamW (lr 1e-3) turns a wrong gradient into ~1e-3 per step

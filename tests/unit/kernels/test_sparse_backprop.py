"""Sparse backprop (recipec's kernels once masks are fixed): the autograd function against
F.linear, the layer swap, when a stage turns it on, and `recipec apply --sparse-backprop`
against the same run on dense kernels. Nothing here needs an optional package: where the
kernels cannot be built, the same tests run the pure-torch fallback."""

from __future__ import annotations

import copy
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


def test_function_ignores_weights_off_the_mask():
    """The kernel reads only the mask's positions: what sits elsewhere has no effect."""
    mask = _mask((16, 16), keep=0.2, seed=1)
    weight = torch.randn(16, 16)
    x = torch.randn(8, 16)
    y = sbp.MaskedSparseLinear.apply(x, weight, None, sbp.Layout.from_mask(mask))
    torch.testing.assert_close(y, F.linear(x, weight * mask), rtol=1e-5, atol=1e-5)


# Hand-made masks: odd shapes, empty rows and columns, a full row, nothing kept at all.
HAND_MASKS = {
    "3x4 empty row and column": [[1, 0, 0, 1], [0, 0, 0, 0], [0, 1, 0, 1]],
    "1x1": [[1]],
    "5x7 full row, empty column": [
        [1, 0, 1, 0, 0, 0, 1],
        [1, 1, 1, 1, 1, 0, 1],
        [0, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0, 0],
        [0, 1, 0, 0, 1, 0, 1],
    ],
    "4x3 nothing kept": [[0, 0, 0]] * 4,
}


def _hand_masks():
    masks = {name: torch.tensor(rows, dtype=torch.bool) for name, rows in HAND_MASKS.items()}
    wide = _mask((17, 33), keep=0.12, seed=4)  # wider than a vector, rows of odd lengths
    wide[[0, 9, 16]] = False  # empty rows, first and last among them
    wide[5] = True
    masks["17x33 ~12% kept, empty rows"] = wide
    return masks


def _brute_force(x, weight, bias, mask, grad_out):
    """y, dL/dx, dL/dW, dL/db of ``x @ (W * mask)^T + b`` by loops over the kept weights
    (float64; integer-valued inputs make every sum exact in float32 too)."""
    x, weight, grad_out = x.double(), weight.double(), grad_out.double()
    tokens, (rows, cols) = x.shape[0], mask.shape
    y = bias.double().repeat(tokens, 1)
    gx = torch.zeros(tokens, cols, dtype=torch.float64)
    gw = torch.zeros(rows, cols, dtype=torch.float64)
    for o, i in mask.nonzero().tolist():
        y[:, o] += x[:, i] * weight[o, i]
        gx[:, i] += grad_out[:, o] * weight[o, i]
        gw[o, i] = (grad_out[:, o] * x[:, i]).sum()
    return y, gx, gw, grad_out.sum(dim=0)


@pytest.mark.parametrize("path", ["avx2", "portable-c", "torch-fallback"])
@pytest.mark.parametrize("name", list(_hand_masks()))
@pytest.mark.parametrize("tokens", [1, 3, 19])
def test_gradients_equal_a_brute_force_reference_exactly(path, name, tokens, monkeypatch):
    from recipec.kernels import native

    if path not in native.available_backends():
        pytest.skip(f"recipec's kernels have no {path!r} path here: {native.unavailable_reason()}")
    monkeypatch.setattr(sbp, "backend", lambda: path)
    mask = _hand_masks()[name]
    rows, cols = mask.shape
    gen = torch.Generator().manual_seed(tokens)
    ints = lambda *shape: torch.randint(-4, 5, shape, generator=gen).float()  # noqa: E731
    weight = ints(rows, cols).requires_grad_()  # nonzero off the mask too: must be ignored
    bias = ints(rows).requires_grad_()
    x = ints(2, tokens, cols).requires_grad_()  # leading dims, as a batch of sequences
    grad_out = ints(2, tokens, rows)

    y = sbp.MaskedSparseLinear.apply(x, weight, bias, sbp.Layout.from_mask(mask))
    gx, gw, gb = torch.autograd.grad(y, [x, weight, bias], grad_out)

    ref = _brute_force(x.detach().reshape(-1, cols), weight.detach(), bias.detach(), mask,
                       grad_out.reshape(-1, rows))  # fmt: skip
    assert torch.equal(y.detach().reshape(-1, rows).double(), ref[0])
    assert torch.equal(gx.reshape(-1, cols).double(), ref[1])
    assert torch.equal(gw.double(), ref[2]) and bool((gw[~mask] == 0).all())
    assert torch.equal(gb.double(), ref[3])
    with torch.no_grad():  # evaluation: the same values, no graph kept
        y_eval = sbp.MaskedSparseLinear.apply(x, weight, bias, sbp.Layout.from_mask(mask), False)
    assert not y_eval.requires_grad and torch.equal(y_eval, y.detach())


def test_a_patched_layer_trains_like_the_masked_dense_layer():
    """Through the layer swap: the same loss and gradients as the dense layer whose weight is
    masked, with integer values (exact)."""
    mask = _hand_masks()["17x33 ~12% kept, empty rows"]
    gen = torch.Generator().manual_seed(0)
    dense = nn.Linear(33, 17)
    with torch.no_grad():
        dense.weight.copy_(torch.randint(-3, 4, (17, 33), generator=gen) * mask)
        dense.bias.copy_(torch.randint(-3, 4, (17,), generator=gen))
    sparse = nn.Sequential(copy.deepcopy(dense))
    kernels = sbp.SparseBackprop(sparse, min_sparsity=0.5)
    assert kernels.refresh({"0.weight": mask}, version=1) and list(kernels.layers) == ["0.weight"]
    x = torch.randint(-3, 4, (5, 33), generator=gen).float()
    for model in (dense, sparse):
        model(x).pow(2).sum().backward()
    assert torch.equal(sparse[0].weight.grad, dense.weight.grad * mask)
    assert torch.equal(sparse[0].bias.grad, dense.bias.grad)


def test_a_second_backward_through_a_freed_layer_says_so():
    mask = _mask((8, 8), keep=0.3)
    x = torch.randn(3, 8, requires_grad=True)
    y = sbp.MaskedSparseLinear.apply(x, torch.randn(8, 8), None, sbp.Layout.from_mask(mask))
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        y.sum().backward()


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 16)
        self.c = nn.Linear(16, 16)
        self.emb = nn.Embedding(10, 32)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


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


def test_double_backward_is_refused():
    mask = _mask((16, 16), keep=0.1)
    weight = (torch.randn(16, 16) * mask).requires_grad_()
    x = torch.randn(4, 16, requires_grad=True)
    y = sbp.MaskedSparseLinear.apply(x, weight, None, sbp.Layout.from_mask(mask))
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


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


def test_a_deepcopy_of_a_patched_model_computes_with_its_own_weights():
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
    assert "backward on recipec's sparse kernels between" in line


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
def test_mask_change_steps(modifiers, expected, tiny_bert):
    import recipec

    recipe = load_recipe_text(f"training: {{epochs: 3}}\nmodifiers: {modifiers}\n")
    optimizer = torch.optim.AdamW(tiny_bert.parameters())
    program = recipec.compile(recipe, tiny_bert, optimizer, 10, sparse_backprop=0.9)
    if expected is None:
        assert program.kernels is None
    else:
        assert program.kernels.change_steps == frozenset(expected)


EPS32 = torch.finfo(torch.float32).eps  # one float32 step at 1.0

RECIPE = """\
training: {epochs: 3, batch_size: 16, learning_rate: 1e-3, max_seq_length: 32, seed: 1, eval_every_epochs: 1}
modifiers:
  - {type: gmp, init_sparsity: 0.5, final_sparsity: 0.92, start_epoch: 0, end_epoch: 1, update_every_steps: 5}
"""
# Every layer at >= 90% from the first pruning step: the kernels run between pruning steps too.
EARLY = RECIPE.replace("init_sparsity: 0.5", "init_sparsity: 0.9").replace("0.92", "0.95")


def _record(least: float, from_step: int | None, layers: int) -> dict:
    """The report's sparse_backprop entry, as this machine's kernel path makes it."""
    record = {"min_sparsity": least, "from_step": from_step, "layers": layers}
    return record if sbp.backend() == sbp.FAST_BACKEND else dict(record, fallback=True)


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
    least = ("--sparse-backprop-min", 0.9)  # the layers pass it at step 10 (RECIPE)
    sparse = _apply(recipe, tiny_model_dir, tmp_path / "sparse", "--sparse-backprop", *least)
    assert sparse.exit_code == 0, sparse.output

    report = json.loads((tmp_path / "sparse" / "report.json").read_text())
    used = report["stages"][0]["sparse_backprop"]
    assert used == _record(0.9, from_step, 12)  # all 12 linears at the end
    # every training step from there x 12 layers, plus the evaluation forwards
    assert len(calls) >= (30 - from_step) * 12
    assert (
        f"Sparse backprop: from step {from_step},"
        in (tmp_path / "sparse" / "report.md").read_text()
    )
    a = load_file(str(tmp_path / "dense" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "sparse" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    # Float rounding only (a bias off by 0.1% moves them by 2e-7): 1e-7, plus one float32 step
    # relative to the value (a LayerNorm weight near 1.0 cannot move by less than 1.2e-7).
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=EPS32, atol=1e-7, msg=name)
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


def test_a_threshold_above_every_layer_keeps_dense_kernels_and_says_so(tiny_model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    result = _apply(recipe, tiny_model_dir, tmp_path / "run", "--sparse-backprop-min", 0.99)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["stages"][0]["sparse_backprop"] == _record(0.99, None, 0)
    assert (
        "no pruned linear layer reached >= 99% zeros"
        in (tmp_path / "run" / "report.md").read_text()
    )


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
    assert report["stages"][0]["sparse_backprop"] == _record(sbp.DEFAULT_MIN_SPARSITY, 0, 12)


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


def _no_compiled_kernels(monkeypatch):
    """This process as on a machine where recipec's kernels could not be built."""
    from recipec.kernels import native

    monkeypatch.setattr(native, "backend", lambda: "torch-fallback")
    monkeypatch.setattr(
        native, "unavailable_reason", lambda: "no C++ compiler found (install g++ or set CXX)"
    )


def test_without_compiled_kernels_it_runs_the_fallback_and_says_it_is_not_faster(
    tiny_model_dir, tmp_path, monkeypatch
):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(EARLY)
    dense = _apply(recipe, tiny_model_dir, tmp_path / "dense")
    assert dense.exit_code == 0, dense.output
    _no_compiled_kernels(monkeypatch)
    assert sbp.backend() == "torch-fallback"
    args = ["apply", recipe, "--model", tiny_model_dir, "--max-train", 160, "--max-eval", 48]
    args += ["--output", tmp_path / "sparse", "--sparse-backprop"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    printed = " ".join(result.output.split())  # the console wraps long lines
    assert printed.count("will not be faster") == 1, result.output
    assert (
        "stage 'main': sparse backprop will not be faster here: no C++ compiler found (install "
        "g++ or set CXX); the pruned layers run the pure-torch fallback (same results, dense "
        "speed)" in printed
    ), result.output
    assert "12 of 12 pruned tensors on the pure-torch fallback (not faster)" in printed
    report = json.loads((tmp_path / "sparse" / "report.json").read_text())
    assert report["stages"][0]["sparse_backprop"] == {
        "min_sparsity": sbp.DEFAULT_MIN_SPARSITY,
        "from_step": 0,
        "layers": 12,
        "fallback": True,
    }
    assert (
        "backward on the pure-torch fallback (recipec's sparse kernels could not run here; not "
        "faster) between mask changes (12 at the end of the stage)"
    ) in (tmp_path / "sparse" / "report.md").read_text()
    a = load_file(str(tmp_path / "dense" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "sparse" / "model" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=EPS32, atol=1e-7, msg=name)


def test_a_program_without_a_progress_callback_warns_once_per_stage(tiny_bert, monkeypatch):
    import recipec

    _no_compiled_kernels(monkeypatch)
    text = "training: {steps: 10}\nmodifiers:\n  - {type: constant}\n"
    optimizer = torch.optim.AdamW(tiny_bert.parameters())
    with pytest.warns(RuntimeWarning, match="will not be faster here: no C"):
        program = recipec.compile(
            load_recipe_text(text), tiny_bert, optimizer, 10, sparse_backprop=0.5
        )
    assert program.kernels.kernels.backend == "torch-fallback"


def test_apply_builds_the_kernels_in_the_background_unless_sparse_backprop_needs_them_now(
    tiny_model_dir, tmp_path, monkeypatch
):
    calls = []
    monkeypatch.setattr(sbp, "start_build", lambda: calls.append("background"))
    monkeypatch.setattr(sbp, "backend", lambda: calls.append("now") or "avx2")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("epochs: 3", "epochs: 1"))
    assert _apply(recipe, tiny_model_dir, tmp_path / "a").exit_code == 0
    assert calls == ["background"]
    calls.clear()
    monkeypatch.setenv("WORLD_SIZE", "2")  # a launcher's worker: no build, and no sparse backprop
    assert _apply(recipe, tiny_model_dir, tmp_path / "b", "--sparse-backprop").exit_code == 2
    assert calls == []


def test_start_build_builds_in_a_thread_and_not_when_the_fallback_is_forced(monkeypatch):
    from recipec.kernels import native

    seen = []
    monkeypatch.setattr(native, "prebuild", lambda: seen.append(1))
    monkeypatch.delenv("RECIPEC_KERNELS", raising=False)
    thread = sbp.start_build()
    thread.join()
    assert seen == [1] and not thread.daemon
    monkeypatch.setenv("RECIPEC_KERNELS", "torch")
    assert sbp.start_build() is None and seen == [1]


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


def test_recipec_trainer_with_sparse_backprop_matches_the_dense_kernels(tmp_path):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
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

"""Structured pruning through the recipe: heads/neurons/layers modifiers at run time (whole
groups, mixed with unstructured GMP), the every-head error with file:line (validate against a
model, plan --model, apply), plan --model's per-layer table, export with and without shrinking,
and a resumed run whose layers were dropped."""

from __future__ import annotations

import json
import os
import signal

import onnx
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import recipec
from recipec.cli import main
from recipec.recipe.errors import RecipeError
from recipec.recipe.load import load_recipe, load_recipe_text
from recipec.sparsity.structured import group_sets, kept_groups, model_facts

RECIPE = """\
training: {steps: 8, batch_size: 8, learning_rate: 1e-3, max_seq_length: 32, seed: 1}
modifiers:
  - {type: layers, keep: 3}
  - {type: heads, init_sparsity: 0.25, final_sparsity: 0.5, start_step: 0, end_step: 4, update_every_steps: 2}
  - {type: neurons, final_sparsity: 0.25, start_step: 0, end_step: 4, update_every_steps: 2}
  - {type: gmp, init_sparsity: 0.3, final_sparsity: 0.8, start_step: 4, end_step: 6, update_every_steps: 1}
"""


def _tiny(layers: int = 4):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


@pytest.fixture(scope="module")
def model4(tmp_path_factory, embedded_tokenizer):
    """A saved 4-layer, 4-head tiny BERT with the embedded tokenizer."""
    folder = tmp_path_factory.mktemp("tiny4")
    _tiny().save_pretrained(folder)
    embedded_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "structured.yaml"
    path.write_text(RECIPE)
    return path


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _apply(recipe, model, out, *extra):
    return _cli(
        "apply", recipe, "--model", model, "--output", out, "--max-train", 64, "--max-eval", 16,
        "--quiet", *extra,
    )  # fmt: skip


# --------------------------------------------------------------------------- runtime


def _zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


def test_heads_neurons_then_unstructured_in_one_recipe():
    """Whole groups at each step; the GMP sparsity counts the weights the groups left."""
    model = _tiny(layers=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights change only by pruning
    recipe = load_recipe_text(RECIPE.replace("keep: 3", "keep: 2"))  # keeps both layers
    program = recipec.compile(recipe, model, opt, steps_per_epoch=8)
    heads_mod, neurons_mod, gmp = program.modifiers[1:]
    params = dict(model.named_parameters())
    expected_heads = {0: 1, 2: 2, 4: 2, 6: 2}  # removed heads per layer after each step's start
    for step in range(8):
        program.step_start(step)
        masks = program.ctx.masks.masks
        for kind in ("heads", "neurons"):
            for gs in group_sets(model, kind):
                kept = kept_groups(gs, masks)
                for s in gs.targets():  # a group is all in or all out, in every tensor
                    for h in range(gs.count):
                        sel = masks[s.param].index_select(s.axis, s.index[h])
                        if kept[h]:
                            # kept groups may have unstructured zeros only after step 4
                            assert step >= 4 or bool(sel.all())
                        else:
                            assert not bool(sel.any()) and not bool(
                                params[s.param].detach().index_select(s.axis, s.index[h]).any()
                            )
        removed = {gs.layer: int((~kept_groups(gs, masks)).sum()) for gs in heads_mod.sets}
        want = expected_heads.get(step, expected_heads[max(k for k in expected_heads if k <= step)])
        assert removed == {0: want, 1: want}, step
        program.after_optimizer_step(step)
    neurons_left = {gs.layer: int(kept_groups(gs, masks).sum()) for gs in neurons_mod.sets}
    assert neurons_left == {0: 48, 1: 48}
    # GMP's 80% is of the weights still there: removed groups count neither way.
    total = sum(p.numel() for p in gmp.targets.values())
    gone = sum(int(r.sum()) for r in gmp.removed_by_structure().values())
    zeros = sum(_zeros(masks[n].float()) for n in gmp.targets)
    assert gone == 2 * (2 * 3 * 8 * 32 + 2 * 32 * 8 + 16 * 32 + 32 * 16)
    assert zeros - gone == round(0.8 * (total - gone))
    assert gmp.achieved_sparsity() == pytest.approx(0.8, abs=1e-3)


def test_layers_dropped_at_compile_leave_the_optimizer_with_the_model_parameters():
    model = _tiny(layers=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # built before the drop
    before = {id(p) for p in model.bert.encoder.layer[2].parameters()}
    recipe = load_recipe_text(RECIPE)
    program = recipec.compile(recipe, model, opt, steps_per_epoch=8)
    assert model.config.num_hidden_layers == 3 and len(model.bert.encoder.layer) == 3
    in_opt = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(in_opt) == sorted(id(p) for p in model.parameters())
    assert not before & set(in_opt)
    recipec.compile(recipe, model, opt, steps_per_epoch=8)  # again: nothing more goes
    assert len(model.bert.encoder.layer) == 3
    assert len([p for g in opt.param_groups for p in g["params"]]) == len(in_opt)
    program.step_start(0)
    out = model(input_ids=torch.randint(3, 99, (2, 7)), labels=torch.tensor([0, 1]))
    program.loss(out.loss, batch={}, outputs=out).backward()
    program.before_optimizer_step(0)
    opt.step()
    program.after_optimizer_step(0)
    assert len(opt.state) == len(in_opt)


def test_blocks_next_to_heads_are_refused_with_file_line(tmp_path):
    path = tmp_path / "mix.yaml"
    path.write_text(
        RECIPE.replace("update_every_steps: 1}", "update_every_steps: 1, structure: block4}")
    )
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(err.value).startswith(f"{path}:6:")
    assert "structure block4 cannot be combined with heads/neurons pruning" in str(err.value)


# --------------------------------------------------------------------------- every head


def test_a_recipe_removing_every_head_of_a_layer_is_a_file_line_error(tmp_path, model4, recipe):
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.replace("final_sparsity: 0.5,", "final_sparsity: 0.9,"))
    load_recipe(bad)  # without the model it is a valid recipe
    message = (
        f"{bad}:4:56: modifiers.1.final_sparsity: would remove every one of the 4 heads of "
        "layer 0; use at most 0.8725 (each layer keeps 1)"
    )
    with pytest.raises(RecipeError) as err:
        load_recipe(bad, model=model_facts(_tiny()))
    assert str(err.value).splitlines()[0] == message
    plan = _cli("plan", bad, "--model", model4)
    assert plan.exit_code == 2 and message in plan.output, plan.output
    applied = _apply(bad, model4, tmp_path / "run")
    assert applied.exit_code == 2 and message in applied.output, applied.output
    assert "Traceback" not in applied.output and not (tmp_path / "run").exists()
    load_recipe(recipe, model=model_facts(_tiny()))  # the 0.5 one fits


def test_a_layers_keep_beyond_the_model_is_a_file_line_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.replace("keep: 3", "keep: 5"))
    with pytest.raises(RecipeError) as err:
        load_recipe(bad, model=model_facts(_tiny()))
    assert f"{bad}:3:" in str(err.value)
    assert "keeps 5 layers but the model has 4" in str(err.value)


# --------------------------------------------------------------------------- plan --model


def test_plan_model_shows_heads_neurons_and_flops_per_layer(model4, recipe):
    result = _cli("plan", recipe, "--model", model4)
    assert result.exit_code == 0, result.output
    text = result.output[result.output.index("structure after the recipe") :]
    lines = [line.split() for line in text.splitlines()[2:5]]
    # layer, was, heads, neurons, GFLOPs after, dense: layer 2 of 4 dropped
    assert [line[:4] for line in lines] == [
        ["0", "0", "2/4", "48/64"],
        ["1", "1", "2/4", "48/64"],
        ["2", "3", "2/4", "48/64"],
    ]
    assert "encoder layers kept: 0, 1, 3" in text
    as_json = _cli("plan", recipe, "--model", model4, "--json")
    assert as_json.exit_code == 0, as_json.output
    structure = json.loads(as_json.output)["model"]["structure"]
    from recipec.architectures import layer_flops

    dense = layer_flops(_tiny(), 128)
    from recipec.sparsity.shrink import shrink_

    small = _tiny(layers=1)
    shrink_(small, {"heads:0": torch.arange(4) >= 2, "neurons:0": torch.arange(64) >= 16})
    per_layer = layer_flops(small, 128)[0]
    assert [r["flops"] for r in structure["layers"]] == [per_layer] * 3
    assert structure["encoder_flops_dense"] == sum(dense.values())
    assert structure["kept_layers"] == [0, 1, 3]
    # the targets and costs are those of the 3 layers that train (the compiler drops first)
    (stage,) = json.loads(as_json.output)["model"]["stages"]
    names = [m["name"] for m in stage["matched"]]
    assert len(names) == 3 * 6 and not [n for n in names if ".layer.3." in n]
    qkv = next(c for c in stage["components"] if c["component"] == "attention.qkv")
    assert qkv["params"] == 3 * 3 * (32 * 32 + 32)


# --------------------------------------------------------------------------- export, resume


@pytest.fixture(scope="module")
def run(tmp_path_factory, recipe, model4):
    out = tmp_path_factory.mktemp("runs") / "run"
    result = _apply(recipe, model4, out, "--checkpoint-every", 3)
    assert result.exit_code == 0, result.output
    return out


def _onnx_shapes(path) -> dict:
    graph = onnx.load(str(path)).graph
    return {i.name: list(i.dims) for i in graph.initializer}


def test_export_shrinks_heads_and_neurons_and_no_shrink_keeps_them(tmp_path, run):
    result = _cli("export", run, "--onnx", "-o", tmp_path / "small")
    assert result.exit_code == 0, result.output
    assert "shrunk: 6 heads and 48 FFN neurons removed, 1,007,682 -> 998,274 parameters" in (
        result.output
    )
    info = json.loads((tmp_path / "small" / "sparsity.json").read_text())
    assert info["structure"]["layers"]["2"] == {
        "heads": {"kept": 2, "of": 4},
        "neurons": {"kept": 48, "of": 64},
    }
    weights = load_file(str(tmp_path / "small" / "model.safetensors"))
    assert weights["bert.encoder.layer.1.attention.self.query.weight"].shape == (16, 32)
    assert weights["bert.encoder.layer.1.output.dense.weight"].shape == (32, 48)
    assert "bert.encoder.layer.3.output.dense.weight" not in weights
    shapes = sorted(map(tuple, _onnx_shapes(tmp_path / "small" / "model.onnx").values()))
    assert shapes.count((32, 48)) + shapes.count((48, 32)) == 6  # FFN weights of 3 layers
    full = _cli("export", run, "--onnx", "-o", tmp_path / "full", "--no-shrink")
    assert full.exit_code == 0, full.output
    assert "shrunk" not in full.output
    assert "structure" not in json.loads((tmp_path / "full" / "sparsity.json").read_text())
    weights = load_file(str(tmp_path / "full" / "model.safetensors"))
    assert weights["bert.encoder.layer.1.attention.self.query.weight"].shape == (32, 32)
    assert weights["bert.encoder.layer.1.output.dense.weight"].shape == (32, 64)
    assert "bert.encoder.layer.3.output.dense.weight" not in weights  # layers are gone anyway
    shapes = sorted(map(tuple, _onnx_shapes(tmp_path / "full" / "model.onnx").values()))
    assert shapes.count((32, 48)) + shapes.count((48, 32)) == 0


def test_the_run_report_lists_what_export_removes(tmp_path, run):
    """report.json / report.md say per layer the heads (which ones) and FFN neurons left and the
    layers kept: the same counts as the export's shrink, computed there independently."""
    report = json.loads((run / "report.json").read_text())
    structure = report["structure"]
    assert structure["source_layers"] == [0, 1, 3]  # keep 3 of 4, spread
    result = _cli("export", run, "--onnx", "-o", tmp_path / "small")
    assert result.exit_code == 0, result.output
    shrunk = json.loads((tmp_path / "small" / "sparsity.json").read_text())["structure"]
    rows = {str(r["layer"]): r for r in structure["layers"]}
    assert rows.keys() == shrunk["layers"].keys()
    for layer, entry in shrunk["layers"].items():
        row = rows[layer]
        assert (row["heads"], row["heads_of"]) == (entry["heads"]["kept"], entry["heads"]["of"])
        assert (row["neurons"], row["neurons_of"]) == (
            entry["neurons"]["kept"],
            entry["neurons"]["of"],
        )
        assert len(row["removed_heads"]) == row["heads_of"] - row["heads"]
    md = (run / "report.md").read_text()
    assert "## Structure" in md and "Encoder layers kept (numbered as loaded): 0, 1, 3." in md
    r2 = rows["2"]
    removed = ", ".join(map(str, r2["removed_heads"]))
    assert f"| 2 | 3 | {r2['heads']}/4 | {removed} | {r2['neurons']}/64 |" in md


def test_resume_of_a_run_with_dropped_layers_is_bit_identical(tmp_path, recipe, model4, run,
                                                              monkeypatch):  # fmt: skip
    from recipec.program import Program

    real = Program.step_start

    def pressed(self, step):  # Ctrl-C during step 5 (a checkpoint exists at step 3)
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, step)

    monkeypatch.setattr(Program, "step_start", pressed)
    out = tmp_path / "cut"
    result = _apply(recipe, model4, out, "--checkpoint-every", 3)
    assert result.exit_code == 130, result.output
    monkeypatch.setattr(Program, "step_start", real)
    result = _apply(recipe, model4, out, "--checkpoint-every", 3, "--resume")
    assert result.exit_code == 0, result.output
    for name in ("model.safetensors", "masks.safetensors"):
        a = load_file(str(run / "model" / name))
        b = load_file(str(out / "model" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), name
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    assert config["recipec_structure"]["source_layers"] == [0, 1, 3]
    assert json.loads((out / "report.json").read_text())["resumed"]


def test_a_dense_run_exports_as_the_baseline(tmp_path):
    """A dense `recipec apply` run writes an empty masks file: export takes the nonzero pattern
    (nothing pruned) instead of refusing (the dense row of benchmarks/structured.py)."""
    from recipec.checkpoint import MASKS_FILE, write_checkpoint

    folder = write_checkpoint(_tiny(layers=1), tmp_path / "dense", {}, None, "name: t\n")
    assert load_file(str(folder / MASKS_FILE)) == {}
    result = _cli("export", folder, "--onnx", "-o", tmp_path / "onnx")
    assert result.exit_code == 0, result.output
    assert "verified: zeros of 6 tensors (0 pruned) match the masks" in result.output
    assert "shrunk" not in result.output

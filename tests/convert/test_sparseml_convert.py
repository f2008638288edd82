"""SparseML -> recipec conversion: validity, schedule equivalence, safety, reporting."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from sparseml_reference import LRFunc, Prune, SetLR, lr_schedule, lr_tolerance, pruning_events

from recipec.convert import ConvertError, convert_file, convert_text
from recipec.plan import resolve
from recipec.recipe.load import load_recipe_text

DATA = Path(__file__).parent / "data"

# Hand-written SparseML schedules of the recipes under data/ (absolute epochs, one clock).
REFERENCE = {
    "obert_unstructured.yaml": dict(
        epochs=[10],
        prune=[Prune(2, 8, 2, 0.7, 0.9)],
        lr=[
            LRFunc("linear", 0, 2, 8e-5, 8e-6),
            LRFunc("cyclic_linear", 2, 8, 8e-5, 8e-6, 2),
            LRFunc("linear", 8, 10, 8e-5, 0.0),
        ],
    ),
    "obert_30epochs.yaml": dict(
        epochs=[30],
        prune=[Prune(2, 26, 4, 0.7, 0.9)],
        lr=[
            LRFunc("linear", 0, 2, 8e-5, 8e-6),
            LRFunc("cyclic_linear", 2, 26, 8e-5, 8e-6, 4),
            LRFunc("linear", 26, 30, 8e-5, 8e-6),
        ],
    ),
    "obert_block4.yaml": dict(
        epochs=[8],
        prune=[Prune(1, 6, 2, 0.5, 0.8)],
        lr=[
            LRFunc("linear", 0, 1, 5e-5, 5e-6),
            LRFunc("cyclic_linear", 1, 6, 5e-5, 5e-6, 2),
            LRFunc("cosine", 6, 8, 5e-5, 0.0),
        ],
    ),
    "gmp_variables.yaml": dict(
        epochs=[12],
        prune=[Prune(2, 9, 0.5, 0.34, 0.85, "linear")],
        lr=[SetLR(-1, 3e-5), LRFunc("linear", 2, 9, 3e-5, 3e-6)],
    ),
    "staged_transfer.yaml": dict(
        epochs=[6, 4],
        prune=[Prune(1, 5, 1, 0.3, 0.8)],
        lr=[LRFunc("linear", 0, 6, 5e-5, 5e-6), LRFunc("cosine", 7, 10, 2e-5, 0.0)],
    ),
    "recipe_card.md": dict(
        epochs=[4],
        prune=[Prune(1, 3, 0.5, 0.1, 0.5)],
        lr=[SetLR(0, 2e-5)],
    ),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
@pytest.mark.parametrize("spe", [4, 10])
def test_plan_matches_sparseml_schedule(name, spe):
    """Per-step sparsity targets and LRs of the converted recipe equal SparseML's."""
    ref = REFERENCE[name]
    conversion = convert_file(DATA / name)
    plans = resolve(conversion.recipe, spe)
    assert [p.total_steps for p in plans] == [e * spe for e in ref["epochs"]]
    offsets = [sum(ref["epochs"][:i]) * spe for i in range(len(plans))]
    # sparsity at every pruning step, on SparseML's absolute clock
    events = [
        (offset + step, sparsity)
        for plan, offset in zip(plans, offsets)
        for step, _, sparsity in plan.pruning_events()
    ]
    expected = [e for mod in ref["prune"] for e in pruning_events(mod, spe)]
    assert [s for s, _ in events] == [s for s, _ in expected]
    assert [sp for _, sp in events] == pytest.approx([sp for _, sp in expected], abs=1e-12)
    # LR: exactly equal at every pruning step; at every other step equal except inside a cyclic
    # window, where recipec's slope is C / (C - 1) of SparseML's (see docs/convert.md)
    total = sum(ref["epochs"]) * spe
    sparseml_lr = lr_schedule(ref["lr"], total, spe)
    recipec_lr = [plan.lr_at(step) for plan in plans for step in range(plan.total_steps)]
    assert len(recipec_lr) == total
    for step, _ in events:
        assert recipec_lr[step] == pytest.approx(sparseml_lr[step], rel=1e-12), step
    for step, (ours, theirs) in enumerate(zip(recipec_lr, sparseml_lr)):
        if theirs is not None:
            assert abs(ours - theirs) <= lr_tolerance(ref["lr"], step, spe) + 1e-12 * theirs, step


@pytest.mark.parametrize("path", sorted(DATA.iterdir()), ids=lambda p: p.name)
def test_every_recipe_converts_to_a_valid_recipe(path):
    conversion = convert_file(path)
    again = load_recipe_text(conversion.text, "again.yaml")
    assert again == conversion.recipe
    assert conversion.summary()


def test_variables_stay_tweakable_references():
    conversion = convert_file(DATA / "gmp_variables.yaml")
    text = conversion.text
    assert "prune_end: ${num_epochs - cooldown_epochs}" in text
    assert "first_step: ${target_sparsity * 0.4}" in text
    assert "end_epoch: ${prune_end}" in text and "final_sparsity: ${target_sparsity}" in text
    assert conversion.recipe.variables["prune_end"] == 9
    tweaked = load_recipe_text(text, overrides=["target_sparsity=0.9", "num_epochs=14"])
    gmp = next(m for m in tweaked.modifiers if m.type == "gmp")
    assert gmp.final_sparsity == 0.9 and gmp.end_epoch == 11
    assert gmp.init_sparsity == pytest.approx(0.36)


def test_obert_fields_and_distillation():
    conversion = convert_file(DATA / "obert_unstructured.yaml")
    (obert,) = [m for m in conversion.recipe.modifiers if m.type == "obert"]
    assert (
        obert.num_grads,
        obert.damp,
        obert.fisher_block_size,
        obert.grad_batch_size,
        obert.recomputations,
    ) == (64, 1e-7, 50, 8, 2)
    assert (obert.scope, obert.structure, obert.schedule) == ("global", "unstructured", "cubic")
    (kd,) = [m for m in conversion.recipe.modifiers if m.type == "distill"]
    assert (kd.teacher, kd.hardness, kd.temperature) == ("auto", 1.0, 5.5)
    assert any("--distill_teacher" in n.message for n in conversion.notes)
    assert not conversion.unsupported
    block4 = convert_file(DATA / "obert_block4.yaml")
    (obert,) = [m for m in block4.recipe.modifiers if m.type == "obert"]
    assert (obert.structure, obert.scope, obert.fisher_block_size) == ("block4", "per_layer", 32)


def test_staged_recipe_epochs_are_relative_to_each_stage():
    conversion = convert_file(DATA / "staged_transfer.yaml")
    recipe = conversion.recipe
    assert [s.name for s in recipe.stages] == ["prune_stage", "transfer_stage"]
    assert [recipe.stage_training(s).epochs for s in recipe.stages] == [6, 4]
    transfer = recipe.stages[1]
    constant = next(m for m in transfer.modifiers if m.type == "constant")
    assert (constant.start_epoch, constant.end_epoch) == (0, 4)
    cosine = next(m for m in transfer.modifiers if m.type == "lr" and m.schedule == "cosine")
    assert (cosine.start_epoch, cosine.init_lr) == (1, 2e-5)
    # the same variable name in two stages becomes two recipec variables
    assert recipe.variables["prune_stage_stage_lr"] == 5e-5
    assert recipe.variables["transfer_stage_stage_lr"] == 2e-5
    # __ALL_PRUNABLE__ is hoisted to the recipe's targets with its exclusions
    assert recipe.targets == [r"\.weight$"] and recipe.exclude == [
        r"embeddings\.",
        r"[Nn]orm\.weight$",
    ]


def _bert_param_names() -> list[str]:
    names = [
        f"bert.embeddings.{n}.weight"
        for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    ]
    names += ["bert.embeddings.LayerNorm.weight", "bert.embeddings.LayerNorm.bias"]
    for layer in range(2):
        base = f"bert.encoder.layer.{layer}."
        for lin in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ):
            names += [base + lin + ".weight", base + lin + ".bias"]
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            names += [base + norm + ".weight", base + norm + ".bias"]
    return names + [
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
        "classifier.weight",
        "classifier.bias",
    ]


def _sparseml_matches(params: list[str], names: list[str]) -> set[str]:
    """SparseML's rule: 're:' patterns with re.match, other entries by exact name."""
    out = set()
    for name in names:
        for p in params:
            if (p.startswith("re:") and re.match(p[3:], name)) or p == name:
                out.add(name)
    return out


def _recipec_matches(recipe, names: list[str]) -> set[str]:
    return {
        n
        for n in names
        if any(re.search(t, n) for t in recipe.targets)
        and not any(re.search(x, n) for x in recipe.exclude)
    }


@pytest.mark.parametrize(
    "params",
    [
        [
            "re:bert.encoder.layer.*.attention.self.query.weight",
            "re:bert.encoder.layer.*.output.dense.weight",
        ],
        ["bert.encoder.layer.0.attention.self.key.weight", "bert.pooler.dense.weight"],
        ["re:.*dense", "re:bert.encoder.layer.1.(intermediate|output).dense.weight"],
    ],
)
def test_params_select_the_same_tensors_as_sparseml(params):
    text = (
        "modifiers:\n  - !EpochRangeModifier\n    end_epoch: 2\n  - !GMPruningModifier\n"
        f"    params: {params!r}\n    init_sparsity: 0.1\n    final_sparsity: 0.5\n"
        "    start_epoch: 0\n    end_epoch: 1\n    update_frequency: 1\n"
    )
    recipe = convert_text(text, "p.yaml").recipe
    names = _bert_param_names()
    assert _recipec_matches(recipe, names) == _sparseml_matches(params, names)
    assert _recipec_matches(recipe, names)


def test_all_prunable_is_every_linear_weight():
    text = (
        "modifiers:\n  - !EpochRangeModifier\n    end_epoch: 2\n  - !GMPruningModifier\n"
        "    params: __ALL_PRUNABLE__\n    init_sparsity: 0.1\n    final_sparsity: 0.5\n"
        "    start_epoch: 0\n    end_epoch: 1\n    update_frequency: 1\n"
    )
    conversion = convert_text(text, "p.yaml")
    linear = {
        n
        for n in _bert_param_names()
        if n.endswith(".weight") and "embeddings" not in n and "LayerNorm" not in n
    }
    assert _recipec_matches(conversion.recipe, _bert_param_names()) == linear
    assert any("__ALL_PRUNABLE__" in n.message for n in conversion.notes)


GMP = """\
modifiers:
  - !EpochRangeModifier
    end_epoch: 4
  - !GMPruningModifier
    params: ["re:.*weight"]
    init_sparsity: {init}
    final_sparsity: {final}
    start_epoch: 1
    end_epoch: 3
    update_frequency: 1
    mask_type: {mask}
"""


def test_mask_types():
    def structure(mask, init=0.1, final=0.5):
        recipe = convert_text(GMP.format(mask=mask, init=init, final=final), "m.yaml").recipe
        return next(m for m in recipe.modifiers if m.type == "gmp")

    assert structure("block4").structure == "block4"
    assert structure("block").structure == "block4"
    assert structure("[1, 4]").structure == "block4"
    nm = structure("'2:4'")
    assert (nm.structure, nm.init_sparsity, nm.final_sparsity) == ("2:4", 0.5, 0.5)
    with_channel = convert_text(GMP.format(mask="channel", init=0.1, final=0.5), "m.yaml")
    assert [f.name for f in with_channel.unsupported] == ["!GMPruningModifier.mask_type"]
    assert with_channel.unsupported[0].line == 11
    assert not [m for m in with_channel.recipe.modifiers if m.type == "gmp"]


def test_unsupported_modifiers_and_fields_are_reported_by_name_and_line():
    conversion = convert_file(DATA / "quantization.yaml")
    found = [(f.name, f.line) for f in conversion.unsupported]
    assert ("!QuantizationModifier", 21) in found
    assert ("!GMPruningModifier.leave_enabled", 19) in found
    assert "# Not converted:" in conversion.text and "!QuantizationModifier" in conversion.text
    odd = convert_text(
        GMP.format(mask="unstructured", init=0.1, final=0.5).replace(
            "    mask_type:", "    sparsity_bonus: 3\n    mask_type:"
        ),
        "o.yaml",
    )
    assert [(f.name, f.line) for f in odd.unsupported] == [
        ("!GMPruningModifier.sparsity_bonus", 11)
    ]
    inverse = convert_text(
        GMP.format(mask="unstructured", init=0.1, final=0.5) + "    inter_func: inverse_cubic\n",
        "i.yaml",
    )
    assert [f.name for f in inverse.unsupported] == ["!GMPruningModifier.inter_func"]


def test_final_sparsity_mapping_makes_one_modifier_per_level():
    text = """\
modifiers:
  - !EpochRangeModifier
    end_epoch: 3
  - !GMPruningModifier
    params: []
    init_sparsity: 0.1
    final_sparsity:
      0.9: ["re:.*intermediate.dense.weight"]
      0.7: ["re:.*attention.self.query.weight"]
    start_epoch: 0
    end_epoch: 2
    update_frequency: 1
"""
    recipe = convert_text(text, "d.yaml").recipe
    gmps = [m for m in recipe.modifiers if m.type == "gmp"]
    assert [(m.final_sparsity, m.targets) for m in gmps] == [
        (0.9, [r"^.*intermediate.dense.weight"]),
        (0.7, [r"^.*attention.self.query.weight"]),
    ]


def test_linear_warmup_from_zero_is_approximated_and_noted():
    text = """\
modifiers:
  - !EpochRangeModifier
    end_epoch: 3
  - !LearningRateFunctionModifier
    lr_func: linear
    start_epoch: 0
    end_epoch: 1
    init_lr: 0.0
    final_lr: 1e-4
"""
    conversion = convert_text(text, "w.yaml")
    (lr, hold) = conversion.recipe.modifiers
    assert (lr.schedule, lr.init_lr, lr.warmup_epochs) == ("constant", 1e-4, 1)
    assert (hold.schedule, hold.init_lr, hold.start_epoch) == ("constant", 1e-4, 1)
    assert any("warm-up" in n.message for n in conversion.notes)


@pytest.mark.parametrize(
    "tag",
    [
        "!!python/object/apply:os.system",
        "!!python/object/new:os.system",
        "!!python/name:os.system",
        "!<tag:yaml.org,2002:python/object/apply:os.system>",
        "!python/object/apply:os.system",
    ],
)
def test_python_tags_are_refused(tag, monkeypatch):
    def boom(*args):
        raise AssertionError("os.system was called")

    monkeypatch.setattr(os, "system", boom)
    text = f'num_epochs: 2\nmodifiers:\n  - {tag} ["echo pwned"]\n'
    with pytest.raises(ConvertError) as info:
        convert_text(text, "evil.yaml")
    (problem,) = info.value.problems
    assert problem.startswith("evil.yaml:3:5: YAML tag ") and "is not allowed" in problem


@pytest.mark.parametrize(
    "value, message",
    [
        ("eval(__import__('os'))", "only these functions are allowed"),
        ("eval(__import__('os').system('echo pwned'))", "only these functions are allowed"),
        ("eval(num_epochs.__class__)", "Attribute is not allowed"),
        ("eval(epochs + 1)", "unknown variable 'epochs'"),
        ("eval(name * 2)", "is not a number"),
    ],
)
def test_eval_uses_the_safe_expression_language(value, message, monkeypatch):
    monkeypatch.setattr(os, "system", lambda *a: pytest.fail("os.system was called"))
    text = (
        f"num_epochs: 3\nname: bert\nmodifiers:\n  - !EpochRangeModifier\n    end_epoch: {value}\n"
    )
    with pytest.raises(ConvertError) as info:
        convert_text(text, "e.yaml")
    (problem,) = info.value.problems
    assert problem.startswith("e.yaml:5:") and message in problem


def test_markdown_front_matter_keeps_file_line_numbers():
    text = (
        (DATA / "recipe_card.md")
        .read_text()
        .replace("final_sparsity: eval(target)", "final_sparsity: eval(tagret)")
    )
    with pytest.raises(ConvertError) as info:
        convert_text(text, "card.md")
    assert info.value.problems[0].startswith("card.md:18:5:")
    with pytest.raises(ConvertError, match="no YAML front matter"):
        convert_text("# just markdown\n", "card.md")


def test_stage_that_starts_before_the_previous_one_ends_is_an_error():
    text = (
        (DATA / "staged_transfer.yaml")
        .read_text()
        .replace(
            "      start_epoch: eval(num_pruning_epochs)\n      end_epoch: eval(num_pruning_epochs + num_transfer_epochs)\n\n    - !LearningRate",
            "      start_epoch: 2.0\n      end_epoch: eval(num_pruning_epochs + num_transfer_epochs)\n\n    - !LearningRate",
        )
    )
    with pytest.raises(ConvertError, match="one epoch clock"):
        convert_text(text, "s.yaml")


def test_stages_are_ordered_by_their_epochs_like_sparseml():
    text = (DATA / "staged_transfer.yaml").read_text()
    head, rest = text.split("prune_stage:\n", 1)
    prune, transfer = rest.split("transfer_stage:\n", 1)
    swapped = convert_text(
        head + "transfer_stage:\n" + transfer + "\nprune_stage:\n" + prune, "swapped.yaml"
    )
    assert [s.name for s in swapped.recipe.stages] == ["prune_stage", "transfer_stage"]
    assert swapped.recipe.stages == convert_file(DATA / "staged_transfer.yaml").recipe.stages


ONE_SHOT = """\
version: 1.1.0
pruning_modifiers:
  - !OBSPruningModifier
    params: ["re:bert.encoder.layer.*.attention.self.query.weight"]
    init_sparsity: 0.6
    final_sparsity: 0.6
    start_epoch: 0.0
    end_epoch: 0.0
    update_frequency: 1.0
    num_grads: 64
    mask_type: unstructured
    global_sparsity: true
"""


def test_a_one_shot_recipe_becomes_a_prune_only_stage():
    result = convert_text(ONE_SHOT, "oneshot.yaml")
    assert result.recipe.training.prune_only
    (plan,) = resolve(result.recipe, 10)
    assert plan.total_steps == 0 and plan.pruning_events() == [(0, 0, 0.6)]
    assert "prune-only" in result.summary()
    assert [n.message for n in result.notes if "prune-only" in n.message]
    assert not [
        n for n in result.notes if "EpochRangeModifier" in n.name or "learning rate" in n.name
    ]


def test_a_one_shot_prune_beside_an_lr_or_in_a_training_run_is_not_prune_only():
    with_lr = ONE_SHOT.replace(
        "    end_epoch: 0.0\n",
        "    end_epoch: 0.0\n  - !SetLearningRateModifier\n"
        "    start_epoch: 0.0\n    learning_rate: 1e-4\n",
        1,
    )
    with pytest.raises(ConvertError, match="cannot tell how long training is"):
        convert_text(with_lr, "r.yaml")
    with_range = ONE_SHOT.replace(
        "pruning_modifiers:\n",
        "training_modifiers:\n  - !EpochRangeModifier\n"
        "    start_epoch: 0.0\n    end_epoch: 3.0\npruning_modifiers:\n",
        1,
    )
    result = convert_text(with_range, "r.yaml")
    assert not result.recipe.training.prune_only and result.recipe.training.epochs == 3.0


STAGED_ONE_SHOT = """\
version: 1.1.0
oneshot_stage:
  pruning_modifiers:
    - !GlobalMagnitudePruningModifier
      params: __ALL_PRUNABLE__
      init_sparsity: 0.7
      final_sparsity: 0.7
      start_epoch: 0.0
      end_epoch: 0.0
      update_frequency: 1.0
recover_stage:
  recover_modifiers:
    - !EpochRangeModifier
      start_epoch: 0.0
      end_epoch: 2.0
    - !ConstantPruningModifier
      params: __ALL_PRUNABLE__
      start_epoch: 0.0
      end_epoch: 2.0
"""


def test_a_one_shot_stage_then_a_training_stage():
    result = convert_text(STAGED_ONE_SHOT, "staged.yaml")
    first, second = result.recipe.stages
    assert (
        result.recipe.stage_training(first).prune_only
        and result.recipe.stage_training(second).epochs == 2.0
    )
    assert (
        "start_epoch"
        not in result.text.split("name: recover_stage")[0].split("name: oneshot_stage")[1]
    )
    # the LR note belongs to the stage that trains
    assert [n for n in result.notes if n.name == "learning rate"], result.notes
    one_shot, recover = resolve(result.recipe, 10)
    assert one_shot.pruning_events() == [(0, 0, 0.7)] and recover.total_steps == 20

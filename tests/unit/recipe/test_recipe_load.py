import pytest
import yaml

from recipec.recipe.errors import RecipeError
from recipec.recipe.load import load_recipe, load_recipe_text
from recipec.recipe.schema import ENCODER_TARGETS, GMPSpec

GOOD = """\
version: 1
variables:
  target: 0.9
  start: 2
training:
  epochs: 10
  learning_rate: 5e-5
modifiers:
  - type: gmp
    init_sparsity: 0.7
    final_sparsity: ${target}
    start_epoch: ${start}
    end_epoch: ${start + 6}
    update_every_epochs: 0.5
"""


def problems(text, overrides=()):
    with pytest.raises(RecipeError) as info:
        load_recipe_text(text, "r.yaml", overrides)
    return [str(p) for p in info.value.problems]


def test_good_recipe_and_defaults():
    recipe = load_recipe_text(GOOD)
    (gmp,) = recipe.modifiers
    assert isinstance(gmp, GMPSpec)
    assert gmp.final_sparsity == 0.9 and gmp.end_epoch == 8
    assert recipe.training.learning_rate == 5e-5  # YAML 1.1 would read 5e-5 as a string
    assert recipe.targets == ENCODER_TARGETS == "encoder"
    assert recipe.variables == {"target": 0.9, "start": 2}


def test_targets_are_encoder_or_a_list_of_regexes():
    base = "training: {steps: 4}\nmodifiers:\n  - {type: gmp, final_sparsity: 0.5%s}\n"
    recipe = load_recipe_text("targets: encoder\n" + base % "")
    assert recipe.targets == "encoder" and recipe.targets_of(recipe.modifiers[0]) == ("encoder", ())
    listed = load_recipe_text("targets: ['encoder', 'x$']\nexclude: [y]\n" + base % "")
    assert listed.targets == ["encoder", "x$"]  # a list is regexes, always
    assert listed.targets_of(listed.modifiers[0]) == (("encoder", "x$"), ("y",))
    own = load_recipe_text("targets: ['x$']\n" + base % ", targets: encoder, exclude: []")
    assert own.targets_of(own.modifiers[0]) == ("encoder", ())
    # the dumped recipe (recipe.yaml of a run) reads back the same
    assert load_recipe_text(yaml.safe_dump(own.model_dump(mode="json"))) == own
    for text, where in (
        ("targets: Encoder\n" + base % "", "r.yaml:1:10: targets"),
        ("targets: 'x$'\n" + base % "", "r.yaml:1:10: targets"),
        (base % ", targets: attention", "r.yaml:3:47: modifiers.0.targets"),
    ):
        (problem,) = problems(text)
        assert problem.startswith(where), problem
        assert "the word 'encoder' (every encoder linear layer) or a list of" in problem
    assert "invalid regular expression" in problems("targets: ['(']\n" + base % "")[0]
    assert (
        "targets must list at least one regular expression"
        in problems("targets: []\n" + base % "")[0]
    )


def test_set_overrides_variables_and_fields():
    recipe = load_recipe_text(
        GOOD, overrides=["target=0.8", "training.epochs=12", "modifiers.0.scope=per_layer"]
    )
    assert recipe.modifiers[0].final_sparsity == 0.8
    assert recipe.training.epochs == 12
    assert recipe.modifiers[0].scope == "per_layer"


def test_every_problem_at_once_with_file_line_col():
    text = GOOD.replace("learning_rate: 5e-5", "learning_rat: 5e-5").replace(
        "init_sparsity: 0.7", "init_sparsity: 1.5"
    )
    text += "  - type: gmpp\n    final_sparsity: 0.5\n"
    found = problems(text)
    assert any(
        p.startswith("r.yaml:7:3: training.learning_rat: unknown key")
        and "did you mean 'learning_rate'" in p
        for p in found
    )
    assert any(
        p.startswith("r.yaml:10:20: modifiers.0.init_sparsity:") and "less than 1" in p
        for p in found
    )
    assert any(
        p.startswith(
            "r.yaml:15:11: modifiers.1.type: unknown modifier type 'gmpp'; did you mean 'gmp'"
        )
        and "valid types: gmp, obert" in p
        for p in found
    )
    assert len(found) == 3


def test_cross_field_checks():
    base = "training: {steps: 100}\nmodifiers:\n"
    assert any(
        "must not exceed final_sparsity" in p
        for p in problems(base + "  - {type: gmp, init_sparsity: 0.9, final_sparsity: 0.5}\n")
    )
    assert any(
        "end_step (5) must not be before start_step (10)" in p
        for p in problems(
            base + "  - {type: gmp, final_sparsity: 0.5, start_step: 10, end_step: 5}\n"
        )
    )
    assert any(
        "give only one of start_step or start_epoch" in p
        for p in problems(
            base + "  - {type: gmp, final_sparsity: 0.5, start_step: 1, start_epoch: 1}\n"
        )
    )
    assert any(
        "divisible" in p
        for p in problems(
            base
            + "  - {type: obert, final_sparsity: 0.5, structure: block4, fisher_block_size: 50}\n"
        )
    )
    assert any(
        "set final_sparsity to 0.5" in p
        for p in problems(base + "  - {type: gmp, final_sparsity: 0.9, structure: '2:4'}\n")
    )
    assert any(
        "cyclic" in p or "cycle_steps" in p
        for p in problems(base + "  - {type: lr, schedule: cyclic_linear, init_lr: 1e-4}\n")
    )
    overlap = problems(
        base
        + "  - {type: gmp, final_sparsity: 0.5, start_step: 0, end_step: 50, update_every_steps: 10}\n"
        "  - {type: obert, final_sparsity: 0.5, start_step: 40, end_step: 60, update_every_steps: 10}\n"
    )
    assert any(p.startswith("r.yaml:4:5: modifiers.1: overlaps modifier 0 (gmp)") for p in overlap)
    assert any("set training.epochs or training.steps" in p for p in problems("modifiers: []\n"))
    assert any(
        "either top-level 'modifiers' or 'stages'" in p
        for p in problems("training: {steps: 1}\nmodifiers: []\nstages: [{name: a}]\n")
    )


def test_yaml_level_errors():
    assert problems("a: [1, 2\n")[0].startswith("r.yaml:2:1: invalid YAML")
    assert problems("")[0] == "r.yaml:1:1: the recipe is empty"
    assert "duplicate key" in problems("training: {steps: 1}\ntraining: {steps: 2}\n")[0]
    assert (
        "YAML tags are not allowed"
        in problems("training: !!python/object:os.system {steps: 1}\n")[0]
    )
    assert "mapping" in problems("- 1\n- 2\n")[0]
    assert (
        "must be a valid" in problems("training: {steps: '3'}\n")[0]
        or "valid integer" in problems("training: {steps: '3'}\n")[0]
    )


def test_variables_errors_point_at_the_variable():
    found = problems("variables: {a: b + 1, b: a}\ntraining: {steps: '${a}'}\n")
    assert any(p.startswith("r.yaml:1:16: variables.a:") and "cycle" in p for p in found)
    found = problems("training:\n  steps: ${nope}\n")
    assert found[0].startswith("r.yaml:2:10: training.steps: unknown variable 'nope'")


def test_set_errors_name_the_override():
    found = problems(GOOD, ["training.epochs=abc", "modifiers.7.x=1", "oops"])
    assert "--set training.epochs=abc: training.epochs: Input should be a valid number" in found[
        0
    ] or any(p.startswith("--set training.epochs=abc: training.epochs:") for p in found)
    assert any(p.startswith("--set modifiers.7.x=1: modifiers.7: no such element") for p in found)
    assert any(p.startswith("--set oops: --set expects KEY=VALUE") for p in found)


def test_stages_merge_training_field_by_field():
    text = """
training: {epochs: 3, batch_size: 8, learning_rate: 1e-4}
stages:
  - name: dense
    training: {steps: 10}
    modifiers: []
  - name: prune
    modifiers:
      - {type: gmp, final_sparsity: 0.5, start_step: 0, end_step: 10, update_every_steps: 5}
"""
    recipe = load_recipe_text(text)
    dense, prune = recipe.resolved_stages()
    merged = recipe.stage_training(dense)
    assert (merged.steps, merged.epochs, merged.batch_size, merged.learning_rate) == (
        10,
        None,
        8,
        1e-4,
    )
    assert recipe.stage_training(prune).epochs == 3


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="no such file") as info:
        load_recipe(tmp_path / "nope.yaml")
    assert "did you mean" not in str(info.value) and "bundled recipes, by name: cram_plus," in str(
        info.value
    )
    with pytest.raises(RecipeError, match="no such file; did you mean 'quickstart'"):
        load_recipe("quikstart")


def test_set_of_an_undefined_variable_is_an_error_not_a_silent_new_variable():
    # A typo in --set used to add an unused variable and leave the schedule unchanged.
    found = problems(GOOD, ["targt=0.8"])
    assert len(found) == 1
    assert found[0].startswith(
        "--set targt=0.8: targt: the recipe has no variable 'targt' (did you mean 'target'?)"
    )
    assert "its variables: start, target" in found[0]
    # The explicit path adds one on purpose.
    recipe = load_recipe_text(GOOD, overrides=["variables.extra=3", "target=0.8"])
    assert recipe.modifiers[0].final_sparsity == 0.8


def test_a_pruning_window_that_outlasts_its_stage_is_an_error():
    """Pruning steps after the last training step never run: the target would be missed silently."""
    late = "training: {epochs: 2}\nmodifiers:\n  - {type: gmp, final_sparsity: 0.9, start_epoch: 1, end_epoch: 5, update_every_epochs: 1}\n"
    (found,) = problems(late)
    assert found.startswith(
        "r.yaml:3:65: modifiers.0.end_epoch: ends at epoch 5, after the stage's last epoch 2"
    )
    assert "final_sparsity 0.9 would not be reached" in found
    staged = (
        "training: {steps: 100}\nstages:\n  - name: a\n    training: {steps: 10}\n    modifiers:\n"
        "      - {type: obert, final_sparsity: 0.5, start_step: 20, update_every_steps: 5}\n"
    )
    (found,) = problems(staged)
    assert (
        "stages.0.modifiers.0.start_step: starts at step 20, after the stage's last step 10"
        in found
    )
    load_recipe_text(
        late.replace("end_epoch: 5", "end_epoch: 2")
    )  # ending at the last step is fine
    # Mixed units need steps_per_epoch: the planner checks them in steps.
    from recipec.plan import PlanError, resolve_stage

    mixed = load_recipe_text(late.replace("end_epoch: 5", "end_step: 25"))
    resolve_stage(mixed, mixed.resolved_stages()[0], steps_per_epoch=13)  # 26 steps: fits
    with pytest.raises(
        PlanError, match=r"modifiers.0.end_step: ends at step 25, after the stage's last step 20"
    ):
        resolve_stage(mixed, mixed.resolved_stages()[0], steps_per_epoch=10)


def test_a_broken_variable_is_reported_once_not_at_every_use():
    found = problems(GOOD, overrides=["target=abc"])
    assert len(found) == 1 and found[0].startswith(
        "--set target=abc: variables.target: unknown variable 'abc'"
    )


def test_a_set_of_training_that_every_stage_overrides_is_an_error():
    staged = (
        "training: {epochs: 4, batch_size: 8}\nstages:\n  - name: a\n    training: {epochs: 2}\n"
        "  - name: b\n    training: {steps: 0}\n"
    )
    (found,) = problems(staged, overrides=["training.epochs=3"])
    assert found.startswith(
        "--set training.epochs=3: training.epochs: has no effect: every stage sets its own "
        "epochs / steps (stages.0.training (line 4), stages.1.training (line 6))"
    )
    recipe = load_recipe_text(
        staged, overrides=["training.batch_size=16"]
    )  # no stage sets it: applies
    assert recipe.stage_training(recipe.stages[0]).batch_size == 16
    one_stage_inherits = staged.replace("    training: {epochs: 2}\n", "")
    assert (
        load_recipe_text(one_stage_inherits, overrides=["training.epochs=3"]).training.epochs == 3
    )


def test_a_later_pruner_below_an_earlier_target_on_the_same_weights_is_an_error():
    two = (
        "training: {epochs: 2}\nmodifiers:\n"
        "  - {type: gmp, final_sparsity: 0.8, start_epoch: 0, end_epoch: 1, update_every_epochs: 0.5}\n"
        "  - {type: gmp, final_sparsity: 0.5, start_epoch: 1.5, end_epoch: 1.9, update_every_epochs: 0.1}\n"
    )
    (found,) = problems(two)
    assert (
        found.startswith("r.yaml:4:")
        and "modifiers.1.final_sparsity: final_sparsity 0.5 is below the 0.8 that " in found
    )
    assert "modifier 0 (gmp) of this stage reaches earlier" in found
    load_recipe_text(
        two.replace("final_sparsity: 0.5", "final_sparsity: 0.9")
    )  # going further is fine
    load_recipe_text(
        two.replace("final_sparsity: 0.5,", "final_sparsity: 0.5, targets: ['query'],")
    )  # other weights
    staged = (
        "training: {steps: 10}\nstages:\n"
        "  - name: a\n    modifiers: [{type: gmp, final_sparsity: 0.9}]\n"
        "  - name: b\n    modifiers: [{type: obert, final_sparsity: 0.7}]\n"
    )
    (found,) = problems(staged)
    assert "stages.1.modifiers.0.final_sparsity" in found and "stage 'a' modifier 0 (gmp)" in found
    # A different ranking (scope) or structure can still prune at a lower target: not compared.
    load_recipe_text(
        staged.replace(
            "type: obert, final_sparsity: 0.7", "type: obert, final_sparsity: 0.7, scope: per_layer"
        )
    )
    load_recipe_text(
        staged.replace(
            "type: obert, final_sparsity: 0.7",
            "type: obert, final_sparsity: 0.7, structure: block4, fisher_block_size: 32",
        )
    )


def test_n_m_pruning_after_its_stage_is_an_error():
    late = "training: {steps: 10}\nmodifiers:\n  - {type: gmp, structure: '2:4', final_sparsity: 0.5, start_step: 50}\n"
    (found,) = problems(late)
    assert "modifiers.0.start_step: starts at step 50, after the stage's last step 10" in found


def test_overrides_given_as_a_generator_are_all_checked():
    staged = "training: {epochs: 4}\nstages:\n  - name: a\n    training: {epochs: 2}\n"
    with pytest.raises(RecipeError, match="has no effect"):
        load_recipe_text(staged, "r.yaml", (o for o in ["training.epochs=3"]))


def test_a_typed_value_that_cannot_be_read_is_a_recipe_error():
    with pytest.raises(RecipeError, match="explicit type tag cannot be read"):
        load_recipe_text("version: 1\ntraining: {steps: !!bool maybe}\nmodifiers: []\n")


def test_a_very_long_chain_of_variables_is_a_recipe_error_not_a_crash():
    chain = "".join(f"  v{i}: ${{v{i + 1}}}\n" for i in range(1500))
    text = f"version: 1\nvariables:\n{chain}  v1500: 1\ntraining: {{steps: 1}}\nmodifiers: []\n"
    with pytest.raises(RecipeError, match="more than 200 deep"):
        load_recipe_text(text)
    short = "".join(f"  v{i}: ${{v{i + 1}}}\n" for i in range(150))
    ok = f"version: 1\nvariables:\n{short}  v150: 1\ntraining: {{steps: 1}}\nmodifiers: []\n"
    assert load_recipe_text(ok).variables["v0"] == 1


@pytest.mark.parametrize(
    "name",
    ["../pyproject.toml", "../recipec/__init__.py", "../__init__.py", "../README", "/etc/passwd"],
)
def test_a_bundled_name_never_resolves_outside_the_recipe_library(name, tmp_path, monkeypatch):
    from recipec.recipe.load import find_bundled, resolve_recipe_path

    monkeypatch.chdir(tmp_path)  # where none of these exist as given
    assert find_bundled(name) is None
    assert find_bundled(name.removesuffix(".toml").removesuffix(".py")) is None
    resolved = resolve_recipe_path(name)
    assert resolved == __import__("pathlib").Path(name)  # left as given: "no such file" follows


def test_bundled_names_resolve_with_or_without_yaml():
    from recipec.recipe.load import bundled_names, find_bundled

    for name in bundled_names():
        assert find_bundled(name) == find_bundled(f"{name}.yaml") and find_bundled(name).is_file()

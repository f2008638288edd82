"""recipec.compile: the modifier registry, stage selection and compile-time errors."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

import recipec
from recipec import modifiers as registry
from recipec.modifiers.base import CompileError, Modifier
from recipec.program import Program
from recipec.recipe.load import load_recipe_text
from recipec.recipe.schema import MODIFIER_TYPES

TARGETS = [r"^a\.weight$", r"^b\.weight$"]


class TwoLinear(nn.Module):
    def __init__(self, d_in: int = 8, d_hidden: int = 8, d_out: int = 4):
        super().__init__()
        self.a = nn.Linear(d_in, d_hidden)
        self.b = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _recipe(modifiers=None, steps: int = 10, **top):
    data = {"training": {"steps": steps}, "targets": TARGETS, **top}
    if modifiers is not None:
        data["modifiers"] = modifiers
    return load_recipe_text(yaml.safe_dump(data))


def _model_opt(seed: int = 0):
    torch.manual_seed(seed)
    model = TwoLinear()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


GMP = {
    "type": "gmp",
    "init_sparsity": 0.25,
    "final_sparsity": 0.5,
    "start_step": 1,
    "end_step": 5,
    "update_every_steps": 2,
}


# -- registry ------------------------------------------------------------------------------


def test_every_spec_type_has_a_builder_and_no_orphans():
    assert set(MODIFIER_TYPES) == set(registry.BUILDERS)
    for kind, builder in registry.BUILDERS.items():
        assert callable(builder), kind


def test_every_builder_builds_a_modifier():
    model, opt = _model_opt()
    teacher = TwoLinear()
    examples = {
        "gmp": GMP,
        "obert": {**GMP, "type": "obert", "num_grads": 2, "fisher_block_size": 4},
        "constant": {"type": "constant"},
        "lr": {"type": "lr", "init_lr": 1e-3},
        "distill": {"type": "distill", "teacher": "given"},
        "cram": {"type": "cram", "sparsities": [0.5, 0.7]},
        "quantize": {"type": "quantize"},  # last: it stays installed on the model
    }
    assert set(examples) == set(MODIFIER_TYPES)
    for kind, spec in examples.items():
        program = recipec.compile(
            _recipe([spec]),
            model,
            opt,
            steps_per_epoch=10,
            teacher=teacher,
            grad_batches=lambda n: iter(()),
        )
        (mod,) = program.modifiers
        assert isinstance(mod, Modifier) and mod.spec.type == kind


def test_unknown_type_in_build_is_a_compile_error():
    recipe = _recipe([GMP])
    model, opt = _model_opt()
    program = recipec.compile(recipe, model, opt, steps_per_epoch=10)
    resolved = program.plan.modifiers[0]
    fake = type("Fake", (), {"type": "prune_everything", "index": 0})()
    with pytest.raises(CompileError, match="no runtime registered"):
        registry.build(fake, program.ctx)
    assert registry.build(resolved, program.ctx).spec is resolved.spec


# -- stages, plan ----------------------------------------------------------------------------


def _two_stage_recipe():
    return load_recipe_text(
        yaml.safe_dump(
            {
                "training": {"steps": 6},
                "targets": TARGETS,
                "stages": [
                    {"name": "dense", "modifiers": [{"type": "lr", "init_lr": 1e-3}]},
                    {
                        "name": "prune",
                        "training": {"epochs": 2},
                        "modifiers": [
                            {
                                **GMP,
                                "start_epoch": 0.5,
                                "end_epoch": 1.5,
                                "update_every_epochs": 0.5,
                                "start_step": None,
                                "end_step": None,
                                "update_every_steps": None,
                            }
                        ],
                    },
                ],
            }
        )
    )


def test_multi_stage_needs_a_stage_and_names_them():
    recipe = _two_stage_recipe()
    model, opt = _model_opt()
    with pytest.raises(CompileError, match=r"2 stages \(dense, prune\)"):
        recipec.compile(recipe, model, opt, steps_per_epoch=4)
    with pytest.raises(CompileError, match="no stage 'finetune'"):
        recipec.compile(recipe, model, opt, steps_per_epoch=4, stage="finetune")
    by_index = recipec.compile(recipe, model, opt, steps_per_epoch=4, stage=1)
    by_name = recipec.compile(recipe, model, opt, steps_per_epoch=4, stage="prune")
    assert by_index.plan.name == by_name.plan.name == "prune"


def test_epochs_are_converted_to_steps_once():
    recipe = _two_stage_recipe()
    model, opt = _model_opt()
    program = recipec.compile(recipe, model, opt, steps_per_epoch=4, stage="prune")
    assert isinstance(program, Program)
    assert program.plan.total_steps == 8  # 2 epochs x 4 steps
    (gmp,) = program.plan.modifiers
    assert gmp.window.start == 2 and gmp.window.end == 6 and gmp.update_every == 2
    assert [e[0] for e in program.plan.pruning_events()] == [2, 4, 6]
    dense = recipec.compile(recipe, model, opt, steps_per_epoch=4, stage="dense")
    assert dense.plan.total_steps == 6 and dense.sets_lr and not program.sets_lr


# -- compile-time errors -------------------------------------------------------------------


def test_distill_needs_a_teacher():
    model, opt = _model_opt()
    with pytest.raises(CompileError, match="needs a teacher"):
        recipec.compile(
            _recipe([{"type": "distill", "teacher": "auto"}]), model, opt, steps_per_epoch=10
        )
    with pytest.raises(CompileError, match="needs a teacher"):
        recipec.compile(
            _recipe([{"type": "distill", "teacher": "x"}]), model, opt, steps_per_epoch=10
        )


def test_distill_teacher_path_that_does_not_load(tmp_path):
    model, opt = _model_opt()
    with pytest.raises(CompileError, match="cannot load the teacher"):
        recipec.compile(
            _recipe([{"type": "distill", "teacher": "x"}]),
            model,
            opt,
            steps_per_epoch=10,
            teacher=str(tmp_path / "missing"),
        )


def test_obert_needs_grad_batches():
    model, opt = _model_opt()
    spec = {**GMP, "type": "obert", "num_grads": 2, "fisher_block_size": 4}
    with pytest.raises(CompileError, match="grad_batches"):
        recipec.compile(_recipe([spec]), model, opt, steps_per_epoch=10)


def test_lr_needs_the_optimizer():
    model, _ = _model_opt()
    with pytest.raises(CompileError, match="needs the optimizer"):
        recipec.compile(_recipe([{"type": "lr", "init_lr": 1e-3}]), model, None, steps_per_epoch=10)


def test_pruners_on_the_same_tensors_in_overlapping_steps():
    # Different regexes (so the loader cannot tell) that select the same tensor.
    model, opt = _model_opt()
    first = {**GMP, "targets": [r"^a\.weight$"]}
    second = {**GMP, "targets": [r"a\.weight"], "start_step": 4, "end_step": 8}
    with pytest.raises(
        CompileError, match=r"\[0\] \(gmp\) and \[1\] \(gmp\) prune the same tensors"
    ) as info:
        recipec.compile(_recipe([first, second]), model, opt, steps_per_epoch=10)
    assert "a.weight" in str(info.value)
    # Back to back (no shared step) is fine, and so is the same window on other tensors.
    later = {**second, "start_step": 6}
    recipec.compile(_recipe([first, later]), model, opt, steps_per_epoch=10)
    other = {**GMP, "targets": [r"^b\.weight$"]}
    recipec.compile(_recipe([first, other]), model, opt, steps_per_epoch=10)


def test_block_structure_needs_divisible_input_dim():
    torch.manual_seed(0)
    model = TwoLinear(d_in=6)  # a.weight is 8 x 6: not divisible into blocks of 4
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(CompileError, match=r"block4 .*a\.weight has shape \(8, 6\)"):
        recipec.compile(_recipe([{**GMP, "structure": "block4"}]), model, opt, steps_per_epoch=10)


def test_plan_errors_become_compile_errors():
    model, opt = _model_opt()
    # In steps against a length in epochs, only the planner can tell that it starts too late.
    late = {**GMP, "start_step": 20, "end_step": 20, "update_every_steps": None}
    recipe = load_recipe_text(
        yaml.safe_dump({"training": {"epochs": 1}, "targets": TARGETS, "modifiers": [late]})
    )
    with pytest.raises(CompileError, match="after the stage's last step 10"):
        recipec.compile(recipe, model, opt, steps_per_epoch=10)
    recipec.compile(recipe, model, opt, steps_per_epoch=20)
    with pytest.raises(CompileError, match="steps_per_epoch must be positive"):
        recipec.compile(_recipe([GMP]), model, opt, steps_per_epoch=0)


# -- masks carried over ----------------------------------------------------------------------


def test_masks_from_an_earlier_stage_are_installed():
    model, opt = _model_opt()
    # Give AdamW some state first, so zeroing it is observable.
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    mask = torch.rand(8, 8, generator=torch.Generator().manual_seed(1)) > 0.5
    program = recipec.compile(
        _recipe([{"type": "lr", "init_lr": 1e-3}]),
        model,
        opt,
        steps_per_epoch=10,
        masks={"a.weight": mask},
    )
    assert torch.equal(program.masks.masks["a.weight"], mask)
    assert bool((model.a.weight[~mask] == 0).all()) and bool((model.a.weight[mask] != 0).all())
    state = opt.state[model.a.weight]
    assert bool((state["exp_avg"][~mask] == 0).all()) and bool(
        (state["exp_avg_sq"][~mask] == 0).all()
    )
    assert bool((state["exp_avg_sq"][mask] != 0).any())
    # The masks hold through training even though no pruning modifier runs in this stage.
    for step in range(3):
        program.step_start(step)
        model(torch.randn(3, 8)).pow(2).sum().backward()
        program.before_optimizer_step(step)
        opt.step()
        program.after_optimizer_step(step)
        opt.zero_grad()
    assert bool((model.a.weight[~mask] == 0).all())

import pytest

from recipec import schedules
from recipec.plan import resolve
from recipec.recipe.load import load_recipe_text


def test_paper_30_epoch_schedule_closed_form():
    """2 dense epochs, prune from epoch 2 to 26 every 4 epochs, 70% -> 90% cubic (design.md)."""
    steps = schedules.pruning_steps(2, 26, 4)
    assert steps == [2, 6, 10, 14, 18, 22, 26]
    got = [schedules.interpolate_sparsity(t, 2, 26, 0.7, 0.9, "cubic") for t in steps]
    expected = [0.9 + (0.7 - 0.9) * (1 - (t - 2) / 24) ** 3 for t in steps]
    assert got == pytest.approx(expected, abs=1e-12)
    # The published rounded values: 70 -> 78.4 -> 84.1 -> 87.5 -> 89.3 -> 89.9 -> 90.
    assert [round(100 * s, 1) for s in got] == [70.0, 78.4, 84.1, 87.5, 89.3, 89.9, 90.0]


def test_linear_and_edges():
    assert schedules.interpolate_sparsity(5, 0, 10, 0.0, 0.8, "linear") == pytest.approx(0.4)
    assert schedules.interpolate_sparsity(0, 0, 10, 0.3, 0.8) == 0.3  # the accelerated first step
    assert schedules.interpolate_sparsity(10, 0, 10, 0.3, 0.8) == 0.8
    assert schedules.interpolate_sparsity(99, 0, 10, 0.3, 0.8) == 0.8
    assert schedules.interpolate_sparsity(3, 3, 3, 0.3, 0.8) == 0.8  # one-shot
    assert schedules.pruning_steps(0, 10, 4) == [0, 4, 8, 10]
    assert schedules.pruning_steps(5, 5, None) == [5]


def test_cyclic_lr_rewinds_at_every_cycle():
    kw = dict(start=100, end=400, schedule="cyclic_linear", init_lr=8e-5, final_lr=8e-6, cycle=100)
    assert schedules.lr_in_window(100, **kw) == 8e-5
    assert schedules.lr_in_window(150, **kw) == pytest.approx(8e-5 + (8e-6 - 8e-5) * 50 / 99)
    assert schedules.lr_in_window(199, **kw) == 8e-6  # the cycle's last step: exactly final_lr
    assert schedules.lr_in_window(200, **kw) == 8e-5  # rewound
    assert schedules.lr_in_window(300, **kw) == 8e-5
    assert schedules.lr_in_window(399, **kw) == 8e-6


def test_every_cycle_bottoms_out_at_final_lr_even_a_short_last_one():
    """The quickstart's rewinding window (issue #24): 63 steps/epoch, cycles of 32 steps over
    epochs 1..3 = steps 63..188: three whole cycles and a last one of 30 steps (cut by the end)."""
    kw = dict(start=63, end=189, schedule="cyclic_linear", init_lr=1e-4, final_lr=1e-5, cycle=32)
    lrs = {t: schedules.lr_in_window(t, **kw) for t in range(63, 189)}
    assert min(lrs.values()) == 1e-5
    assert [t for t, lr in lrs.items() if lr == 1e-4] == [63, 95, 127, 159]
    assert [t for t, lr in lrs.items() if lr == 1e-5] == [94, 126, 158, 188]
    for first, length in ((63, 32), (95, 32), (127, 32), (159, 30)):  # brute force, k / (L - 1)
        for k in range(length):
            expected = 1e-4 + (1e-5 - 1e-4) * k / (length - 1)
            assert lrs[first + k] == pytest.approx(expected, rel=1e-12, abs=0), (first, k)
    assert all(lrs[t] > lrs[t + 1] for t in range(63, 188) if t + 1 not in (95, 127, 159))
    one = dict(kw, cycle=1)  # one-step cycles: every step is a cycle start
    assert {schedules.lr_in_window(t, **one) for t in range(63, 189)} == {1e-4}


def test_warmup_cosine_constant():
    assert schedules.lr_in_window(
        0, start=0, end=10, schedule="constant", init_lr=1.0, final_lr=0.0, warmup=4
    ) == pytest.approx(0.2)
    assert schedules.lr_in_window(
        4, start=0, end=10, schedule="cosine", init_lr=1.0, final_lr=0.0, warmup=4
    ) == pytest.approx(1.0)
    assert schedules.lr_in_window(
        7, start=0, end=10, schedule="cosine", init_lr=1.0, final_lr=0.0, warmup=4
    ) == pytest.approx(0.5)
    assert schedules.default_lr(50, total=100, learning_rate=1.0) == pytest.approx(0.5)


RECIPE = """
training: {epochs: 30, learning_rate: 8e-5}
modifiers:
  - {type: gmp, init_sparsity: 0.7, final_sparsity: 0.9, start_epoch: 2, end_epoch: 26, update_every_epochs: 4}
  - {type: lr, schedule: linear, init_lr: 8e-5, final_lr: 8e-6, end_epoch: 2}
  - {type: lr, schedule: cyclic_linear, init_lr: 8e-5, final_lr: 8e-6, cycle_epochs: 4, start_epoch: 2, end_epoch: 26}
  - {type: lr, schedule: linear, init_lr: 8e-5, final_lr: 0, start_epoch: 26}
"""


def test_plan_resolves_epochs_to_steps_and_aligns_rewinds_with_pruning():
    (plan,) = resolve(load_recipe_text(RECIPE), steps_per_epoch=10)
    assert plan.total_steps == 300
    (gmp,) = plan.by_type("gmp")
    assert gmp.pruning_steps == (20, 60, 100, 140, 180, 220, 260)
    assert [round(100 * s, 1) for s in gmp.sparsities] == [70.0, 78.4, 84.1, 87.5, 89.3, 89.9, 90.0]
    for step in gmp.pruning_steps[:-1]:
        assert plan.lr_at(step) == pytest.approx(8e-5)  # rewound at each pruning step
        assert plan.lr_at(step - 1) < 8e-5
    assert plan.lr_at(0) == pytest.approx(8e-5)
    assert plan.lr_at(299) == pytest.approx(8e-5 * (1 - 39 / 40))


def test_lr_between_windows_holds_previous_value():
    text = """
training: {steps: 100}
modifiers:
  - {type: lr, schedule: linear, init_lr: 1.0, final_lr: 0.5, start_step: 10, end_step: 20}
  - {type: lr, schedule: constant, init_lr: 0.1, start_step: 50}
"""
    (plan,) = resolve(load_recipe_text(text), steps_per_epoch=1)
    assert plan.lr_at(0) == pytest.approx(1.0)  # before the first window: its starting value
    assert plan.lr_at(30) == pytest.approx(plan.lr_at(19))  # the gap holds the last value
    assert plan.lr_at(60) == pytest.approx(0.1)

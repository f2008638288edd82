"""The run's plots: the teacher and the pruning steps on eval.png, the target on
layer_sparsity.png with every label inside the image, one LR tick format."""

import matplotlib

matplotlib.use("Agg")

from recipec.train import plots  # noqa: E402

RECORDS = [
    {"stage": "dense", "step": 10, "loss": 0.5, "lr": 1e-4},
    {"stage": "dense", "step": 10, "eval_accuracy": 0.8},
    {"stage": "prune", "step": 5, "loss": 0.4, "lr": 2e-5, "sparsity": 0.5},
    {"stage": "prune", "step": 20, "eval_accuracy": 0.75, "sparsity": 0.8},
]


def test_stages_follow_each_other_on_one_axis():
    assert plots.stage_offsets(RECORDS) == {"dense": 0, "prune": 10}


def test_eval_plot_has_the_teacher_and_the_pruning_steps():
    evals = [r for r in RECORDS if "eval_accuracy" in r]
    fig = plots.eval_figure(evals, plots.stage_offsets(RECORDS), "accuracy", 0.9, [12, 15])
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["sparse model"].get_xdata()) == [10, 30]
    assert list(lines["dense teacher (0.9000)"].get_ydata()) == [0.9, 0.9]
    vertical = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert [list(line.get_xdata()) for line in vertical] == [[12, 12], [15, 15]]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["pruning step", "sparse model", "dense teacher (0.9000)"]


def test_layer_plot_has_the_target_and_keeps_every_label_inside(tmp_path):
    names = [f"bert.encoder.layer.{i}.attention.self.query.weight" for i in range(24)]
    per_layer = {n: 0.8 for n in names}
    fig = plots.layer_figure(per_layer, 0.8)
    (ax,) = fig.axes
    (target,) = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert list(target.get_xdata()) == [80.0, 80.0] and target.get_label() == "target 80.0%"
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width, height = fig.get_size_inches()
    for label in ax.get_yticklabels():  # inside the figure itself, before any tight crop
        extent = label.get_window_extent(renderer).transformed(fig.dpi_scale_trans.inverted())
        assert 0 <= extent.x0 and extent.x1 <= width and 0 <= extent.y0 and extent.y1 <= height
    assert [t.get_text() for t in ax.get_yticklabels()][
        0
    ] == "bert.encoder.layer.0.attention.self.query"


def test_the_lr_axis_has_one_format_whatever_the_range():
    fmt = plots.lr_formatter()
    assert [fmt(v, 0) for v in (0.0, 1e-4, 5e-5, 2e-3)] == ["0", "1.0e-04", "5.0e-05", "2.0e-03"]
    fig = plots.lr_figure(RECORDS, plots.stage_offsets(RECORDS))
    assert fig.axes[0].yaxis.get_major_formatter() is not None
    assert fig.axes[0].yaxis.get_major_formatter()(1e-4, 0) == "1.0e-04"


def test_write_plots_saves_every_plot_with_data(tmp_path):
    written = plots.write_plots(
        tmp_path,
        RECORDS,
        {"a.weight": 0.8},
        "accuracy",
        teacher=0.9,
        pruning=[("prune", 2), ("prune", 5)],
        target=0.8,
    )
    assert written == ["sparsity_lr.png", "eval.png", "layer_sparsity.png"]
    assert all((tmp_path / name).stat().st_size > 1000 for name in written)

"""Runtimes: sparse kernels, torch-csr swapping, output checks, the DeepSparse worker protocol."""

from __future__ import annotations

import os
import stat
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from recipec.checkpoint import magnitude_masks
from recipec.kernels import sparseprop as sp
from recipec.runtime import runtimes as rt
from recipec.runtime.bench import (
    Measurement,
    Target,
    dense_twin_torch,
    run_alternating,
    speedups,
    summarize,
)

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")


def pruned_linear(n_in=48, n_out=40, sparsity=0.9, seed=0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) > sparsity)
    return lin.eval()


@pytest.mark.parametrize("kernel", rt.available_kernels())
@pytest.mark.parametrize("shape", [(3, 7), (2, 16), (1,)])
def test_sparse_linear_matches_dense(kernel, shape):
    lin = pruned_linear()
    x = torch.randn(*shape, 48)
    sparse = rt.SparseLinear(lin, kernel)
    with torch.inference_mode():
        torch.testing.assert_close(sparse(x), lin(x), atol=1e-5, rtol=1e-5)
    assert sparse.sparsity == pytest.approx(float((lin.weight == 0).float().mean()))
    assert kernel in repr(sparse)


def test_sparse_linear_without_bias():
    lin = pruned_linear()
    lin.bias = None
    x = torch.randn(5, 48)
    with torch.inference_mode():
        torch.testing.assert_close(rt.SparseLinear(lin, "csr")(x), lin(x), atol=1e-5, rtol=1e-5)


def tiny_bert(sparsity=0.95):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
    )
    model = BertForSequenceClassification(cfg).eval()
    masks = magnitude_masks(model, sparsity)
    from recipec.checkpoint import squash

    squash(model, masks)
    return model, masks


def _inputs(batch=2, seq=8):
    rng = np.random.default_rng(0)
    return {
        "input_ids": rng.integers(1, 100, size=(batch, seq), dtype=np.int64),
        "attention_mask": np.ones((batch, seq), dtype=np.int64),
        "token_type_ids": np.zeros((batch, seq), dtype=np.int64),
    }


@pytest.mark.parametrize("kernel", rt.available_kernels())
def test_sparsify_model_swaps_only_pruned_layers_and_keeps_outputs(kernel):
    model, masks = tiny_bert()
    x = _inputs()
    ref = rt.TorchRunner(model, x).outputs()
    names = rt.pruned_linear_names(model, masks)
    assert len(names) == 12
    sparse_model = __import__("copy").deepcopy(model)
    # force: swap whatever the timing says on a busy machine.
    choices = rt.sparsify_model(sparse_model, tokens=16, names=names, kernels=[kernel], force=True)
    assert {c.kernel for c in choices} == {kernel}
    swapped = [m for m in sparse_model.modules() if isinstance(m, rt.SparseLinear)]
    assert len(swapped) == 12
    assert isinstance(sparse_model.classifier, torch.nn.Linear)  # head untouched
    got = rt.TorchRunner(sparse_model, x).outputs()
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert len({id(m.cache) for m in swapped}) == 1  # Q, K, V share one input transpose
    assert swapped[0].cache.src is None  # cleared after the forward pass
    np.testing.assert_allclose(rt.TorchRunner(sparse_model, x).outputs(), ref, atol=1e-5)


def test_transpose_2d_matches_torch():
    for shape in ((32, 48), (5, 7), (16, 1)):
        x = torch.randn(*shape)
        torch.testing.assert_close(sp.transpose_2d(x), x.t().contiguous(), rtol=0, atol=0)
        assert sp.transpose_2d(x).is_contiguous()


def test_sparsify_model_leaves_low_sparsity_layers_dense():
    model, masks = tiny_bert(sparsity=0.5)
    choices = rt.sparsify_model(model, tokens=16, names=rt.pruned_linear_names(model, masks))
    assert all(c.kernel == "dense" for c in choices)
    assert not any(isinstance(m, rt.SparseLinear) for m in model.modules())


def test_sparsify_model_measures_and_keeps_dense_when_not_faster(monkeypatch):
    model, masks = tiny_bert()
    calls = []

    def fake_measure(linear, tokens, kernels, rounds=5):
        calls.append(tuple(linear.weight.shape))
        return {"dense": 1.0, **{k: 2.0 for k in kernels}}

    monkeypatch.setattr(rt, "measure_layer", fake_measure)
    choices = rt.sparsify_model(model, tokens=16, names=rt.pruned_linear_names(model, masks))
    assert all(c.kernel == "dense" for c in choices)
    assert sorted(set(calls)) == [(32, 32), (32, 64), (64, 32)]  # once per shape
    assert len(calls) == 3


def test_sparsify_model_picks_fastest_kernel(monkeypatch):
    model, masks = tiny_bert()
    monkeypatch.setattr(
        rt, "measure_layer", lambda lin, tokens, kernels, rounds=5: {"dense": 1.0, "csr": 0.5}
    )
    choices = rt.sparsify_model(
        model, tokens=16, names=rt.pruned_linear_names(model, masks), kernels=["csr"]
    )
    assert {c.kernel for c in choices} == {"csr"}
    assert choices[0].speedup == pytest.approx(2.0)


def test_measure_layer_reports_every_kernel():
    times = rt.measure_layer(pruned_linear(), tokens=8, kernels=rt.available_kernels(), rounds=2)
    assert set(times) == {"dense", *rt.available_kernels()}
    assert all(t > 0 for t in times.values())


def test_torch_csr_runner_copies_and_times():
    model, masks = tiny_bert()
    runner = rt.torch_csr_runner(model, masks, _inputs(), kernels=["csr"])
    assert runner.model is not model
    times = runner.time(3)
    assert len(times) == 3 and all(t > 0 for t in times)
    assert "dense" in runner.summary() or "csr" in runner.summary()


def test_check_outputs():
    ref = np.array([[1.0, -2.0]], dtype=np.float32)
    assert rt.check_outputs("x", ref + 1e-6, ref, 1e-4, 0) <= 1e-5
    with pytest.raises(rt.OutputMismatch, match="refusing to time"):
        rt.check_outputs("x", ref + 0.1, ref, 1e-3, 1e-3)
    with pytest.raises(rt.OutputMismatch, match="shape"):
        rt.check_outputs("x", ref[:, :1], ref, 1e-3, 1e-3)
    with pytest.raises(rt.OutputMismatch):
        rt.check_outputs("x", ref * np.nan, ref, 1e-3, 1e-3)


def test_ort_runner(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)],
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    runner = rt.OrtRunner(
        rt.ort_session(tmp_path / "m.onnx", 1), {"input_ids": np.ones((2, 3), np.int64)}
    )
    np.testing.assert_array_equal(runner.outputs(), np.ones((2, 3), np.float32))
    assert len(runner.time(4)) == 4


def test_find_deepsparse_python(monkeypatch, tmp_path):
    monkeypatch.delenv(rt.DEEPSPARSE_ENV, raising=False)
    monkeypatch.setattr(rt, "DEFAULT_DEEPSPARSE_VENV", tmp_path / "none")
    monkeypatch.setattr(rt.importlib.util, "find_spec", lambda name: None)
    assert rt.find_deepsparse_python() is None
    with pytest.raises(rt.RuntimeUnavailable, match="install_deepsparse.sh"):
        rt.start_deepsparse()
    with pytest.raises(rt.RuntimeUnavailable, match="does not exist"):
        rt.find_deepsparse_python(tmp_path / "nope" / "python")
    monkeypatch.setenv(rt.DEEPSPARSE_ENV, sys.executable)
    assert rt.find_deepsparse_python() == Path(sys.executable)
    monkeypatch.setenv(rt.DEEPSPARSE_ENV, str(tmp_path / "gone"))
    with pytest.raises(rt.RuntimeUnavailable, match=rt.DEEPSPARSE_ENV):
        rt.find_deepsparse_python()


FAKE_DEEPSPARSE = """
import numpy as np
__version__ = "0.0-fake"
class _Engine:
    num_cores = 1
    def __init__(self, path, batch_size):
        import onnx
        m = onnx.load(path)
        self.input_names = [i.name for i in m.graph.input]
        self.batch = batch_size
    def run(self, feed):
        out = np.stack([f.sum(axis=-1).astype(np.float32) for f in feed], axis=-1)
        return [out + OFFSET]
OFFSET = {offset}
def compile_model(path, batch_size=1, num_cores=None, **kw):
    return _Engine(path, batch_size)
"""


def fake_deepsparse_python(tmp_path: Path, offset: float) -> Path:
    """A 'python' whose deepsparse is a stub computing per-input row sums (+ offset)."""
    pkg = tmp_path / f"fake{offset}".replace(".", "_")
    (pkg / "deepsparse").mkdir(parents=True)
    (pkg / "deepsparse" / "__init__.py").write_text(FAKE_DEEPSPARSE.format(offset=offset))
    exe = tmp_path / f"python-{offset}".replace(".", "_")
    exe.write_text(
        textwrap.dedent(f"""\
        #!/bin/sh
        export PYTHONPATH={pkg}
        exec {sys.executable} "$@"
        """)
    )
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


def _two_input_model(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["logits"])],
        "g",
        [
            helper.make_tensor_value_info("a", TensorProto.INT64, ["b", "s"]),
            helper.make_tensor_value_info("c", TensorProto.INT64, ["b", "s"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "s"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.mark.skipif(os.name != "posix", reason="shell-script python stub")
def test_deepsparse_worker_checks_outputs_then_times(tmp_path):
    _two_input_model(tmp_path / "m.onnx")
    inputs = {"a": np.ones((2, 5), np.int64), "c": np.full((2, 5), 2, np.int64)}
    expected = np.array([[5.0, 10.0], [5.0, 10.0]], np.float32)
    worker = rt.DeepSparseWorker(
        fake_deepsparse_python(tmp_path, 0.0), num_cores=1, require_numpy1=False
    )
    try:
        assert worker.info["deepsparse"] == "0.0-fake"
        runner = worker.runner(tmp_path / "m.onnx", inputs, expected)
        assert runner.load_info["max_abs_diff"] == 0.0
        times = runner.time(3)
        assert len(times) == 3
        runner.close()
        with pytest.raises(rt.RuntimeUnavailable, match="no verified engine"):
            worker.time(runner.key, 1)
    finally:
        worker.close()
    assert worker.proc.poll() is not None


@pytest.mark.skipif(os.name != "posix", reason="shell-script python stub")
def test_deepsparse_worker_refuses_wrong_outputs(tmp_path):
    _two_input_model(tmp_path / "m.onnx")
    inputs = {"a": np.ones((2, 5), np.int64), "c": np.full((2, 5), 2, np.int64)}
    expected = np.array([[5.0, 10.0], [5.0, 10.0]], np.float32)
    worker = rt.DeepSparseWorker(fake_deepsparse_python(tmp_path, 0.5), require_numpy1=False)
    try:
        with pytest.raises(rt.OutputMismatch, match="refusing to time"):
            worker.runner(tmp_path / "m.onnx", inputs, expected)
        # and the worker itself will not time an engine that failed its check
        with pytest.raises(rt.RuntimeUnavailable, match="no verified engine"):
            worker.time("m1", 1)
    finally:
        worker.close()


def test_deepsparse_worker_under_numpy2_is_refused(tmp_path):
    if int(np.__version__.split(".")[0]) < 2:
        pytest.skip("this interpreter has numpy<2")
    with pytest.raises(rt.RuntimeUnavailable, match="numpy 2"):
        rt.DeepSparseWorker(fake_deepsparse_python(tmp_path, 0.0))


def test_deepsparse_worker_without_deepsparse(tmp_path):
    with pytest.raises(rt.RuntimeUnavailable, match="cannot import deepsparse|install"):
        rt.DeepSparseWorker(sys.executable, require_numpy1=False)


class _FakeRunner(rt.Runner):
    def __init__(self, dt):
        self.dt = dt
        self.calls = 0

    def time(self, n, clock="wall"):
        self.calls += n
        return [self.dt] * n


def test_run_alternating_and_speedups():
    targets = [
        Target("m", "ort", "dense", 4, 8, _FakeRunner(0.02)),
        Target("m", "ort", "sparse", 4, 8, _FakeRunner(0.02)),
        Target("m", "torch-csr", "sparse", 4, 8, _FakeRunner(0.01)),
    ]
    ms = run_alternating(targets, warmup=2, repeats=5)
    assert all(t.runner.calls == 7 for t in targets)
    assert [m.calls for m in ms] == [5, 5, 5]
    assert ms[2].p50_ms == pytest.approx(10.0)
    assert ms[2].items_per_s == pytest.approx(400.0)
    rows = {r["runtime"]: r for r in speedups(ms)}
    assert rows["torch-csr"]["vs_dense_ort"] == pytest.approx(2.0)
    assert rows["ort"]["vs_dense_ort"] == pytest.approx(1.0)


def test_summarize_percentiles():
    t = Target("m", "ort", "sparse", 1, 8, _FakeRunner(0))
    m = summarize(t, [0.001 * i for i in range(1, 11)])
    assert isinstance(m, Measurement)
    assert m.p50_ms == pytest.approx(5.5)
    assert m.p90_ms == pytest.approx(9.1)


def test_dense_twins_are_the_same_model_in_torch_and_onnx(tmp_path):
    from recipec.checkpoint import write_checkpoint
    from recipec.export.onnx import export, read_sparsity
    from recipec.runtime.bench import dense_twin_onnx

    model, masks = tiny_bert()
    write_checkpoint(model, tmp_path / "run" / "model", masks)
    folder = export(tmp_path / "run", shrink=False).output_dir  # the twin has the model's shapes
    info = read_sparsity(folder)
    dense_onnx = dense_twin_onnx(folder, tmp_path / "dense.onnx")
    twin = dense_twin_torch(model, info["tensors"], dense_onnx)
    params = dict(twin.named_parameters())
    for name in masks:
        assert int((params[name] == 0).sum()) == 0
    assert int((dict(model.named_parameters())[next(iter(masks))] == 0).sum()) > 0
    x = _inputs()
    got = rt.OrtRunner(rt.ort_session(dense_onnx, 1), x).outputs()
    np.testing.assert_allclose(rt.TorchRunner(twin, x).outputs(), got, atol=1e-5)
    sparse = rt.OrtRunner(rt.ort_session(folder / "model.onnx", 1), x).outputs()
    assert np.abs(sparse - got).max() > 1e-4  # the twin really differs from the sparse model


@pytest.mark.slow
def test_real_deepsparse_matches_onnxruntime(tmp_path):
    """Needs the venv from scripts/install_deepsparse.sh."""
    python = rt.find_deepsparse_python()
    if python is None:
        pytest.skip("DeepSparse venv not installed")
    from recipec.runtime.bench import bench

    model, masks = tiny_bert(0.9)
    from recipec.checkpoint import write_checkpoint
    from recipec.export.onnx import export

    write_checkpoint(model, tmp_path / "run" / "model", masks)
    folder = export(tmp_path / "run").output_dir
    report = bench(folder, ["ort", "deepsparse"], [1], 16, dense_baseline=True, repeats=2)
    assert not report["refused"], report["refused"]
    assert {r["runtime"] for r in report["results"]} == {"ort", "deepsparse"}


def test_default_threads_follows_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert rt.default_threads() == 1
    for unset in ("", "0", "two"):  # not a positive integer: every core this process may use
        monkeypatch.setenv("OMP_NUM_THREADS", unset)
        assert rt.default_threads() == len(os.sched_getaffinity(0))


def test_onnxruntime_sessions_do_not_spin_between_runs(tmp_path):
    """Interleaved with other runtimes, spinning intra-op threads slow whatever runs next (a
    quiet 2-thread bench showed onnxruntime sparse 1.53x its identical dense twin)."""
    from recipec.checkpoint import write_checkpoint
    from recipec.export.onnx import export

    model, masks = tiny_bert()
    write_checkpoint(model, tmp_path / "run" / "model", masks)
    folder = export(tmp_path / "run").output_dir
    opts = rt.ort_session(folder / "model.onnx", 2).get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_bench_asks_for_passive_openmp_waits_before_torch_loads(monkeypatch):
    from click.testing import CliRunner

    from recipec.cli import main

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    result = CliRunner().invoke(main, ["bench", "/nonexistent", "--seq-len", "0"])
    assert result.exit_code == 2
    assert os.environ.get("OMP_WAIT_POLICY") == "PASSIVE"

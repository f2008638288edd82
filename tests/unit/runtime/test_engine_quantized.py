"""The engine on the export of a quantization-aware run: its int8 layers run the int8 weights and
scales of ``model.int8.safetensors`` (not a re-quantization of the fp32 weights), its check
against the folder's INT8 (QDQ) ``model.onnx`` uses the INT8 tolerance, and a damaged or foreign
int8 file is a clear error."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from recipec.quant.files import INT8_FILE, INT8_FORMAT, read_int8
from recipec.runtime.engine import EngineError, load
from recipec.runtime.engine.model import compare, reference_dtype


def sparse_timer(candidate, fn):
    """Every sparse form looks faster than dense (so the int8 kernels really run)."""
    fn()
    return {"dense": 3.0, "unstructured": 1.0, "block4": 0.5}[candidate]


def _inputs(engine, batch=2, seq=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, size=(batch, seq))
    arrays = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    arrays["token_type_ids"] = np.zeros_like(ids)
    return {n: arrays[n] for n in engine.input_names}


def _copy(quantized_run, tmp_path):
    run, masks, result = quantized_run
    folder = tmp_path / "onnx"
    shutil.copytree(result.onnx_path.parent, folder)
    return folder, masks


def _rewrite(folder, change, metadata=None):
    tensors = load_file(str(folder / INT8_FILE))
    change(tensors)
    save_file(tensors, str(folder / INT8_FILE), metadata=metadata or {"format": INT8_FORMAT})


def test_int8_engine_runs_the_files_weights_and_scales(quantized_run, tmp_path):
    folder, masks = _copy(quantized_run, tmp_path)
    engine = load(folder, "int8", timer=sparse_timer, tokenizer=False)  # verified vs QDQ ORT
    assert engine.int8_source == "file"
    stored = read_int8(folder / INT8_FILE)
    assert len(engine.layers) == len(masks) == len(stored)
    for name, layer in engine.layers.items():
        q, scale = stored[f"{name}.weight"]
        for packed in layer.packed.values():
            torch.testing.assert_close(packed.dense_weight(), q.float(), rtol=0, atol=0)
            torch.testing.assert_close(packed.scale, scale, rtol=0, atol=0)

    # the file is what runs: halving one layer's scales changes the logits
    inputs = _inputs(engine)
    before = engine.logits(inputs)
    name = next(iter(stored))
    _rewrite(folder, lambda t: t.__setitem__(f"{name}.scale", t[f"{name}.scale"] * 0.5))
    changed = load(folder, "int8", timer=sparse_timer, tokenizer=False, verify=False)
    assert not np.allclose(changed.logits(inputs), before)


def test_fp32_engine_on_a_quantized_folder_is_checked_at_the_int8_tolerance(
    quantized_run, tmp_path
):
    _, _, result = quantized_run
    folder = result.onnx_path.parent
    engine = load(folder, "fp32", timer=sparse_timer, tokenizer=False)  # would fail at 1e-3
    assert engine.int8_source is None
    assert reference_dtype(engine, folder) == "int8"
    assert reference_dtype(engine, tmp_path) == "fp32"  # a folder without the int8 file
    import onnxruntime as ort

    inputs = _inputs(engine, seed=1)
    sess = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    ref = sess.run(["logits"], inputs)[0]
    diff, bound = compare(engine.logits(inputs), ref, "int8")
    assert diff <= bound
    assert diff > 0  # the reference really is the int8 graph


def test_a_nonzero_int8_weight_where_pruned_is_refused(quantized_run, tmp_path):
    folder, masks = _copy(quantized_run, tmp_path)
    name, mask = next(iter(masks.items()))
    pruned = (mask == 0).nonzero()[0].tolist()

    def plant(tensors):
        tensors[name][tuple(pruned)] = 5

    _rewrite(folder, plant)
    with pytest.raises(EngineError, match="nonzero where the weight is pruned"):
        load(folder, "int8", timer=sparse_timer, tokenizer=False, verify=False)


@pytest.mark.parametrize("damage", ["format", "dtype", "scale", "garbage"])
def test_a_damaged_int8_file_names_itself(quantized_run, tmp_path, damage):
    folder, _ = _copy(quantized_run, tmp_path)
    if damage == "format":
        _rewrite(folder, lambda t: None, metadata={"format": "other/1"})
    elif damage == "dtype":
        name = next(k for k in read_int8(folder / INT8_FILE))
        _rewrite(folder, lambda t: t.__setitem__(name, t[name].float()))
    elif damage == "scale":
        name = next(k for k in read_int8(folder / INT8_FILE))
        _rewrite(folder, lambda t: t.__setitem__(f"{name}.scale", t[f"{name}.scale"][:1]))
    else:
        (folder / INT8_FILE).write_bytes(b"\x00" * 64)
    with pytest.raises(EngineError, match=INT8_FILE):
        load(folder, "int8", timer=sparse_timer, tokenizer=False, verify=False)


def test_bench_on_a_quantized_folder(quantized_run):
    """bench's INT8 engine runs the file's weights, checked at the INT8 tolerance against the
    folder's own INT8 graph; onnxruntime's dynamic INT8 is not applied to an INT8 graph again."""
    from recipec.runtime.bench import bench

    _, _, result = quantized_run
    folder = result.onnx_path.parent
    runtimes = ["ort", "ort-int8", "engine", "engine-int8", "torch-csr"]
    report = bench(folder, runtimes, [1], 16, repeats=2)
    assert not report["refused"], report["refused"]
    assert "already INT8" in report["skipped"]["ort-int8 sparse"]
    ran = {(r["runtime"], r["variant"]) for r in report["results"]}
    assert {("ort", "sparse"), ("engine", "sparse"), ("engine-int8", "sparse")} <= ran
    assert ("torch-csr", "sparse") in ran


def test_deepsparse_runs_the_int8_graph(quantized_run):
    from recipec.runtime import runtimes as rt

    if rt.find_deepsparse_python() is None:
        pytest.skip("DeepSparse venv not installed")
    from recipec.runtime.bench import bench

    _, _, result = quantized_run
    report = bench(result.onnx_path.parent, ["ort", "deepsparse"], [1], 16, repeats=2)
    assert not report["refused"], report["refused"]
    assert {r["runtime"] for r in report["results"]} == {"ort", "deepsparse"}


def test_the_int8_table_lists_an_engine_that_fails_its_load_check_as_refused(
    quantized_run, load_benchmark, monkeypatch, tmp_path
):
    """benchmarks/int8_latency.py: an engine whose check against onnxruntime fails is a
    "refused" line with the check's message; the other runtimes of the row are still timed."""
    import recipec.runtime.engine as engine_pkg

    bench = load_benchmark("int8_latency")
    run, _, _ = quantized_run
    (tmp_path / "ptq_80").mkdir()
    (tmp_path / "ptq_80" / "onnx").symlink_to(run / "onnx")

    def names(targets):
        return sorted((t.model, t.runtime) for t in targets)

    targets, refused = bench.targets_for(tmp_path, 1, 8, 1, None, True, lambda _: None)
    assert names(targets) == [("ptq_80", "engine-int8"), ("ptq_80", "ort")] and not refused

    def disagree(*args, **kwargs):
        raise EngineError("engine int8 logits disagree with onnxruntime: max |diff| 9 > 1")

    monkeypatch.setattr(engine_pkg, "load", disagree)
    targets, refused = bench.targets_for(tmp_path, 1, 8, 1, None, True, lambda _: None)
    assert names(targets) == [("ptq_80", "ort")]
    assert refused == [
        "engine-int8 ptq_80 b1: engine int8 logits disagree with onnxruntime: max |diff| 9 > 1"
    ]

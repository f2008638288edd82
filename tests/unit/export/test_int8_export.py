"""INT8 export of a quantized checkpoint: QDQ graph with int8 weights, pruned weights zero in
them, onnxruntime vs the fake-quant PyTorch model within the stated tolerance, the int8
weights file against an independent reference, and verification that can fail."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from recipec.checkpoint import load_checkpoint
from recipec.export.onnx import (
    VerificationError,
    sample_inputs,
    verify_deployment,
)
from recipec.export.quantized import INT8_ATOL, verify_int8_zeros
from recipec.quant.files import INT8_FILE, install_frozen, read_quant

INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def _int8_initializers(path):
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    return {i.name: numpy_helper.to_array(i) for i in graph.initializer}, graph


def test_the_graph_is_qdq_with_int8_weights_and_pruned_zeros(quantized_run):
    run, masks, result = quantized_run
    arrays, graph = _int8_initializers(result.onnx_path)
    ops = [n.op_type for n in graph.node]
    # one QuantizeLinear per distinct linear input (Q, K and V share theirs): 4 per layer
    assert ops.count("QuantizeLinear") == 4 * 2
    # a DequantizeLinear per input, and per weight (its int8 initializer, no QuantizeLinear)
    assert ops.count("DequantizeLinear") == 4 * 2 + len(masks)
    info = json.loads((run / "onnx" / "sparsity.json").read_text())
    for name, mask in masks.items():
        entry = info["tensors"][name]
        values = arrays[entry["onnx_initializer"]]
        assert values.dtype == np.int8
        values = values.T if entry["transposed"] else values
        assert values.shape == tuple(mask.shape)
        assert not values[~mask.numpy()].any(), name  # pruned -> 0 in the int8 weights
        # no fp32 copy of a quantized weight is left in the graph
        assert not any(
            a.dtype == np.float32 and a.shape in (values.shape, values.T.shape)
            for k, a in arrays.items()
            if name in k
        )
    assert info["quantization"]["weights"] == "int8_per_channel_symmetric"


def test_onnxruntime_matches_the_fake_quant_model_not_the_fp32_one(quantized_run):
    import onnxruntime as ort

    run, _, result = quantized_run
    ckpt = load_checkpoint(run)
    fp32 = {}
    sess = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    inputs = sample_inputs(ckpt.model.config, "classification", INPUTS, batch=3, seq=12, seed=5)
    with torch.no_grad():
        fp32 = ckpt.model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
        install_frozen(ckpt.model, read_quant(run / "model"))
        fq = ckpt.model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
    got = sess.run(["logits"], inputs)[0]
    assert np.max(np.abs(got - fq)) <= INT8_ATOL
    assert np.max(np.abs(got - fq)) < np.max(np.abs(got - fp32))  # quantized, not FP32
    assert result.ort_max_abs_diff <= INT8_ATOL and result.int8_layers == 12


def test_the_int8_weights_file_is_the_reference_quantization(quantized_run):
    run, masks, _ = quantized_run
    params = dict(load_checkpoint(run).model.named_parameters())
    record = read_quant(run / "model")
    with safe_open(str(run / "onnx" / INT8_FILE), "pt") as f:
        assert f.metadata()["format"] == "recipec-int8/1"
        for name in masks:
            w = params[name].detach().double().numpy()
            scale = np.abs(w).max(axis=1) / 127
            q = f.get_tensor(name)
            assert q.dtype == torch.int8
            want = np.clip(np.rint(w / np.where(scale > 0, scale, 1)[:, None]), -127, 127)
            assert np.array_equal(q.numpy(), want.astype(np.int8)), name
            np.testing.assert_allclose(f.get_tensor(f"{name}.scale").numpy(), scale, rtol=1e-6)
            lo, hi = record["layers"][name]["input_range"]
            assert float(f.get_tensor(f"{name}.input_scale")) == pytest.approx(
                max(abs(lo), abs(hi)) / 127, rel=1e-6
            )
            assert not q.numpy()[~masks[name].numpy()].any()


def test_a_nonzero_pruned_int8_weight_fails_verification(quantized_run):
    import onnx
    from onnx import numpy_helper

    run, masks, _ = quantized_run
    info = json.loads((run / "onnx" / "sparsity.json").read_text())
    model = onnx.load(str(run / "onnx" / "model.onnx"))
    name = next(iter(masks))
    entry = info["tensors"][name]
    mapping = {name: (entry["onnx_initializer"], entry["transposed"])}
    assert verify_int8_zeros(model, mapping, masks)[name]["int8_zeros"] >= int((~masks[name]).sum())
    init = next(i for i in model.graph.initializer if i.name == entry["onnx_initializer"])
    values = numpy_helper.to_array(init).copy()
    pruned = np.argwhere(~(masks[name].numpy().T if entry["transposed"] else masks[name].numpy()))[
        0
    ]
    values[tuple(pruned)] = 3
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    with pytest.raises(ValueError, match="1 pruned weight"):
        verify_int8_zeros(model, mapping, masks)


def test_the_deployment_folder_reverifies(quantized_run):
    run, _, _ = quantized_run
    assert verify_deployment(run / "onnx")["ort_vs_torch_max_abs_diff"] <= INT8_ATOL
    with pytest.raises(VerificationError):
        verify_deployment(run / "onnx", atol=1e-12)

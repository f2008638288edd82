"""The INT8 (QDQ) form of an exported model whose checkpoint has ``quantization.json``.

The model is traced with its fake quantization in export mode: every quantized linear's input
becomes ``QuantizeLinear -> DequantizeLinear`` (int8 per tensor, zero point 0) and its weight
``QuantizeLinear(W) -> DequantizeLinear`` per output channel (axis 0). :func:`int8_weights`
then stores each weight as an int8 initializer (``round(W / scale)``, the scheme of
:mod:`recipec.quant.fake`) feeding its ``DequantizeLinear`` directly, so the file holds int8
weights only, and removes the fp32 weights and the nodes that computed their scales.

Verification (hard errors): every pruned weight is 0 in its int8 initializer, and onnxruntime's
logits equal the fake-quant PyTorch model's within ``INT8_ATOL`` (:func:`int8_tolerance`).
"""

from __future__ import annotations

import numpy as np

from recipec.quant.fake import FakeQuant, quantize_weight

INT8_ATOL = 2e-2
"""Default |onnxruntime - fake-quant PyTorch| bound on the logits of a quantized export.

Not 1e-4 as for FP32: onnxruntime may run a QDQ linear as an integer matmul, or compute a layer
norm / GELU in another order; a 1e-7 difference in an input that falls on a rounding boundary
moves that value by one quantization step (its scale, ~1% of the input's range), which the next
layers carry to the logits. Measured on the tests' tiny BERT: ~1e-6 (no boundary hit); the
bound leaves room for a few such steps."""


class Int8ExportError(ValueError):
    """The traced graph does not have the QDQ weights expected (a bug, or an unknown layout)."""


def _initializer_index(graph) -> dict[str, int]:
    return {init.name: i for i, init in enumerate(graph.initializer)}


def _param_of(init_name: str, names: list[str]) -> str | None:
    hits = [n for n in names if init_name == n or init_name.endswith("." + n)]
    return hits[0] if len(hits) == 1 else None


def int8_weights(onnx_model, quant: FakeQuant) -> dict[str, tuple[str, bool]]:
    """Replace each quantized weight's ``QuantizeLinear`` by an int8 initializer (in place);
    return ``{weight parameter name: (int8 initializer name, transposed)}``.

    A ``DequantizeLinear -> Transpose -> MatMul`` chain (how ``F.linear`` traces) becomes
    ``DequantizeLinear(axis=1) -> MatMul`` on the transposed int8 weight ``[in, out]``, the
    pattern onnxruntime's QDQ fusion runs as an integer matmul."""
    graph = onnx_model.graph
    names = list(quant.layers)
    mapping: dict[str, tuple[str, bool]] = {}
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in _initializer_index(graph):
            continue
        param = _param_of(node.input[0], names)
        if param is None or param in mapping:
            continue
        mapping[param] = _replace_weight(graph, node, param, quant)
    missing = sorted(set(names) - set(mapping))
    if missing:
        raise Int8ExportError(f"no QuantizeLinear of the weight found for {missing[:3]}")
    remove_dead(graph)
    return mapping


def _consumers(graph, name: str) -> list:
    return [n for n in graph.node if name in n.input]


def _replace_weight(graph, node, param: str, quant: FakeQuant) -> tuple[str, bool]:
    from onnx import helper, numpy_helper

    (dq,) = _consumers(graph, node.output[0]) or [None]
    if dq is None or dq.op_type != "DequantizeLinear":
        raise Int8ExportError(f"{param}: its QuantizeLinear does not feed one DequantizeLinear")
    q, scale = quantize_weight(quant.layers[param].module.weight)
    q = q.numpy()
    safe = np.where(scale.numpy() > 0, scale.numpy(), np.float32(1.0)).astype(np.float32)
    after = _consumers(graph, dq.output[0])
    transpose = (
        len(after) == 1
        and after[0].op_type == "Transpose"
        and [list(a.ints) for a in after[0].attribute if a.name == "perm"] in ([[1, 0]], [])
    )
    base = f"{param}.int8"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.ascontiguousarray(q.T) if transpose else q, base),
            numpy_helper.from_array(safe, f"{base}.scale"),
            numpy_helper.from_array(np.zeros(len(safe), np.int8), f"{base}.zero_point"),
        ]
    )
    dq.input[:] = [base, f"{base}.scale", f"{base}.zero_point"]
    if transpose:
        del dq.attribute[:]
        dq.attribute.append(helper.make_attribute("axis", 1))
        for later in _consumers(graph, after[0].output[0]):
            later.input[:] = [dq.output[0] if i == after[0].output[0] else i for i in later.input]
    graph.node.remove(node)
    return base, transpose


def remove_dead(graph) -> None:
    """Drop nodes and initializers that no graph output depends on."""
    needed = {out.name for out in graph.output}
    kept = []
    for node in reversed(list(graph.node)):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
    kept_ids = {id(n) for n in kept}
    for node in [n for n in graph.node if id(n) not in kept_ids]:
        graph.node.remove(node)
    for init in [i for i in graph.initializer if i.name not in needed]:
        graph.initializer.remove(init)


def verify_int8_zeros(
    onnx_model, mapping: dict[str, tuple[str, bool]], masks: dict
) -> dict[str, dict]:
    """Every pruned weight is 0 in its int8 initializer; per-tensor counts (``int8_zeros``,
    ``rounded_to_zero``: kept weights below half a quantization step). Returns
    ``{param: entry}``; raises ValueError naming each tensor with a nonzero pruned weight."""
    from onnx import numpy_helper

    arrays = {i.name: i for i in onnx_model.graph.initializer}
    table, errors = {}, []
    for name, (init_name, transposed) in mapping.items():
        values = numpy_helper.to_array(arrays[init_name])
        values = values.T if transposed else values
        if values.dtype != np.int8:
            errors.append(f"{name}: initializer {init_name!r} is {values.dtype}, not int8")
            continue
        zero = values == 0
        entry = {
            "int8_initializer": init_name,
            "transposed": transposed,
            "int8_zeros": int(zero.sum()),
        }
        if name in masks:
            keep = masks[name].cpu().numpy()
            bad = int((~keep & ~zero).sum())
            if bad:
                errors.append(f"{name}: {bad} pruned weight(s) nonzero in the int8 initializer")
            entry["rounded_to_zero"] = int((keep & zero).sum())
        table[name] = entry
    if errors:
        raise ValueError("int8 zeros do not match the masks:\n  " + "\n  ".join(errors))
    return table

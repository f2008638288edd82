"""Bench targets for recipec's engine (FP32, INT8) and onnxruntime's dynamic INT8 baseline.

``setup_extras`` prepares, once per bench run, what the runtimes ``engine``, ``engine-int8`` and
``ort-int8`` need (engines built from the folder's torch weights; quantized copies of the sparse
model and of its dense twin). ``extra_targets`` then gives, per batch, each runtime's runner with
its outputs checked against onnxruntime FP32 first: FP32 within the bench's tolerance, INT8
within ``recipec.runtime.engine.INT8_TOLERANCE``. A runtime that disagrees is refused.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recipec.quant.fake import QuantError
from recipec.quant.files import INT8_FILE, read_int8
from recipec.runtime.engine import INT8_TOLERANCE, Engine, Planner, kernels_note
from recipec.runtime.runtimes import (
    OrtRunner,
    OutputMismatch,
    Runner,
    check_outputs,
    clock_fn,
    ort_session,
)

ENGINE_RUNTIMES = {"engine": "fp32", "engine-int8": "int8"}
INT8_RUNTIMES = ("ort-int8", "engine-int8")
EXTRA_RUNTIMES = ("ort-int8", "engine", "engine-int8")


class EngineRunner(Runner):
    """recipec's engine on fixed inputs."""

    def __init__(self, engine: Engine, inputs: dict[str, np.ndarray], runtime: str = "engine"):
        self.engine = engine
        self.runtime = runtime
        self.inputs = engine.to_tensors(inputs)

    @torch.inference_mode()
    def outputs(self) -> np.ndarray:
        return self.engine.model(**self.inputs).logits.float().numpy()

    @torch.inference_mode()
    def time(self, n: int, clock: str = "wall") -> list[float]:
        now = clock_fn(clock)
        model, inputs = self.engine.model, self.inputs
        times = []
        for _ in range(n):
            start = now()
            model(**inputs)
            times.append(now() - start)
        return times


@dataclass
class Extras:
    """What the extra runtimes of one bench run share."""

    runtimes: list[str]
    quantized: bool = False  # the folder's model.onnx is an INT8 (QDQ) export
    ort_int8: dict[str, Any] = field(default_factory=dict)  # variant -> session
    engines: dict[tuple[str, str], Engine] = field(default_factory=dict)  # (runtime, variant)


def setup_extras(
    active: list[str],
    folder: Path,
    info: dict,
    onnx_paths: dict[str, Path],
    workdir: Path,
    threads: int,
    torch_models: tuple[Any, Any, Any],
    report: dict,
    log: Callable[[str], None],
) -> Extras:
    """Quantized sessions and engines for the extra runtimes in ``active``.

    ``onnx_paths``: variant ("sparse", and "dense" with --dense-baseline) -> model.onnx;
    ``torch_models``: ``(model, masks, dense twin)`` as loaded for the torch runtimes.
    """
    extras = Extras([r for r in EXTRA_RUNTIMES if r in active])
    extras.quantized = (folder / INT8_FILE).is_file()
    if "ort-int8" in extras.runtimes:
        from recipec.runtime.int8 import quantize_onnx

        for variant, path in onnx_paths.items():
            if variant == "sparse" and extras.quantized:
                report["skipped"]["ort-int8 sparse"] = (
                    f"{folder}'s model.onnx is already INT8 (QDQ): its 'ort' row is the INT8 run"
                )
                continue
            q = quantize_onnx(path, workdir / f"{variant}-int8.onnx")
            extras.ort_int8[variant] = ort_session(q, threads)
        log(f"ort-int8: quantize_dynamic (int8 weights) of {', '.join(onnx_paths)}")
    model, masks, dense = torch_models
    for runtime, dtype in ENGINE_RUNTIMES.items():
        if runtime not in extras.runtimes:
            continue
        if model is None:
            report["skipped"][runtime] = f"{folder} has no torch weights (model.safetensors)"
            extras.runtimes.remove(runtime)
            continue
        int8_weights = None
        if dtype == "int8" and extras.quantized:
            try:
                int8_weights = read_int8(folder / INT8_FILE)
            except QuantError as exc:
                report["skipped"][runtime] = str(exc)
                extras.runtimes.remove(runtime)
                continue
        extras.engines[(runtime, "sparse")] = _engine(model, masks, info, dtype, int8_weights)
        if dense is not None and runtime == "engine":  # INT8 has ort-int8's twin instead
            extras.engines[(runtime, "dense")] = _engine(dense, masks, info, dtype)
    note = kernels_note()
    if note and extras.engines:
        log(note)
        report.setdefault("notes", []).append(note)
    return extras


def _engine(model, masks, info: dict, dtype: str, int8_weights=None) -> Engine:
    return Engine(
        copy.deepcopy(model),
        masks,
        task=info["task"],
        dtype=dtype,
        input_names=info["inputs"],
        planner=Planner(),
        int8_weights=int8_weights,
    )


def extra_targets(
    extras: Extras,
    inputs: dict[str, np.ndarray],
    ref: dict[str, np.ndarray],
    tol: tuple[float, float],
    report: dict,
    log: Callable[[str], None],
) -> list[tuple[str, str, Runner, float]]:
    """``(runtime, variant, runner, max |diff| vs onnxruntime)`` of every checked extra target.

    ``ref``: onnxruntime FP32 logits per variant; ``tol``: the bench's FP32 ``(atol, rtol)``.
    """
    batch = int(next(iter(inputs.values())).shape[0])
    seq = int(next(iter(inputs.values())).shape[-1])
    runners: list[tuple[str, str, Runner]] = []
    for variant, session in extras.ort_int8.items():
        runner = OrtRunner(session, inputs)
        runner.runtime = "ort-int8"
        runners.append(("ort-int8", variant, runner))
    for (runtime, variant), engine in extras.engines.items():
        engine.prepare(batch, seq, choices=_choices(inputs, engine))
        tokens = int(np.prod(inputs["input_ids"].shape))
        summary = engine.summary(tokens)
        report.setdefault("engine_layers", {})[f"{runtime} {variant} b{batch}"] = summary
        log(f"{runtime} {variant} b{batch}: layers -> {summary}")
        runners.append((runtime, variant, EngineRunner(engine, inputs, runtime)))
    out = []
    for runtime, variant, runner in runners:
        # an INT8 folder's onnxruntime reference is itself INT8 (its QDQ model.onnx)
        int8 = runtime in INT8_RUNTIMES or (extras.quantized and variant == "sparse")
        atol, rtol = INT8_TOLERANCE if int8 else tol
        try:
            diff = check_outputs(f"{runtime} {variant}", runner.outputs(), ref[variant], atol, rtol)
        except OutputMismatch as exc:
            report["refused"].append(str(exc))
            log(f"{runtime} {variant} b{batch}: REFUSED: {exc}")
            continue
        out.append((runtime, variant, runner, diff))
    return out


def _choices(inputs: dict[str, np.ndarray], engine: Engine) -> int:
    ids = inputs["input_ids"]
    return int(ids.shape[1]) if engine.task == "multiple-choice" and ids.ndim == 3 else 1

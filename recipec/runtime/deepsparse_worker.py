"""DeepSparse worker: run by the DeepSparse venv's python, spoken to over stdin/stdout.

It must not import recipec (the venv has DeepSparse 1.8.0, numpy<2 and onnx<1.15 only).
One JSON request per line on stdin, one JSON reply per line on the protocol stream:

- ``{"cmd": "hello"}`` -> versions;
- ``{"cmd": "load", "key": K, "onnx": PATH, "inputs": NPZ, "expected": NPZ, "atol": A,
  "rtol": R, "num_cores": N}``: copies the model with static input shapes (DeepSparse
  rewrites the file it compiles), compiles one engine for that (batch, seq), runs it on the
  inputs and compares with the expected (onnxruntime) logits; an engine that disagrees is
  refused and never timed;
- ``{"cmd": "time", "key": K, "iterations": N, "clock": "wall"|"cpu"}`` -> per-call seconds;
- ``{"cmd": "unload", "key": K}``; ``{"cmd": "quit"}``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("NM_LOGGING_LEVEL", "warn")

# Replies go to the real stdout; everything DeepSparse prints goes to stderr.
_PROTOCOL = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

import numpy as np  # noqa: E402

ENGINES: dict = {}
WORKDIR = tempfile.mkdtemp(prefix="recipec-deepsparse-")


def _reply(**kwargs) -> None:
    _PROTOCOL.write(json.dumps(kwargs) + "\n")
    _PROTOCOL.flush()


def _static_copy(path: str, inputs: dict, key: str) -> str:
    """A copy of the model whose graph inputs have the fixed shapes of ``inputs``."""
    import onnx

    model = onnx.load(path)
    for graph_input in model.graph.input:
        if graph_input.name not in inputs:
            continue
        dims = graph_input.type.tensor_type.shape.dim
        for dim, size in zip(dims, inputs[graph_input.name].shape):
            dim.ClearField("dim_param")
            dim.dim_value = int(size)
    safe = "".join(c if c.isalnum() else "_" for c in key)
    out = os.path.join(WORKDIR, f"{safe}.onnx")
    onnx.save(model, out)
    return out


def _load(req: dict) -> dict:
    import deepsparse

    key = req["key"]
    with np.load(req["inputs"]) as data:
        inputs = {k: np.ascontiguousarray(data[k]) for k in data.files}
    with np.load(req["expected"]) as data:
        expected = data["logits"]
    static = _static_copy(req["onnx"], inputs, key)
    batch = int(next(iter(inputs.values())).shape[0])
    start = time.perf_counter()
    engine = deepsparse.compile_model(static, batch_size=batch, num_cores=req.get("num_cores"))
    compile_s = time.perf_counter() - start
    names = list(engine.input_names) if hasattr(engine, "input_names") else list(inputs)
    feed = [inputs[n] for n in names]
    got = np.array(engine.run(feed)[0], copy=True)
    diff = float(np.max(np.abs(got - expected))) if expected.size else 0.0
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    bound = req.get("atol", 1e-3) + req.get("rtol", 1e-3) * scale
    ok = got.shape == expected.shape and np.isfinite(diff) and diff <= bound
    if ok:
        ENGINES[key] = (engine, feed)
    return {
        "ok": ok,
        "max_abs_diff": diff,
        "bound": bound,
        "shape": list(got.shape),
        "compile_s": compile_s,
        "num_cores": getattr(engine, "num_cores", None),
    }


def _time(req: dict) -> dict:
    key = req["key"]
    if key not in ENGINES:
        return {"ok": False, "error": f"no verified engine {key!r}"}
    engine, feed = ENGINES[key]
    # "cpu": this process's CPU time, for oversubscribed machines (see runtimes.clock_fn).
    now = time.process_time if req.get("clock") == "cpu" else time.perf_counter
    times = []
    for _ in range(int(req.get("iterations", 1))):
        start = now()
        engine.run(feed)
        times.append(now() - start)
    return {"ok": True, "times": times}


def main() -> None:
    """Serve requests until ``quit`` or end of input."""
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
            cmd = req.get("cmd")
            if cmd == "hello":
                import deepsparse
                import onnx

                _reply(
                    ok=True,
                    deepsparse=deepsparse.__version__,
                    numpy=np.__version__,
                    onnx=onnx.__version__,
                    python=sys.version.split()[0],
                )
            elif cmd == "load":
                _reply(**_load(req))
            elif cmd == "time":
                _reply(**_time(req))
            elif cmd == "unload":
                ENGINES.pop(req.get("key"), None)
                _reply(ok=True)
            elif cmd == "quit":
                _reply(ok=True)
                break
            else:
                _reply(ok=False, error=f"unknown command {cmd!r}")
        except Exception as exc:  # report to the parent instead of dying silently
            _reply(ok=False, error=f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()

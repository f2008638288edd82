"""CPU runtimes for the benchmark: onnxruntime, DeepSparse (in its own venv), torch-csr.

(recipec's own engine and onnxruntime's dynamic INT8 are in ``recipec.runtime.bench_targets``.)

Every runtime is driven through a ``Runner`` bound to one set of inputs: ``outputs()`` runs
once and returns the logits (checked against onnxruntime before any timing), ``time(n)``
returns ``n`` per-call latencies in seconds.

- ``ort``: onnxruntime's CPU provider on the exported ``model.onnx``.
- ``deepsparse``: DeepSparse 1.8.0 in a subprocess of a separate venv
  (``scripts/install_deepsparse.sh``), one static-shape engine per (batch, seq); an engine
  whose outputs disagree with onnxruntime is refused.
- ``torch-csr``: the PyTorch model with each pruned ``nn.Linear`` swapped for a sparse kernel
  (``torch.sparse.addmm`` on a CSR weight, or the optional ``sparseprop`` package's AVX2
  kernel) only where a quick measurement at load shows it beats the dense layer.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recipec.kernels.sparseprop import (
    RuntimeUnavailable,
    SparseLinear,
    TransposeCache,
    available_kernels,
)
from recipec.sparsity.masks import count_zeros

RUNTIMES = ("ort", "ort-int8", "deepsparse", "torch-csr", "engine", "engine-int8")
DEEPSPARSE_ENV = "RECIPEC_DEEPSPARSE_PYTHON"
DEFAULT_DEEPSPARSE_VENV = Path.home() / ".cache" / "recipec" / "deepsparse-venv"
WORKER_SCRIPT = Path(__file__).with_name("deepsparse_worker.py")
INSTALL_HINT = (
    "run scripts/install_deepsparse.sh (a separate venv with deepsparse==1.8.0 and numpy<2), "
    f"then pass --deepsparse-python VENV/bin/python or set {DEEPSPARSE_ENV}"
)


class OutputMismatch(Exception):
    """A runtime whose outputs disagree with onnxruntime: it is not timed."""


def default_threads() -> int:
    """Threads per runtime when none is asked for: ``OMP_NUM_THREADS`` if set to a positive
    integer (as torch and onnxruntime users expect), else the CPU cores this process may use."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def check_outputs(name: str, got: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> float:
    """Max |got - ref|; raises OutputMismatch above ``atol + rtol * max|ref|``."""
    if got.shape != ref.shape:
        raise OutputMismatch(f"{name}: output shape {got.shape} != onnxruntime's {ref.shape}")
    diff = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    bound = atol + rtol * (float(np.max(np.abs(ref))) if ref.size else 0.0)
    if not np.isfinite(diff) or diff > bound:
        raise OutputMismatch(
            f"{name}: outputs disagree with onnxruntime (max |diff| {diff:.3g} > {bound:.3g}); "
            "refusing to time it"
        )
    return diff


CLOCKS = ("wall", "cpu")


def clock_fn(clock: str):
    """``wall``: elapsed time; ``cpu``: this process's CPU time (all its threads).

    CPU time is for shared, oversubscribed machines: with one thread per runtime it counts
    only the work, not the time spent waiting for a core. With several threads it adds them
    up and counts spin-waiting, so use it with ``--threads 1``.
    """
    if clock == "wall":
        return time.perf_counter
    if clock == "cpu":
        return time.process_time
    raise ValueError(f"unknown clock {clock!r}; choose from {', '.join(CLOCKS)}")


class Runner:
    """A model on one runtime, bound to one set of inputs."""

    runtime = ""

    def outputs(self) -> np.ndarray:
        """Run once and return the logits."""
        raise NotImplementedError

    def time(self, n: int, clock: str = "wall") -> list[float]:
        """Per-call seconds of ``n`` consecutive calls (``clock``: wall or process CPU time)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the runner holds."""


# --------------------------------------------------------------------------------------
# onnxruntime
# --------------------------------------------------------------------------------------


def ort_session(onnx_path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session with full graph optimisation."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # No busy-waiting worker threads after a run: interleaved with other sessions (bench's
    # rounds), spinning threads steal the cores of whatever runs next.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


class OrtRunner(Runner):
    """onnxruntime on fixed inputs."""

    runtime = "ort"

    def __init__(self, session, inputs: dict[str, np.ndarray]):
        self.session = session
        self.inputs = inputs

    def outputs(self) -> np.ndarray:
        return self.session.run(["logits"], self.inputs)[0]

    def time(self, n: int, clock: str = "wall") -> list[float]:
        now = clock_fn(clock)
        times = []
        for _ in range(n):
            start = now()
            self.session.run(["logits"], self.inputs)
            times.append(now() - start)
        return times


# --------------------------------------------------------------------------------------
# torch-csr
# --------------------------------------------------------------------------------------


@dataclass
class LayerChoice:
    """What torch-csr decided for one pruned linear layer."""

    name: str
    shape: tuple[int, int]
    sparsity: float
    kernel: str  # "dense", "csr" or "sparseprop"
    speedup: float  # measured dense time / chosen kernel time (1.0 when kept dense)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.inference_mode()
def measure_layer(
    linear: torch.nn.Linear, tokens: int, kernels: list[str], rounds: int = 5
) -> dict[str, float]:
    """Best-of-``rounds`` seconds of the dense layer and each sparse kernel on ``tokens`` rows.

    The minimum, not the median: on a shared machine other processes only ever add time,
    so the fastest call is the best estimate of what each kernel costs.
    """
    x = torch.randn(tokens, linear.in_features)
    fns = {"dense": lambda: linear(x)}
    for kernel in kernels:
        module = SparseLinear(linear, kernel)
        fns[kernel] = lambda m=module: m(x)
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):  # interleaved, so drifting clocks hit every kernel alike
        for k, fn in fns.items():
            samples[k].append(_seconds(fn))
    return {k: min(v) for k, v in samples.items()}


def sparsify_model(
    model: torch.nn.Module,
    tokens: int,
    *,
    kernels: list[str] | None = None,
    min_sparsity: float = 0.7,
    min_speedup: float = 1.05,
    names: list[str] | None = None,
    force: bool = False,
) -> list[LayerChoice]:
    """Swap pruned linears for ``SparseLinear`` where measured faster, in place.

    Layers below ``min_sparsity`` stay dense without measuring (sparse kernels never win
    there on these CPUs). Others are measured once per (shape, sparsity to 1%) at ``tokens``
    rows; a kernel is used only if it is ``min_speedup`` times faster than dense. With
    ``force`` every layer above ``min_sparsity`` gets the first kernel, unmeasured.
    """
    kernels = available_kernels() if kernels is None else kernels
    cache = TransposeCache()  # shared: Q, K and V read the same hidden states
    choices: list[LayerChoice] = []
    decided: dict[tuple, tuple[str, float]] = {}
    modules = dict(model.named_modules())
    targets = names
    if targets is None:
        targets = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
    for name in targets:
        linear = modules[name]
        if not isinstance(linear, torch.nn.Linear):
            continue
        weight = linear.weight.detach()
        sparsity = count_zeros(weight) / weight.numel()
        shape = tuple(weight.shape)
        if sparsity < min_sparsity or not kernels:
            choices.append(LayerChoice(name, shape, sparsity, "dense", 1.0))
            continue
        key = (shape, round(sparsity, 2), tokens)
        if force:
            decided[key] = (kernels[0], float("nan"))
        if key not in decided:
            times = measure_layer(linear, tokens, kernels)
            best = min(kernels, key=lambda k: times[k])
            speedup = times["dense"] / times[best]
            decided[key] = (best, speedup) if speedup >= min_speedup else ("dense", 1.0)
        kernel, speedup = decided[key]
        if kernel != "dense":
            parent_name, _, attr = name.rpartition(".")
            parent = modules[parent_name] if parent_name else model
            setattr(parent, attr, SparseLinear(linear, kernel, cache))
        choices.append(LayerChoice(name, shape, sparsity, kernel, speedup))
    if any(c.kernel != "dense" for c in choices):
        # The cache matches inputs by identity; never let it outlive one forward pass.
        model.register_forward_pre_hook(cache.clear)
        model.register_forward_hook(cache.clear)
    return choices


def pruned_linear_names(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> list[str]:
    """Module names of the ``nn.Linear`` layers whose weight is masked."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and f"{name}.weight" in masks:
            names.append(name)
    return names


class TorchRunner(Runner):
    """A PyTorch model (dense, or with sparse linears) on fixed inputs."""

    runtime = "torch-csr"

    def __init__(self, model: torch.nn.Module, inputs: dict[str, np.ndarray], choices=None):
        self.model = model.eval()
        self.inputs = {k: torch.from_numpy(v) for k, v in inputs.items()}
        self.choices: list[LayerChoice] = list(choices or [])

    @torch.inference_mode()
    def outputs(self) -> np.ndarray:
        return self.model(**self.inputs).logits.float().numpy()

    @torch.inference_mode()
    def time(self, n: int, clock: str = "wall") -> list[float]:
        now = clock_fn(clock)
        times = []
        for _ in range(n):
            start = now()
            self.model(**self.inputs)
            times.append(now() - start)
        return times

    def summary(self) -> str:
        """One line: how many layers went to which kernel."""
        counts: dict[str, int] = {}
        for c in self.choices:
            counts[c.kernel] = counts.get(c.kernel, 0) + 1
        return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "no pruned layers"


def torch_csr_runner(
    model: torch.nn.Module,
    masks: dict[str, torch.Tensor],
    inputs: dict[str, np.ndarray],
    *,
    kernels: list[str] | None = None,
    copy_model: bool = True,
) -> TorchRunner:
    """A torch-csr runner for ``inputs``: a copy of ``model`` sparsified for that token count."""
    model = copy.deepcopy(model) if copy_model else model
    tokens = int(np.prod(next(iter(inputs.values())).shape))
    choices = sparsify_model(
        model, tokens, kernels=kernels, names=pruned_linear_names(model, masks)
    )
    return TorchRunner(model, inputs, choices)


# --------------------------------------------------------------------------------------
# DeepSparse (subprocess in its own venv)
# --------------------------------------------------------------------------------------


def _numpy_major_ok() -> bool:
    return int(np.__version__.split(".")[0]) < 2


def find_deepsparse_python(explicit: str | Path | None = None) -> Path | None:
    """The python that has DeepSparse: ``explicit``, ``$RECIPEC_DEEPSPARSE_PYTHON``, the
    default venv (``~/.cache/recipec/deepsparse-venv``), or this interpreter if it has
    DeepSparse under numpy<2. None when none is found.
    """
    if explicit:
        path = Path(explicit).expanduser()
        if not path.exists():
            raise RuntimeUnavailable(f"deepsparse python {path} does not exist; {INSTALL_HINT}")
        return path
    env = os.environ.get(DEEPSPARSE_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.exists():
            raise RuntimeUnavailable(f"${DEEPSPARSE_ENV}={env} does not exist; {INSTALL_HINT}")
        return path
    default = DEFAULT_DEEPSPARSE_VENV / "bin" / "python"
    if default.exists():
        return default
    if importlib.util.find_spec("deepsparse") is not None and _numpy_major_ok():
        return Path(sys.executable)
    return None


class DeepSparseWorker:
    """A long-lived ``deepsparse_worker.py`` process in the DeepSparse venv."""

    def __init__(
        self, python: str | Path, num_cores: int | None = None, *, require_numpy1: bool = True
    ):
        self.python = Path(python)
        self.num_cores = num_cores
        self.workdir = Path(tempfile.mkdtemp(prefix="recipec-ds-"))
        env = dict(os.environ, NM_DISABLE_ANALYTICS="1", PYTHONNOUSERSITE="1")
        for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
            env.pop(var, None)
        self.log_path = self.workdir / "worker.log"
        try:
            with open(self.log_path, "w") as log:
                self.proc = subprocess.Popen(
                    [str(self.python), str(WORKER_SCRIPT)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                    env=env,
                )
        except OSError as exc:
            raise RuntimeUnavailable(f"cannot start {self.python}: {exc}; {INSTALL_HINT}") from exc
        try:
            self.info = self._ask(cmd="hello")
        except RuntimeUnavailable:
            self.close()
            raise
        if not self.info.get("ok"):
            self.close()
            raise RuntimeUnavailable(
                f"{self.python} cannot import deepsparse ({self.info.get('error')}); {INSTALL_HINT}"
            )
        if require_numpy1 and int(str(self.info.get("numpy", "2")).split(".")[0]) >= 2:
            self.close()
            raise RuntimeUnavailable(
                f"{self.python} has numpy {self.info['numpy']}: DeepSparse 1.8.0 returns wrong "
                f"outputs under numpy 2; {INSTALL_HINT}"
            )
        self._count = 0

    def _ask(self, **request) -> dict:
        if self.proc.poll() is not None:
            raise RuntimeUnavailable(f"the DeepSparse worker ({self.python}) has exited")
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError) as exc:
            raise RuntimeUnavailable(f"the DeepSparse worker died: {exc}") from exc
        if not line:
            raise RuntimeUnavailable(
                f"the DeepSparse worker ({self.python}) exited without answering"
                f"{self._log_tail()}; {INSTALL_HINT}"
            )
        return json.loads(line)

    def _log_tail(self) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text().splitlines() if ln.strip()]
        except OSError:
            return ""
        return f" (last message: {lines[-1].strip()})" if lines else ""

    def runner(
        self,
        onnx_path: str | Path,
        inputs: dict[str, np.ndarray],
        expected: np.ndarray,
        *,
        atol: float = 1e-3,
        rtol: float = 1e-3,
    ) -> DeepSparseRunner:
        """Compile an engine for these inputs' shapes; raises OutputMismatch if it disagrees."""
        self._count += 1
        key = f"m{self._count}"
        inputs_path = self.workdir / f"{key}-inputs.npz"
        expected_path = self.workdir / f"{key}-expected.npz"
        np.savez(inputs_path, **inputs)
        np.savez(expected_path, logits=expected)
        reply = self._ask(
            cmd="load",
            key=key,
            onnx=str(Path(onnx_path).resolve()),
            inputs=str(inputs_path),
            expected=str(expected_path),
            atol=atol,
            rtol=rtol,
            num_cores=self.num_cores,
        )
        if "error" in reply:
            raise RuntimeUnavailable(f"deepsparse could not compile {onnx_path}: {reply['error']}")
        if not reply.get("ok"):
            raise OutputMismatch(
                f"deepsparse: outputs disagree with onnxruntime on {onnx_path} "
                f"(max |diff| {reply['max_abs_diff']:.3g} > {reply['bound']:.3g}); refusing to time it"
            )
        return DeepSparseRunner(self, key, reply)

    def time(self, key: str, n: int, clock: str = "wall") -> list[float]:
        """Per-call seconds of ``n`` runs of engine ``key``."""
        reply = self._ask(cmd="time", key=key, iterations=n, clock=clock)
        if not reply.get("ok"):
            raise RuntimeUnavailable(f"deepsparse: {reply.get('error')}")
        return reply["times"]

    def unload(self, key: str) -> None:
        """Free engine ``key``."""
        if self.proc.poll() is None:
            self._ask(cmd="unload", key=key)

    def close(self) -> None:
        """Stop the worker and remove its files."""
        if self.proc.poll() is None:
            try:
                self._ask(cmd="quit")
                self.proc.wait(timeout=30)
            except (RuntimeUnavailable, subprocess.TimeoutExpired, ValueError):
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


class DeepSparseRunner(Runner):
    """One verified DeepSparse engine; calls are timed inside the worker."""

    runtime = "deepsparse"

    def __init__(self, worker: DeepSparseWorker, key: str, load_info: dict):
        self.worker = worker
        self.key = key
        self.load_info = load_info

    def outputs(self) -> np.ndarray:
        raise NotImplementedError("DeepSparse outputs are checked inside the worker at load")

    def time(self, n: int, clock: str = "wall") -> list[float]:
        return self.worker.time(self.key, n, clock)

    def close(self) -> None:
        self.worker.unload(self.key)


def start_deepsparse(
    explicit: str | Path | None = None, num_cores: int | None = None
) -> DeepSparseWorker:
    """Start the DeepSparse worker; raises RuntimeUnavailable with install advice if absent."""
    python = find_deepsparse_python(explicit)
    if python is None:
        raise RuntimeUnavailable(f"deepsparse is not installed; {INSTALL_HINT}")
    return DeepSparseWorker(python, num_cores=num_cores)

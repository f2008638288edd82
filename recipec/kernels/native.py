"""recipec's sparse CPU linear kernels: packing, the compiled ops and a pure-torch fallback.

``y[..., out] = x[..., in] @ W^T + b`` for a pruned ``W`` (exact zeros), fp32 or int8, with the
weight stored as CSR by output row ("unstructured") or as 1x4 blocks of input features
("block4"). Activations stay row-major ``[tokens, features]`` in and out.

The C++ library (``csrc/``) is compiled on first use with the system C++ compiler into
``$RECIPEC_CACHE`` (default ``~/.cache/recipec``), keyed by a hash of its sources, the compiler
and torch, and loaded as torch ops (``torch.ops.recipec_kernels``). Inside it, AVX2+FMA code runs
only after a CPU check; other CPUs get its portable scalar path. When nothing can be built, a
pure-torch fallback with the same semantics runs instead, and one line on stderr says why.

``RECIPEC_KERNELS`` picks the path: ``auto`` (default), ``portable-c`` (the compiled scalar
path) or ``torch`` (the pure-torch fallback, never compiles).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BACKENDS = ("avx2", "portable-c", "torch-fallback")
STRUCTURES = ("unstructured", "block4")
DTYPES = ("fp32", "int8")

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ("kernels.cpp", "ops.cpp")
_HEADERS = ("kernels.h",)
_LIB_NAME = "recipec_kernels"
# The kernels' int8 epilogue must round like the fallback: no FMA contraction of a * s + b.
_CXXFLAGS = ["-O3", "-std=c++20", "-fPIC", "-ffp-contract=off", "-DNDEBUG", "-w"]
_STRUCTURE_ID = {"unstructured": 0, "block4": 1}
_MODE_ID = {"fp32": 0, "int8": 1, "int8-acc": 2}
_ISA_ID = {"portable-c": 0, "avx2": 1}
# Tokens per packed tile (<= 64): the tile is [in, tile] floats (int16 for int8), e.g. 96 KiB
# for in=768 at 32 tokens, which stays in the 512 KiB L2 while W streams past it. Measured on
# Zen 2 (1 thread, 90%): fp32 is best at 32 for every BERT/MiniLM shape; int8 gains ~5% from
# 64 where in <= 768 (fewer per-row passes) and loses it beyond (the tile leaves L2).
DEFAULT_TILE = {"fp32": 32, "int8": 32}


# Input features per panel (see pack_linear). Measured (Zen 2, 1 thread, 90%, 2048 tokens):
# fp32 panels of 384 features (48 KiB of tile) beat one panel by 17% at 3072 features, 10% at
# 1536 and 8% at 768 (256-768 within 3% of each other); int8's tile is half the size and
# panels only cost it (up to 5%), so it is cut only beyond 4096 features.
PANEL_FEATURES = {"fp32": 384, "int8": 4096}


def default_tile(dtype: str, in_features: int) -> int:
    """Tokens per packed tile used when ``sparse_linear`` gets no ``tile``."""
    return 64 if dtype == "int8" and in_features <= 768 else DEFAULT_TILE[dtype]


# The first build's expected duration, in the line printed while building. Measured on the 2
# Zen 2 cores: kernels.cpp 5.4 s and ops.cpp 2.9 s of CPU, compiled in parallel (~6 s idle,
# 19 s at load average 7).
_BUILD_SECONDS = 10

_lock = threading.Lock()
_state: dict = {}


def _say(msg: str) -> None:
    print(f"recipec kernels: {msg}", file=sys.stderr, flush=True)


def _cache_dir() -> Path:
    root = os.environ.get("RECIPEC_CACHE") or os.path.join(Path.home(), ".cache", "recipec")
    return Path(root) / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build_key(cxx: str) -> str:
    h = hashlib.sha256()
    for name in _SOURCES + _HEADERS:
        h.update((_CSRC / name).read_bytes())
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
        h.update(version.stdout.encode())
    except (OSError, subprocess.SubprocessError):
        pass
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{' '.join(_CXXFLAGS)}".encode())
    return h.hexdigest()[:16]


def _build(cxx: str, out: Path) -> None:
    """Compiles the two sources in parallel and links them into ``out`` (atomic rename)."""
    from torch.utils import cpp_extension

    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libdir = cpp_extension.library_paths()[0]
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        objs, procs = [], []
        for src in _SOURCES:
            obj = os.path.join(tmp, src + ".o")
            cmd = [cxx, *_CXXFLAGS, abi, *includes, "-c", str(_CSRC / src), "-o", obj]
            procs.append((cmd, subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)))
            objs.append(obj)
        errors = []
        for cmd, proc in procs:
            _, err = proc.communicate()
            if proc.returncode != 0:
                errors.append(err.strip() or f"{' '.join(cmd)} exited {proc.returncode}")
        if errors:
            raise RuntimeError(errors[0])
        so = os.path.join(tmp, f"{_LIB_NAME}.so")
        link = [cxx, "-shared", *objs, f"-L{libdir}", "-lc10", "-ltorch_cpu"]
        link += [f"-Wl,-rpath,{libdir}", "-o", so]
        proc = subprocess.run(link, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip() or "link failed")
        os.replace(so, out)


@contextlib.contextmanager
def _file_lock(path: Path):
    """Serializes builds across processes (pytest-xdist, several workers); no-op without fcntl."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _load_library() -> tuple[bool, str | None]:
    """Builds (once per source hash) and loads the library: (loaded, reason when not)."""
    cxx = _compiler()
    if cxx is None:
        return False, "no C++ compiler found (install g++ or set CXX)"
    key = _build_key(cxx)
    root = _cache_dir()
    out = root / key / f"{_LIB_NAME}.so"
    failed = root / key / "build-failed.txt"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(root / key / "lock"):
            if not out.exists() and failed.exists():
                first = failed.read_text().strip().splitlines()[:1] or ["?"]
                return False, f"build failed earlier ({first[0][:200]}); delete {failed} to retry"
            if not out.exists():
                _say(f"building recipec's sparse kernels (once, ~{_BUILD_SECONDS} s)…")
                start = time.perf_counter()
                try:
                    _build(cxx, out)
                except (OSError, RuntimeError) as exc:
                    failed.write_text(str(exc))
                    lines = str(exc).strip().splitlines() or ["?"]
                    return False, f"build failed ({lines[0][:200]}); log: {failed}"
                _say(f"built in {time.perf_counter() - start:.0f} s: {out}")
        torch.ops.load_library(str(out))
    except (OSError, RuntimeError) as exc:
        return False, f"could not build or load the library: {exc}"
    return True, None


def _init(quiet: bool = False) -> dict:
    """Decides the backend once per process; never raises. ``quiet``: no line when nothing
    can be built (``prebuild`` said so once already)."""
    if _state:
        return _state
    with _lock:
        if _state:
            return _state
        choice = os.environ.get("RECIPEC_KERNELS", "auto").strip().lower() or "auto"
        state = {
            "loaded": False,
            "avx2": False,
            "reason": None,
            "default": "torch-fallback",
            "isa": {},
        }
        if choice in ("torch", "torch-fallback", "fallback"):
            state["reason"] = f"RECIPEC_KERNELS={choice} forces the pure-torch fallback"
        else:
            if choice not in ("auto", "portable-c", "portable", "avx2"):
                _say(f"ignoring unknown RECIPEC_KERNELS={choice!r} (auto, portable-c, torch)")
                choice = "auto"
            try:
                loaded, reason = _load_library()
                if loaded:
                    ops = torch.ops.recipec_kernels
                    state["linear"], state["sddmm"] = ops.linear.default, ops.sddmm.default
                    state["avx2"] = bool(ops.has_avx2(torch.empty(0)))
            except Exception as exc:  # noqa: BLE001 - a kernel build must never break recipec
                loaded, reason = False, f"unexpected error: {exc!r}"
                state["avx2"] = False
            state["loaded"], state["reason"] = loaded, reason
            if loaded:
                state["isa"] = {"portable-c": _ISA_ID["portable-c"]}
                if state["avx2"]:
                    state["isa"]["avx2"] = _ISA_ID["avx2"]
                use_avx2 = state["avx2"] and choice not in ("portable-c", "portable")
                state["default"] = "avx2" if use_avx2 else "portable-c"
                if choice in ("portable-c", "portable"):
                    state["reason"] = f"RECIPEC_KERNELS={choice} forces the portable C path"
                elif not state["avx2"]:
                    state["reason"] = "this CPU has no AVX2+FMA: portable C path"
            elif not quiet:
                _say(f"fast path unavailable ({reason}); using the pure-torch fallback")
        _state.update(state)
    return _state


def backend() -> str:
    """The path ``sparse_linear`` takes by default: "avx2", "portable-c" or "torch-fallback"."""
    return _init()["default"]


def prebuild() -> None:
    """Builds the library now if it is not built yet, for whatever uses it later (``recipec
    apply`` runs this in a background thread). Where it cannot be built, the one line saying
    why is printed by the first call only: a marker in ``$RECIPEC_CACHE`` keeps later runs
    quiet until a build works (the kernels' users still say why when they run)."""
    marker = _cache_dir() / "unavailable.txt"
    st = _init(quiet=marker.exists())
    forced = os.environ.get("RECIPEC_KERNELS", "").strip().lower() not in ("", "auto", "avx2")
    with contextlib.suppress(OSError):
        if st["loaded"]:
            marker.unlink(missing_ok=True)
        elif not forced:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{st['reason']}\n")


def unavailable_reason() -> str | None:
    """Why the AVX2 path is not the default here, or None when it is."""
    return _init()["reason"]


def available_backends() -> list[str]:
    """Backends this process can run (the compiled ones only where the library loaded)."""
    st = _init()
    got = ["torch-fallback"]
    if st["loaded"]:
        got.insert(0, "portable-c")
        if st["avx2"]:
            got.insert(0, "avx2")
    return got


@dataclass(eq=False, frozen=True)
class PackedLinear:
    """A pruned linear layer in the kernels' format (plain tensors, no compiled state).

    Entries per row (``row_ptr`` counts them): unstructured fp32, one nonzero each
    (``col`` = input feature; a row with an odd count ends with a zero on its last column);
    unstructured int8, a pair of nonzeros (``col[2e], col[2e+1]``, a row's odd last one
    paired with a zero); block4, four weights of features
    ``col[e] .. col[e] + 3``, zeros of a block included. ``col`` is int16 where
    ``in_features <= 32767``, else int32. Layers wider than ``PANEL_FEATURES`` are stored as
    one CSR per panel of input features: ``row_ptr`` is ``[panels * (out + 1)]``. int8: ``values`` are ``round(W / scale)`` with
    ``scale[o] = max|W[o]| / 127``.
    """

    out_features: int
    in_features: int
    structure: str
    dtype: str
    row_ptr: Tensor
    col: Tensor
    values: Tensor
    scale: Tensor | None
    bias: Tensor | None
    nnz: int
    _dense: dict = field(default_factory=dict, repr=False)  # caches: dense weight, op args

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def op_args(self) -> tuple:
        """The weight's arguments of the compiled op, built once."""
        if "args" not in self._dense:
            self._dense["args"] = (
                self.row_ptr,
                self.col,
                self.values,
                self.scale,
                self.bias,
                self.out_features,
                self.in_features,
                _STRUCTURE_ID[self.structure],
            )
        return self._dense["args"]

    @property
    def density(self) -> float:
        """Nonzero weights / all weights of the source layer."""
        return self.nnz / max(1, self.out_features * self.in_features)

    @property
    def stored(self) -> int:
        """Weights stored, padding zeros of blocks and pairs included."""
        return self.values.numel()

    def dense_weight(self) -> Tensor:
        """The weight the kernels use, dense [out, in]: fp32, or the int8 values (as float)."""
        if "w" not in self._dense:
            w = torch.zeros(self.out_features, _round_up(self.in_features, 4))
            rp = self.row_ptr.long().view(-1, self.out_features + 1)  # [panels, out + 1]
            rows = torch.repeat_interleave(
                torch.arange(self.out_features).repeat(rp.shape[0]),
                torch.diff(rp, dim=1).reshape(-1),
            )
            vals = self.values.float()
            if self.structure == "block4":
                cols = self.col.long()[:, None] + torch.arange(4)
                w.index_put_((rows[:, None].expand_as(cols), cols), vals.view(-1, 4))
            else:  # padding entries repeat a column with a zero: accumulate, not overwrite
                rows = rows.repeat_interleave(2) if self.dtype == "int8" else rows
                w.index_put_((rows, self.col.long()), vals, accumulate=True)
            self._dense["w"] = w[:, : self.in_features].contiguous()
        return self._dense["w"]


def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def pack_linear(
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    structure: str = "unstructured",
    dtype: str = "fp32",
    quantized: tuple[Tensor, Tensor] | None = None,
) -> PackedLinear:
    """Packs a pruned ``[out, in]`` weight (exact zeros are pruned) for ``sparse_linear``.

    Args:
        weight: dense weight with exact zeros; any float dtype, CPU.
        bias: optional ``[out]`` bias (kept in fp32).
        structure: "unstructured" (CSR) or "block4" (1x4 blocks of input features aligned to 4;
            a block with any nonzero is stored whole, so any weight packs).
        dtype: "fp32", or "int8" (symmetric per output channel; zeros stay exactly zero).
        quantized: int8 only: ``(q [out, in], scale [out])`` to use instead of quantizing
            ``weight`` (e.g. the weights a quantization-aware run trained); ``q`` must be 0
            wherever ``weight`` is.
    """
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    w = weight.detach().to("cpu", torch.float32).contiguous()
    out_f, in_f = w.shape
    nnz = int((w != 0).sum())
    scale = None
    if quantized is not None:
        if dtype != "int8":
            raise ValueError("quantized weights need dtype='int8'")
        q, scale = quantized
        if tuple(q.shape) != (out_f, in_f) or tuple(scale.shape) != (out_f,):
            raise ValueError(
                f"quantized weights {tuple(q.shape)}/{tuple(scale.shape)} do not fit the "
                f"layer's [{out_f}, {in_f}]"
            )
        values_of = q.to(torch.float32)
        if bool(((values_of != 0) & (w == 0)).any()):
            raise ValueError("quantized weights are nonzero where the weight is pruned")
        scale = scale.to(torch.float32)
    elif dtype == "int8":
        scale = w.abs().amax(dim=1) / 127.0 if in_f else torch.zeros(out_f)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        wq = torch.round(w / safe[:, None]).clamp_(-127, 127)
        wq[w == 0] = 0
        values_of = wq
    else:
        values_of = w
    idx_dtype = torch.int16 if in_f <= 32767 else torch.int32
    # Wide layers are cut into panels of input features, each stored as its own CSR: the
    # kernel runs all rows over one panel's slice of the packed tile before the next, so the
    # slice stays near L1 (at 3072 features the whole fp32 tile, 384 KiB, does not fit L2).
    panel = PANEL_FEATURES[dtype] if in_f > PANEL_FEATURES[dtype] else max(in_f, 1)
    npanels = max(1, -(-in_f // panel))
    if structure == "block4":
        key, col, values, counts = _block4_entries(w, values_of, panel, npanels)
    else:
        key, col, values, counts = _csr_entries(w, values_of, panel, npanels, dtype)
    ends = torch.cumsum(counts, 0).view(npanels, out_f)
    row_ptr = torch.zeros(npanels, out_f + 1, dtype=torch.int64)
    row_ptr[:, 1:] = ends
    if npanels > 1 and out_f > 0:
        row_ptr[1:, 0] = ends[:-1, -1]
    row_ptr = row_ptr.reshape(-1)
    if int(row_ptr[-1]) >= 2**31:
        raise ValueError("layer too large for int32 row pointers")
    return PackedLinear(
        out_features=out_f,
        in_features=in_f,
        structure=structure,
        dtype=dtype,
        row_ptr=row_ptr.to(torch.int32),
        col=col.to(idx_dtype).contiguous(),
        values=values.to(torch.int8 if dtype == "int8" else torch.float32).contiguous(),
        scale=scale.contiguous() if scale is not None else None,
        bias=None if bias is None else bias.detach().to("cpu", torch.float32).contiguous(),
        nnz=nnz,
    )


def _block4_entries(w: Tensor, values_of: Tensor, panel: int, npanels: int):
    """Block4 entries sorted by (panel, row): block start columns, values, counts per row."""
    out_f, in_f = w.shape
    in4 = _round_up(in_f, 4)
    padded = F.pad(values_of, (0, in4 - in_f))
    mask = F.pad(w != 0, (0, in4 - in_f)).view(out_f, in4 // 4, 4).any(dim=2)
    rows, blocks = mask.nonzero(as_tuple=True)
    cols = blocks * 4
    vals = padded.view(out_f, in4 // 4, 4)[rows, blocks]
    key = (cols // panel) * out_f + rows  # (panel, row); blocks never straddle panels
    order = torch.sort(key, stable=True).indices
    key, col, values = key[order], cols[order], vals[order].reshape(-1)
    counts = torch.bincount(key, minlength=npanels * out_f)
    return key, col, values, counts


def _csr_entries(w: Tensor, values_of: Tensor, panel: int, npanels: int, dtype: str):
    """Unstructured entries sorted by (panel, row), each row padded to an even count.

    Each (panel, row) is padded with a zero on its last column: int8 entries are pairs, and the
    fp32 kernel's 2-way unrolled loop then never runs its remainder loop (one mispredicted
    loop exit less per row and tile).
    """
    out_f = w.shape[0]
    mask = w != 0
    rows, cols = mask.nonzero(as_tuple=True)
    vals = values_of[rows, cols]
    key = (cols // panel) * out_f + rows
    counts = torch.bincount(key, minlength=npanels * out_f)
    order = torch.sort(key, stable=True).indices
    key, cols, vals = key[order], cols[order], vals[order]
    odd = (counts % 2 == 1).nonzero(as_tuple=True)[0]
    last = torch.cumsum(counts, 0)[odd] - 1
    key = torch.cat([key, odd])
    cols = torch.cat([cols, cols[last]])
    vals = torch.cat([vals, torch.zeros(len(odd))])
    order = torch.sort(key, stable=True).indices
    col, values = cols[order], vals[order]
    counts = counts + counts % 2
    if dtype == "int8":
        counts = counts // 2
    return key, col, values, counts


def quantize_tokens(x: Tensor) -> tuple[Tensor, Tensor]:
    """The kernels' per-token int8 quantization of ``x [T, in]``: (int values as float, scales).

    ``scale_t = max|x_t| / 127``; ``q = clamp(round_half_even(x * (127 / max|x_t|)), +-127)``,
    every step in float32 as in the C++ packing step.
    """
    amax = x.abs().amax(dim=1) if x.shape[1] else torch.zeros(x.shape[0])
    # A true division: ``127.0 / amax`` would run as ``amax.reciprocal() * 127`` (rounds twice).
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(x * inv[:, None]).clamp_(-127, 127)
    return q, amax / 127.0


def _fallback(x2: Tensor, p: PackedLinear, acc_only: bool) -> Tensor:
    if p.dtype == "fp32":
        return F.linear(x2, p.dense_weight(), p.bias)
    q, sx = quantize_tokens(x2)
    # float64 holds every partial sum exactly (|sum| <= in * 127^2 << 2^53): integer accumulation.
    acc = (q.double() @ p.dense_weight().double().T).to(torch.int32)
    if acc_only:
        return acc
    y = acc.float() * (sx[:, None] * p.scale[None, :])
    return y + p.bias if p.bias is not None else y


def sparse_linear(
    x: Tensor,
    packed: PackedLinear,
    *,
    backend: str | None = None,
    tile: int | None = None,
    threads: int = 0,
    int8_accumulators: bool = False,
) -> Tensor:
    """``x[..., in] @ W^T + b`` with the packed weight; float32 in, float32 out.

    Args:
        x: float32 activations ``[..., in]`` (any leading dims; made contiguous).
        packed: from ``pack_linear``.
        backend: force "avx2", "portable-c" or "torch-fallback" (tests, benchmarks); default
            ``backend()``. Raises if the requested one is unavailable.
        tile: tokens per packed tile (8..64); default ``default_tile``.
        threads: at most this many of torch's threads (0: ``torch.get_num_threads()``).
        int8_accumulators: int8 only: return the raw int32 accumulators instead (tests).
    """
    if x.dtype != torch.float32:
        raise TypeError(f"sparse_linear takes float32 activations, got {x.dtype}")
    in_f, out_f = packed.in_features, packed.out_features
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features, the layer {in_f}")
    if int8_accumulators and packed.dtype != "int8":
        raise ValueError("int8_accumulators needs an int8 layer")
    if x.requires_grad and torch.is_grad_enabled():
        # The compiled op has no backward: a silent cut in the graph would be worse.
        raise RuntimeError("sparse_linear is inference-only; train with sparse_linear_train")
    st = _state or _init()
    which = backend or st["default"]
    if which == "torch-fallback":
        y = _fallback(x.reshape(math.prod(x.shape[:-1]), in_f), packed, int8_accumulators)
        return y.reshape(*x.shape[:-1], out_f)
    # The per-call Python work is kept to a minimum (the op takes any leading dims, so no
    # reshapes): at 128 tokens a MiniLM layer at 90% takes ~100 us, and each us here shows.
    isa = st["isa"].get(which)
    if isa is None:
        raise RuntimeError(f"backend {which!r} unavailable here: {unavailable_reason()}")
    if not x.is_contiguous():
        x = x.contiguous()
    if int8_accumulators:
        y = torch.empty(*x.shape[:-1], out_f, dtype=torch.int32)
        mode = _MODE_ID["int8-acc"]
    else:
        y = torch.empty(*x.shape[:-1], out_f)
        mode = _MODE_ID[packed.dtype]
    tile = tile or default_tile(packed.dtype, in_f)
    st["linear"](x, *packed.op_args(), mode, isa, tile, threads, y)
    return y


class SparseLinearModule(nn.Module):
    """Inference drop-in for a pruned ``nn.Linear``: same call, the weight packed once.

    Args:
        linear: the pruned layer (its zeros are pruned; later changes to it are not seen).
        structure: "unstructured" or "block4".
        dtype: "fp32" or "int8".
    """

    def __init__(self, linear: nn.Linear, structure: str = "unstructured", dtype: str = "fp32"):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.packed = pack_linear(linear.weight, linear.bias, structure=structure, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return sparse_linear(x, self.packed)

    def extra_repr(self) -> str:
        p = self.packed
        return (
            f"in_features={p.in_features}, out_features={p.out_features}, "
            f"structure={p.structure}, dtype={p.dtype}, density={p.density:.3f}"
        )


# ---------------------------------------------------------------------------------------------
# Training: forward and backward on a fixed mask (replaces the sparseprop package's kernels).
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class TrainLayout:
    """A fixed mask as CSR by output row plus its transpose (CSR by input feature), built once.

    ``flat`` indexes the kept weights in ``weight.view(-1)`` (CSR order); ``t_perm`` orders
    those values for the transposed CSR, which ``dX = dY @ W`` walks.
    """

    out_features: int
    in_features: int
    row_ptr: Tensor
    col: Tensor
    flat: Tensor
    t_row_ptr: Tensor
    t_col: Tensor
    t_perm: Tensor
    mask: Tensor

    @property
    def nnz(self) -> int:
        return self.flat.numel()


def make_train_layout(mask: Tensor) -> TrainLayout:
    """The layout of a boolean ``[out, in]`` mask (True = kept) for ``sparse_linear_train``."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D [out, in], got shape {tuple(mask.shape)}")
    m = mask.detach().to("cpu").bool().contiguous()
    out_f, in_f = m.shape
    if max(out_f, in_f) > 2**31 - 1 or int(m.sum()) >= 2**31:
        raise ValueError("layer too large for int32 indices")
    rows, cols = m.nonzero(as_tuple=True)
    flat = rows * in_f + cols
    t_perm = torch.sort(cols * out_f + rows).indices  # entries in (col, row) order

    def ptr(counts: Tensor) -> Tensor:
        p = torch.zeros(counts.numel() + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=p[1:])
        return p.to(torch.int32)

    return TrainLayout(
        out_features=out_f,
        in_features=in_f,
        row_ptr=ptr(m.sum(dim=1)),
        col=cols.to(torch.int16 if in_f <= 32767 else torch.int32),
        flat=flat,
        t_row_ptr=ptr(m.sum(dim=0)),
        t_col=rows[t_perm].to(torch.int16 if out_f <= 32767 else torch.int32),
        t_perm=t_perm,
        mask=m,
    )


class _SparseLinearTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias, layout: TrainLayout, isa: int):
        values = weight.detach().reshape(-1)[layout.flat].contiguous()
        b = None if bias is None else bias.detach().contiguous()
        y = torch.empty(x2.shape[0], layout.out_features)
        _state["linear"](
            x2, layout.row_ptr, layout.col, values, None, b, layout.out_features,
            layout.in_features, 0, 0, isa, DEFAULT_TILE["fp32"], 0, y,
        )  # fmt: skip
        ctx.save_for_backward(x2, values)
        ctx.layout, ctx.isa, ctx.has_bias = layout, isa, bias is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        x2, values = ctx.saved_tensors
        lay, isa = ctx.layout, ctx.isa
        gy = gy.contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            # dX = dY @ W: the forward kernel with W^T's CSR (rows = input features).
            gx = torch.empty(gy.shape[0], lay.in_features)
            _state["linear"](
                gy, lay.t_row_ptr, lay.t_col, values[lay.t_perm].contiguous(), None, None,
                lay.in_features, lay.out_features, 0, 0, isa, DEFAULT_TILE["fp32"], 0, gx,
            )  # fmt: skip
        if ctx.needs_input_grad[1]:
            g = torch.empty(lay.nnz)
            _state["sddmm"](x2, gy, lay.row_ptr, lay.col, isa, 0, g)
            gw = torch.zeros(lay.out_features * lay.in_features, dtype=g.dtype)
            gw.index_copy_(0, lay.flat, g)
            gw = gw.view(lay.out_features, lay.in_features)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum(dim=0)
        return gx, gw, gb, None, None


def sparse_linear_train(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    layout: TrainLayout,
    *,
    backend: str | None = None,
) -> Tensor:
    """Autograd-ready ``x @ (W * mask)^T + b`` on the layout's fixed mask.

    Forward and ``dX = dY @ W`` run the sparse kernels (the transposed CSR for dX); ``dW`` is
    computed only at the kept positions (a sampled dense-dense product) and returned
    dense-shaped with exact zeros elsewhere, so the pruned weights never move. Weights outside
    the mask are ignored. Same leading-dims and float32 rules as ``sparse_linear``.
    """
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        raise TypeError("sparse_linear_train takes float32 activations and weights")
    if tuple(weight.shape) != (layout.out_features, layout.in_features):
        raise ValueError(f"weight {tuple(weight.shape)} does not match the layout's mask")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, layout.in_features).contiguous()
    which = backend or _init()["default"]
    if which == "torch-fallback":
        y = F.linear(x2, weight * layout.mask, bias)
    else:
        isa = _init()["isa"].get(which)
        if isa is None:
            raise RuntimeError(f"backend {which!r} unavailable here: {unavailable_reason()}")
        y = _SparseLinearTrain.apply(x2, weight, bias, layout, isa)
    return y.reshape(*lead, layout.out_features)

"""recipec.kernels.native against float64 / exact-integer references, on every backend here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from recipec.kernels import native

BACKENDS = ["avx2", "portable-c", "torch-fallback"]
TOKENS = [1, 3, 17, 128, 130]


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param not in native.available_backends():
        pytest.skip(f"{request.param} unavailable here: {native.unavailable_reason()}")
    return request.param


def make_weight(out_f, in_f, density, seed, *, block4=False, dense_rows=(), empty_rows=()):
    """A pruned weight: random mask (of 1x4 blocks when block4), some rows forced dense/empty."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    if block4:
        nb = (in_f + 3) // 4
        keep = torch.rand(out_f, nb, generator=g) < density
        mask = keep.repeat_interleave(4, dim=1)[:, :in_f]
    else:
        mask = torch.rand(out_f, in_f, generator=g) < density
    w = w * mask
    for r in dense_rows:
        w[r] = torch.randn(in_f, generator=g)
    for r in empty_rows:
        w[r] = 0
    return w


# (out, in, density, dense rows, empty rows): odd shapes, in not a multiple of 4 or 8, empty
# and dense rows, all-zero (100% sparse) and dense (0% sparse) layers.
LAYERS = [
    (5, 7, 0.5, (1,), (3,)),
    (13, 33, 0.3, (0,), (5, 6)),
    (17, 30, 0.1, (), (0, 16)),
    (24, 64, 0.2, (23,), ()),
    (9, 12, 0.0, (), ()),
    (11, 21, 1.0, (), ()),
    (40, 97, 0.15, (2,), (39,)),
    # Wider than a panel (384 fp32 features): several CSR panels, partial sums between them.
    (20, 1700, 0.1, (3,), (5,)),
]


def fp32_tolerance(x, w):
    """Rounding bound for float32 accumulation: a few ulps of sum |x_k w_k| per output."""
    return 1e-5 * (x.double().abs() @ w.double().abs().T) + 1e-6


def quantize_reference(x):
    """Per-token symmetric int8 written out independently of the library (float32 steps)."""
    amax = x.abs().amax(dim=1)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    q = torch.round(x * inv[:, None]).clamp(-127, 127).to(torch.int64)
    return q, amax / 127.0


def int8_weight_reference(w):
    scale = w.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(w / safe[:, None]).clamp(-127, 127).to(torch.int64), scale


@pytest.mark.parametrize("structure", ["unstructured", "block4"])
@pytest.mark.parametrize("layer", LAYERS, ids=lambda v: f"{v[0]}x{v[1]}d{v[2]}")
def test_fp32_against_float64(backend, structure, layer):
    out_f, in_f, density, dense_rows, empty_rows = layer
    w = make_weight(out_f, in_f, density, 1, block4=structure == "block4", dense_rows=dense_rows,
                    empty_rows=empty_rows)  # fmt: skip
    for with_bias in (True, False):
        b = torch.randn(out_f) if with_bias else None
        p = native.pack_linear(w, b, structure=structure, dtype="fp32")
        for t in TOKENS:
            x = torch.randn(t, in_f)
            y = native.sparse_linear(x, p, backend=backend)
            ref = x.double() @ w.double().T + (b.double() if with_bias else 0)
            assert y.dtype == torch.float32 and y.shape == (t, out_f)
            err = (y.double() - ref).abs()
            assert bool((err <= fp32_tolerance(x, w)).all()), (t, with_bias, err.max())


@pytest.mark.parametrize("structure", ["unstructured", "block4"])
@pytest.mark.parametrize("layer", LAYERS, ids=lambda v: f"{v[0]}x{v[1]}d{v[2]}")
def test_int8_accumulators_exact(backend, structure, layer):
    out_f, in_f, density, dense_rows, empty_rows = layer
    w = make_weight(out_f, in_f, density, 2, block4=structure == "block4", dense_rows=dense_rows,
                    empty_rows=empty_rows)  # fmt: skip
    b = torch.randn(out_f)
    p = native.pack_linear(w, b, structure=structure, dtype="int8")
    wq, sw = int8_weight_reference(w)
    assert torch.equal(p.dense_weight().to(torch.int64), wq)
    assert torch.equal(p.scale, sw)
    for t in TOKENS:
        x = torch.randn(t, in_f) * torch.rand(t, 1) * 4  # tokens of different ranges
        if t > 2:
            x[1] = 0  # an all-zero token: scale 0, output = bias
        q, sx = quantize_reference(x)
        acc_ref = q @ wq.T  # exact int64
        acc = native.sparse_linear(x, p, backend=backend, int8_accumulators=True)
        assert acc.dtype == torch.int32
        assert torch.equal(acc.to(torch.int64), acc_ref), t
        y = native.sparse_linear(x, p, backend=backend)
        # The output is acc * (s_x * s_w) + b in float32, rounded like this:
        expect = acc_ref.float() * (sx[:, None] * sw[None, :]) + b
        assert torch.allclose(y, expect, rtol=1e-6, atol=1e-6), t
        # Against the float result: each kept product x_k w_k is off by at most
        # s_x s_w (|q_x|/2 + |q_w|/2 + 1/4) from rounding both to the int8 grid.
        ref = x.double() @ w.double().T + b.double()
        nz = (w != 0).double()
        bound = (sx.double()[:, None] * sw.double()[None, :]) * (
            0.5 * (q.abs().double() @ nz.T) + nz.sum(1)[None, :] * (0.5 * 127 + 0.25)
        )
        assert bool(((y.double() - ref).abs() <= bound + 1e-4).all()), t


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
@pytest.mark.parametrize("structure", ["unstructured", "block4"])
def test_threads_equal_single_thread(backend, structure, dtype):
    w = make_weight(200, 96, 0.1, 3, block4=structure == "block4", dense_rows=(7,))
    p = native.pack_linear(w, torch.randn(200), structure=structure, dtype=dtype)
    for t in (1, 17, 130, 300):
        x = torch.randn(t, 96)
        one = native.sparse_linear(x, p, backend=backend, threads=1)
        many = native.sparse_linear(x, p, backend=backend, threads=2)
        assert torch.equal(one, many), t


@pytest.mark.parametrize("tile", [8, 16, 24, 40, 64])
def test_tile_sizes(backend, tile):
    w = make_weight(33, 50, 0.2, 4)
    x = torch.randn(130, 50)
    for dtype in ("fp32", "int8"):
        p = native.pack_linear(w, None, structure="unstructured", dtype=dtype)
        ref = native.sparse_linear(x, p, backend="torch-fallback")
        y = native.sparse_linear(x, p, backend=backend, tile=tile)
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5), dtype


def test_leading_dims_and_module(backend):
    lin = nn.Linear(30, 12)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) < 0.3)
    x = torch.randn(2, 5, 30)
    for structure in ("unstructured", "block4"):
        p = native.pack_linear(lin.weight, lin.bias, structure=structure)
        y = native.sparse_linear(x, p, backend=backend)
        assert y.shape == (2, 5, 12)
        assert torch.allclose(y, lin(x).detach(), atol=1e-5)
    if backend == native.backend():
        mod = native.SparseLinearModule(lin, "block4", "fp32")
        with torch.inference_mode():
            assert torch.allclose(mod(x), lin(x), atol=1e-5)
        assert "block4" in repr(mod)


def test_packing_formats():
    w = torch.zeros(3, 10)
    w[0, 1], w[0, 6], w[0, 9] = 1.0, -2.0, 3.0
    w[2, 4] = 0.5
    assert native.pack_linear(torch.ones(2, 1700), None).row_ptr.numel() == 5 * 3  # 5 panels
    p = native.pack_linear(w, None, structure="unstructured")
    # Odd rows end with a zero on their last column (even counts for the 2-way unrolled loop).
    assert (p.nnz, p.stored, p.col.dtype) == (4, 6, torch.int16)
    assert p.row_ptr.tolist() == [0, 4, 4, 6] and p.col.tolist() == [1, 6, 9, 9, 4, 4]
    assert p.values.tolist() == [1.0, -2.0, 3.0, 0.0, 0.5, 0.0]
    b4 = native.pack_linear(w, None, structure="block4")
    # Blocks of features 0-3, 4-7, 8-11 (past in=10: zeros); zeros inside a block are stored.
    assert b4.row_ptr.tolist() == [0, 3, 3, 4] and b4.col.tolist() == [0, 4, 8, 4]
    assert b4.values.tolist()[:4] == [0.0, 1.0, 0.0, 0.0] and b4.stored == 16
    q = native.pack_linear(w, None, structure="unstructured", dtype="int8")
    # Pairs: row 0 (3 nonzeros) gets a zero partner, row 2 too.
    assert q.row_ptr.tolist() == [0, 2, 2, 3] and q.values.dtype == torch.int8
    assert q.values.tolist() == [42, -85, 127, 0, 127, 0]
    assert torch.equal(q.dense_weight() != 0, w != 0)
    for packed in (p, b4):
        assert torch.equal(packed.dense_weight(), w)
    wide = torch.zeros(2, 40000)
    wide[1, 39999] = 1.0
    pw = native.pack_linear(wide, None)
    assert pw.col.dtype == torch.int32
    for be in native.available_backends():
        y = native.sparse_linear(torch.ones(3, 40000), pw, backend=be)
        assert y[:, 1].tolist() == [1.0] * 3 and y[:, 0].tolist() == [0.0] * 3


def test_bad_inputs():
    p = native.pack_linear(torch.eye(4), None)
    with pytest.raises(TypeError):
        native.sparse_linear(torch.ones(2, 4, dtype=torch.float64), p)
    with pytest.raises(ValueError):
        native.sparse_linear(torch.ones(2, 5), p)
    with pytest.raises(ValueError):
        native.pack_linear(torch.eye(4), None, structure="2:4")
    assert native.sparse_linear(torch.ones(0, 4), p).shape == (0, 4)
    with pytest.raises(RuntimeError, match="inference-only"):
        native.sparse_linear(torch.ones(2, 4, requires_grad=True), p)
    with torch.no_grad():
        assert native.sparse_linear(torch.ones(2, 4, requires_grad=True), p).shape == (2, 4)


def test_degenerate_layers(backend):
    b = torch.arange(3.0)
    for dtype in ("fp32", "int8"):
        for structure in ("unstructured", "block4"):
            no_inputs = native.pack_linear(torch.zeros(3, 0), b, structure=structure, dtype=dtype)
            y = native.sparse_linear(torch.ones(2, 0), no_inputs, backend=backend)
            assert torch.equal(y, b.expand(2, 3)), (dtype, structure)
            no_outputs = native.pack_linear(
                torch.zeros(0, 5), None, structure=structure, dtype=dtype
            )
            assert native.sparse_linear(torch.ones(2, 5), no_outputs, backend=backend).shape == (
                2,
                0,
            )


def run_python(code, **env):
    full = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300
    )


PROBE = (
    "from recipec.kernels import native as n; import torch\n"
    "p = n.pack_linear(torch.eye(3), None, dtype='int8')\n"
    "y = n.sparse_linear(torch.ones(2, 3), p)\n"
    "print(n.backend(), '|', n.unavailable_reason(), '|', y.tolist())"
)


def test_env_forces_fallbacks():
    out = run_python(PROBE, RECIPEC_KERNELS="torch")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("torch-fallback |") and "RECIPEC_KERNELS" in out.stdout
    assert "[[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]" in out.stdout
    if "portable-c" in native.available_backends():
        out = run_python(PROBE, RECIPEC_KERNELS="portable-c")
        assert out.returncode == 0 and out.stdout.startswith("portable-c |"), out.stderr


@pytest.mark.parametrize("how", ["no-compiler", "broken-compiler"])
def test_fallback_when_nothing_builds(tmp_path, how):
    env = {"RECIPEC_CACHE": str(tmp_path), "RECIPEC_KERNELS": "auto"}
    if how == "no-compiler":
        env.update(PATH=str(tmp_path), CXX="")
    else:
        env["CXX"] = "false"
    out = run_python(PROBE, **env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("torch-fallback |"), out.stdout
    lines = [ln for ln in out.stderr.splitlines() if "fast path unavailable" in ln]
    assert len(lines) == 1, out.stderr
    assert ("no C++ compiler" in lines[0]) == (how == "no-compiler")


PREBUILD = "from recipec.kernels import native as n; n.prebuild(); print(n.backend())"


def test_prebuild_says_once_that_nothing_builds_until_a_build_works(tmp_path):
    """``recipec apply`` prebuilds in the background on every run: where nothing builds, the
    first run says why and later ones stay quiet; once a build works the marker goes."""
    env = {"RECIPEC_CACHE": str(tmp_path), "RECIPEC_KERNELS": "auto"}
    no_compiler = {**env, "PATH": str(tmp_path), "CXX": ""}
    said = []
    for _ in range(2):
        out = run_python(PREBUILD, **no_compiler)
        assert out.returncode == 0 and out.stdout.strip() == "torch-fallback", out.stderr
        said.append([ln for ln in out.stderr.splitlines() if "fast path unavailable" in ln])
    assert len(said[0]) == 1 and "no C++ compiler" in said[0][0] and said[1] == [], said
    marker = tmp_path / "kernels" / "unavailable.txt"
    assert "no C++ compiler" in marker.read_text()
    out = run_python(PROBE, **no_compiler)  # a user of the kernels still says why
    assert out.stderr.count("fast path unavailable (no C++ compiler") == 1, out.stderr
    if "portable-c" not in native.available_backends():
        return
    for built in native._cache_dir().iterdir():  # this machine's build, not a second one
        if built.is_dir():
            (tmp_path / "kernels" / built.name).symlink_to(built)
    out = run_python(PREBUILD, **env)
    assert out.returncode == 0 and out.stdout.strip() == native.backend(), out.stderr
    assert not marker.exists()


@pytest.mark.parametrize("layer", LAYERS, ids=lambda v: f"{v[0]}x{v[1]}d{v[2]}")
def test_training_forward_backward(backend, layer):
    out_f, in_f, density, dense_rows, empty_rows = layer
    w = torch.randn(out_f, in_f)
    mask = make_weight(out_f, in_f, density, 5, dense_rows=dense_rows, empty_rows=empty_rows) != 0
    lay = native.make_train_layout(mask)
    for t in (1, 17, 130):
        x = torch.randn(2, t, in_f, requires_grad=True)
        wp = w.clone().requires_grad_()
        b = torch.randn(out_f, requires_grad=True)
        y = native.sparse_linear_train(x, wp, b, lay, backend=backend)
        gy = torch.randn_like(y)
        (y * gy).sum().backward()
        wm = (w * mask).double()
        x64, gy64 = x.detach().double().reshape(-1, in_f), gy.double().reshape(-1, out_f)
        ref_y = x64 @ wm.T + b.detach().double()
        ref_gx = gy64 @ wm
        ref_gw = (gy64.T @ x64) * mask
        assert y.shape == (2, t, out_f)
        assert torch.allclose(y.detach().double().reshape(-1, out_f), ref_y, atol=1e-4)
        assert torch.allclose(x.grad.double().reshape(-1, in_f), ref_gx, atol=1e-4)
        assert torch.allclose(wp.grad.double(), ref_gw, atol=1e-4)
        assert bool((wp.grad[~mask] == 0).all())  # pruned weights get exactly zero gradient
        assert torch.allclose(b.grad.double(), gy64.sum(0), atol=1e-4)


@pytest.mark.parametrize("structure", ["unstructured", "block4"])
def test_small_panels(backend, structure, monkeypatch):
    """Many panels (16 features each) for both dtypes: partial sums carried across panels."""
    monkeypatch.setitem(native.PANEL_FEATURES, "fp32", 16)
    monkeypatch.setitem(native.PANEL_FEATURES, "int8", 16)
    w = make_weight(19, 70, 0.3, 6, block4=structure == "block4", dense_rows=(2,), empty_rows=(4,))
    b = torch.randn(19)
    fp = native.pack_linear(w, b, structure=structure, dtype="fp32")
    q8 = native.pack_linear(w, b, structure=structure, dtype="int8")
    assert fp.row_ptr.numel() == 5 * 20 and q8.row_ptr.numel() == 5 * 20
    wq, _ = int8_weight_reference(w)
    for t in (1, 17, 130):
        x = torch.randn(t, 70)
        y = native.sparse_linear(x, fp, backend=backend)
        err = (y.double() - (x.double() @ w.double().T + b.double())).abs()
        assert bool((err <= fp32_tolerance(x, w)).all()), t
        acc = native.sparse_linear(x, q8, backend=backend, int8_accumulators=True)
        assert torch.equal(acc.to(torch.int64), quantize_reference(x)[0] @ wq.T), t

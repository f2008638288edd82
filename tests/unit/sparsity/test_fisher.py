"""Tests for recipec.sparsity.fisher against a dense float64 reference inverse."""

from __future__ import annotations

import math

import pytest
import torch

from recipec.sparsity.fisher import BlockFisherInverse, MFACInverse

CLASSES = [BlockFisherInverse, MFACInverse]

# (numel, block_size, num_grads, damp); includes numel % B != 0, B > numel and a whole-tensor block
CASES = [
    (96, 32, 16, 1e-2),
    (103, 16, 24, 1e-3),
    (250, 50, 64, 1e-2),
    (512, 64, 32, 1e-3),
    (37, 50, 16, 1e-2),
    (100, None, 40, 1e-4),
]


def _grads(numel, m, seed, scale=None):
    g = torch.Generator().manual_seed(seed)
    # Scale the gradients so the per-block Fisher has eigenvalues of order damp..100*damp:
    # well conditioned in float32 (the reference is float64).
    return torch.randn(m, numel, generator=g, dtype=torch.float64) * (scale or 0.1)


def _dense_blocks(G, block_size, damp):
    """Exact inverse blocks (damp*I + G_b^T G_b / m)^-1 in float64, padded like the class."""
    m, numel = G.shape
    b = numel if block_size is None else block_size
    nb = math.ceil(numel / b)
    out = torch.zeros(nb, b, b, dtype=torch.float64)
    for i in range(nb):
        Gb = torch.zeros(m, b, dtype=torch.float64)
        chunk = G[:, i * b : (i + 1) * b]
        Gb[:, : chunk.shape[1]] = chunk
        F = damp * torch.eye(b, dtype=torch.float64) + Gb.T @ Gb / m
        out[i] = torch.linalg.inv(F)
    return out


def _dense_full(blocks, numel):
    return torch.block_diag(*blocks)[:numel, :numel]


def _rel(a, b):
    a = a.double()
    b = b.double()
    return float((a - b).norm() / b.norm())


def _build(cls, numel, b, m, damp, G, mode):
    f = cls(numel, b, damp, m)
    Gf = G.float()
    if mode == "one":
        for g in Gf:
            f.update(g)
    elif mode == "many":
        f.update_many(Gf)
    else:  # mixed batch sizes
        k = m // 3
        f.update_many(Gf[:k])
        f.update(Gf[k])
        f.update_many(Gf[k + 1 :])
    return f


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["one", "many", "mixed"])
def test_inverse_matches_dense_reference(cls, case, mode):
    numel, b, m, damp = case
    G = _grads(numel, m, seed=numel + m)
    ref_blocks = _dense_blocks(G, b, damp)
    ref = _dense_full(ref_blocks, numel)
    f = _build(cls, numel, b, m, damp, G, mode)
    assert f.count == m
    if cls is BlockFisherInverse:
        assert f.blocks.shape == ref_blocks.shape
        assert f.blocks.dtype == torch.float32
        assert _rel(f.blocks, ref_blocks) < 1e-5
    d = f.diag()
    assert d.shape == (numel,) and d.dtype == torch.float32
    assert _rel(d, ref.diagonal()) < 1e-5
    x = torch.randn(numel, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert _rel(f.matvec(x.float()), ref @ x) < 1e-5
    X = torch.randn(3, numel, dtype=torch.float64)
    assert _rel(f.matvec(X.float()), X @ ref.T) < 1e-5
    bb = numel if b is None else b
    for group in (2, 4):
        if bb % group or numel % group:
            with pytest.raises(ValueError, match="straddle"):
                f.diag_blocks(group)
            continue
        sub = f.diag_blocks(group)
        want = torch.stack([ref[q : q + group, q : q + group] for q in range(0, numel, group)])
        assert sub.shape == want.shape
        assert _rel(sub, want) < 1e-5


@pytest.mark.parametrize("cls", CLASSES)
def test_submatrix(cls):
    numel, b, m, damp = 96, 32, 16, 1e-2
    G = _grads(numel, m, seed=3)
    f = _build(cls, numel, b, m, damp, G, "one")
    ref_blocks = _dense_blocks(G, b, damp)
    idx = torch.tensor([1, 5, 6, 30])
    assert _rel(f.submatrix(2, idx), ref_blocks[2][idx][:, idx]) < 1e-5


def test_float64_mode_is_exact():
    numel, b, m, damp = 120, 40, 30, 1e-5  # badly conditioned: fine in float64
    G = _grads(numel, m, seed=11, scale=1.0)
    ref_blocks = _dense_blocks(G, b, damp)
    for cls in CLASSES:
        f = cls(numel, b, damp, m, dtype=torch.float64)
        f.update_many(G[:7])
        for g in G[7:]:
            f.update(g)
        assert _rel(f.diag(), _dense_full(ref_blocks, numel).diagonal()) < 1e-9
    f = BlockFisherInverse(numel, b, damp, m, dtype=torch.float64)
    f.update_many(G)
    assert _rel(f.blocks, ref_blocks) < 1e-9


@pytest.mark.parametrize("cls", CLASSES)
def test_padding_does_not_leak(cls):
    numel, b, m, damp = 45, 16, 8, 1e-2  # last block has 13 real + 3 padded entries
    G = _grads(numel, m, seed=5, scale=1.0)
    f = _build(cls, numel, b, m, damp, G, "many")
    if cls is BlockFisherInverse:
        last = f.blocks[-1]
        pad = last[13:, 13:]
        assert torch.equal(pad, torch.eye(3) / damp)
        assert torch.equal(last[13:, :13], torch.zeros(3, 13))
        assert torch.equal(last[:13, 13:], torch.zeros(13, 3))
    # removing the padded tail from the reference gives the same real entries
    ref = _dense_full(_dense_blocks(G, b, damp), numel)
    assert _rel(f.diag(), ref.diagonal()) < 1e-5


@pytest.mark.parametrize("cls", CLASSES)
def test_gradient_dtypes_accumulate_in_float32(cls):
    numel, b, m, damp = 64, 16, 8, 1e-2
    G = _grads(numel, m, seed=9)
    f64 = cls(numel, b, damp, m)
    f16 = cls(numel, b, damp, m)
    for g in G:
        f64.update(g)  # float64 input
        f16.update(g.to(torch.bfloat16).reshape(8, 8))  # any shape with numel entries
    assert f64.diag().dtype == torch.float32
    assert f16.diag().dtype == torch.float32
    ref = _dense_full(_dense_blocks(G, b, damp), numel)
    assert _rel(f64.diag(), ref.diagonal()) < 1e-5
    # bf16 rounding of the inputs only (about 3 significant digits)
    assert _rel(f16.diag(), ref.diagonal()) < 1e-2


@pytest.mark.parametrize("cls", CLASSES)
def test_errors(cls):
    f = cls(10, 5, 1e-2, 2)
    f.update(torch.ones(10))
    f.update(torch.ones(10))
    with pytest.raises(ValueError, match="num_grads"):
        f.update(torch.ones(10))
    with pytest.raises(ValueError):
        f.matvec(torch.ones(11))
    with pytest.raises(ValueError):
        cls(10, 5, 0.0, 2)
    with pytest.raises(ValueError):
        cls(0, 5, 1e-2, 2)


def test_estimate_bytes_matches_storage():
    for numel, b in [(1000, 50), (1003, 32), (64, None)]:
        f = BlockFisherInverse(numel, b, 1e-2, 4)
        assert BlockFisherInverse.estimate_bytes(numel, b) == f.nbytes
        g = MFACInverse(numel, b, 1e-2, 4)
        assert MFACInverse.estimate_bytes(numel, b, 4) == g.nbytes
    # BERT-base encoder linears at B=50 in fp32: ~17 GB (design notes)
    n = 85_000_000
    assert 16.5e9 < BlockFisherInverse.estimate_bytes(n, 50) < 17.5e9
    assert BlockFisherInverse.estimate_bytes(n, 50, dtype_bytes=2) * 2 == (
        BlockFisherInverse.estimate_bytes(n, 50)
    )


def test_rank_k_falls_back_to_rank1_when_cholesky_fails(monkeypatch):
    numel, b, m, damp = 96, 32, 16, 1e-2
    G = _grads(numel, m, seed=21)
    ref = _dense_blocks(G, b, damp)
    real = torch.linalg.cholesky_ex

    def failing(a, *args, **kwargs):
        chol, info = real(a, *args, **kwargs)
        return chol, torch.ones_like(info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    f = BlockFisherInverse(numel, b, damp, m)
    f.update_many(G.float())
    assert _rel(f.blocks, ref) < 1e-5

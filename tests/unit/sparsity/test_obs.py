"""Tests for recipec.sparsity.obs: oBERT saliencies, OBS updates and the pruning step."""

from __future__ import annotations

import math

import pytest
import torch

from recipec.sparsity.fisher import BlockFisherInverse, MFACInverse
from recipec.sparsity.masks import compute_masks, mask_sparsity
from recipec.sparsity.obs import (
    estimate_fisher_bytes,
    obert_prune_step,
    obs_update,
    saliency_blocks,
    saliency_unstructured,
)

CLASSES = [BlockFisherInverse, MFACInverse]


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _problem(numel, b, m, damp, seed, scale=0.1):
    """Gradients, weights and the exact block-diagonal Fisher H (float64) and its inverse."""
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(m, numel, generator=g, dtype=torch.float64) * scale
    w = torch.randn(numel, generator=g, dtype=torch.float64)
    blocks = []
    for i in range(math.ceil(numel / b)):
        Gb = G[:, i * b : (i + 1) * b]
        blocks.append(damp * torch.eye(Gb.shape[1], dtype=torch.float64) + Gb.T @ Gb / m)
    H = torch.block_diag(*blocks)
    return G, w, H, torch.linalg.inv(H)


def _finv(cls, G, b, damp, dtype=torch.float32):
    m, numel = G.shape
    f = cls(numel, b, damp, m, dtype=dtype)
    f.update_many(G.to(dtype))
    return f


def _ref_saliency(w, Hinv, group):
    out = []
    for q in range(0, w.numel(), group):
        Q = slice(q, q + group)
        out.append(0.5 * w[Q] @ torch.linalg.solve(Hinv[Q, Q], w[Q]))
    return torch.stack(out)


def _ref_update(w, prune, Hinv, group):
    """Brute force: w - sum_{Q pruned} Hinv[:, Q] (Hinv[Q, Q])^-1 w_Q, then zero the pruned."""
    dw = torch.zeros_like(w)
    for q in range(0, w.numel(), group):
        Q = slice(q, q + group)
        if prune[Q].all():
            dw -= Hinv[:, Q] @ torch.linalg.solve(Hinv[Q, Q], w[Q])
    out = w + dw
    out[prune] = 0.0
    return out


# ---------------------------------------------------------------------------- saliencies


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("numel, b, m, damp", [(128, 32, 16, 1e-2), (200, 40, 48, 1e-3)])
def test_saliency_matches_dense_reference(cls, numel, b, m, damp):
    G, w, _, Hinv = _problem(numel, b, m, damp, seed=numel)
    f = _finv(cls, G, b, damp)
    s1 = saliency_unstructured(w.float(), f.diag())
    assert s1.dtype == torch.float32
    assert _rel(s1, w**2 / (2 * Hinv.diagonal())) < 1e-5
    assert _rel(saliency_blocks(w.float(), f, 1), s1) < 1e-7
    for group in (2, 4, 8):
        s = saliency_blocks(w.float(), f, group)
        assert s.shape == (numel // group,)
        assert _rel(s, _ref_saliency(w, Hinv, group)) < 1e-5


def test_saliency_blocks_rejects_straddling_groups():
    G, w, _, _ = _problem(120, 30, 8, 1e-2, seed=0)
    f = _finv(BlockFisherInverse, G, 30, 1e-2)
    with pytest.raises(ValueError, match="straddle"):
        saliency_blocks(w.float(), f, 4)


# ---------------------------------------------------------------------------- updates


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("group", [1, 4])
def test_obs_update_matches_dense_reference(cls, group):
    numel, b, m, damp = 160, 32, 24, 1e-2
    G, w, _, Hinv = _problem(numel, b, m, damp, seed=group)
    f = _finv(cls, G, b, damp)
    gen = torch.Generator().manual_seed(5)
    prune = (torch.rand(numel // group, generator=gen) < 0.4).repeat_interleave(group)
    new = obs_update(w.float(), prune, f, group)
    ref = _ref_update(w, prune, Hinv, group)
    assert new.dtype == torch.float32
    assert torch.all(new[prune] == 0)
    assert _rel(new, ref) < 1e-5
    # the update is not a no-op on the kept weights
    assert _rel(new[~prune], w.float()[~prune]) > 1e-2


def test_obs_update_rejects_split_groups_and_keeps_dtype():
    G, w, _, _ = _problem(64, 16, 8, 1e-2, seed=1)
    f = _finv(BlockFisherInverse, G, 16, 1e-2)
    prune = torch.zeros(64, dtype=torch.bool)
    prune[1] = True
    with pytest.raises(ValueError, match="splits"):
        obs_update(w.float(), prune, f, 4)
    out = obs_update(w.to(torch.bfloat16), prune, f, 1)
    assert out.dtype == torch.bfloat16 and out[1] == 0
    none = obs_update(w.float(), torch.zeros(64, dtype=torch.bool), f, 1)
    assert torch.equal(none, w.float())


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("group", [1, 4])
def test_single_removal_loss_change_equals_saliency(cls, group):
    """On L(x) = 1/2 (x - w)^T H (x - w) with H = F, removing Q costs exactly rho_Q."""
    numel, b, m, damp = 96, 32, 16, 1e-3
    G, w, H, _ = _problem(numel, b, m, damp, seed=42 + group)
    f = _finv(cls, G, b, damp, dtype=torch.float64)
    sal = saliency_blocks(w, f, group)
    for q in (0, 7, numel // group - 1):
        prune = torch.zeros(numel, dtype=torch.bool)
        prune[q * group : (q + 1) * group] = True
        new = obs_update(w, prune, f, group)
        dx = new - w
        loss = 0.5 * dx @ H @ dx
        assert math.isclose(float(loss), float(sal[q]), rel_tol=1e-8)
        # OBS is optimal: plain zeroing of the same weights costs at least as much
        dz = torch.where(prune, -w, torch.zeros_like(w))
        assert 0.5 * dz @ H @ dz >= loss * (1 - 1e-12)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("structure, group", [("unstructured", 1), ("block4", 4)])
def test_obs_beats_magnitude_on_quadratic(seed, structure, group):
    numel, b, m, damp = 256, 32, 16, 1e-2  # m < B: strongly anisotropic Fisher
    G, w, H, _ = _problem(numel, b, m, damp, seed=100 + seed, scale=0.3)
    f = _finv(BlockFisherInverse, G, b, damp)

    def loss(x):
        d = x.double() - w
        return float(0.5 * d @ H @ d)

    sal = saliency_blocks(w.float(), f, group).reshape(1, -1)
    keep = compute_masks({"w": sal}, 0.5, structure, "per_layer", grouped=group > 1)["w"]
    obs_w = obs_update(w.float(), ~keep.reshape(-1), f, group)
    mag = compute_masks({"w": w.abs().reshape(1, -1)}, 0.5, structure, "per_layer")["w"]
    mag_w = w * mag.reshape(-1)
    assert int((obs_w == 0).sum()) == int((mag_w == 0).sum()) == numel // 2
    assert loss(obs_w) < 0.9 * loss(mag_w)


# ---------------------------------------------------------------------------- prune step


class _Toy:
    """Two layers on fixed data; ``grad_fn`` cycles over ``m`` fixed mini-batches.

    The gradient depends on the live weights (manual backprop of a tanh MLP with squared
    loss, cheaper than autograd), so writing weights too early would change later gradients.
    """

    def __init__(self, m, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(32, 16, generator=g) * 0.3
        self.w2 = torch.randn(8, 32, generator=g) * 0.3
        self.x = torch.randn(m, 4, 16, generator=g)
        self.y = torch.randn(m, 4, 8, generator=g)
        self.m = m
        self.calls = 0

    @property
    def params(self):
        return {"fc1.weight": self.w1, "fc2.weight": self.w2}

    def grad_fn(self):
        i = self.calls % self.m
        self.calls += 1
        x = self.x[i]
        h = torch.tanh(x @ self.w1.T)
        r = (h @ self.w2.T - self.y[i]) / x.shape[0]  # d/d(out) of 1/(2n) ||out - y||^2
        g2 = r.T @ h
        g1 = ((r @ self.w2) * (1 - h * h)).T @ x
        return {"fc1.weight": g1, "fc2.weight": g2, "unused.bias": torch.zeros(3)}


KW = dict(num_grads=16, block_size=16, damp=1e-4)


@pytest.mark.parametrize("scope", ["global", "per_layer"])
@pytest.mark.parametrize("structure", ["unstructured", "block4"])
@pytest.mark.parametrize("fisher", ["block", "mfac"])
def test_prune_step_exact_sparsity_and_chunking_invariance(scope, structure, fisher):
    group = 4 if structure == "block4" else 1
    results = {}
    for label, budget in [("whole", None), ("chunked", 1e-9)]:
        toy = _Toy(16)
        before = {k: v.clone() for k, v in toy.params.items()}
        msgs = []
        masks = obert_prune_step(
            toy.params,
            None,
            toy.grad_fn,
            sparsity=0.6,
            structure=structure,
            scope=scope,
            fisher=fisher,
            max_memory_gb=budget,
            progress=msgs.append,
            **KW,
        )
        p = toy.params
        assert set(masks) == set(p)
        for k in p:
            assert masks[k].dtype == torch.bool and masks[k].shape == p[k].shape
            assert torch.all(p[k][~masks[k]] == 0)
            assert not torch.equal(p[k][masks[k]], before[k][masks[k]])  # OBS moved them
            if group > 1:
                gm = masks[k].reshape(-1, group)
                assert (gm.all(-1) | ~gm.any(-1)).all()
        groups = {k: v.numel() // group for k, v in p.items()}
        pruned = {k: int((~masks[k]).sum()) // group for k in p}
        if scope == "per_layer":
            assert pruned == {k: round(0.6 * n) for k, n in groups.items()}
        else:
            assert sum(pruned.values()) == round(0.6 * sum(groups.values()))
        chunks = 1 if budget is None else 2
        expect_calls = KW["num_grads"] * (chunks if scope == "per_layer" else 2 * chunks - 1)
        assert toy.calls == expect_calls
        assert msgs and msgs[0].startswith("oBERT:")
        results[label] = (masks, {k: v.clone() for k, v in p.items()})
    (m0, w0), (m1, w1) = results["whole"], results["chunked"]
    for k in m0:
        assert torch.equal(m0[k], m1[k])
        assert torch.equal(w0[k], w1[k])


def test_prune_step_global_differs_from_per_layer():
    out = {}
    for scope in ("global", "per_layer"):
        toy = _Toy(16)
        out[scope] = obert_prune_step(
            toy.params, None, toy.grad_fn, sparsity=0.6, structure="unstructured",
            scope=scope, **KW,
        )  # fmt: skip
    _, per_g = mask_sparsity(out["global"])
    _, per_l = mask_sparsity(out["per_layer"])
    assert per_l == {"fc1.weight": round(0.6 * 512) / 512, "fc2.weight": round(0.6 * 256) / 256}
    assert per_g != per_l


def test_prune_step_monotone_nm_and_grad_batch():
    toy = _Toy(16)
    m1 = obert_prune_step(
        toy.params, None, toy.grad_fn, sparsity=0.3, structure="block4", scope="global", **KW
    )
    m2 = obert_prune_step(
        toy.params, m1, toy.grad_fn, sparsity=0.7, structure="block4", scope="global", **KW
    )
    for k in m1:
        assert not (m2[k] & ~m1[k]).any()
        assert torch.all(toy.params[k][~m2[k]] == 0)
    overall, _ = mask_sparsity(m2)
    assert overall == pytest.approx(0.7, abs=1 / 192)

    toy = _Toy(16)
    nm = obert_prune_step(toy.params, None, toy.grad_fn, sparsity=0.5, structure="2:4", **KW)
    for v in nm.values():
        assert (v.reshape(-1, 4).sum(-1) == 2).all()

    ref_toy, bat_toy = _Toy(16), _Toy(16)
    a = obert_prune_step(
        ref_toy.params, None, ref_toy.grad_fn, sparsity=0.5, structure="unstructured", **KW
    )
    b = obert_prune_step(
        bat_toy.params, None, bat_toy.grad_fn, sparsity=0.5, structure="unstructured",
        grad_batch=5, **KW,
    )  # fmt: skip
    for k in a:
        assert (a[k] != b[k]).sum() <= 2  # rank-k vs rank-1: equal up to rounding
        assert _rel(bat_toy.params[k], ref_toy.params[k]) < 1e-3


def test_prune_step_errors():
    toy = _Toy(4)
    with pytest.raises(ValueError, match="divisible"):
        obert_prune_step(
            toy.params, None, toy.grad_fn, sparsity=0.5, structure="block4",
            num_grads=4, block_size=18, damp=1e-4,
        )  # fmt: skip
    with pytest.raises(KeyError, match="fc2.weight"):
        obert_prune_step(
            toy.params, None, lambda: {"fc1.weight": torch.zeros(32, 16)}, sparsity=0.5,
            structure="unstructured", num_grads=4, block_size=16, damp=1e-4,
        )  # fmt: skip
    with pytest.raises(ValueError, match="fisher"):
        obert_prune_step(
            toy.params, None, toy.grad_fn, sparsity=0.5, structure="unstructured",
            fisher="dense", num_grads=4, block_size=16, damp=1e-4,
        )  # fmt: skip


def test_estimate_fisher_bytes():
    numels = {"a": 1000, "b": 96}
    blk = estimate_fisher_bytes(numels, 32, "block", 64)
    assert blk == (32 + 3) * 32 * 32 * 4
    assert blk == estimate_fisher_bytes([1000, 96], 32, "block", 64)
    mf = estimate_fisher_bytes(numels, None, "mfac", 64)
    assert mf == (1001 + 97) * 64 * 4
    with pytest.raises(ValueError):
        estimate_fisher_bytes(numels, 32, "dense", 64)

"""Inverse empirical Fisher, block-diagonal, built gradient by gradient (oBERT, M-FAC).

Both classes represent, for one flattened tensor of ``numel`` weights split into consecutive
blocks of ``B`` weights (the last block zero-padded), the inverse of

    F = damp * I + (1/m) * sum_{i=1..m} g_i g_i^T        (restricted to each B x B block)

where ``m = num_grads``. Starting from ``F_0^-1 = I / damp``, each gradient applies the
Sherman-Morrison (rank-1 Woodbury) step, per block,

    F_i^-1 = F_{i-1}^-1 - (F_{i-1}^-1 g)(F_{i-1}^-1 g)^T / (m + g^T F_{i-1}^-1 g).

``BlockFisherInverse`` stores the ``B x B`` inverse blocks (memory ``~numel * B`` floats);
``MFACInverse`` stores only ``v_i = F_{i-1}^-1 g_i`` and ``d_i = m + g_i . v_i`` (memory
``~numel * m`` floats), which pays off for large blocks (``B > m``), e.g. a whole tensor.

Padding never affects results: padded gradient entries are zero, so padded rows/columns stay
``e_k / damp`` and are decoupled from the real weights. Everything is accumulated in
``dtype`` (float32 by default) whatever the gradient dtype.
"""

from __future__ import annotations

import contextlib
import math

import torch

__all__ = ["BlockFisherInverse", "MFACInverse"]


@contextlib.contextmanager
def _single_thread():
    """Run the enclosed torch ops with one intra-op thread (restored afterwards).

    Batched ``linalg`` calls on CPU (``cholesky_ex``, ``solve_triangular``) make one small
    LAPACK call per matrix; with MKL/OpenMP using several threads for each of those calls,
    tens of thousands of k x k systems took 10-60 s instead of 0.2-0.5 s on 2 busy cores
    (oversubscription), which made the rank-k update slower than k rank-1 steps.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _BlockedInverse:
    """Shared bookkeeping: shapes, padding, argument checks."""

    def __init__(
        self,
        numel: int,
        block_size: int | None,
        damp: float,
        num_grads: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        numel = int(numel)
        if numel <= 0:
            raise ValueError(f"numel must be positive, got {numel}")
        if block_size is None:
            block_size = numel
        block_size = int(block_size)
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if not damp > 0:
            raise ValueError(f"damp must be > 0, got {damp}")
        if int(num_grads) <= 0:
            raise ValueError(f"num_grads must be positive, got {num_grads}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be floating point, got {dtype}")
        self.numel = numel
        self.block_size = block_size
        self.nblocks = math.ceil(numel / block_size)
        self.padded = self.nblocks * block_size
        self.damp = float(damp)
        self.num_grads = int(num_grads)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.count = 0

    def _blockify(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., numel]`` -> ``[..., nblocks, B]`` in ``self.dtype``, zero-padded."""
        if x.shape[-1] != self.numel:
            raise ValueError(f"expected last dim {self.numel}, got shape {tuple(x.shape)}")
        x = x.detach().to(device=self.device, dtype=self.dtype)
        pad = self.padded - self.numel
        if pad:
            x = torch.nn.functional.pad(x, (0, pad))
        return x.reshape(*x.shape[:-1], self.nblocks, self.block_size)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``[numel]`` or ``[k, numel]`` -> ``[k, numel]`` (checked)."""
        if x.dim() not in (1, 2) or x.shape[-1] != self.numel:
            raise ValueError(f"expected [{self.numel}] or [k, {self.numel}], got {tuple(x.shape)}")
        return x.reshape(-1, self.numel)

    def _unblockify(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:-2], self.padded)[..., : self.numel]

    def _take(self, k: int) -> None:
        if self.count + k > self.num_grads:
            raise ValueError(
                f"received {self.count + k} gradients but num_grads={self.num_grads}; "
                "F = damp*I + (1/m) sum g g^T is defined for at most m gradients"
            )
        self.count += k

    def _check_group(self, group: int) -> None:
        if group <= 0 or self.block_size % group or self.numel % group:
            raise ValueError(
                f"group {group} must divide block_size {self.block_size} and numel {self.numel} "
                "(groups may not straddle Fisher blocks)"
            )

    def update(self, g: torch.Tensor) -> None:
        """Apply the Woodbury step for one gradient ``g`` (any shape with ``numel`` entries)."""
        self.update_many(g.reshape(1, -1))

    def update_many(self, grads: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def diag(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def matvec(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def diag_blocks(self, group: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class BlockFisherInverse(_BlockedInverse):
    """Block-diagonal inverse empirical Fisher stored as ``[nblocks, B, B]`` matrices.

    Args:
        numel: Number of weights (the flattened tensor).
        block_size: ``B``; ``None`` means one block for the whole tensor.
        damp: Dampening ``lambda`` in ``F = lambda I + (1/m) sum g g^T``.
        num_grads: ``m``, the number of gradients that will be added.
        dtype: Accumulation dtype (float32 default).
        device: Device of the stored inverse.
    """

    def __init__(
        self,
        numel: int,
        block_size: int | None,
        damp: float,
        num_grads: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(numel, block_size, damp, num_grads, dtype, device)
        b = self.block_size
        eye = torch.eye(b, dtype=dtype, device=self.device) / self.damp
        self.F_inv = eye.unsqueeze(0).repeat(self.nblocks, 1, 1)

    @property
    def blocks(self) -> torch.Tensor:
        """The inverse blocks, ``[nblocks, B, B]`` (padded entries of the last block included)."""
        return self.F_inv

    @property
    def nbytes(self) -> int:
        """Bytes held by the inverse blocks."""
        return self.F_inv.numel() * self.F_inv.element_size()

    @staticmethod
    def estimate_bytes(
        numel: int, block_size: int | None, dtype_bytes: int = 4, num_grads: int | None = None
    ) -> int:
        """Bytes of the stored inverse: ``ceil(numel/B) * B^2 * dtype_bytes``.

        ``num_grads`` is accepted for interface symmetry with ``MFACInverse`` and ignored.
        """
        b = int(numel) if block_size is None else int(block_size)
        return math.ceil(int(numel) / b) * b * b * int(dtype_bytes)

    def update_many(self, grads: torch.Tensor) -> None:
        """Add ``k`` gradients ``[k, numel]`` at once (one rank-k Woodbury step per block).

        With ``A = F_prev^-1`` and ``G_b`` the block's ``[k, B]`` gradient rows this is exactly
        ``k`` sequential rank-1 steps:
        ``A' = A - (A G_b^T) (m I_k + G_b A G_b^T)^-1 (A G_b^T)^T``,
        applied as ``A' = A - U U^T`` with ``U = A G_b^T L^-T``, ``L L^T = m I + G_b A G_b^T``.
        """
        if grads.dim() == 1:
            grads = grads.unsqueeze(0)
        k = grads.shape[0]
        if k == 0:
            return
        g = self._blockify(grads.reshape(k, -1)).transpose(0, 1)  # [nb, k, B]
        self._take(k)
        if k > 1:
            v = torch.bmm(self.F_inv, g.transpose(1, 2))  # [nb, B, k] = A G^T
            s = torch.bmm(g, v)  # [nb, k, k] = G A G^T
            s = 0.5 * (s + s.transpose(1, 2))
            s.diagonal(dim1=1, dim2=2).add_(self.num_grads)
            # One tiny LAPACK call per block: run them single-threaded (see _single_thread).
            with _single_thread():
                chol, info = torch.linalg.cholesky_ex(s)  # lower; s is SPD (eigenvalues >= m)
                ok = not bool(info.any())
                if ok:
                    # U^T = L^-1 V^T  ->  U = V L^-T
                    ut = torch.linalg.solve_triangular(chol, v.transpose(1, 2), upper=False)
            if ok:
                self.F_inv.baddbmm_(ut.transpose(1, 2), ut, alpha=-1.0)
                return
            # Numerically indefinite in this dtype: fall back to exact rank-1 steps.
        for t in range(k):
            self._rank1(g[:, t : t + 1])

    def _rank1(self, g: torch.Tensor) -> None:
        """Sherman-Morrison step for blocked gradient rows ``g`` of shape ``[nb, 1, B]``."""
        v = torch.bmm(self.F_inv, g.transpose(1, 2))  # [nb, B, 1] = A g
        denom = self.num_grads + torch.bmm(g, v)  # [nb, 1, 1] = m + g^T A g
        u = v / denom.sqrt()
        # broadcast in-place outer product: much faster than a k=1 baddbmm on CPU
        self.F_inv.addcmul_(u, u.transpose(1, 2), value=-1.0)

    def diag(self) -> torch.Tensor:
        """``[F^-1]_kk`` for every weight, shape ``[numel]``."""
        return self._unblockify(self.F_inv.diagonal(dim1=1, dim2=2))

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """``F^-1 x`` blockwise; ``x`` has ``numel`` entries (or ``[k, numel]`` rows)."""
        squeeze = x.dim() == 1
        xb = self._blockify(self._rows(x))  # [k, nb, B]
        y = torch.einsum("nij,knj->kni", self.F_inv, xb)
        y = self._unblockify(y)
        return y[0] if squeeze else y

    def diag_blocks(self, group: int) -> torch.Tensor:
        """Diagonal ``group x group`` sub-blocks ``[F^-1]_QQ`` for consecutive groups ``Q``.

        Returns:
            ``[numel // group, group, group]``.
        """
        self._check_group(group)
        nb, b = self.nblocks, self.block_size
        q = b // group
        sub = self.F_inv.reshape(nb, q, group, q, group).diagonal(dim1=1, dim2=3)  # [nb,g,g,q]
        sub = sub.permute(0, 3, 1, 2).reshape(nb * q, group, group)
        return sub[: self.numel // group]

    def submatrix(self, block_idx: int, idx: torch.Tensor) -> torch.Tensor:
        """``[F^-1]_{idx, idx}`` within block ``block_idx`` (``idx`` are in-block indices)."""
        blk = self.F_inv[block_idx]
        return blk[idx][:, idx]


class MFACInverse(_BlockedInverse):
    """Matrix-free block inverse empirical Fisher (M-FAC static algorithm).

    Stores, per block, ``v_i = F_{i-1}^-1 g_i`` and ``d_i = m + g_i . v_i`` so that

        F^-1 x = x / damp - sum_j (v_j . x / d_j) v_j,
        [F^-1]_kk = 1 / damp - sum_j v_j[k]^2 / d_j.

    ``v_i`` itself is computed with the previous ``v_j`` (``O(numel * m^2)`` in total).

    Args:
        numel: Number of weights (the flattened tensor).
        block_size: ``B``; ``None`` means one block for the whole tensor.
        damp: Dampening ``lambda``.
        num_grads: ``m``; storage for this many gradients is preallocated.
        dtype: Accumulation dtype (float32 default).
        device: Device of the stored vectors.
    """

    def __init__(
        self,
        numel: int,
        block_size: int | None,
        damp: float,
        num_grads: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(numel, block_size, damp, num_grads, dtype, device)
        self.V = torch.zeros(
            self.nblocks, self.num_grads, self.block_size, dtype=dtype, device=self.device
        )
        self.d = torch.ones(self.nblocks, self.num_grads, dtype=dtype, device=self.device)

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored vectors and denominators."""
        return self.V.numel() * self.V.element_size() + self.d.numel() * self.d.element_size()

    @staticmethod
    def estimate_bytes(
        numel: int, block_size: int | None, num_grads: int, dtype_bytes: int = 4
    ) -> int:
        """Bytes of the stored vectors: ``ceil(numel/B) * (B + 1) * m * dtype_bytes``."""
        b = int(numel) if block_size is None else int(block_size)
        return math.ceil(int(numel) / b) * (b + 1) * int(num_grads) * int(dtype_bytes)

    def _apply_prev(self, x: torch.Tensor, upto: int) -> torch.Tensor:
        """``F_upto^-1`` applied to blocked rows ``x`` of shape ``[nb, k, B]``."""
        out = x / self.damp
        if upto:
            vs = self.V[:, :upto]  # [nb, j, B]
            c = torch.bmm(x, vs.transpose(1, 2)) / self.d[:, None, :upto]  # [nb, k, j]
            out = out - torch.bmm(c, vs)
        return out

    def update_many(self, grads: torch.Tensor) -> None:
        """Add ``k`` gradients ``[k, numel]``; sequential in ``k``, vectorised over blocks.

        Products with the already stored ``v_j`` are done for the whole batch at once; the
        in-batch recursion ``v_t -= (v_s . g_t / d_s) v_s`` (``s < t``) is a short loop.
        """
        if grads.dim() == 1:
            grads = grads.unsqueeze(0)
        k = grads.shape[0]
        if k == 0:
            return
        start = self.count
        g = self._blockify(grads.reshape(k, -1)).transpose(0, 1).contiguous()  # [nb, k, B]
        self._take(k)
        w = self._apply_prev(g, start)  # F_start^-1 g_t for all t in the batch
        for t in range(k):
            v = w[:, t]
            for s in range(t):
                i = start + s
                coef = (self.V[:, i] * g[:, t]).sum(-1) / self.d[:, i]
                v = v - coef.unsqueeze(-1) * self.V[:, i]
            self.V[:, start + t] = v
            self.d[:, start + t] = self.num_grads + (g[:, t] * v).sum(-1)

    def diag(self) -> torch.Tensor:
        """``[F^-1]_kk = 1/damp - sum_j v_j[k]^2 / d_j``, shape ``[numel]``."""
        out = torch.full(
            (self.nblocks, self.block_size), 1.0 / self.damp, dtype=self.dtype, device=self.device
        )
        for j in range(self.count):
            out -= self.V[:, j] ** 2 / self.d[:, j : j + 1]
        return self._unblockify(out)

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """``F^-1 x = x/damp - sum_j (v_j . x / d_j) v_j`` blockwise."""
        squeeze = x.dim() == 1
        xb = self._blockify(self._rows(x)).transpose(0, 1)  # [nb, k, B]
        y = self._apply_prev(xb, self.count).transpose(0, 1)  # [k, nb, B]
        y = self._unblockify(y)
        return y[0] if squeeze else y

    def diag_blocks(self, group: int) -> torch.Tensor:
        """``[F^-1]_QQ = I/damp - sum_j v_j[Q] v_j[Q]^T / d_j`` for consecutive groups ``Q``.

        Returns:
            ``[numel // group, group, group]``.
        """
        self._check_group(group)
        nb, b = self.nblocks, self.block_size
        q = b // group
        out = torch.zeros(nb, q, group, group, dtype=self.dtype, device=self.device)
        out += torch.eye(group, dtype=self.dtype, device=self.device) / self.damp
        for j in range(self.count):
            vj = self.V[:, j].reshape(nb, q, group)
            out -= (vj.unsqueeze(-1) * vj.unsqueeze(-2)) / self.d[:, j].reshape(nb, 1, 1, 1)
        return out.reshape(nb * q, group, group)[: self.numel // group]

    def submatrix(self, block_idx: int, idx: torch.Tensor) -> torch.Tensor:
        """``[F^-1]_{idx, idx}`` within block ``block_idx`` (``idx`` are in-block indices)."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.device)
        vs = self.V[block_idx, : self.count][:, idx]  # [j, |idx|]
        eye = torch.eye(idx.numel(), dtype=self.dtype, device=self.device) / self.damp
        return eye - (vs.T / self.d[block_idx, : self.count]) @ vs

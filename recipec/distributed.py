"""Multi-process data-parallel training: process group, sharding, reductions, mask checks.

Launch ``recipec apply`` under ``torchrun`` (or ``accelerate launch``, which calls it) and every
rank runs the same program; see docs/distributed.md. Without ``WORLD_SIZE`` in the environment
(or with ``WORLD_SIZE=1``) nothing here initialises anything and every helper is a no-op, so
single-process runs are exactly what they were.

Design (the contract the driver relies on):

* **Global batches.** ``training.batch_size`` is the *global* batch. Every rank builds the same
  seeded batch order; rank ``r`` takes a contiguous slice of each global batch
  (:func:`shard_indices`, sizes differ by at most one) and scales its mean loss by
  ``world * n_r / n`` so that DDP's gradient *average* equals the gradient of the global
  batch's mean loss — whatever the split. A rank whose slice is empty (a batch smaller than
  the world) runs one example with weight 0, so collectives stay in step.
* **Identical pruning on every rank.** Magnitude masks come from identical weights. oBERT's
  gradients are all-reduced (summed with the same weights) so every rank builds the same
  Fisher and takes the same, deterministic decision; :func:`verify_identical` checks masks
  and pruned weights bit for bit after every pruning step (an ``all_gather`` of one int64
  checksum pair per tensor) and stops the run with a clear error if any rank differs.
* **One writer.** Only rank 0 writes checkpoints, metrics, reports and plots; every rank reads
  checkpoints on resume (a shared file system is assumed).
* **Failures.** Collectives time out after ``RECIPEC_DIST_TIMEOUT`` seconds (default 900); a
  collective that fails because a peer died raises :class:`DistributedError`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

DEFAULT_TIMEOUT_S = 900.0

_ENV_KEYS = {
    # name: (torchrun / accelerate, Open MPI, MPICH / Intel MPI)
    "rank": ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"),
    "world": ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"),
    "local_rank": ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"),
}


class DistributedError(RuntimeError):
    """Distributed training cannot go on: bad launch environment, a lost peer, diverging ranks."""


class RankMismatchError(DistributedError):
    """Ranks disagree on something that must be identical everywhere (masks, weights, steps)."""


def _env_int(kind: str, default: int) -> int:
    for key in _ENV_KEYS[kind]:
        value = os.environ.get(key)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise DistributedError(
                    f"environment variable {key}={value!r} is not an integer"
                ) from None
    return default


def env_world_size() -> int:
    """World size named by the launcher's environment (1 when not launched by one)."""
    return _env_int("world", 1)


def env_rank() -> int:
    return _env_int("rank", 0)


def env_local_rank() -> int:
    return _env_int("local_rank", 0)


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Number of ranks of the active process group (1 without one)."""
    return torch.distributed.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank: the process group's, else the launcher's RANK (0 outside a world)."""
    if is_initialized():
        return torch.distributed.get_rank()
    return env_rank() if env_world_size() > 1 else 0


def is_distributed() -> bool:
    return world_size() > 1


def is_main() -> bool:
    """True on the rank that writes files and prints (rank 0, or the only process)."""
    return rank() == 0


def timeout_seconds() -> float:
    raw = os.environ.get("RECIPEC_DIST_TIMEOUT")
    if raw in (None, ""):
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise DistributedError(f"RECIPEC_DIST_TIMEOUT={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise DistributedError(f"RECIPEC_DIST_TIMEOUT must be positive, got {raw}")
    return value


def backend_for(device: str) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise; ``RECIPEC_DIST_BACKEND`` overrides."""
    override = os.environ.get("RECIPEC_DIST_BACKEND")
    if override:
        return override
    return "nccl" if str(device).startswith("cuda") else "gloo"


def init_from_env(device: str = "cpu") -> str:
    """Initialise the default process group from the launcher's environment.

    Reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (or their Open MPI / MPICH equivalents) and
    ``MASTER_ADDR``/``MASTER_PORT``. Picks the backend from ``device`` (:func:`backend_for`)
    and sets the collective timeout (:func:`timeout_seconds`).

    Returns:
        The device this rank should use: ``device`` unchanged on CPU (and whenever there is
        no world to join), ``cuda:LOCAL_RANK`` for ``cuda``.

    Raises:
        DistributedError: An incomplete launch environment or a CUDA rank without its GPU.
    """
    world = env_world_size()
    if world <= 1 or is_initialized():
        if is_initialized() and str(device) == "cuda":
            return f"cuda:{torch.cuda.current_device()}"
        return device
    if not torch.distributed.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={world} but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: "
            "launch with torchrun or accelerate launch (see docs/distributed.md)"
        )
    r, local = env_rank(), env_local_rank()
    if not 0 <= r < world:
        raise DistributedError(f"RANK={r} is outside WORLD_SIZE={world}")
    if str(device) == "cuda" or str(device).startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DistributedError("--device cuda but no CUDA device is available on this node")
        count = torch.cuda.device_count()
        if local >= count:
            raise DistributedError(
                f"LOCAL_RANK={local} but this node has {count} CUDA device(s): start at most {count} processes per node"
            )
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    backend = backend_for(device)
    try:
        torch.distributed.init_process_group(
            backend=backend,
            rank=r,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_seconds()),
        )
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(
            f"rank {r}: cannot join the process group ({backend}, {world} ranks at "
            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}): {_first_line(exc)}"
        ) from exc
    return device


def shutdown() -> None:
    if is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str = "cpu") -> Iterator[str]:
    """``init_from_env`` for the block; destroys the group on exit if it created it."""
    created = not is_initialized() and env_world_size() > 1
    dev = init_from_env(device)
    try:
        yield dev
    finally:
        if created:
            shutdown()


# --------------------------------------------------------------------------------------------
# Collectives (no-ops in a single process)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def _comm_device() -> torch.device:
    if is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn a failed collective (peer died, timeout) into a :class:`DistributedError`."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as exc:
        if not is_distributed():
            raise
        raise DistributedError(
            f"rank {rank()}: {what} failed: {_first_line(exc)}. This usually means another rank died or "
            "hung (the launcher's summary names it); the last checkpoint is kept: fix the cause and run "
            "the same command again with --resume"
        ) from exc


def barrier(what: str = "barrier") -> None:
    if is_distributed():
        with collective(what):
            if torch.distributed.get_backend() == "nccl":
                torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
            else:
                torch.distributed.barrier()


def all_reduce_sum(tensor: torch.Tensor, what: str = "all_reduce") -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (on the communication device); returns it."""
    if not is_distributed():
        return tensor
    dev = _comm_device()
    buf = tensor if tensor.device == dev else tensor.to(dev)
    with collective(what):
        torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def all_reduce_mean(tensor: torch.Tensor, what: str = "all_reduce") -> torch.Tensor:
    """Average ``tensor`` over ranks in place; returns it."""
    if not is_distributed():
        return tensor
    all_reduce_sum(tensor, what)
    return tensor.div_(world_size())


def all_reduce_dict(
    tensors: Mapping[str, torch.Tensor], mean: bool, what: str = "all_reduce"
) -> dict[str, torch.Tensor]:
    """Sum (or average) a dict of tensors over ranks with one collective on a flat buffer.

    Every rank must pass the same names in the same order, with the same shapes."""
    names = list(tensors)
    if not is_distributed() or not names:
        return dict(tensors)
    flat = torch.cat([tensors[n].reshape(-1) for n in names])
    (all_reduce_mean if mean else all_reduce_sum)(flat, what)
    out, offset = {}, 0
    for n in names:
        k = tensors[n].numel()
        out[n] = flat[offset : offset + k].view_as(tensors[n])
        offset += k
    return out


def broadcast_object(obj: Any, src: int = 0, what: str = "broadcast") -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects)."""
    if not is_distributed():
        return obj
    holder = [obj if rank() == src else None]
    with collective(what):
        torch.distributed.broadcast_object_list(holder, src=src, device=_comm_device())
    return holder[0]


def all_gather_object(obj: Any, what: str = "all_gather") -> list[Any]:
    """Every rank's ``obj``, in rank order (picklable objects)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    with collective(what):
        torch.distributed.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------------
# Sharding


def shard_bounds(n: int, rank_: int, world: int) -> tuple[int, int]:
    """``[start, end)`` of rank ``rank_``'s contiguous share of ``n`` items (sizes differ by <= 1)."""
    if world < 1 or not 0 <= rank_ < world:
        raise ValueError(f"rank {rank_} is outside world size {world}")
    base, extra = divmod(int(n), world)
    start = rank_ * base + min(rank_, extra)
    return start, start + base + (1 if rank_ < extra else 0)


def shard_indices(
    indices: Sequence[int] | np.ndarray, rank_: int, world: int
) -> tuple[np.ndarray, float]:
    """This rank's slice of one global batch and its weight ``n_rank / n_global``.

    The union of the ranks' slices, in rank order, is exactly ``indices``. A rank whose slice
    would be empty (fewer examples than ranks) gets ``indices[:1]`` with weight 0.0, so it
    still runs forward/backward (collectives stay in step) without contributing.
    """
    idx = np.asarray(indices)
    if idx.size == 0:
        raise ValueError("cannot shard an empty batch")
    start, end = shard_bounds(idx.size, rank_, world)
    if end == start:
        return idx[:1], 0.0
    return idx[start:end], (end - start) / idx.size


class ShardBatch(dict):
    """A batch (``model(**batch)`` works as with a dict) that knows its share of the global batch.

    ``weight`` is ``n_rank / n_global`` (0.0 for a placeholder batch on a rank with no examples).
    """

    weight: float = 1.0

    def __init__(self, data: Mapping[str, torch.Tensor], weight: float):
        super().__init__(data)
        self.weight = float(weight)


def sharded_batches(
    loader: Any, rank_: int | None = None, world: int | None = None
) -> Iterator[ShardBatch]:
    """This rank's :class:`ShardBatch` of each remaining global batch of an ``ExampleLoader`` pass.

    Equivalent to ``for batch in loader`` when ``world == 1`` (weight 1.0). Like a full pass of
    the loader, exhausting the generator advances the loader to the next epoch.
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if world == 1:
        for batch in loader:
            yield ShardBatch(batch, 1.0)
        return
    for idx in loader.batch_indices()[loader.start_batch :]:
        local, weight = shard_indices(idx, rank_, world)
        yield ShardBatch(loader.collator([loader.examples[int(i)] for i in local]), weight)
    loader.epoch += 1
    loader.start_batch = 0


# --------------------------------------------------------------------------------------------
# Models


def wrap_model(model: nn.Module, device: str) -> nn.Module:
    """``DistributedDataParallel(model)`` in a world of several ranks, else ``model`` itself.

    DDP broadcasts rank 0's parameters when it is built, so every rank starts identical.
    Buffers are not re-broadcast every step (BERT-family buffers are constant index tensors).
    Set ``RECIPEC_DDP_FIND_UNUSED=1`` for a model whose forward leaves parameters unused.
    """
    if not is_distributed():
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # No per-forward buffer broadcast (torch >= 2.13 names this forward_sync_buffers).
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    kwargs: dict[str, Any] = {
        "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False
    }
    if os.environ.get("RECIPEC_DDP_FIND_UNUSED", "") not in ("", "0"):
        kwargs["find_unused_parameters"] = True  # models with parameters the forward does not use
    if str(device).startswith("cuda"):
        index = torch.device(device).index
        kwargs["device_ids"] = [index if index is not None else torch.cuda.current_device()]
    with collective("wrapping the model in DistributedDataParallel"):
        return DistributedDataParallel(model, **kwargs)


def seed_rank(seed: int) -> None:
    """Give each rank its own torch stream (dropout) after a common ``seed_everything(seed)``.

    Rank 0 keeps ``seed`` (its stream is the single-process one); numpy and ``random``, used for
    nothing rank-specific, stay common. No-op in a single process.
    """
    if is_distributed() and rank() != 0:
        torch.manual_seed((int(seed) + 1_000_003 * rank()) % 2**63)


# --------------------------------------------------------------------------------------------
# Checksums


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def tensor_checksum(tensor: torch.Tensor) -> int:
    """An exact, order-sensitive 64-bit checksum of a tensor's bits (bool masks included).

    ``sum_i (bits_i + 1) * w_i`` with wrapping int64 arithmetic and pseudo-random position
    weights ``w_i``: any changed, moved or swapped element changes it (barring a 2^-64-ish
    collision). Computed on the tensor's device; costs one int64 temporary of its size.
    """
    flat = tensor.detach().reshape(-1)
    if flat.dtype == torch.bool:
        bits = flat.to(torch.int64)
    elif flat.is_floating_point() or flat.is_complex():
        bits = flat.contiguous().view(_INT_OF_SIZE[flat.element_size()]).to(torch.int64)
    else:
        bits = flat.to(torch.int64)
    pos = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64)
    weights = (pos * 2654435761 + 97) % 2147483647 + 1
    return int(((bits + 1) * weights).sum())


def mask_checksum(
    masks: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """``[len(masks), 2]`` int64: per mask (sorted by name) its checksum and its weight's.

    The weight column is 0 when ``params`` is None or lacks the tensor.
    """
    rows = []
    for name in sorted(masks):
        weight = params.get(name) if params is not None else None
        rows.append(
            [tensor_checksum(masks[name]), tensor_checksum(weight) if weight is not None else 0]
        )
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)


def verify_identical(
    masks: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None, where: str
) -> None:
    """Check that masks (and the masked weights) are bit-identical on every rank.

    One ``all_gather`` of ``[tensors, 2]`` int64 checksums. Raises :class:`RankMismatchError`
    on every rank (they all see the same gathered table) naming the first differing tensor.
    No-op in a single process.
    """
    if not is_distributed():
        return
    names = sorted(masks)
    local = mask_checksum(masks, params)
    counts = all_gather_object(len(names), what=f"mask check ({where})")
    if len(set(counts)) != 1:
        raise RankMismatchError(
            f"{where}: ranks hold different numbers of masks ({', '.join(f'rank {i}: {c}' for i, c in enumerate(counts))})"
        )
    dev = _comm_device()
    gathered = [torch.empty_like(local, device=dev) for _ in range(world_size())]
    with collective(f"mask check ({where})"):
        torch.distributed.all_gather(gathered, local.to(dev))
    table = torch.stack([g.cpu() for g in gathered])  # [world, tensors, 2]
    for r in range(1, table.shape[0]):
        diff = (table[r] != table[0]).nonzero()
        if diff.numel():
            i, col = int(diff[0, 0]), int(diff[0, 1])
            what = "masks" if col == 0 else "weights"
            raise RankMismatchError(
                f"{where}: rank 0 and rank {r} hold different {what} for {names[i]} "
                f"({diff.shape[0]} mismatching checksum(s)). Pruning decisions must be identical on every "
                "rank; this points at non-deterministic pruning (different hardware, library versions or "
                "non-deterministic kernels across ranks). Stopping before the ranks drift apart."
            )

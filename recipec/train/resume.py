"""Atomic training checkpoints: weights, masks, Program state, optimizer, RNG, data position.

Layout::

    CKPT_ROOT/step-000120/{model.safetensors, state.pt}
    CKPT_ROOT/latest            # text file naming the newest complete checkpoint folder

A checkpoint is written into a temporary folder, flushed, then renamed; ``latest`` is replaced
atomically afterwards. A crash (even SIGKILL) at any point leaves the previous checkpoint
intact and ``latest`` pointing at a complete folder.

Distributed runs: only rank 0 calls :func:`save_checkpoint` (the driver gathers every rank's
RNG state into ``state["rng_ranks"]`` first); every rank calls :func:`load_checkpoint` on the
same folder, so the run folder must be on a file system all nodes share.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from recipec.outputs import fsync_dir, share_like_umask, write_text_atomic

KEEP = 2
"""Checkpoints kept per stage while it trains: the newest and the one before (a crash while
writing the newest leaves the previous one whole)."""


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(
    root: Path,
    step_label: str,
    model: torch.nn.Module,
    state: dict[str, Any],
    keep: int | None = KEEP,
) -> Path:
    """Write ``model`` weights and ``state`` (torch-serialisable) as a new checkpoint; then
    delete all but the newest ``keep`` of ``root`` (None: keep every one)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_label
    tmp = root / f".tmp-{step_label}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(_dedupe(tensors), str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    for name in ("model.safetensors", "state.pt"):
        with open(tmp / name, "rb") as fh:
            os.fsync(fh.fileno())
    share_like_umask(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    write_text_atomic(root / "latest", step_label + "\n")
    if keep is not None:
        _prune_old(root, keep=keep)
    return final


def _dedupe(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage (tied embeddings): clone the duplicates."""
    seen: dict[int, str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        ptr = tensor.data_ptr()
        out[name] = tensor.clone() if ptr in seen and tensor.numel() else tensor
        seen.setdefault(ptr, name)
    return out


def _prune_old(root: Path, keep: int) -> None:
    latest = latest_checkpoint(root)
    folders = sorted(p for p in root.glob("*") if p.is_dir() and not p.name.startswith(".tmp-"))
    folders = [p for p in folders if p != latest]
    for old in folders[: max(0, len(folders) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        if str(os.getpid()) not in stale.name:
            shutil.rmtree(stale, ignore_errors=True)


def keep_last(stage_roots: list[Path]) -> list[Path]:
    """After a finished run: delete every checkpoint but the last stage's newest (all that
    ``--resume`` reads from a finished run); returns the folders deleted. Stage folders left
    without a checkpoint are removed."""
    last = latest_checkpoint(stage_roots[-1]) if stage_roots else None
    if last is None:
        return []  # the run did not finish a checkpoint: nothing is safe to delete
    deleted = []
    for root in stage_roots:
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and p != last):
            shutil.rmtree(folder)
            deleted.append(folder)
        if root != last.parent:
            shutil.rmtree(root)
    return deleted


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    folder = root / pointer.read_text(encoding="utf-8").strip()
    if (folder / "model.safetensors").is_file() and (folder / "state.pt").is_file():
        return folder
    return None


def read_state(folder: Path) -> dict[str, Any]:
    """The training state saved with a checkpoint (step, optimizer, Program, RNG, ...)."""
    return torch.load(folder / "state.pt", weights_only=False)


def load_checkpoint(folder: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load weights into ``model`` and return the saved state dict."""
    tensors = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or [m for m in missing if m not in _tied(model)]:
        raise ValueError(
            f"checkpoint {folder} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return read_state(folder)


def _tied(model: torch.nn.Module) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or []
    return set(keys) if isinstance(keys, list | tuple | set) else set(keys)

"""Atomic training checkpoints: weights, masks, Program state, optimizer, RNG, data position.

Layout::

    CKPT_ROOT/STAGE-step-00000120/{model.safetensors, state.json, state.safetensors}
    CKPT_ROOT/latest            # text file naming the newest checkpoint folder (informative)

A checkpoint is written into a temporary folder, flushed, then renamed; ``latest`` is replaced
atomically afterwards. A crash (even SIGKILL) at any point leaves the previous checkpoint
intact; a failed write (disk full, Ctrl-C) removes its temporary folder.

The training state is never pickled (a pickle can run any code when loaded): its tensors
(optimizer moments, masks, RNG byte tensors, numpy's RNG array) go into ``state.safetensors`` and
everything else into ``state.json``::

    {"format": "recipec-checkpoint-state", "version": 1, "written_by": "recipec 0.1.0",
     "files": {"model.safetensors": {"bytes": N, "sha256": "..."},
               "state.safetensors": {"bytes": N, "sha256": "..."}},
     "state": <the state: JSON values; tensors, numpy arrays, tuples, dicts with non-string
              keys and non-finite floats as {"$type": ...} objects>}

A checkpoint is *verified* (:func:`verify_checkpoint`) when ``state.json`` parses with that
format, and every file it lists has its size and SHA-256 (so a truncated or garbled file is
caught) and a readable safetensors header. Resuming takes the newest verified checkpoint
(:func:`latest_checkpoint`); ``latest`` is only a hint for people. A ``state.pt`` (recipec before
this format) or any other state file is refused, never unpickled.

Distributed runs: only rank 0 calls :func:`save_checkpoint` (the driver gathers every rank's
RNG state into ``state["rng_ranks"]`` first); every rank calls :func:`load_checkpoint` on the
same folder, so the run folder must be on a file system all nodes share.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from recipec.outputs import as_os_error, fsync_dir, share_like_umask, write_text_atomic

KEEP = 2
"""Checkpoints kept per stage while it trains: the newest and the one before (a crash while
writing the newest leaves the previous one whole)."""
MODEL_FILE = "model.safetensors"
STATE_STEM = "state"
LEGACY_STATE = "state.pt"
STATE_FORMAT = "recipec-checkpoint-state"
STATE_VERSION = 1
_STEP_FOLDER = re.compile(r"-step-(\d+)$")
_MAX_JSON_BYTES = 256 * 2**20
_NDARRAY_DTYPES = frozenset(
    {"uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64"}
    | {"float16", "float32", "float64", "bool"}
)


class CheckpointStateError(ValueError):
    """A checkpoint (or a state file) that cannot be used; the message names the file."""


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


# -- the state codec: JSON + safetensors, no pickle ---------------------------------------------


def encode_state(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``state`` as a JSON value and the tensors it refers to (by key)."""
    tensors: dict[str, torch.Tensor] = {}

    def tensor_ref(t: torch.Tensor) -> str:
        key = f"t{len(tensors)}"
        tensors[key] = t.detach().cpu().contiguous()
        return key

    def enc(x: Any) -> Any:
        if x is None or isinstance(x, bool | int | str):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {"$type": "float", "value": repr(x)}
        if isinstance(x, np.generic):
            return enc(x.item())
        if isinstance(x, torch.Tensor):
            return {"$type": "tensor", "key": tensor_ref(x)}
        if isinstance(x, np.ndarray):
            data = np.ascontiguousarray(x).tobytes()
            raw = (
                torch.frombuffer(bytearray(data), dtype=torch.uint8)
                if data
                else torch.zeros(0, dtype=torch.uint8)
            )
            return {
                "$type": "ndarray",
                "key": tensor_ref(raw),
                "dtype": x.dtype.name,
                "shape": list(x.shape),
            }
        if isinstance(x, tuple):
            return {"$type": "tuple", "items": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x) and "$type" not in x:
                return {k: enc(v) for k, v in x.items()}
            return {"$type": "dict", "items": [[enc(k), enc(v)] for k, v in x.items()]}
        raise TypeError(f"checkpoint state: cannot store a {type(x).__name__} ({x!r:.80})")

    return enc(state), _dedupe(tensors)


def decode_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`encode_state`; ``ValueError`` on anything it does not write."""
    return _Decoder(tensors).value(tree)


class _Decoder:
    """JSON values back into state: only the types :func:`encode_state` writes."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def tensor(self, key: Any) -> torch.Tensor:
        if not isinstance(key, str) or key not in self.tensors:
            raise ValueError(f"refers to a tensor {str(key)[:40]!r} the tensor file lacks")
        return self.tensors[key]

    def ndarray(self, obj: dict[str, Any]) -> np.ndarray:
        dtype, shape = obj.get("dtype"), obj.get("shape")
        if dtype not in _NDARRAY_DTYPES or not isinstance(shape, list):
            raise ValueError(f"an array of dtype {str(dtype)[:20]!r}")
        if not all(isinstance(n, int) and n >= 0 for n in shape):
            raise ValueError("an array of a bad shape")
        raw = self.tensor(obj.get("key")).numpy().tobytes()
        return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()

    def value(self, x: Any) -> Any:
        if x is None or isinstance(x, bool | int | float | str):
            return x
        if isinstance(x, list):
            return [self.value(v) for v in x]
        if not isinstance(x, dict):
            raise ValueError(f"a value of type {type(x).__name__}")
        kind = x.get("$type")
        if kind is None:
            return {k: self.value(v) for k, v in x.items()}
        return self.tagged(kind, x)

    def tagged(self, kind: Any, x: dict[str, Any]) -> Any:
        items = x.get("items")
        if kind == "tensor":
            return self.tensor(x.get("key"))
        if kind == "ndarray":
            return self.ndarray(x)
        if kind == "tuple" and isinstance(items, list):
            return tuple(self.value(v) for v in items)
        if kind == "dict" and isinstance(items, list):
            pairs = [self.value(p) for p in items]
            if not all(isinstance(p, list) and len(p) == 2 for p in pairs):
                raise ValueError("a malformed mapping")
            return {_hashable(k): v for k, v in pairs}
        if kind == "float" and x.get("value") in ("nan", "inf", "-inf"):
            return float(x["value"])
        raise ValueError(f"an object of type {str(kind)[:40]!r}")


def _hashable(key: Any) -> Any:
    if key is None or isinstance(key, bool | int | float | str | tuple):
        return key
    raise ValueError("a mapping key that is not a number or a string")


def _save_tensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors`` ``save_file``; a failed write (a full disk) as the ``OSError`` it is."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        error = as_os_error(exc, path)
        if error is None:
            raise
        raise error from None


def _digest(path: Path) -> dict[str, Any]:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            sha.update(block)
    return {"bytes": path.stat().st_size, "sha256": sha.hexdigest()}


def write_state(folder: Path, stem: str, state: Any, also: Sequence[str] = ()) -> None:
    """Write ``state`` as ``STEM.safetensors`` plus ``STEM.json`` in ``folder``; the JSON lists
    the size and SHA-256 of the tensor file and of the files named in ``also`` (written before)."""
    from recipec import __version__

    tree, tensors = encode_state(state)
    tensor_file = f"{stem}.safetensors"
    _save_tensors(tensors, folder / tensor_file, metadata={"format": STATE_FORMAT})
    doc = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "written_by": f"recipec {__version__}",
        "files": {name: _digest(folder / name) for name in (*also, tensor_file)},
        "state": tree,
    }
    write_text_atomic(folder / f"{stem}.json", json.dumps(doc, allow_nan=False))


def _state_document(folder: Path, stem: str) -> dict[str, Any]:
    """``STEM.json``, parsed and checked (format, version, listed files); names the file."""
    path = folder / f"{stem}.json"
    if not path.is_file():
        legacy = folder / f"{stem}.pt"
        if legacy.exists():
            raise CheckpointStateError(
                f"{legacy} is a checkpoint state in the pickle format of an older recipec; "
                "recipec does not unpickle checkpoint files (a pickle can run any code). Start "
                "the run over (--overwrite), or finish it with the recipec version that wrote it"
            )
        raise CheckpointStateError(f"{path} is missing (an incomplete checkpoint)")
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            raise ValueError("too large")
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "it is not JSON recipec wrote"
        raise CheckpointStateError(f"{path} cannot be read: {why}") from None
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if fmt != STATE_FORMAT:
        raise CheckpointStateError(
            f"{path} is not a recipec checkpoint state (no 'format': {STATE_FORMAT!r}); recipec "
            "reads only the state files it writes. Start the run over (--overwrite)"
        )
    version = doc.get("version")
    if not isinstance(version, int) or version > STATE_VERSION:
        raise CheckpointStateError(
            f"{path} has state version {str(version)[:20]}, newer than this recipec reads "
            f"({STATE_VERSION}): resume with the recipec version that wrote it"
        )
    files = doc.get("files")
    if not isinstance(files, dict) or f"{stem}.safetensors" not in files:
        raise CheckpointStateError(f"{path} does not list its files")
    return doc


def _check_files(folder: Path, files: dict[str, Any], listed_in: Path) -> None:
    """Every listed file present, of its size and SHA-256, with a readable safetensors header."""
    for name, expected in files.items():
        if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
            raise CheckpointStateError(f"{listed_in} lists a file {str(name)[:60]!r}")
        path = folder / name
        if not path.is_file():
            raise CheckpointStateError(f"{path} is missing")
        if not isinstance(expected, dict) or _digest(path) != {
            "bytes": expected.get("bytes"),
            "sha256": expected.get("sha256"),
        }:
            raise CheckpointStateError(
                f"{path} is not the file this checkpoint wrote (truncated or changed: its size or "
                "SHA-256 differs)"
            )
        try:
            with safe_open(str(path), "pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise CheckpointStateError(f"{path} cannot be read: {exc}") from None


def read_state(folder: Path, stem: str = STATE_STEM, check: Sequence[str] | None = None) -> Any:
    """The state written by :func:`write_state` (by default a checkpoint's training state),
    after checking the files it lists; :class:`CheckpointStateError` naming the bad file."""
    doc = _state_document(folder, stem)
    files = doc["files"]
    if check is not None:
        missing = [name for name in check if name not in files]
        if missing:
            raise CheckpointStateError(f"{folder / (stem + '.json')} does not list {missing[0]}")
    _check_files(folder, files, folder / f"{stem}.json")
    tensor_file = folder / f"{stem}.safetensors"
    try:
        tensors = load_file(str(tensor_file))
        return decode_state(doc.get("state"), tensors)
    except (SafetensorError, OSError) as exc:
        raise CheckpointStateError(f"{tensor_file} cannot be read: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise CheckpointStateError(
            f"{folder / (stem + '.json')} is not a state recipec wrote: it holds {exc}"
        ) from None


def verify_checkpoint(folder: Path) -> dict[str, Any]:
    """A checkpoint folder's training state, once everything in it checks out (see the module
    docstring); :class:`CheckpointStateError` naming the first problem otherwise."""
    state = read_state(folder, check=(MODEL_FILE,))
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointStateError(f"{folder / 'state.json'} has no training step")
    return state


# -- checkpoint folders --------------------------------------------------------------------------


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
    try:
        tmp.mkdir()
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        _save_tensors(_dedupe(tensors), tmp / MODEL_FILE)
        write_state(tmp, STATE_STEM, state, also=(MODEL_FILE,))
        for name in (MODEL_FILE, f"{STATE_STEM}.safetensors", f"{STATE_STEM}.json"):
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        share_like_umask(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root)
    write_text_atomic(root / "latest", step_label + "\n")
    if keep is not None:
        _prune_old(root, final, keep=keep)
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


def _step_of(folder: Path) -> int:
    match = _STEP_FOLDER.search(folder.name)
    return int(match.group(1)) if match else -1


def checkpoints(root: Path) -> list[Path]:
    """The checkpoint folders under ``root`` (``*-step-N``), newest (highest step) first."""
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and not p.is_symlink() and not p.name.startswith(".") and _step_of(p) >= 0
    ]
    return sorted(found, key=lambda p: (_step_of(p), p.name), reverse=True)


def _prune_old(root: Path, newest: Path, keep: int) -> None:
    """Keep ``newest`` and the ``keep - 1`` checkpoints before it; delete the older ones, any
    after it (left by a run resumed from an older checkpoint) and other processes' temp folders."""
    step = _step_of(newest)
    older = [p for p in checkpoints(root) if p != newest and _step_of(p) <= step]
    later = [p for p in checkpoints(root) if p != newest and _step_of(p) > step]
    for old in later + older[max(0, keep - 1) :]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)


def keep_last(stage_roots: list[Path], keep: int = 1) -> list[Path]:
    """After a finished run: delete every checkpoint but the last stage's newest verified one
    (all that ``--resume`` reads from a finished run) and the ``keep - 1`` before it; returns
    the folders deleted. Stage folders left without a checkpoint are removed."""
    last = latest_checkpoint(stage_roots[-1]) if stage_roots else None
    if last is None:
        return []  # the run did not finish a checkpoint: nothing is safe to delete
    older = [p for p in checkpoints(last.parent) if _step_of(p) < _step_of(last)]
    kept = {last, *older[: max(0, keep - 1)]}
    deleted = []
    for root in stage_roots:
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and p not in kept):
            shutil.rmtree(folder)
            deleted.append(folder)
        if root != last.parent:
            shutil.rmtree(root)
    return deleted


def find_checkpoint(
    root: Path, skipped: list[tuple[Path, str]] | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """The newest verified checkpoint folder under ``root`` with its state, or None. Each newer
    folder that did not verify is appended to ``skipped`` with the reason."""
    for folder in checkpoints(root):
        try:
            return folder, verify_checkpoint(folder)
        except CheckpointStateError as exc:
            if skipped is not None:
                skipped.append((folder, str(exc)))
    return None


def latest_checkpoint(root: Path, skipped: list[tuple[Path, str]] | None = None) -> Path | None:
    """The newest verified checkpoint folder under ``root`` (see :func:`find_checkpoint`)."""
    found = find_checkpoint(root, skipped)
    return found[0] if found is not None else None


def load_checkpoint(
    folder: Path, model: torch.nn.Module, state: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Load weights into ``model`` and return the saved state (read and verified here unless
    ``state`` gives it); :class:`CheckpointStateError` when the folder does not fit."""
    if state is None:
        state = verify_checkpoint(folder)
    path = folder / MODEL_FILE
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointStateError(f"{path} cannot be read: {exc}") from None
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise CheckpointStateError(
            f"{path} does not fit this model: {str(exc).splitlines()[0][:300]}"
        ) from None
    if unexpected or [m for m in missing if m not in _tied(model)]:
        raise CheckpointStateError(
            f"{path} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return state


def _tied(model: torch.nn.Module) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or []
    return set(keys) if isinstance(keys, list | tuple | set) else set(keys)

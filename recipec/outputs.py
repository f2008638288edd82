"""Files recipec writes: atomic writes, and output folders created only when asked for,
replaced (``--overwrite``) only when safe.

``apply`` and ``export`` replace a non-empty output folder only when asked, and only when the
folder is one recipec wrote (it holds the command's marker file), is not a symbolic link, does
not hold the current folder, and holds none of the command's own inputs (model, teacher, data,
recipe, checkpoint).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_like_umask(path: Path) -> None:
    """Give ``path`` and, for a folder, everything under it the modes a plain ``open`` or
    ``mkdir`` gives (0666 / 0777 less the umask, e.g. 0644 / 0755).

    Temporary folders (``tempfile.mkdtemp``: 0700) and some writers (safetensors: 0600) create
    private files; a model or ONNX folder is meant to be shared and deployed like any other.
    Symbolic links are left alone.
    """
    mask = umask()
    paths = [path, *path.rglob("*")] if path.is_dir() and not path.is_symlink() else [path]
    for item in paths:
        if item.is_symlink():
            continue
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a flushed temporary file and a rename.

    A crash leaves either the old file or the new one, never a partial file.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class ReplaceError(ValueError):
    """The output folder must not be replaced; the message says why and what to do."""


def input_inside(out: Path, inputs: Iterable[tuple[str, object]]) -> str | None:
    """The first ``(label, path)`` whose existing path is ``out`` or lies under it, as a message part."""
    root = out.resolve()
    for label, value in inputs:
        if value is None:
            continue
        path = Path(os.fspath(value)).expanduser()
        if not path.exists():
            continue  # a hub name, or a file the command will report missing
        resolved = path.resolve()
        if resolved == root or root in resolved.parents:
            return f"{label} {value}"
    return None


def check_replaceable(
    out: Path, *, marker: str, written_by: str, inputs: Iterable[tuple[str, object]] = ()
) -> None:
    """Raise :class:`ReplaceError` unless the non-empty folder ``out`` may be deleted and written anew."""
    if out.is_symlink():
        raise ReplaceError(
            f"{out} is a symbolic link: name the folder it points to, or another output folder"
        )
    root, cwd = out.resolve(), Path.cwd().resolve()
    if root == cwd or root in cwd.parents:
        raise ReplaceError(
            f"{out} is the current folder or holds it: replacing it would delete the folder you "
            "are in; choose another output folder"
        )
    inside = input_inside(out, inputs)
    if inside is not None:
        raise ReplaceError(
            f"{inside} is inside {out}, which --overwrite would delete first: choose another "
            "output folder (or move that input out of it)"
        )
    if not (out / marker).is_file():
        raise ReplaceError(
            f"{out} is not empty and is not {written_by} (it has no {marker}): --overwrite only "
            "replaces folders recipec wrote; choose another output folder or empty it yourself"
        )


def check_output(
    out: Path,
    *,
    overwrite: bool,
    marker: str,
    written_by: str,
    busy: str,
    inputs: Iterable[tuple[str, object]] = (),
    reusable: bool = False,
) -> bool:
    """Whether the existing, non-empty ``out`` is to be replaced (read-only; nothing is deleted).

    False when ``out`` is missing or empty. Raises :class:`ReplaceError` with ``busy`` (what to
    do instead) when it is not empty and neither ``overwrite`` nor ``reusable`` (a folder the
    caller knows holds nothing worth keeping) allows replacing it, or when
    :func:`check_replaceable` refuses it."""
    if not out.is_symlink() and (not out.exists() or (out.is_dir() and not any(out.iterdir()))):
        return False
    if not (overwrite or reusable):
        raise ReplaceError(f"output folder {out} exists and is not empty: {busy}")
    check_replaceable(out, marker=marker, written_by=written_by, inputs=inputs)
    return True

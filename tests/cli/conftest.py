"""Fixtures of the CLI tests.

- ``fast_recipe``: the FAST_RECIPE of ``run_helpers`` (8 steps) saved as a file (session).
- ``fast_run``: one finished ``recipec apply`` of it on ``tiny_model_dir`` (session; copy it
  with ``run_helpers.copy_run`` before changing anything in it). It keeps the checkpoints of
  steps 6 and 8.
"""

from __future__ import annotations

import pytest
from run_helpers import FAST_RECIPE, apply, assert_clean


@pytest.fixture(scope="session")
def fast_recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "fast.yaml"
    path.write_text(FAST_RECIPE)
    return path


@pytest.fixture(scope="session")
def fast_run(tmp_path_factory, fast_recipe, tiny_model_dir):
    out = tmp_path_factory.mktemp("fast-run") / "run"
    assert_clean(apply(fast_recipe, tiny_model_dir, out, quiet=True), 0)
    return out

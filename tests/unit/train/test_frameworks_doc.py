"""docs/frameworks.md: every Python example runs (after the shared setup block), the excerpt of
examples/accelerate_loop.py is verbatim, and the README links the page. (Its shell commands are
run by tests/unit/train/test_accelerate_example.py.)"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "frameworks.md"
EXCERPT = re.compile(r"\A# from (\S+)\n")


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.DOTALL)


SETUP, *EXAMPLES = python_blocks()
RUN = [b for b in EXAMPLES if not EXCERPT.match(b)]
EXCERPTS = [b for b in EXAMPLES if EXCERPT.match(b)]


def _name(block: str) -> str:
    for module in ("lightning", "recipec.train.hf"):
        if f"import {module}" in block or f"from {module} " in block:
            return module.rsplit(".", 1)[-1]
    return "plain"


def test_the_page_has_the_four_loops():
    assert [_name(b) for b in RUN] == ["plain", "hf", "lightning"]
    assert [EXCERPT.match(b).group(1) for b in EXCERPTS] == ["examples/accelerate_loop.py"]
    assert "[docs/frameworks.md](docs/frameworks.md)" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("block", RUN, ids=[_name(b) for b in RUN])
def test_each_example_runs_and_reaches_the_planned_sparsity(block, tmp_path, monkeypatch):
    if _name(block) == "lightning" and importlib.util.find_spec("lightning") is None:
        pytest.skip("lightning is not installed (pip install 'recipec[lightning]')")
    monkeypatch.chdir(tmp_path)  # the examples write under runs/
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(SETUP + "\n" + block, f"{DOC.name}:{_name(block)}", "exec"), {})
    assert "encoder sparsity: 0.800" in out.getvalue()


@pytest.mark.parametrize("block", EXCERPTS)
def test_excerpts_are_verbatim(block):
    path = EXCERPT.match(block).group(1)
    body = EXCERPT.sub("", block)
    assert body in (ROOT / path).read_text(encoding="utf-8"), f"{path} no longer has this code"

"""Every code example in docs/*.md runs (README.md's are run by tests/test_readme.py).

Fenced blocks tagged ``bash``, ``console`` or ``python`` are examples. Each one either runs
here, or the line above its fence says why not: ``<!-- not run: needs 8 GPUs -->``. Other
directives: ``<!-- run: slow -->`` (run by the slow test only), ``<!-- run: in DIR -->`` (the
working directory), ``<!-- output of the command above: FILE -->`` on a ``yaml`` block (the
file the previous console block wrote must equal it). In a ``console`` block every ``$``
command runs and the lines shown after it must appear, in order, in what it printed.

Commands run in a scratch folder holding ``recipes/`` and ``tests/`` (links to the
project's) and, for the examples that need one, ``runs/quickstart``: a short quickstart run
(64 training examples) with its ONNX export. ``recipec apply`` commands are shortened the same
way (``--max-train 64 --max-eval 32``).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
RUNNABLE = ("bash", "console", "python")
FENCE = re.compile(
    r"(?:^<!--\s*(?P<directive>.*?)\s*-->\n)?^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```",
    re.S | re.M,
)
SHORT_APPLY = ["--max-train", "64", "--max-eval", "32", "--quiet"]


@dataclass
class Block:
    doc: Path
    line: int
    lang: str
    body: str
    directive: str

    @property
    def id(self) -> str:
        return f"{self.doc.name}:{self.line}"


def blocks(doc: Path) -> list[Block]:
    text = doc.read_text(encoding="utf-8")
    found = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start("lang")) + 1
        found.append(Block(doc, line, m["lang"], m["body"], (m["directive"] or "").strip()))
    return found


ALL = [b for doc in DOCS for b in blocks(doc)]
EXAMPLES = [b for b in ALL if b.lang in RUNNABLE and not b.directive.startswith("not run")]


def test_every_example_is_run_or_says_why_not():
    unmarked = [
        b.id
        for b in ALL
        if b.lang in RUNNABLE
        and not b.directive.startswith(("not run:", "run: slow", "run: in"))
        and b.directive != ""
    ]
    assert not unmarked, f"unknown directives on {unmarked}"
    reasons = [b.directive for b in ALL if b.directive.startswith("not run")]
    assert all(len(r) > len("not run: ") for r in reasons)  # a reason is given
    assert len(EXAMPLES) >= 5


def _env(tmp: Path) -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", RECIPEC_CACHE=str(tmp / "cache"))


def _recipec(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    if args[:1] == ["apply"]:
        args = [a for a in args if a != "--overwrite"] + SHORT_APPLY
    return subprocess.run(
        [sys.executable, "-c", "from recipec.cli import main; main()", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A scratch folder with recipes/, tests/ and a short quickstart run exported to ONNX."""
    tmp = tmp_path_factory.mktemp("docs")
    for name in ("recipes", "tests"):
        (tmp / name).symlink_to(ROOT / name)
    env = _env(tmp)
    run = _recipec(["apply", "quickstart", "--output", "runs/quickstart"], tmp, env)
    assert run.returncode == 0, run.stderr
    export = _recipec(["export", "runs/quickstart", "--onnx"], tmp, env)
    assert export.returncode == 0, export.stderr
    return tmp


def _console(block: Block, cwd: Path, env: dict[str, str]) -> None:
    """Run each ``$`` command; the lines shown after it appear, in order, in its output."""
    steps: list[tuple[str, list[str]]] = []
    for line in block.body.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif steps and line.strip():
            steps[-1][1].append(line.rstrip())
    for command, shown in steps:
        command = command.split("  #")[0].strip()
        words = shlex.split(command)
        assert words[0] == "recipec", f"{block.id}: only recipec commands run here: {command}"
        redirect = words.index(">") if ">" in words else None
        args = words[1:redirect] if redirect else words[1:]
        result = _recipec(args, cwd, env)
        assert result.returncode == 0, f"{block.id}: {command}\n{result.stderr}"
        if redirect:
            (cwd / words[redirect + 1]).write_text(result.stdout)
        printed = (result.stdout + result.stderr).splitlines()
        at = 0
        for want in shown:
            hits = [i for i in range(at, len(printed)) if printed[i].rstrip() == want]
            assert hits, f"{block.id}: `{command}` did not print:\n{want}\n---\n" + "\n".join(
                printed
            )
            at = hits[0] + 1


def _bash(block: Block, cwd: Path, env: dict[str, str]) -> None:
    for line in block.body.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        if not line:
            continue
        words = shlex.split(line)
        if words[0] == "torchrun":  # as written (needs the recipec script), shortened
            launch = [sys.executable, "-m", "torch.distributed.run", *words[1:], *SHORT_APPLY]
            result = subprocess.run(
                launch, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800
            )
        else:
            assert words[0] == "recipec", f"{block.id}: cannot run: {line}"
            result = _recipec(words[1:], cwd, env)
        assert result.returncode == 0, f"{block.id}: {line}\n{result.stderr}"


def _python(block: Block, cwd: Path, env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", block.body],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, f"{block.id}\n{result.stderr}"


def run_block(block: Block, workdir: Path) -> None:
    cwd = workdir
    if block.directive.startswith("run: in "):
        cwd = workdir / block.directive[len("run: in ") :]
    env = _env(workdir)
    {"console": _console, "bash": _bash, "python": _python}[block.lang](block, cwd, env)


FAST = [b for b in EXAMPLES if b.directive != "run: slow"]
SLOW = [b for b in EXAMPLES if b.directive == "run: slow"]


@pytest.mark.parametrize("block", FAST, ids=lambda b: b.id)
def test_doc_example_runs(block, workdir):
    run_block(block, workdir)
    following = _following_output(block)
    if following is not None:
        name, text = following
        assert (workdir / name).read_text() == text, f"{block.id}: {name} differs from the doc"


@pytest.mark.slow
@pytest.mark.parametrize("block", SLOW, ids=lambda b: b.id)
def test_slow_doc_example_runs(block, workdir):
    run_block(block, workdir)


def _following_output(block: Block) -> tuple[str, str] | None:
    """The ``<!-- output of the command above: FILE -->`` block right after ``block``."""
    later = [b for b in ALL if b.doc == block.doc and b.line > block.line]
    if later and later[0].directive.startswith("output of the command above: "):
        return later[0].directive.split(": ", 1)[1], later[0].body
    return None


def test_a_wrong_output_line_is_caught(workdir):
    block = Block(ROOT / "x.md", 1, "console", "$ recipec validate quickstart\nnot printed\n", "")
    with pytest.raises(AssertionError, match="did not print"):
        _console(block, workdir, _env(workdir))

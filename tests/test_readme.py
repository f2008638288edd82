"""Every example in README.md runs: the shell commands (apply shortened with --max-train) and the Python block."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```(bash|python)\n(.*?)```", README, flags=re.DOTALL)


def _commands() -> list[str]:
    commands = []
    for lang, body in BLOCKS:
        if lang != "bash":
            continue
        for line in body.splitlines():
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("recipec "):
                    commands.append(part)
    return commands


def test_readme_starts_with_the_two_commands():
    first_lang, first = BLOCKS[0]
    lines = [line for line in first.strip().splitlines() if line.strip()]
    assert first_lang == "bash" and len(lines) == 2
    assert lines[0].startswith("pip install -e '.[dev]' && recipec apply recipes/quickstart.yaml")
    assert lines[1] == "python -m pytest"
    assert "python3 -m pytest" in (ROOT / ".ci" / "run").read_text()


def test_readme_shell_examples_run(tmp_path):
    for name in ("recipes", "tests"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = dict(os.environ, HF_HUB_OFFLINE="1", RECIPEC_CACHE=str(tmp_path / "cache"))
    commands = _commands()
    assert any(c.startswith("recipec apply") for c in commands)
    for command in commands:
        args = shlex.split(command)
        if args[1] == "apply":
            args = [a for a in args if a != "--overwrite"] + [
                "--max-train",
                "64",
                "--max-eval",
                "32",
                "--quiet",
            ]
            if "--output" not in args:
                args += ["--output", "runs/quickstart"]
            if (tmp_path / "runs" / "quickstart").exists():
                args.append("--overwrite")
        result = subprocess.run(
            [sys.executable, "-c", "from recipec.cli import main; main()", *args[1:]],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    _the_first_command_left_the_kernels_built(tmp_path / "cache")


def _the_first_command_left_the_kernels_built(cache: Path) -> None:
    """The README's first command builds recipec's sparse kernels where this machine can."""
    from recipec.kernels import native

    if "portable-c" not in native.available_backends():  # no compiler here: nothing to build
        return
    assert list(cache.glob("kernels/*/recipec_kernels.so")), sorted(cache.rglob("*"))


def test_readme_python_example_runs(tmp_path):
    (code,) = [body for lang, body in BLOCKS if lang == "python"]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert "encoder sparsity: 0.900" in result.stdout


def test_readme_recipe_examples_validate():
    from recipec.recipe.load import load_recipe_text

    examples = re.findall(r"```yaml\n(.*?)```", README, flags=re.DOTALL)
    assert examples
    for text in examples:
        load_recipe_text(text, "README.md")

"""``recipec convert`` through click's CliRunner."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from recipec.cli import main
from recipec.recipe.load import load_recipe

DATA = Path(__file__).parent / "data"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_convert_writes_a_valid_recipe_and_plan_reads_it(tmp_path):
    out = tmp_path / "obert.yaml"
    result = run("convert", DATA / "obert_unstructured.yaml", "--output", out)
    assert result.exit_code == 0, result.output
    assert f"-> {out}: main: 10 epochs, lr, lr, lr, obert, distill" in result.stdout
    assert "notes (2):" in result.stdout and "--distill_teacher" in result.stdout
    assert "not converted" not in result.stdout
    recipe = load_recipe(out)
    assert recipe.training.epochs == 10
    assert run("validate", out).exit_code == 0
    plan = run("plan", out, "--steps-per-epoch", "4")
    assert plan.exit_code == 0, plan.output
    for step, sparsity in ((8, 70.0), (16, 84.07), (24, 89.26), (32, 90.0)):
        assert f"step {step:>7}: sparsity {sparsity:6.2f}%   lr 8e-05" in plan.output


def test_convert_to_stdout_keeps_the_report_on_stderr():
    result = run("convert", DATA / "recipe_card.md")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("# Converted from the SparseML recipe recipe_card.md")
    assert "type: gmp" in result.stdout and "converted" not in result.stdout.splitlines()[-1]
    assert "recipe_card.md -> stdout: main: 4 epochs, lr, gmp" in result.stderr


def test_unsupported_parts_are_listed_and_strict_fails(tmp_path):
    path = DATA / "quantization.yaml"
    out = tmp_path / "q.yaml"
    result = run("convert", path, "-o", out)
    assert result.exit_code == 0, result.output
    assert "not converted (2):" in result.stdout
    assert f"{path}:21: !QuantizationModifier: quantization-aware training" in result.stdout
    assert f"{path}:19: !GMPruningModifier.leave_enabled" in result.stdout
    out.unlink()
    strict = run("convert", path, "-o", out, "--strict")
    assert strict.exit_code == 2
    assert (
        "--strict: 2 part(s)" in strict.stderr
        and f"{path}:21: !QuantizationModifier" in strict.stderr
    )
    assert not out.exists()
    clean = run("convert", DATA / "gmp_variables.yaml", "-o", out, "--strict")
    assert clean.exit_code == 0 and out.exists()
    written = out.read_text()
    again = run("convert", path, "-o", out)  # an existing file is kept unless --overwrite
    assert again.exit_code == 2 and "already exists: pass --overwrite" in again.stderr
    assert out.read_text() == written
    assert (
        run("convert", path, "-o", out, "--overwrite").exit_code == 0 and out.read_text() != written
    )


def test_malicious_and_broken_recipes_fail_cleanly(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text('modifiers:\n  - !!python/object/apply:os.system ["echo pwned"]\n')
    result = run("convert", evil)
    assert result.exit_code == 2
    assert f"{evil}:2:5: YAML tag '!!python/object/apply:os.system' is not allowed" in result.stderr
    assert "pwned" not in result.stdout and "Traceback" not in result.output
    code = tmp_path / "code.yaml"
    code.write_text(
        "n: eval(__import__('os'))\nmodifiers:\n  - !EpochRangeModifier\n    end_epoch: 1\n"
    )
    result = run("convert", code)
    assert result.exit_code == 2 and "only these functions are allowed" in result.stderr
    assert "1 problem found; nothing converted." in result.stderr
    missing = run("convert", tmp_path / "nope.yaml")
    assert missing.exit_code == 2 and "no such file" in missing.stderr
    same = run("convert", code, "-o", code)
    assert same.exit_code == 2 and "must not be the SparseML recipe" in same.stderr

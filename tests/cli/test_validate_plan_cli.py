import json
import subprocess
import sys

from click.testing import CliRunner

from recipec.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_help_does_not_import_torch():
    code = "import sys; from recipec.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit: pass\nprint(sorted(m for m in ('torch', 'transformers', 'onnx', 'pydantic') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().endswith("[]"), out
    assert "validate" in out and "plan" in out and "apply" in out


def test_validate_ok_and_errors(tmp_path):
    assert run("validate", "quickstart").exit_code == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  epocs: 3\nmodifiers:\n  - type: gmq\n")
    result = run("validate", str(bad))
    assert result.exit_code == 2
    assert (
        f"{bad}:2:3: training.epocs: unknown key 'epocs'; did you mean 'epochs'?" in result.output
    )
    assert f"{bad}:4:11: modifiers.0.type: unknown modifier type 'gmq'" in result.output
    assert "2 problems found." in result.output
    assert "Traceback" not in result.output
    missing = run("validate", str(tmp_path / "nope.yaml"))
    assert missing.exit_code == 2 and "no such file" in missing.output


def test_validate_set_goes_through_validation():
    result = run("validate", "quickstart", "--set", "target_sparsity=1.5")
    assert result.exit_code == 2
    assert "modifiers.1.final_sparsity" in result.output and "less than 1" in result.output


def test_plan_text_json_and_plot(tmp_path):
    text = run("plan", "quickstart", "--steps-per-epoch", "63")
    assert text.exit_code == 0, text.output
    assert "step      63: sparsity  30.00%" in text.output
    data = json.loads(run("plan", "quickstart", "--steps-per-epoch", "63", "--json").output)
    (stage,) = data["stages"]
    gmp = next(m for m in stage["modifiers"] if m["type"] == "gmp")
    assert gmp["pruning"][0] == {"step": 63, "sparsity": 0.3}
    assert gmp["pruning"][-1]["sparsity"] == 0.8
    png = tmp_path / "new" / "folder" / "plan.png"  # missing folders are created
    assert run("plan", "quickstart", "--steps-per-epoch", "63", "--plot", str(png)).exit_code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = run("plan", "quickstart", "--steps-per-epoch", "63", "--plot", str(tmp_path / "plan.txt"))
    assert (
        bad.exit_code == 2
        and ".txt is not an image format" in bad.output
        and "Traceback" not in bad.output
    )


def test_examples_in_the_cli_help_name_bundled_recipes_that_exist():
    import re

    from recipec.recipe.load import resolve_recipe_path

    texts = [
        run(*cmd, "--help").output
        for cmd in ((), ("validate",), ("plan",), ("apply",), ("convert",))
    ]
    named = {m for text in texts for m in re.findall(r"recipes/([\w.-]+)\.yaml", text)}
    assert named, "the help shows no recipe example"
    for name in sorted(named):
        assert resolve_recipe_path(name).is_file(), (
            f"help names recipes/{name}.yaml, which is not bundled"
        )


def test_plan_needs_steps_per_epoch_for_epoch_recipes():
    result = run("plan", "quickstart")
    assert result.exit_code == 2 and "--steps-per-epoch" in result.output


def test_plan_text_shows_warm_up_peak_one_shot_stages_and_grouped_tensors(tiny_model_dir):
    text = run("plan", "cram_plus", "--steps-per-epoch", "50")
    assert text.exit_code == 0, text.output
    assert (
        "lr: step 0: 9.09e-06, step 10: 0.0001, step 99: 1.11e-06" in text.output
    )  # the peak after warm-up
    assert "[0] gmp      steps 0..0  unstructured, global, one-shot at step 0" in text.output
    assert "cram_plus, rho 0.02 (normalized), sparsities 0.5/0.6/0.7/0.8" in text.output
    model = run("plan", "quickstart", "--steps-per-epoch", "10", "--model", str(tiny_model_dir))
    assert model.exit_code == 0, model.output
    # 2 layers x 6 tensors: one line per tensor kind, layers grouped
    assert "    bert.encoder.layer.{0-1}.attention.self.query.weight [" in model.output
    assert "layer.0.attention" not in model.output and "12 target tensors" in model.output


def test_grouped_tensor_names():
    from recipec.cli.plan import _grouped_tensors

    got = _grouped_tensors(
        {"a.0.w": (2,), "a.1.w": (2,), "a.3.w": (2,), "a.4.w": (5,), "b.w": (1,), "c.7.x": (3,)}
    )
    assert got == ["a.{0-1,3}.w [2]", "a.4.w [5]", "b.w [1]", "c.7.x [3]"]

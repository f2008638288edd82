"""`recipec apply` end to end on a tiny saved BERT and the built-in task (fast), plus faults."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from recipec.cli import main

TINY_RECIPE = """\
training: {epochs: 3, batch_size: 16, learning_rate: 1e-3, max_seq_length: 32, seed: 1, eval_every_epochs: 1}
modifiers:
  - {type: gmp, init_sparsity: 0.3, final_sparsity: 0.8, start_epoch: 1, end_epoch: 2, update_every_steps: 2}
  - {type: lr, schedule: cyclic_linear, init_lr: 1e-3, final_lr: 1e-4, cycle_steps: 2, start_epoch: 1, end_epoch: 2}
  - {type: lr, schedule: linear, init_lr: 1e-3, final_lr: 0, start_epoch: 2}
"""


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE)
    return path


def apply(*args):
    return CliRunner().invoke(main, ["apply", *map(str, args), "--quiet"])


def test_apply_writes_a_sparse_checkpoint_and_report(recipe_file, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = apply(
        recipe_file,
        "--model",
        tiny_model_dir,
        "--max-train",
        160,
        "--max-eval",
        64,
        "--output",
        out,
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    masks = load_file(str(out / "model" / "masks.safetensors"))
    weights = load_file(str(out / "model" / "model.safetensors"))
    assert len(masks) == 12  # 2 layers x (Q, K, V, attn out, FFN in, FFN out)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert total - kept == round(0.8 * total)  # exact count on the targeted tensors
    for name, mask in masks.items():
        assert torch.equal(weights[name] == 0, mask == 0), name  # exact zeros where pruned
    untouched = [n for n in weights if "embeddings" in n or "classifier" in n or "pooler" in n]
    assert untouched and all(float((weights[n] == 0).float().mean()) < 0.01 for n in untouched)
    assert report["sparsity"]["targets"] == (total - kept) / total
    pruning = report["stages"][0]["pruning"]
    assert [h["step"] for h in pruning] == [10, 12, 14, 16, 18, 20]
    assert [round(h["achieved"] * total) for h in pruning] == [
        round(h["target"] * total) for h in pruning
    ]
    for name in (
        "report.md",
        "sparsity_lr.png",
        "eval.png",
        "layer_sparsity.png",
        "recipe.yaml",
        "metrics.jsonl",
    ):
        assert (out / name).is_file(), name
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 31))
    # Everything in the run folder is something recipec writes there (what --overwrite may delete).
    from recipec.outputs import RUN, foreign_entries

    assert foreign_entries(out, RUN.rule) == []
    # The folder loads as a plain HF model.
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(out / "model")


def test_existing_output_is_not_overwritten(recipe_file, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = apply(recipe_file, "--model", tiny_model_dir, "--output", out)
    assert result.exit_code == 2 and "--resume" in result.output
    assert (out / "keep.txt").read_text() == "precious"


def test_overwrite_replaces_only_a_recipec_run(recipe_file, tiny_model_dir, tmp_path):
    """--overwrite refuses a folder recipec did not write, and one that holds an input of the run."""
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("data")
    result = apply(
        recipe_file, "--model", tiny_model_dir, "--max-train", 32, "--output", out, "--overwrite"
    )
    assert result.exit_code == 2 and "not a recipec run" in result.output, result.output
    assert (out / "thesis.txt").read_text() == "data"

    run = tmp_path / "run"
    result = apply(
        recipe_file, "--model", tiny_model_dir, "--max-train", 32, "--max-eval", 16, "--output", run
    )
    assert result.exit_code == 0, result.output
    # --model inside the run that --overwrite would delete: refused, the run kept whole.
    result = apply(
        recipe_file, "--model", run / "model", "--max-train", 32, "--output", run, "--overwrite"
    )
    assert result.exit_code == 2 and f"--model {run / 'model'} is inside {run}" in result.output, (
        result.output
    )
    assert (run / "model" / "config.json").is_file() and (run / "report.json").is_file()
    # A recipec run with its inputs elsewhere is replaced.
    result = apply(
        recipe_file,
        "--model",
        tiny_model_dir,
        "--max-train",
        32,
        "--max-eval",
        16,
        "--output",
        run,
        "--overwrite",
    )
    assert result.exit_code == 0, result.output
    result = apply(
        recipe_file, "--model", tiny_model_dir, "--output", run, "--overwrite", "--resume"
    )
    assert result.exit_code == 2 and "pass one of them" in result.output


@pytest.mark.parametrize(
    "bad",
    [
        ["--data", "/nonexistent/folder"],
        ["--model", "/nonexistent/model"],
        ["--teacher", "/nonexistent/teacher"],
    ],
)
def test_a_bad_input_leaves_no_output_folder_behind(recipe_file, tiny_model_dir, tmp_path, bad):
    """Inputs are checked before the output folder exists, so the corrected command just runs."""
    out = tmp_path / "run"
    recipe = tmp_path / "kd.yaml"
    recipe.write_text(TINY_RECIPE + "  - {type: distill, teacher: auto, teacher_epochs: 1}\n")
    base = ["--max-train", 32, "--max-eval", 16, "--output", out]
    model = [] if bad[0] == "--model" else ["--model", tiny_model_dir]
    result = apply(recipe, *model, *bad, *base)
    assert result.exit_code == 2 and bad[1] in result.output, result.output
    assert "Traceback" not in result.output and "Repo id" not in result.output
    assert not out.exists()
    result = apply(recipe_file, "--model", tiny_model_dir, *base)
    assert result.exit_code == 0, result.output


def test_a_run_that_failed_before_training_is_replaced_without_overwrite(
    recipe_file, tiny_model_dir, tmp_path
):
    """A compile error (a teacher without a trained head) comes after the folder is created; the
    fixed command reuses the folder. Targets that match nothing fail before it exists."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    out = tmp_path / "run"
    base = ["--model", tiny_model_dir, "--max-train", 32, "--max-eval", 16, "--output", out]
    result = apply(recipe_file, *base, "--set", "targets=['nomatch']")
    assert result.exit_code == 2 and "match no parameter" in result.output, result.output
    assert not out.exists()
    headless = tmp_path / "headless"
    BertForSequenceClassification.from_pretrained(tiny_model_dir).bert.save_pretrained(headless)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(headless)
    kd = tmp_path / "kd.yaml"
    kd.write_text(recipe_file.read_text() + "  - {type: distill, hardness: 0.5}\n")
    result = apply(kd, *base, "--teacher", headless)
    assert result.exit_code == 2 and (out / "run.json").is_file(), result.output
    result = CliRunner().invoke(main, ["apply", str(recipe_file), *map(str, base)])
    assert result.exit_code == 0, result.output
    assert "stopped before training anything" in result.output
    # Once it trained, the folder is kept again.
    result = apply(recipe_file, *base)
    assert result.exit_code == 2 and "--resume" in result.output


def test_a_new_task_head_is_seeded_so_the_same_command_repeats(
    recipe_file, tiny_model_dir, tmp_path
):
    """A base model without a classification head gets a random one: seeded by the recipe's seed
    (torch seeds its default generator differently in every process, and a run in this process
    has consumed it), so two runs of one command train the same model."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    headless = tmp_path / "headless"
    BertForSequenceClassification.from_pretrained(tiny_model_dir).bert.save_pretrained(headless)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(headless)
    weights = []
    for name in ("a", "b"):
        torch.manual_seed(len(weights) + 123)  # a different global RNG state before each run
        result = apply(
            recipe_file,
            "--model",
            headless,
            "--max-train",
            64,
            "--max-eval",
            16,
            "--output",
            tmp_path / name,
        )
        assert result.exit_code == 0, result.output
        weights.append(load_file(str(tmp_path / name / "model" / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys() and any("classifier" in k for k in weights[0])
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_a_teacher_without_a_trained_task_head_is_refused(recipe_file, tiny_model_dir, tmp_path):
    """A base model as --teacher would get a random head and distil noise: refused, with the way out."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    headless = tmp_path / "headless"
    BertForSequenceClassification.from_pretrained(tiny_model_dir).bert.save_pretrained(headless)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(headless)
    recipe = tmp_path / "kd.yaml"
    recipe.write_text(
        recipe_file.read_text()
        + "  - {type: distill, teacher: auto, hardness: 0.5, temperature: 2.0}\n"
    )
    result = apply(
        recipe,
        "--model",
        tiny_model_dir,
        "--teacher",
        headless,
        "--max-train",
        32,
        "--max-eval",
        16,
        "--output",
        tmp_path / "run",
    )
    assert result.exit_code == 2, result.output
    assert "has no trained task head" in result.output and "--teacher auto" in result.output
    # a fine-tuned classifier (it has the head) is accepted
    result = apply(
        recipe,
        "--model",
        tiny_model_dir,
        "--teacher",
        tiny_model_dir,
        "--max-train",
        32,
        "--max-eval",
        16,
        "--output",
        tmp_path / "ok",
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "lines, fresh",
    [
        (None, True),
        ([], True),
        (
            ['{"stage": "loss-sweep", "step": 0, "eval_accuracy": 0.5}'],
            True,
        ),  # "loss" only inside a value
        (['{"stage": "main", "step": 1, "loss": 0.7, "lr": 1e-3}'], False),
        (["my own notes"], False),
    ],
)
def test_never_trained_reads_the_metrics_records(tmp_path, lines, fresh):
    from recipec.train.run import _never_trained

    (tmp_path / "run.json").write_text("{}")
    if lines is not None:
        (tmp_path / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    assert _never_trained(tmp_path) is fresh


def test_a_failed_start_with_the_users_files_is_not_reused(recipe_file, tiny_model_dir, tmp_path):
    """A run that stopped before training (a headless teacher: refused after the folder
    exists) is reused only while it holds nothing but recipec's files."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    out = tmp_path / "run"
    base = ["--model", tiny_model_dir, "--max-train", 32, "--max-eval", 16, "--output", out]
    headless = tmp_path / "headless"
    BertForSequenceClassification.from_pretrained(tiny_model_dir).bert.save_pretrained(headless)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(headless)
    kd = tmp_path / "kd.yaml"
    kd.write_text(recipe_file.read_text() + "  - {type: distill, hardness: 0.5}\n")
    assert apply(kd, *base, "--teacher", headless).exit_code == 2
    assert (out / "run.json").is_file()
    (out / "notes.txt").write_text("mine")
    result = apply(recipe_file, *base)
    assert result.exit_code == 2 and "exists and is not empty" in result.output
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_the_current_folder_a_symlink_and_a_task_path_inside(
    recipe_file, tiny_model_dir, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    base = ["--model", tiny_model_dir, "--max-train", 32, "--max-eval", 16]
    assert apply(recipe_file, *base, "--output", run).exit_code == 0
    monkeypatch.chdir(run / "model")
    result = apply(recipe_file, *base, "--output", run, "--overwrite")
    assert result.exit_code == 2 and "is the current folder or holds it" in result.output
    monkeypatch.chdir(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(run, target_is_directory=True)
    result = apply(recipe_file, *base, "--output", link, "--overwrite")
    assert result.exit_code == 2 and "is a symbolic link" in result.output
    data = run / "data"
    data.mkdir()
    (data / "train.tsv").write_text("sentence\tlabel\ngood\t1\n")
    result = apply(recipe_file, *base, "--task", data, "--output", run, "--overwrite")
    assert result.exit_code == 2 and f"--task {data} is inside {run}" in result.output
    assert (run / "report.json").is_file() and (data / "train.tsv").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "no-such-task"], "unknown task"),
        (["--data", "/nonexistent/folder"], "/nonexistent/folder"),
        (["--model", "/nonexistent/model"], "/nonexistent/model"),
        (["--set", "targets=['nomatch']"], "match no parameter"),
        (["--set", "modifiers.0.structure=block5"], "divisible by 5"),
        (["--set", "targets=['embeddings']"], "1-D tensor"),
    ],
)
def test_bad_input_gives_one_clear_error(recipe_file, tiny_model_dir, tmp_path, args, message):
    base = ["--model", tiny_model_dir] if "--model" not in args else []
    result = apply(recipe_file, *base, *args, "--max-train", 32, "--output", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert message.lower() in result.output.lower()
    assert "Traceback" not in result.output


def test_ill_formed_data_file(recipe_file, tiny_model_dir, tmp_path):
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\ngood stuff\t1\nbad row without label\n")
    result = apply(
        recipe_file,
        "--model",
        tiny_model_dir,
        "--data",
        train,
        "--data",
        train,
        "--output",
        tmp_path / "r",
    )
    assert result.exit_code == 2 and "train.tsv:3" in result.output


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(
    tmp_path, tiny_model_dir, monkeypatch
):
    from recipec.train import loop

    real = loop.StageRunner.run

    def poisoned(self, checkpoint=None):
        model = self.data.model
        calls = {"n": 0}
        original = model.forward

        def forward(*a, **k):
            out = original(*a, **k)
            calls["n"] += 1
            if calls["n"] > 7:  # from the 8th training forward on (step index 7)
                out.loss = out.loss * float("nan")
            return out

        model.forward = forward
        return real(self, checkpoint)

    monkeypatch.setattr(loop.StageRunner, "run", poisoned)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_RECIPE)
    result = CliRunner().invoke(
        main,
        [
            "apply",
            str(recipe),
            "--model",
            str(tiny_model_dir),
            "--max-train",
            160,
            "--output",
            str(tmp_path / "run"),
            "--checkpoint-every",
            "5",
            "--quiet",
            "--set",
            "training.eval_every_epochs=100",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "at step 7" in result.output and "nan" in result.output.lower()
    latest = (tmp_path / "run" / "checkpoints" / "00-main" / "latest").read_text().strip()
    assert latest == "main-step-00000005"


def _run_cli(args, env):
    return subprocess.Popen(
        [sys.executable, "-c", "from recipec.cli import main; main()", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )


def test_sigkill_then_resume_is_bit_identical(recipe_file, tiny_model_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    common = [
        recipe_file,
        "--model",
        tiny_model_dir,
        "--max-train",
        160,
        "--max-eval",
        32,
        "--checkpoint-every",
        3,
        "--quiet",
    ]
    ref = _run_cli(["apply", *common, "--output", tmp_path / "ref"], env)
    assert ref.wait(timeout=600) == 0, ref.stdout.read().decode()

    kill_at = random.Random().randint(4, 26)
    print(f"killing at step >= {kill_at}")
    proc = _run_cli(["apply", *common, "--output", tmp_path / "cut"], env)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists():
            steps = [
                json.loads(x).get("step", 0) for x in metrics.read_text().splitlines() if x.strip()
            ]
            if steps and max(steps) >= kill_at:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = _run_cli(["apply", *common, "--output", tmp_path / "cut", "--resume"], env)
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read().decode()

    a = load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ma = load_file(str(tmp_path / "ref" / "model" / "masks.safetensors"))
    mb = load_file(str(tmp_path / "cut" / "model" / "masks.safetensors"))
    assert all(torch.equal(ma[n], mb[n]) for n in ma)
    # The report says the wall time is the last session's, and gives the training time of all.
    report = json.loads((tmp_path / "cut" / "report.json").read_text())
    training = sum(stage["seconds"] for stage in report["stages"])
    assert (
        report["resumed"]
        and f"the stages trained {training:.1f} s over all sessions"
        in (tmp_path / "cut" / "report.md").read_text()
    )
    assert "resumed" not in (tmp_path / "ref" / "report.md").read_text()


def test_every_message_is_printed_once_and_only_the_result_on_stdout(
    recipe_file, tiny_model_dir, tmp_path
):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    args = [*("apply", recipe_file, "--model", tiny_model_dir, "--max-train", 160)]
    args += ["--max-eval", 32, "--output", tmp_path / "run"]
    proc = subprocess.run(
        [sys.executable, "-c", "from recipec.cli import main; main()", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    out, err = proc.stdout.splitlines(), proc.stderr.splitlines()
    assert [line.split(":")[0] for line in out] == ["done", "report"]
    assert not set(out) & set(err)
    lines = [line for line in err if line.strip()]
    assert len(lines) == len(set(lines)), [x for x in lines if lines.count(x) > 1]
    # not a terminal: plain lines (no bar redrawn at the end), one per stage end, not wrapped
    assert not any("━" in line for line in lines)
    assert sum(line.startswith("main: step 30/30 ") for line in lines) == 1
    assert any(
        line.startswith("[data] classification, 2 classes") and "eval {" in line for line in lines
    )
    # each evaluation on the console (epochs 1, 2, 3)
    evals = [line.split(":")[0] for line in lines if ": eval accuracy " in line]
    assert evals == [
        f"stage 'main' step {s}/30 (epoch {e})" for s, e in ((10, 1), (20, 2), (30, 3))
    ]


@pytest.mark.parametrize("keep", ["last", "2", "all"])
def test_a_finished_run_keeps_its_last_checkpoint_unless_asked_for_more(
    recipe_file, tiny_model_dir, tmp_path, keep
):
    out = tmp_path / "run"
    base = [recipe_file, "--model", tiny_model_dir, "--max-train", 160, "--max-eval", 32]
    base += ["--output", out, "--checkpoint-every", 3, "--keep-checkpoints", keep]
    assert apply(*base).exit_code == 0
    root = out / "checkpoints" / "00-main"
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    steps = {"all": range(3, 31, 3), "2": [27, 30], "last": [30]}[keep]
    assert folders == [f"main-step-{s:08d}" for s in steps]
    assert (root / "latest").read_text().strip() == "main-step-00000030"
    from recipec.train import resume

    state = resume.verify_checkpoint(root / "main-step-00000030")
    assert state["complete"] and state["step"] == 30
    before = load_file(str(out / "model" / "model.safetensors"))
    resumed = apply(*base, "--resume")  # a finished run resumes from what is left
    assert resumed.exit_code == 0, resumed.output
    after = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.equal(before[n], after[n]) for n in before)

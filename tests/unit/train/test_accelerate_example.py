"""examples/accelerate_loop.py: the Program's hooks in a Hugging Face accelerate loop, run as a
script (one process; two CPU processes under ``accelerate launch`` in the slow test)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate", reason="the example needs accelerate (a recipec dependency)")

import recipec  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "examples" / "accelerate_loop.py"


def _example():
    spec = importlib.util.spec_from_file_location("accelerate_loop", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(command: list[str], output: Path) -> dict:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    env.setdefault("OMP_NUM_THREADS", "1")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr[-4000:]}"
    return json.loads((output / "result.json").read_text())


def _plain_loop(example, accumulate: int):
    """The same stage in the contract's plain loop: groups of ``accumulate`` batches, each loss
    divided by ``accumulate`` (as ``accelerator.backward`` does), mask, clip to 1.0, step."""
    model, teacher = example.tiny_bert(0), example.tiny_bert(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    batches = list(torch.utils.data.DataLoader(example.dataset(), batch_size=example.BATCH_SIZE))
    spe = math.ceil(len(batches) / accumulate)
    recipe = recipec.load_recipe_text(example.RECIPE)
    program = recipec.compile(recipe, model, optimizer, steps_per_epoch=spe, teacher=teacher)
    model.train()
    step = 0
    while step < program.plan.total_steps:
        for start in range(0, len(batches), accumulate):
            program.step_start(step)
            for batch in batches[start : start + accumulate]:
                outputs = model(**batch)
                loss = program.loss(outputs.loss, batch=batch, outputs=outputs)
                (loss / accumulate).backward()
            program.before_optimizer_step(step)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            program.after_optimizer_step(step)
            step += 1
    program.finalize()
    return model, program


def _assert_masks_exact(weights: dict, masks: dict) -> None:
    assert len(masks) == 12  # Q, K, V, attention output, FFN in and out of 2 layers
    for name, mask in masks.items():
        assert not bool((weights[name][~mask] != 0).any()), name


def _documented(first: str, output: Path) -> list[str]:
    """The command of docs/frameworks.md's bash blocks that starts with ``first``, writing to
    ``output``."""
    doc = (ROOT / "docs" / "frameworks.md").read_text(encoding="utf-8")
    lines = [
        line.strip()
        for b in re.findall(r"```bash\n(.*?)```", doc, flags=re.DOTALL)
        for line in b.splitlines()
    ]
    (line,) = [c for c in lines if c.startswith(first + " ")]
    args = shlex.split(line)
    args[args.index("--output") + 1] = str(output)
    return args


def test_the_accelerate_example_equals_the_plain_loop(tmp_path):
    output = tmp_path / "run"
    command = _documented("python examples/accelerate_loop.py", output)
    assert command[1:3] == ["examples/accelerate_loop.py", "--output"]
    result = _run([sys.executable, *command[1:]], output)
    assert result["processes"] == 1 and result["steps"] == 24  # 12 batches / 2 per step x 4
    assert result["pruning_steps"] == result["planned_pruning_steps"] == [6, 12, 18]
    assert result["sparsity"] == pytest.approx(0.8, abs=1e-3)
    weights = torch.load(output / "model.pt", weights_only=True)
    masks = torch.load(output / "masks-rank0.pt", weights_only=True)
    _assert_masks_exact(weights, masks)
    # accelerator.save_state holds the Program's state (register_for_checkpointing).
    saved = torch.load(output / "state" / "custom_checkpoint_0.pkl", weights_only=True)
    assert saved["step"] == 23 and saved["finalized"]
    assert all(torch.equal(saved["masks"][name], mask) for name, mask in masks.items())

    ref_model, ref_program = _plain_loop(_example(), accumulate=2)
    assert set(masks) == set(ref_program.masks.masks)
    for name, mask in ref_program.masks.masks.items():
        assert torch.equal(masks[name], mask), name
    for name, p in ref_model.state_dict().items():
        torch.testing.assert_close(weights[name], p, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_the_accelerate_example_under_accelerate_launch_with_two_cpu_processes(tmp_path):
    launcher = shutil.which("accelerate")
    if launcher is None:
        pytest.skip("the accelerate command is not on PATH")
    output = tmp_path / "ddp"
    command = _documented("accelerate launch", output)
    assert command[command.index("--num_processes") + 1] == "2" and "--cpu" in command
    result = _run([launcher, *command[1:]], output)
    # Each process takes every other batch: 6 per epoch, 3 optimizer steps of 2.
    assert result["processes"] == 2 and result["steps_per_epoch"] == 3 and result["steps"] == 12
    assert result["pruning_steps"] == result["planned_pruning_steps"] == [3, 6, 9]
    assert result["sparsity"] == pytest.approx(0.8, abs=1e-3)
    masks = [torch.load(output / f"masks-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert masks[0].keys() == masks[1].keys()
    for name in masks[0]:
        assert torch.equal(masks[0][name], masks[1][name]), name
    _assert_masks_exact(torch.load(output / "model.pt", weights_only=True), masks[0])

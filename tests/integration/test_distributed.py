"""`recipec apply` under torchrun: 2 CPU processes (gloo) against a single-process run.

One recipe exercises everything the distributed driver must keep identical: GMP on the
attention Q/K/V weights, oBERT (all-reduced Fisher gradients, unequal shards: grad batches of 5
over 2 ranks) on the other encoder linears, distillation from a `teacher: auto` fine-tuned under
DDP, and global batches of 15 (shards of 8 + 7). The distributed run is killed (rank 1 SIGKILLs
itself mid-run), must fail promptly with torchrun's failure summary, and `--resume` must finish
it; the result must match the single-process run within float tolerance (dynamic padding
differs per shard) and be bit-identical across ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

# damp 1e-2: with m=8 gradients for blocks of 16 the Fisher is rank-deficient, and the published
# damp (1e-7, meant for m=1024 >> B) would turn float noise into different near-tie decisions.
RECIPE = r"""
training: {epochs: 2, batch_size: 15, learning_rate: 1e-3, max_seq_length: 32, seed: 3, eval_every_epochs: 1}
modifiers:
  - {type: gmp, targets: ['attention\.self\.(query|key|value)\.weight$'], init_sparsity: 0.3, final_sparsity: 0.8,
     start_epoch: 1, end_epoch: 1.5, update_every_steps: 2}
  - {type: obert, targets: ['(intermediate|output)\.dense\.weight$'], init_sparsity: 0.5, final_sparsity: 0.7,
     start_epoch: 1, end_epoch: 1.5, update_every_steps: 2, num_grads: 8, grad_batch_size: 5, fisher_block_size: 16,
     damp: 1e-2}
  - {type: distill, teacher: auto, hardness: 0.5, temperature: 2.0, teacher_epochs: 1}
"""

# Wraps StageRunner.run: optionally SIGKILLs rank 1 after a given step of stage "main", and dumps
# every rank's final masks and weights so the test can compare ranks bit for bit.
HARNESS = r"""
import os, signal, sys
import torch
from recipec.train import loop
from recipec import distributed as dist_utils

real = loop.StageRunner.run
dump = os.environ["RECIPEC_TEST_DUMP"]
kill_at = int(os.environ.get("RECIPEC_TEST_KILL_RANK1_AT", "0"))

def run(self, checkpoint=None):
    on_step = self.on_step

    def hook(step, record):
        if on_step:
            on_step(step, record)
        if kill_at and step == kill_at and self.plan.name == "main" and dist_utils.rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    self.on_step = hook
    result = real(self, checkpoint)
    if self.log_sparsity and result.final_eval is not None:
        state = {k: v.detach().clone() for k, v in self.data.model.state_dict().items()}
        torch.save({"masks": self.program.masks.state_dict(), "weights": state},
                   os.path.join(dump, f"rank{dist_utils.rank()}.pt"))
    return result

loop.StageRunner.run = run
from recipec.cli import main
main()
"""

KILL_AT = 13  # after pruning steps 10 and 12; checkpoints every 3 steps -> resume from step 12


@pytest.fixture
def tiny_dropout_free_dir(tmp_path, save_tiny_bert):
    """A tiny random BERT with dropout off (dropout streams differ per rank by design)."""
    return save_tiny_bert(tmp_path / "tiny", head=True)


def _setup(tmp_path, recipe_text: str):
    """The recipe and harness files, and an environment without any launcher variables."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text)
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        RECIPEC_DIST_TIMEOUT="120",
    )
    return recipe, harness, env


def _assert_same_model(single_run, dist_run, atol: float = 1e-5) -> None:
    """The distributed run's model equals the single process's within float tolerance."""
    single = load_file(str(single_run / "model" / "model.safetensors"))
    dist = load_file(str(dist_run / "model" / "model.safetensors"))
    masks_single = load_file(str(single_run / "model" / "masks.safetensors"))
    masks_dist = load_file(str(dist_run / "model" / "masks.safetensors"))
    assert masks_single.keys() == masks_dist.keys()
    total = sum(m.numel() for m in masks_single.values())
    differ = sum(int((masks_single[n] != masks_dist[n]).sum()) for n in masks_single)
    # Near-ties in a ranking may flip under float noise; none do here, allow a handful elsewhere.
    assert differ <= total * 1e-3, f"{differ} of {total} mask entries differ"
    for name in single:
        both = torch.ones_like(single[name], dtype=torch.bool)
        if name in masks_single:
            both = masks_single[name].bool() == masks_dist[name].bool()
        assert torch.allclose(single[name][both], dist[name][both], atol=atol, rtol=1e-4), name
    for name, mask in masks_dist.items():
        assert torch.equal(dist[name] == 0, mask == 0), name  # exact zeros where pruned


def _single_and_two_ranks(tmp_path, harness, common, env) -> dict[str, Path]:
    """The harness run as one process and under torchrun with 2 ranks (run folders "single" and
    "dist"), after checking that both ranks ended with the same weights."""
    runs = {}
    for name, world in (("single", None), ("dist", 2)):
        dump = tmp_path / f"dump-{name}"
        dump.mkdir()
        rc, out, _ = _launch(
            [harness, *common, "--output", tmp_path / name],
            world=world,
            env=dict(env, RECIPEC_TEST_DUMP=str(dump)),
        )
        assert rc == 0, out
        runs[name] = tmp_path / name
    r0, r1 = (torch.load(tmp_path / "dump-dist" / f"rank{r}.pt") for r in (0, 1))
    for name in r0["weights"]:
        assert torch.equal(r0["weights"][name], r1["weights"][name]), name
    return runs


def _launch(args, *, env, world: int | None, timeout: float = 600) -> tuple[int, str, float]:
    cmd = [sys.executable]
    if world is not None:
        cmd += [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes",
            "1",
            "--nproc_per_node",
            str(world),
        ]
    cmd += [*map(str, args)]
    started = time.time()
    proc = subprocess.run(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, timeout=timeout
    )
    return proc.returncode, proc.stdout.decode(errors="replace"), time.time() - started


def test_two_gloo_ranks_match_one_process_and_survive_a_killed_rank(
    tmp_path, tiny_dropout_free_dir
):
    recipe, harness, base_env = _setup(tmp_path, RECIPE)
    common = [
        "apply",
        recipe,
        "--model",
        tiny_dropout_free_dir,
        "--max-train",
        143,
        "--max-eval",
        37,
        "--checkpoint-every",
        3,
        "--quiet",
    ]

    def env_for(name: str, **extra: str) -> dict[str, str]:
        dump = tmp_path / f"dump-{name}"
        dump.mkdir(exist_ok=True)
        return dict(
            base_env,
            RECIPEC_TEST_DUMP=str(dump),
            RECIPEC_CACHE=str(tmp_path / f"cache-{name}"),
            **extra,
        )

    # Reference: one process, same global batches.
    rc, out, _ = _launch(
        [harness, *common, "--output", tmp_path / "single"], env=env_for("single"), world=None
    )
    assert rc == 0, out

    # Two ranks; rank 1 dies mid-run: the job fails promptly and says which rank and why.
    cut = tmp_path / "dist"
    rc, out, seconds = _launch(
        [harness, *common, "--output", cut],
        world=2,
        env=env_for("dist", RECIPEC_TEST_KILL_RANK1_AT=str(KILL_AT)),
    )
    assert rc != 0, out
    assert "SIGKILL" in out or "Signal 9" in out, (
        out
    )  # torchrun's summary: which rank, which signal
    assert "local_rank: 1" in out, out
    assert seconds < 300, f"the surviving rank hung for {seconds:.0f} s"
    assert (cut / "checkpoints" / "00-main" / "latest").read_text().strip() == "main-step-00000012"
    assert not (cut / "model").exists()

    # --resume with the same world size finishes the run.
    rc, out, _ = _launch(
        [harness, *common, "--output", cut, "--resume"], env=env_for("dist"), world=2
    )
    assert rc == 0, out
    assert "done:" in out and out.count("done:") == 1, out  # only rank 0 prints

    # Bit-identical across ranks: masks and every weight.
    r0 = torch.load(tmp_path / "dump-dist" / "rank0.pt")
    r1 = torch.load(tmp_path / "dump-dist" / "rank1.pt")
    assert r0["masks"].keys() == r1["masks"].keys() and len(r0["masks"]) == 12
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
    for name in r0["weights"]:
        assert torch.equal(r0["weights"][name], r1["weights"][name]), name

    # Equal to the single-process run within float tolerance.
    _assert_same_model(tmp_path / "single", cut)

    # Metrics: global-batch loss each step, same eval, same pruning history.
    def losses(folder):
        lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        return [(r["stage"], r["step"], r["loss"]) for r in lines if "loss" in r]

    ls, ld = losses(tmp_path / "single"), losses(cut)
    assert [x[:2] for x in ls] == [x[:2] for x in ld]  # no duplicates or gaps after the resume
    assert all(abs(a[2] - b[2]) < 1e-4 for a, b in zip(ls, ld))
    rs = json.loads((tmp_path / "single" / "report.json").read_text())
    rd = json.loads((cut / "report.json").read_text())
    assert rd["final_eval"]["accuracy"] == pytest.approx(rs["final_eval"]["accuracy"])
    assert rd["sparsity"]["targets"] == pytest.approx(rs["sparsity"]["targets"])
    assert [h["step"] for h in rd["stages"][0]["pruning"]] == [
        h["step"] for h in rs["stages"][0]["pruning"]
    ]


# CrAM+ under DDP (its second pass all-reduced, shards of 8 + 7 weighted by their share), then a
# prune-only stage: one-shot oBERT with all-reduced gradients.
CRAM_RECIPE = r"""
training: {batch_size: 15, learning_rate: 1e-3, max_seq_length: 32, seed: 3}
stages:
  - name: cram
    training: {epochs: 2}
    modifiers:
      - {type: cram, sparsities: [0.5, 0.7], rho: 0.05, scope: global}
  - name: prune
    training: {steps: 0}
    modifiers:
      - {type: obert, init_sparsity: 0.6, final_sparsity: 0.6, num_grads: 8, grad_batch_size: 5,
         fisher_block_size: 16, damp: 1e-2}
"""


def test_cram_then_a_prune_only_stage_under_two_ranks_match_one_process(
    tmp_path, tiny_dropout_free_dir
):
    recipe, harness, env = _setup(tmp_path, CRAM_RECIPE)
    common = [
        "apply",
        recipe,
        "--model",
        tiny_dropout_free_dir,
        "--max-train",
        143,
        "--max-eval",
        37,
        "--quiet",
    ]
    runs = _single_and_two_ranks(tmp_path, harness, common, env)
    _assert_same_model(runs["single"], runs["dist"])
    reports = [json.loads((runs[n] / "report.json").read_text()) for n in ("single", "dist")]
    assert [s["steps"] for s in reports[1]["stages"]] == [
        20,
        0,
    ]  # 143 examples / 15 = 10 steps per epoch
    assert reports[1]["stages"][1]["eval_before_pruning"]["accuracy"] == pytest.approx(
        reports[0]["stages"][1]["eval_before_pruning"]["accuracy"]
    )


# The Hugging Face Trainer under torchrun (its own DDP through accelerate, gloo on CPU) with a
# CrAM recipe: every global batch is the whole training set (16 examples: 8 per step, in order),
# so one process with batch 8 and two ranks with batch 4 see the same examples at every step.
HF_CRAM_SCRIPT = r"""
import os, sys
import torch, yaml
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
import recipec
from recipec.recipe.load import load_recipe_text
from recipec.train.hf import RecipecTrainer

out = sys.argv[1]
world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
torch.manual_seed(0)
config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                    max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
model = BertForSequenceClassification(config)
g = torch.Generator().manual_seed(11)
data = [{"input_ids": torch.randint(0, 64, (10,), generator=g), "attention_mask": torch.ones(10, dtype=torch.long),
         "labels": torch.randint(0, 2, (), generator=g)} for _ in range(16)]
first = ({"type": "gmp", "init_sparsity": 0.3, "final_sparsity": 0.6, "start_step": 1, "end_step": 3,
          "update_every_steps": 1} if os.environ.get("HF_TEST_GMP") else
         {"type": "cram", "sparsities": [0.5, 0.7], "rho": 0.05, "normalize": True})
recipe = load_recipe_text(yaml.safe_dump({"training": {"epochs": 2}, "modifiers": [
    first, {"type": "lr", "schedule": "linear", "init_lr": 1e-3, "final_lr": 0.0}]}))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
program = recipec.compile(recipe, model, optimizer, steps_per_epoch=2)
if os.environ.get("HF_TEST_CORRUPT") and rank == 1:  # one mask bit differs on rank 1 after step 1's pruning
    real_step_start = program.step_start

    def step_start(step):
        real_step_start(step)
        if step == 1:
            mask = next(iter(program.masks.masks.values())).view(-1)
            mask[0] = ~mask[0] if mask.dtype == torch.bool else 1 - mask[0]

    program.step_start = step_start
args = TrainingArguments(output_dir=os.path.join(out, "hf"), per_device_train_batch_size=8 // world,
                         num_train_epochs=2, max_grad_norm=0.05, weight_decay=0.0, report_to=[], save_strategy="no",
                         logging_strategy="no", disable_tqdm=True, use_cpu=True, train_sampling_strategy="sequential",
                         dataloader_num_workers=0, seed=0, ddp_backend="gloo" if world > 1 else None)
assert args.world_size == world
RecipecTrainer(model=model, args=args, train_dataset=data, program=program).train()
torch.save({"weights": model.state_dict(), "counts": getattr(program.modifiers[0], "counts", None),
            "masks": {k: v.clone() for k, v in program.masks.masks.items()}},
           os.path.join(out, f"world{world}-rank{rank}.pt"))
"""


def test_cram_through_the_hf_trainer_under_two_ranks_matches_one_process(tmp_path):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    script = tmp_path / "hf_cram.py"
    script.write_text(HF_CRAM_SCRIPT)
    _, _, env = _setup(tmp_path, "")
    for world in (None, 2):
        rc, out, _ = _launch([script, tmp_path], world=world, env=env, timeout=300)
        assert rc == 0, out
    single, r0, r1 = (
        torch.load(tmp_path / f"world{w}-rank{r}.pt") for w, r in ((1, 0), (2, 0), (2, 1))
    )
    assert single["counts"] == r0["counts"] == r1["counts"] and sum(single["counts"].values()) == 4
    for name, weight in single["weights"].items():
        assert torch.equal(r0["weights"][name], r1["weights"][name]), (
            name
        )  # the ranks agree bit for bit
        # ... and equal one process (without the all-reduce of CrAM's second pass they differ by ~5e-3)
        torch.testing.assert_close(r0["weights"][name], weight, rtol=1e-5, atol=1e-6, msg=name)


def test_the_hf_trainer_under_two_ranks_checks_that_masks_agree(tmp_path):
    """GMP through the Trainer under torchrun: the ranks' masks are compared after every pruning
    step; one flipped mask bit on rank 1 stops the run, naming the tensor."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    script = tmp_path / "hf_cram.py"
    script.write_text(HF_CRAM_SCRIPT)
    _, _, env = _setup(tmp_path, "")
    rc, out, _ = _launch([script, tmp_path], world=2, env=dict(env, HF_TEST_GMP="1"), timeout=300)
    assert rc == 0, out
    r0, r1 = (torch.load(tmp_path / f"world2-rank{r}.pt") for r in (0, 1))
    assert r0["masks"] and all(torch.equal(r0["masks"][n], r1["masks"][n]) for n in r0["masks"])
    rc, out, _ = _launch(
        [script, tmp_path],
        world=2,
        env=dict(env, HF_TEST_GMP="1", HF_TEST_CORRUPT="1"),
        timeout=300,
    )
    assert rc != 0
    assert "step 1 (after pruning): rank 0 and rank 1 hold different masks for" in out, out


# GMP to 80%, then QAT (calibration, observation, freeze) with distillation from a `teacher: auto`
# fine-tuned under DDP: the freeze merges the ranks' observed input ranges (the widest over the
# ranks), so the frozen scales, the int8 weights and the model match the single process. Until
# the freeze each rank quantizes with the range of the batches it saw itself, so those steps
# round a few inputs differently: measured max |weight diff| 6.5e-5 at LR 1e-3 (atol 2e-4 here).
QAT_RECIPE = r"""
training: {epochs: 3, batch_size: 15, learning_rate: 1e-3, max_seq_length: 32, seed: 3, eval_every_epochs: 1}
modifiers:
  - {type: gmp, init_sparsity: 0.3, final_sparsity: 0.8, start_epoch: 0.5, end_epoch: 1.5,
     update_every_steps: 2}
  - {type: quantize, start_epoch: 2, freeze_observers_at_epoch: 2.5, calibration_batches: 3}
  - {type: distill, teacher: auto, hardness: 0.5, temperature: 5.5, teacher_epochs: 1}
"""


def test_qat_with_distillation_under_two_ranks_matches_one_process(tmp_path, tiny_dropout_free_dir):
    recipe, harness, env = _setup(tmp_path, QAT_RECIPE)
    common = ["apply", recipe, "--model", tiny_dropout_free_dir, "--max-train", 143]
    common += ["--max-eval", 37, "--quiet"]
    runs = _single_and_two_ranks(tmp_path, harness, common, env)
    _assert_same_model(runs["single"], runs["dist"], atol=2e-4)
    quant = {
        n: json.loads((runs[n] / "model" / "quantization.json").read_text())["layers"] for n in runs
    }
    assert quant["single"].keys() == quant["dist"].keys() and len(quant["single"]) == 12
    for layer, entry in quant["single"].items():
        # the same examples observed (pad positions differ with each shard's dynamic padding)
        assert entry["input_scale"] == pytest.approx(
            quant["dist"][layer]["input_scale"], rel=2e-2
        ), layer
    reports = [json.loads((runs[n] / "report.json").read_text()) for n in runs]
    assert reports[1]["final_eval"]["accuracy"] == pytest.approx(
        reports[0]["final_eval"]["accuracy"], abs=1 / 37 + 1e-9
    )

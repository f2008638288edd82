"""Precision of `recipec apply` (--precision auto|fp32|bf16), the fused optimizer on CUDA only,
asynchronous copies and the prefetch thread: the logic, on CPU (torch.cuda mocked where needed).
"""

from __future__ import annotations

import json
import threading

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from recipec.cli import main
from recipec.sparsity.state import MaskState
from recipec.train import loop
from recipec.train.loop import (
    Precision,
    make_optimizer,
    prefetched,
    resolve_precision,
    to_device,
)

# ------------------------------------------------------------------------------------------
# Resolution
# ------------------------------------------------------------------------------------------


def fake_cuda(monkeypatch, bf16: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def test_auto_is_fp32_on_cpu():
    p = resolve_precision("auto", "cpu")
    assert (p.name, p.autocast, p.tf32, p.requested) == ("fp32", False, False, "auto")


def test_auto_is_bf16_and_tf32_on_a_cuda_device_with_bf16(monkeypatch):
    fake_cuda(monkeypatch, bf16=True)
    p = resolve_precision("auto", "cuda")
    assert (p.name, p.device_type, p.autocast, p.tf32) == ("bf16", "cuda", True, True)
    assert resolve_precision("auto", "cuda:1").device_type == "cuda"


def test_auto_is_fp32_on_a_cuda_device_without_bf16(monkeypatch):
    fake_cuda(monkeypatch, bf16=False)
    p = resolve_precision("auto", "cuda")
    assert (p.name, p.tf32) == ("fp32", False)
    with pytest.raises(ValueError, match="does not support bf16"):
        resolve_precision("bf16", "cuda")


def test_fp32_is_fp32_everywhere(monkeypatch):
    assert not resolve_precision("fp32", "cpu").autocast
    fake_cuda(monkeypatch, bf16=True)
    p = resolve_precision("fp32", "cuda")
    assert (p.name, p.autocast, p.tf32) == ("fp32", False, False)


def test_bf16_is_allowed_on_cpu_without_tf32():
    p = resolve_precision("bf16", "cpu")
    assert (p.name, p.device_type, p.autocast, p.tf32) == ("bf16", "cpu", True, False)


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        resolve_precision("fp16", "cpu")


def test_the_forward_context_autocasts_only_in_bf16():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with Precision("bf16", "cpu").forward():
        assert (a @ b).dtype == torch.bfloat16
    with Precision("fp32", "cpu").forward():
        assert (a @ b).dtype == torch.float32


def test_tf32_flags_are_set_inside_and_restored_after():
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32)
    with Precision("bf16", "cuda", "auto", tf32=True).matmuls():
        assert matmul.allow_tf32 and cudnn.allow_tf32
    assert (matmul.allow_tf32, cudnn.allow_tf32) == before
    with Precision("fp32", "cuda").matmuls():
        assert (matmul.allow_tf32, cudnn.allow_tf32) == before


def test_the_log_line_and_report_record_say_what_runs():
    bf16 = Precision("bf16", "cuda", "auto", tf32=True)
    assert "bf16 autocast" in bf16.describe() and "TF32" in bf16.describe()
    assert bf16.record() == {
        "requested": "auto",
        "used": "bf16",
        "device": "cuda",
        "autocast": "bf16: training forward and loss",
        "tf32": True,
    }
    assert resolve_precision("auto", "cpu").describe() == "fp32 (auto on cpu)"


# ------------------------------------------------------------------------------------------
# Fused AdamW on CUDA only
# ------------------------------------------------------------------------------------------


class RecordingAdamW:
    calls: list[dict] = []

    def __init__(self, groups, **kwargs):
        RecordingAdamW.calls.append(kwargs)
        self.param_groups = groups


@pytest.mark.parametrize(
    ("device", "fused"), [("cuda", True), ("cuda:0", True), ("cpu", None), (None, None)]
)
def test_adamw_is_fused_on_cuda_only(tiny_bert, monkeypatch, device, fused):
    RecordingAdamW.calls = []
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    make_optimizer(tiny_bert, 1e-3, 0.01, device)
    (kwargs,) = RecordingAdamW.calls
    assert kwargs.get("fused") is fused


def test_the_cpu_optimizer_is_todays(tiny_bert):
    opt = make_optimizer(tiny_bert, 1e-3, 0.01)
    assert all(not g["fused"] and g["foreach"] is None for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]


def test_resuming_a_fused_checkpoint_keeps_this_optimizers_implementation(tiny_bert):
    opt = make_optimizer(tiny_bert, 1e-3, 0.01)
    state = opt.state_dict()
    for group in state["param_groups"]:
        group["fused"] = True  # as written on CUDA
    loop._keep_implementation(opt, state)
    assert all(not g["fused"] for g in opt.param_groups)


# ------------------------------------------------------------------------------------------
# Asynchronous copies, prefetching
# ------------------------------------------------------------------------------------------


class FakeTensor:
    def __init__(self):
        self.calls = []

    def to(self, device, **kwargs):
        self.calls.append((device, kwargs))
        return self


@pytest.mark.parametrize(("device", "non_blocking"), [("cuda", True), ("cpu", False)])
def test_copies_to_cuda_do_not_block(device, non_blocking):
    batch = {"input_ids": FakeTensor()}
    to_device(batch, device)
    assert batch["input_ids"].calls == [(device, {"non_blocking": non_blocking})]


def test_prefetched_yields_the_same_items_in_order():
    assert list(prefetched(iter(range(50)), depth=3)) == list(range(50))


def test_prefetched_raises_the_threads_error():
    def items():
        yield 1
        raise RuntimeError("bad batch")

    it = prefetched(items())
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="bad batch"):
        next(it)


def test_closing_prefetched_stops_its_thread():
    produced = []

    def items():
        for i in range(10_000):
            produced.append(i)
            yield i

    it = prefetched(items(), depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert not any(t.name == "recipec-prefetch" and t.is_alive() for t in threading.enumerate())
    assert len(produced) < 10


# ------------------------------------------------------------------------------------------
# bf16 on CPU end to end: exact zeros, the same sparsity, autocast where it belongs
# ------------------------------------------------------------------------------------------

RECIPE = """\
training: {epochs: 3, batch_size: 16, learning_rate: 1e-3, max_seq_length: 32, seed: 1, eval_every_epochs: 1}
modifiers:
  - {type: %(pruner)s, init_sparsity: 0.3, final_sparsity: 0.8, start_epoch: 1, end_epoch: 2, update_every_steps: 2%(extra)s}
  - {type: lr, schedule: cyclic_linear, init_lr: 1e-3, final_lr: 1e-4, cycle_steps: 2, start_epoch: 1, end_epoch: 2}
  - {type: lr, schedule: linear, init_lr: 1e-3, final_lr: 0, start_epoch: 2}
  - {type: distill, teacher: %(teacher)s, hardness: 0.5, temperature: 5.5}
"""
OBERT = ", num_grads: 4, grad_batch_size: 4, fisher_block_size: 16, damp: 1e-5"


def apply_run(tmp_path, model_dir, precision, pruner="gmp", name=None):
    recipe = tmp_path / f"{pruner}.yaml"
    extra = OBERT if pruner == "obert" else ""
    recipe.write_text(RECIPE % {"pruner": pruner, "extra": extra, "teacher": model_dir})
    out = tmp_path / (name or f"{pruner}-{precision}")
    args = ["apply", str(recipe), "--model", str(model_dir), "--precision", precision]
    args += ["--max-train", "160", "--max-eval", "32", "--output", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out, result.output


def masked_weights(out):
    masks = load_file(str(out / "model" / "masks.safetensors"))
    weights = load_file(str(out / "model" / "model.safetensors"))
    return masks, weights


def test_bf16_on_cpu_keeps_exact_zeros_and_the_fp32_sparsity(tmp_path, tiny_model_dir):
    out32, _ = apply_run(tmp_path, tiny_model_dir, "fp32")
    out16, log = apply_run(tmp_path, tiny_model_dir, "bf16")
    assert "[precision] bf16 autocast" in log
    masks16, weights16 = masked_weights(out16)
    masks32, _ = masked_weights(out32)
    assert masks16.keys() == masks32.keys() and len(masks16) == 12
    for name, mask in masks16.items():
        assert weights16[name].dtype == torch.float32  # fp32 master weights
        assert bool((weights16[name][mask == 0] == 0.0).all()), name  # every masked weight 0.0
    count = lambda ms: sum(int((m == 0).sum()) for m in ms.values())  # noqa: E731
    assert count(masks16) == count(masks32) == round(0.8 * sum(m.numel() for m in masks16.values()))
    r16 = json.loads((out16 / "report.json").read_text())
    r32 = json.loads((out32 / "report.json").read_text())
    assert r16["sparsity"]["targets"] == r32["sparsity"]["targets"]
    assert r16["precision"]["used"] == "bf16" and r32["precision"]["used"] == "fp32"
    assert r16["precision"]["requested"] == "bf16" and not r16["precision"]["tf32"]


def test_autocast_covers_the_training_forward_only(tmp_path, tiny_model_dir, monkeypatch):
    """Training forwards (one per step) autocast; evaluation and oBERT's gradients don't."""
    seen = []
    real = loop.StageRunner.run

    def spying(self, checkpoint=None):
        model = self.data.model
        original = model.forward

        def forward(*a, **k):
            seen.append((model.training, torch.is_autocast_enabled("cpu")))
            return original(*a, **k)

        model.forward = forward
        try:
            return real(self, checkpoint)
        finally:
            del model.forward

    monkeypatch.setattr(loop.StageRunner, "run", spying)
    out, _ = apply_run(tmp_path, tiny_model_dir, "bf16", pruner="obert")
    steps = json.loads((out / "report.json").read_text())["stages"][0]["steps"]
    autocast = [s for s in seen if s[1]]
    assert len(autocast) == steps == 30 and all(training for training, _ in autocast)
    # the rest, in fp32: evaluations (one batch each) and oBERT's gradient collection (6 pruning
    # steps x 4 gradients)
    assert len(seen) - len(autocast) >= 3 + 6 * 4


def test_the_sparsity_is_counted_when_the_masks_change_not_every_step(
    tmp_path, tiny_model_dir, monkeypatch
):
    calls = []
    real = MaskState.sparsity

    def counting(self):
        calls.append(self.version)
        return real(self)

    monkeypatch.setattr(MaskState, "sparsity", counting)
    out, _ = apply_run(tmp_path, tiny_model_dir, "fp32")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("sparsity" in r for r in lines) >= 30
    assert len(calls) <= len(set(calls)) + 1  # one count per mask version (+ the report's)

"""The plain-PyTorch driver: one stage of training with a compiled Program.

Flat and readable on purpose: the Program's hooks are called in the documented order, LR comes
from the plan, and everything needed to resume (weights, masks, Program state, optimizer, RNG,
data position) goes into atomic checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from recipec import distributed as dist_utils
from recipec.modifiers.training import set_lr
from recipec.plan import StagePlan
from recipec.program import Program
from recipec.tasks import Example, TaskInfo
from recipec.tasks.data import make_dataloader
from recipec.tasks.metrics import compute_metrics
from recipec.train import resume as ckpt


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, ...); the last good checkpoint is kept."""


class Interrupted(RuntimeError):
    """SIGINT: a checkpoint was written; the run can continue with --resume."""


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; biases and LayerNorm weights get no weight decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (
            no_decay if param.dim() < 2 or "LayerNorm" in name or "layer_norm" in name else decay
        ).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def to_device(
    batch: Mapping[str, torch.Tensor], device: torch.device | str
) -> dict[str, torch.Tensor]:
    """The batch on ``device``; a rank's shard keeps its weight (cram's second pass uses it)."""
    moved = {k: v.to(device) for k, v in batch.items()}
    weight = getattr(batch, "weight", None)
    return moved if weight is None else dist_utils.ShardBatch(moved, weight)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    examples: list[Example],
    tokenizer: Any,
    info: TaskInfo,
    *,
    batch_size: int,
    max_seq_length: int,
    device: str,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Metrics of ``model`` on ``examples`` (eval mode, no gradients).

    In a distributed run every rank must call this: each evaluates a contiguous shard of
    ``examples`` and the logits are gathered, so every rank returns the same metrics.
    """
    world = dist_utils.world_size()
    if world > 1:
        start, end = dist_utils.shard_bounds(len(examples), dist_utils.rank(), world)
        local = list(examples[start:end])
    else:
        local = examples
    was_training = model.training
    model.eval()
    logits, labels, losses = [], [], []
    if local or world == 1:  # (a single process with no examples gets the loader's error)
        loader = make_dataloader(
            local, tokenizer, info, batch_size=batch_size, max_seq_length=max_seq_length
        )
        for i, batch in enumerate(loader):
            batch = to_device(batch, device)
            out = model(**batch)
            logits.append(out.logits.float().cpu())
            labels.append(batch["labels"].cpu())
            if out.loss is not None:
                losses.append(float(out.loss) * len(batch["labels"]))
            if progress:
                progress(i + 1, len(loader))
    model.train(was_training)
    if world > 1:
        mine = (
            torch.cat(logits).numpy() if logits else None,
            torch.cat(labels).numpy() if labels else None,
            losses,
        )
        parts = dist_utils.all_gather_object(mine, what="gathering eval predictions")
        all_logits = np.concatenate([p[0] for p in parts if p[0] is not None])
        all_labels = np.concatenate([p[1] for p in parts if p[1] is not None])
        losses = [x for p in parts for x in p[2]]
    else:
        all_logits = torch.cat(logits).numpy()
        all_labels = torch.cat(labels).numpy()
    metrics = compute_metrics(info, all_logits, all_labels)
    if losses:
        metrics["loss"] = sum(losses) / len(all_labels)
    return metrics


def eval_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of an evaluation record (its ``eval_*`` keys, without the prefix)."""
    return {k[5:]: v for k, v in record.items() if k.startswith("eval_")}


@dataclass
class StageResult:
    steps: int
    seconds: float
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    final_eval: dict[str, float] | None = None
    # --sparse-backprop: the first step on SparseProp kernels, the layers and min sparsity
    sparse_backprop: dict[str, Any] | None = None

    @property
    def eval_before_pruning(self) -> dict[str, float] | None:
        """A finished prune-only stage's first evaluation, of the model before its one-shot pruning."""
        if self.steps != 0 or self.final_eval is None or len(self.eval_history) < 2:
            return None
        return eval_metrics(self.eval_history[0])


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed, safe to tail)."""

    def __init__(self, path: Path | None):
        self.path = path

    def write(self, record: Mapping[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def truncate_after(self, stage: str, step: int) -> None:
        """On resume, drop records newer than the checkpoint (they will be re-logged)."""
        if self.path is None or not self.path.exists():
            return
        kept = []
        stages_seen: list[str] = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("stage") not in stages_seen:
                stages_seen.append(rec.get("stage"))
            if rec.get("stage") == stage and rec.get("step", 0) > step:
                continue
            kept.append(line)
        ckpt.write_text_atomic(self.path, "".join(k + "\n" for k in kept))


class _SigintFlag:
    """Turns the first Ctrl-C into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None

    def __enter__(self) -> _SigintFlag:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not in the main thread
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.raised:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def train_stage(
    *,
    model: nn.Module,
    tokenizer: Any,
    info: TaskInfo,
    train_examples: list[Example],
    eval_examples: list[Example],
    plan: StagePlan,
    optimizer: torch.optim.Optimizer,
    program: Program | None,
    device: str = "cpu",
    checkpoint_dir: Path | None = None,
    checkpoint_every: int | None = None,
    resume_state: dict[str, Any] | None = None,
    metrics: MetricsLog | None = None,
    extra_state: Callable[[], dict[str, Any]] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    on_eval_progress: Callable[[int, int], None] | None = None,
    stop_after_step: int | None = None,
    eval_before: dict[str, float] | None = None,
    sparse_backprop: float | None = None,
) -> StageResult:
    """Train one stage to ``plan.total_steps`` optimizer steps (0: a prune-only stage, which
    evaluates, runs the Program's step 0, its one-shot pruning, and evaluates again; with
    ``eval_before``, the metrics of the model as it comes, that first evaluation is skipped).

    ``resume_state`` (from a checkpoint) restores optimizer, Program, RNG and step; the data
    position follows from the step (every epoch has exactly ``plan.steps_per_epoch`` batches
    in a seeded order). ``stop_after_step`` ends early (tests).

    In a distributed run (an initialised process group of several ranks, see
    :mod:`recipec.distributed`) every rank calls this with the same arguments: the model
    is wrapped in ``DistributedDataParallel`` for the training forward/backward, each rank
    trains on its shard of every global batch of ``training.batch_size`` examples with its loss
    weighted so that gradients equal the global batch's, the logged loss is the global batch's
    mean, a Ctrl-C stops all ranks at the same step, masks are checked identical across ranks
    after every change, evaluation is sharded, and only rank 0 writes metrics and checkpoints
    (which hold every rank's RNG state).

    ``sparse_backprop`` (a minimum sparsity; CPU, one process): between mask changes, pruned
    linear layers at that sparsity or more run forward and backward on SparseProp's kernels
    (:mod:`recipec.kernels.sparse_backprop`); they are put back before ``finalize`` and whenever
    the stage ends.
    """
    training = plan.training
    world = dist_utils.world_size()
    rank = dist_utils.rank()
    metrics = metrics if metrics is not None and dist_utils.is_main() else MetricsLog(None)
    spe = plan.steps_per_epoch
    total = plan.total_steps
    step = 0
    eval_history: list[dict[str, Any]] = []
    started = time.perf_counter()
    elapsed_before = 0.0
    if resume_state is not None:
        step = int(resume_state["step"])
        optimizer.load_state_dict(resume_state["optimizer"])
        if program is not None and resume_state.get("program") is not None:
            program.load_state_dict(resume_state["program"])
        _restore_rng(resume_state, world, rank, training.seed + step)
        eval_history = list(resume_state.get("eval_history", []))
        elapsed_before = float(resume_state.get("seconds", 0.0))
        if step >= total and resume_state.get("complete"):
            last = eval_metrics(eval_history[-1]) if eval_history else None
            return StageResult(total, elapsed_before, eval_history, last)

    def state(at_step: int) -> dict[str, Any]:
        rng = ckpt.rng_state()
        per_rank = {}
        if world > 1:  # every rank's stream, so a resumed run continues each of them
            per_rank = {
                "rng_ranks": dist_utils.all_gather_object(rng, what="gathering RNG states"),
                "world_size": world,
            }
        return {
            "stage": plan.name,
            "step": at_step,
            "optimizer": optimizer.state_dict(),
            "program": program.state_dict() if program is not None else None,
            "rng": rng,
            **per_rank,
            "eval_history": eval_history,
            "seconds": elapsed_before + time.perf_counter() - started,
            "data": {"epoch": at_step // spe, "batch": at_step % spe},
            **(extra_state() if extra_state else {}),
        }

    def save(at_step: int, complete: bool = False) -> None:
        if checkpoint_dir is not None:
            data = dict(state(at_step), complete=complete)
            if dist_utils.is_main():
                ckpt.save_checkpoint(checkpoint_dir, f"{plan.name}-step-{at_step:08d}", model, data)

    def run_eval(at_step: int, known: dict[str, float] | None = None) -> dict[str, float]:
        result = (
            known
            if known is not None
            else evaluate(
                model,
                eval_examples,
                tokenizer,
                info,
                batch_size=max(training.batch_size, 32),
                max_seq_length=training.max_seq_length,
                device=device,
                progress=on_eval_progress,
            )
        )
        record = {
            "stage": plan.name,
            "step": at_step,
            **{f"eval_{k}": v for k, v in result.items()},
        }
        if program is not None:
            record["sparsity"] = program.sparsity()[0]
        eval_history.append(record)
        metrics.write(record)
        return result

    def check_masks(where: str) -> None:
        if program is not None and world > 1:
            dist_utils.verify_identical(
                program.masks.masks, program.masks.params, f"stage {plan.name!r} {where}"
            )

    net = dist_utils.wrap_model(model, device)  # the model itself in a single process
    check_masks(f"start (step {step})")
    checked_version = program.masks.version if program is not None else 0
    model.train()
    final_eval = None
    with (
        _SigintFlag() as sigint,
        _sparse_kernels(sparse_backprop, model, program, resume_state is not None) as sparse,
    ):
        if (
            total == 0 and program is not None and resume_state is None
        ):  # prune-only: one-shot, no optimizer step
            run_eval(0, eval_before)  # the model as it came, to compare with after pruning
            program.step_start(0)
            metrics.write({"stage": plan.name, "step": 0, "sparsity": program.sparsity()[0]})
            flag = torch.tensor(
                [float(sigint.raised)], dtype=torch.float64
            )  # every rank stops, or none
            if dist_utils.all_reduce_sum(flag, what=f"stage {plan.name!r}: interrupt check")[0] > 0:
                # the pruning is kept: --resume evaluates it and goes on
                save(0)
                raise Interrupted(
                    f"interrupted at stage {plan.name!r} after its one-shot pruning; checkpoint saved"
                )
        while step < total:
            loader = make_dataloader(
                train_examples,
                tokenizer,
                info,
                batch_size=training.batch_size,
                max_seq_length=training.max_seq_length,
                shuffle=True,
                seed=training.seed,
                epoch=step // spe,
                start_batch=step % spe,
            )
            batches = loader if world == 1 else dist_utils.sharded_batches(loader, rank, world)
            for batch in batches:
                if step >= total:
                    break
                weight = getattr(batch, "weight", 1.0)
                batch = to_device(batch, device)
                if sparse is not None:
                    sparse.step_start(step)  # program.step_start, pruning on dense layers
                elif program is not None:
                    program.step_start(step)
                if program is None or not program.owns_lr:
                    set_lr(optimizer, plan.lr_at(step))
                with dist_utils.collective(f"stage {plan.name!r} step {step}: forward"):
                    outputs = net(**batch)
                loss = outputs.loss
                if program is not None:
                    loss = program.loss(loss, batch=batch, outputs=outputs)
                if world == 1:
                    loss_value = float(loss.detach())
                else:
                    loss_value, stop = _reduce_step(
                        loss, weight, sigint.raised, program, world, plan.name, step
                    )
                    if program is not None and program.masks.version != checked_version:
                        check_masks(f"step {step} (after pruning)")
                        checked_version = program.masks.version
                if not math.isfinite(loss_value):
                    raise TrainingError(
                        f"stage {plan.name!r}: the loss is {loss_value} at step {step}; stopping. "
                        "The last good checkpoint is kept (lower the learning rate, then --resume)."
                    )
                if world > 1:
                    scale = weight * world  # DDP averages over ranks: this makes it the global mean
                    with dist_utils.collective(
                        f"stage {plan.name!r} step {step}: gradient all-reduce"
                    ):
                        (loss * scale if scale != 1.0 else loss).backward()
                else:
                    loss.backward()
                if program is not None:
                    program.before_optimizer_step(step)
                if training.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), training.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if program is not None:
                    program.after_optimizer_step(step)
                lr = optimizer.param_groups[0]["lr"]
                step += 1
                record = {"stage": plan.name, "step": step, "loss": loss_value, "lr": lr}
                if program is not None:
                    record["sparsity"] = program.sparsity()[0]
                metrics.write(record)
                if on_step:
                    on_step(step, record)
                if plan.eval_every and step % plan.eval_every == 0 and step < total:
                    run_eval(step)
                if checkpoint_every and step % checkpoint_every == 0 and step < total:
                    save(step)
                if sigint.raised if world == 1 else stop:
                    save(step)
                    raise Interrupted(
                        f"interrupted at stage {plan.name!r} step {step}; checkpoint saved"
                    )
                if stop_after_step is not None and step >= stop_after_step:
                    return StageResult(
                        step,
                        elapsed_before + time.perf_counter() - started,
                        eval_history,
                        sparse_backprop=sparse.record() if sparse else None,
                    )
        if program is not None:
            if sparse is not None:
                sparse.kernels.remove()
            program.finalize()
            check_masks("end (after finalize)")
        final_eval = run_eval(total)
        save(total, complete=True)
    return StageResult(
        total,
        elapsed_before + time.perf_counter() - started,
        eval_history,
        final_eval,
        sparse_backprop=sparse.record() if sparse else None,
    )


@contextlib.contextmanager
def _sparse_kernels(
    min_sparsity: float | None, model: nn.Module, program: Program | None, resumed: bool
) -> Iterator[Any]:
    """The stage's sparse-backprop kernels (None when not asked for or not usable in this stage);
    every layer is back on its dense forward when the block ends, however it ends."""
    if (
        min_sparsity is None or program is None or program.plan.total_steps == 0
    ):  # prune-only: no step to speed up
        yield None
        return
    from recipec.kernels import sparse_backprop as sbp

    stage = sbp.StageKernels.for_program(program, model, min_sparsity, resumed)
    if stage is None:
        yield None
        return
    try:
        yield stage
    finally:
        stage.kernels.remove()


def _reduce_step(
    loss: torch.Tensor,
    weight: float,
    interrupted: bool,
    program: Program | None,
    world: int,
    stage: str,
    step: int,
) -> tuple[float, bool]:
    """One small all-reduce per step: global mean loss, any rank's Ctrl-C, mask-version agreement."""
    version = float(program.masks.version) if program is not None else 0.0
    contribution = float(loss.detach()) * weight if weight else 0.0
    stats = torch.tensor(
        [contribution, float(interrupted), version, version * version], dtype=torch.float64
    )
    dist_utils.all_reduce_sum(stats, what=f"stage {stage!r} step {step}: loss all-reduce")
    total, flags, vsum, vsq = (float(x) for x in stats)
    if vsq * world != vsum * vsum:  # not every rank has changed its masks the same number of times
        raise dist_utils.RankMismatchError(
            f"stage {stage!r} step {step}: ranks disagree on how many times the masks changed "
            f"(this rank: {int(version)}); every rank must prune at the same steps"
        )
    return total, flags > 0


def _restore_rng(state: Mapping[str, Any], world: int, rank: int, reseed: int) -> None:
    """Each rank's own RNG stream when the world size is unchanged; else rank 0's, re-split."""
    per_rank = state.get("rng_ranks")
    if per_rank is not None and len(per_rank) == world:
        ckpt.set_rng_state(per_rank[rank])
        return
    ckpt.set_rng_state(state["rng"])
    if world > 1:
        dist_utils.seed_rank(reseed)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

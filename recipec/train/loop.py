"""The plain-PyTorch driver: one stage of training with a compiled Program.

Flat and readable on purpose: the Program's hooks are called in the documented order, LR comes
from the plan, and everything needed to resume (weights, masks, Program state, optimizer, RNG,
data position) goes into atomic checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import math
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from recipec import distributed as dist_utils
from recipec.outputs import write_text_atomic
from recipec.program import Program
from recipec.tasks import Example, TaskInfo
from recipec.tasks.collapse import prediction_diagnostics
from recipec.tasks.data import make_dataloader
from recipec.tasks.metrics import compute_metrics
from recipec.train import resume


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, ...); the last good checkpoint is kept."""


class Interrupted(RuntimeError):
    """SIGINT: a checkpoint was written; the run can continue with --resume."""


PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Precision:
    """How a run computes (see :func:`resolve_precision`).

    Attributes:
        name: ``"fp32"``, or ``"bf16"``: bf16 autocast around the training forward and its loss
            (distillation's teacher forward included); weights, gradients and optimizer state
            stay fp32, so masks applied to the weights stay exact zeros. Evaluation, oBERT's
            gradient collection and CrAM's second pass run outside the autocast (fp32).
        device_type: ``"cpu"`` or ``"cuda"`` (the autocast's device type).
        requested: What was asked (``auto``, ``fp32``, ``bf16``).
        tf32: TF32 matmuls and convolutions (CUDA) for the run's fp32 work.
    """

    name: str
    device_type: str = "cpu"
    requested: str = "fp32"
    tf32: bool = False

    @property
    def autocast(self) -> bool:
        return self.name == "bf16"

    def forward(self) -> contextlib.AbstractContextManager:
        """The context of the training forward and loss: bf16 autocast, or nothing."""
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=torch.bfloat16)

    @contextlib.contextmanager
    def matmuls(self) -> Iterator[None]:
        """TF32 matmuls / cuDNN inside the block when ``tf32``; the flags are restored after."""
        if not self.tf32:
            yield
            return
        before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before

    def describe(self) -> str:
        """One line for the log."""
        if not self.autocast:
            return f"fp32 ({self.requested} on {self.device_type})"
        line = (
            f"bf16 autocast of the training forward and loss, fp32 master weights ({self.requested} "
            f"on {self.device_type}); evaluation, oBERT gradients and CrAM's second pass in fp32"
        )
        return line + (", TF32 matmuls" if self.tf32 else "")

    def record(self) -> dict[str, Any]:
        """What report.json says."""
        return {
            "requested": self.requested,
            "used": self.name,
            "device": self.device_type,
            "autocast": "bf16: training forward and loss" if self.autocast else None,
            "tf32": self.tf32,
        }


def _cuda_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_precision(requested: str, device: str | torch.device) -> Precision:
    """``auto``: bf16 autocast and TF32 matmuls on a CUDA device that supports bf16, fp32
    elsewhere (CPU); ``bf16``: bf16 autocast on any device (slow on CPUs without native bf16,
    but it runs), TF32 too on CUDA; ``fp32``: plain fp32.

    Raises:
        ValueError: An unknown name, or ``bf16`` on a CUDA device without bf16.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    device_type = torch.device(device).type
    cuda = device_type == "cuda"
    if requested == "fp32" or (requested == "auto" and not (cuda and _cuda_bf16())):
        return Precision("fp32", device_type, requested)
    if cuda and not _cuda_bf16():
        raise ValueError("--precision bf16: this CUDA device does not support bf16; use fp32")
    return Precision("bf16", device_type, requested, tf32=cuda)


FP32 = Precision("fp32")


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, device: str | torch.device | None = None
) -> torch.optim.Optimizer:
    """AdamW; biases and LayerNorm weights get no weight decay. On CUDA (``device``, or the
    model's parameters when None) the fused implementation; on CPU torch's default, unchanged."""
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else "cpu"
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
    groups = [g for g in groups if g["params"]]
    if torch.device(device).type == "cuda":
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    return torch.optim.AdamW(groups, lr=lr)


def _keep_implementation(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Load an optimizer state, keeping this optimizer's implementation (fused / foreach): a
    checkpoint written on another device must not switch it."""
    flags = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, flags):
        group.update(kept)


def to_device(
    batch: Mapping[str, torch.Tensor], device: torch.device | str
) -> dict[str, torch.Tensor]:
    """The batch on ``device`` (asynchronous copies to CUDA: pinned batches don't block); a
    rank's shard keeps its weight (cram's second pass uses it)."""
    non_blocking = torch.device(device).type == "cuda"
    moved = {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}
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
    """Metrics of ``model`` on ``examples`` (eval mode, no gradients), with what the
    predictions look like (``top_class_share`` or ``prediction_spread``, see
    :mod:`recipec.tasks.collapse`) and the mean loss.

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
            local,
            tokenizer,
            info,
            batch_size=batch_size,
            max_seq_length=max_seq_length,
            pin_memory=torch.device(device).type == "cuda",
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
    metrics.update(prediction_diagnostics(info, all_logits, all_labels))
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
    # --sparse-backprop: the first step on the sparse kernels, the layers and min sparsity
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

    def truncate_after(self, stage: str, step: int, later: Sequence[str] = ()) -> None:
        """On resume, drop the records newer than the checkpoint (they will be logged again):
        ``stage``'s after ``step``, every record of the ``later`` stages, and lines that are not
        JSON objects (a write cut short)."""
        if self.path is None or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict) or rec.get("stage") in later:
                continue
            at = rec.get("step", 0)
            if rec.get("stage") == stage and (not isinstance(at, int) or at > step):
                continue
            kept.append(line)
        write_text_atomic(self.path, "".join(k + "\n" for k in kept))

    def clear(self) -> None:
        """A run that starts from its first step: no records from an earlier attempt."""
        if self.path is not None and self.path.exists():
            self.path.unlink()


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


@dataclass
class StageData:
    """What a stage trains and evaluates: the model, its tokenizer and the task's examples."""

    model: nn.Module
    tokenizer: Any
    info: TaskInfo
    train: list[Example]
    eval: list[Example]
    device: str = "cpu"


_END = object()


def prefetched(batches: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """``batches``, collated up to ``depth`` ahead in a background thread (CUDA runs: the next
    batch is padded and pinned while the device computes). Same items, same order; an error in
    the thread is raised here; closing the generator stops the thread."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for batch in batches:
                if not put((batch, None)):
                    return
            put((_END, None))
        except BaseException as exc:  # handed to the consumer
            put((_END, exc))

    thread = threading.Thread(target=work, name="recipec-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            batch, error = items.get()
            if error is not None:
                raise error
            if batch is _END:
                return
            yield batch
    finally:
        stop.set()
        thread.join(timeout=5)


class StageRunner:
    """Trains one stage to ``plan.total_steps`` optimizer steps with its compiled Program.

    Phases, one method each: :meth:`resume` (optimizer, Program, RNG, step and evaluations from
    a checkpoint), :meth:`prune_only` (a ``steps: 0`` stage: evaluate, the one-shot pruning of
    step 0, no optimizer step; the evaluation is skipped when ``eval_before`` gives the metrics
    of the model as it comes), :meth:`train_step` (one optimizer step in the documented hook
    order), :meth:`end` (finalize, evaluate, the complete checkpoint). The data position follows
    from the step (every epoch has exactly ``plan.steps_per_epoch`` batches in a seeded order).

    In a distributed run (an initialised process group of several ranks, see
    :mod:`recipec.distributed`) every rank runs the same stage: the model is wrapped in
    ``DistributedDataParallel`` for the training forward/backward, each rank trains on its shard
    of every global batch of ``training.batch_size`` examples with its loss weighted so that
    gradients equal the global batch's, the logged loss is the global batch's mean, a Ctrl-C
    stops all ranks at the same step, masks are checked identical across ranks after every
    change, evaluation is sharded, and only rank 0 writes metrics and checkpoints (which hold
    every rank's RNG state).

    Args:
        program: The compiled stage (its optimizer is the one stepped).
        data: Model, tokenizer and examples.
        checkpoint_dir: Where atomic checkpoints go (None: none).
        checkpoint_every: Steps between checkpoints.
        metrics: The run's ``metrics.jsonl`` (rank 0 writes it).
        on_step: ``f(step, record)`` after every optimizer step (progress bars).
        on_eval: ``f(step, metrics)`` after every evaluation (the console).
        stop_after_step: End after this step without finalizing (tests).
        eval_before: A prune-only stage's metrics before pruning, when already known.
        log_sparsity: Put the masks' sparsity into each record (False for the dense teacher).
        keep_checkpoints: Checkpoints kept in ``checkpoint_dir`` (None: every one).
        precision: How the training forward and loss compute (default fp32, see
            :class:`Precision`); the stage runs inside its ``matmuls()`` context.
    """

    def __init__(
        self,
        program: Program,
        data: StageData,
        *,
        checkpoint_dir: Path | None = None,
        checkpoint_every: int | None = None,
        metrics: MetricsLog | None = None,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
        on_eval: Callable[[int, dict[str, float]], None] | None = None,
        stop_after_step: int | None = None,
        eval_before: dict[str, float] | None = None,
        log_sparsity: bool = True,
        keep_checkpoints: int | None = resume.KEEP,
        precision: Precision = FP32,
    ):
        self.program = program
        self.precision = precision
        self._sparsity: tuple[int, float] | None = None  # (mask version, overall sparsity)
        self.plan = program.plan
        self.optimizer = program.ctx.optimizer
        self.data = data
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.metrics = metrics if metrics is not None and dist_utils.is_main() else MetricsLog(None)
        self.on_step = on_step
        self.on_eval = on_eval
        self.stop_after_step = stop_after_step
        self.eval_before = eval_before
        self.log_sparsity = log_sparsity
        self.keep_checkpoints = keep_checkpoints
        self.on_resumed: Callable[[], None] | None = None  # after a checkpoint's state loaded
        self.world = dist_utils.world_size()
        self.rank = dist_utils.rank()
        self.step = 0
        self.eval_history: list[dict[str, Any]] = []
        self.started = time.perf_counter()
        self.elapsed_before = 0.0
        self.checked_version = program.masks.version
        self.net: nn.Module = data.model

    # -- phases -------------------------------------------------------------------------------

    def run(self, checkpoint: dict[str, Any] | None = None) -> StageResult:
        """The whole stage, from the start or from a checkpoint's state; returns its result
        (``final_eval`` None when stopped early)."""
        if checkpoint is not None:
            finished = self.resume(checkpoint)
            if self.on_resumed is not None:
                self.on_resumed()
            if finished:
                last = eval_metrics(self.eval_history[-1]) if self.eval_history else None
                return StageResult(
                    self.plan.total_steps, self.elapsed_before, self.eval_history, last
                )
        self.net = dist_utils.wrap_model(self.data.model, self.data.device)
        self.check_masks(f"start (step {self.step})")
        self.checked_version = self.program.masks.version
        self.data.model.train()
        try:
            with _SigintFlag() as sigint, self.precision.matmuls():
                if self.plan.total_steps == 0 and checkpoint is None:
                    self.prune_only(sigint)
                while self.step < self.plan.total_steps:
                    for batch in self.batches():
                        if self.step >= self.plan.total_steps:
                            break
                        stop = self.train_step(batch, sigint)
                        if self.after_step(stop):
                            return self.result(None)
                return self.end()
        finally:
            self.program.close()

    def resume(self, state: dict[str, Any]) -> bool:
        """Restore a checkpoint's state; True when it is a finished stage (nothing to do).

        Raises :class:`recipec.train.resume.CheckpointStateError` when the state does not fit
        this stage (its optimizer, Program or RNG state)."""
        try:
            self.step = int(state["step"])
            _keep_implementation(self.optimizer, state["optimizer"])
            if state.get("program") is not None:
                self.program.load_state_dict(state["program"])
            _restore_rng(state, self.world, self.rank, self.plan.training.seed + self.step)
            self.eval_history = list(state.get("eval_history", []))
            self.elapsed_before = float(state.get("seconds", 0.0))
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
            raise resume.CheckpointStateError(
                f"its state does not fit stage {self.plan.name!r}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200] if str(exc) else ''}"
            ) from None
        return self.step >= self.plan.total_steps and bool(state.get("complete"))

    def prune_only(self, sigint: _SigintFlag) -> None:
        """Evaluate, prune once (step 0), log the sparsity; a Ctrl-C keeps the pruning."""
        program, name = self.program, self.plan.name
        self.evaluate(0, self.eval_before)  # the model as it came, to compare with after pruning
        program.step_start(0)
        self.metrics.write({"stage": name, "step": 0, "sparsity": self.sparsity()})
        flag = torch.tensor([float(sigint.raised)], dtype=torch.float64)  # every rank, or none
        if dist_utils.all_reduce_sum(flag, what=f"stage {name!r}: interrupt check")[0] > 0:
            self.save(0)  # --resume evaluates it and goes on
            raise Interrupted(
                f"interrupted at stage {name!r} after its one-shot pruning; checkpoint saved"
            )

    def batches(self) -> Iterator[Mapping[str, torch.Tensor]]:
        """The rest of the current epoch's batches (this rank's shards when distributed)."""
        training, spe = self.plan.training, self.plan.steps_per_epoch
        cuda = torch.device(self.data.device).type == "cuda"
        loader = make_dataloader(
            self.data.train,
            self.data.tokenizer,
            self.data.info,
            batch_size=training.batch_size,
            max_seq_length=training.max_seq_length,
            shuffle=True,
            seed=training.seed,
            epoch=self.step // spe,
            start_batch=self.step % spe,
            pin_memory=cuda,
        )
        if self.world == 1:
            batches = iter(loader)
        else:
            batches = iter(dist_utils.sharded_batches(loader, self.rank, self.world))
        return prefetched(batches) if cuda else batches

    def sparsity(self) -> float:
        """The masks' overall sparsity, recounted only when the masks change (counting syncs
        a CUDA device once per tensor: not something to do every step)."""
        version = self.program.masks.version
        if self._sparsity is None or self._sparsity[0] != version:
            self._sparsity = (version, self.program.sparsity()[0])
        return self._sparsity[1]

    def train_step(self, batch: Mapping[str, torch.Tensor], sigint: _SigintFlag) -> bool:
        """One optimizer step in the Program's hook order; True when a rank asked to stop."""
        program, step, name = self.program, self.step, self.plan.name
        weight = getattr(batch, "weight", 1.0)
        batch = to_device(batch, self.data.device)
        program.step_start(step)
        with self.precision.forward():  # bf16 autocast (or nothing): the forward and its loss
            with dist_utils.collective(f"stage {name!r} step {step}: forward"):
                outputs = self.net(**batch)
            loss = program.loss(outputs.loss, batch=batch, outputs=outputs)
        stop = sigint.raised
        if self.world == 1:
            loss_value = float(loss.detach())
        else:
            loss_value, stop = _reduce_step(
                loss, weight, sigint.raised, program, self.world, name, step
            )
            if program.masks.version != self.checked_version:
                self.check_masks(f"step {step} (after pruning)")
                self.checked_version = program.masks.version
        if not math.isfinite(loss_value):
            raise TrainingError(
                f"stage {name!r}: the loss is {loss_value} at step {step}; stopping. The last good "
                "checkpoint is kept: continue from it with a lower learning rate, i.e. the same "
                "command plus --resume --set training.learning_rate=... (or the lr modifiers' "
                "init_lr / final_lr, or the variables that feed them; see docs/safety.md)."
            )
        self.backward(loss, weight, step)
        program.before_optimizer_step(step)
        max_norm = self.plan.training.max_grad_norm
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.data.model.parameters(), max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        program.after_optimizer_step(step)
        self.step += 1
        lr = self.optimizer.param_groups[0]["lr"]
        record = {"stage": name, "step": self.step, "loss": loss_value, "lr": lr}
        if self.log_sparsity:
            record["sparsity"] = self.sparsity()
        self.metrics.write(record)
        if self.on_step:
            self.on_step(self.step, record)
        return stop

    def backward(self, loss: torch.Tensor, weight: float, step: int) -> None:
        if self.world == 1:
            loss.backward()
            return
        scale = weight * self.world  # DDP averages over ranks: this makes it the global mean
        with dist_utils.collective(f"stage {self.plan.name!r} step {step}: gradient all-reduce"):
            (loss * scale if scale != 1.0 else loss).backward()

    def after_step(self, stop: bool) -> bool:
        """Periodic evaluation and checkpoint, a Ctrl-C; True to end the stage early (tests)."""
        step, total = self.step, self.plan.total_steps
        if self.plan.eval_every and step % self.plan.eval_every == 0 and step < total:
            self.evaluate(step)
        if self.checkpoint_every and step % self.checkpoint_every == 0 and step < total:
            self.save(step)
        if stop:
            self.save(step)
            raise Interrupted(
                f"interrupted at stage {self.plan.name!r} step {step}; checkpoint saved"
            )
        return self.stop_after_step is not None and step >= self.stop_after_step

    def end(self) -> StageResult:
        """Finalize (last pruning steps, masks), evaluate, write the complete checkpoint."""
        self.program.finalize()
        self.check_masks("end (after finalize)")
        final_eval = self.evaluate(self.plan.total_steps)
        self.save(self.plan.total_steps, complete=True)
        return self.result(final_eval)

    # -- helpers ------------------------------------------------------------------------------

    def result(self, final_eval: dict[str, float] | None) -> StageResult:
        return StageResult(
            self.step,
            self.elapsed_before + time.perf_counter() - self.started,
            self.eval_history,
            final_eval,
            sparse_backprop=self.program.sparse_backprop_record(),
        )

    def evaluate(self, at_step: int, known: dict[str, float] | None = None) -> dict[str, float]:
        """Evaluate (or take ``known`` metrics), record it in the history and metrics."""
        training = self.plan.training
        result = known
        if result is None:
            result = evaluate(
                self.data.model,
                self.data.eval,
                self.data.tokenizer,
                self.data.info,
                batch_size=max(training.batch_size, 32),
                max_seq_length=training.max_seq_length,
                device=self.data.device,
            )
        record = {"stage": self.plan.name, "step": at_step}
        record.update({f"eval_{k}": v for k, v in result.items()})
        if self.log_sparsity:
            record["sparsity"] = self.sparsity()
        self.eval_history.append(record)
        self.metrics.write(record)
        if self.on_eval:
            self.on_eval(at_step, result)
        return result

    def check_masks(self, where: str) -> None:
        """Under torchrun: masks and masked weights bit-identical on every rank."""
        if self.world > 1:
            masks = self.program.masks
            where = f"stage {self.plan.name!r} {where}"
            dist_utils.verify_identical(masks.masks, masks.params, where)

    def state(self, at_step: int) -> dict[str, Any]:
        """Everything a resumed run needs (optimizer, Program, RNG, evaluations, data position)."""
        rng = resume.rng_state()
        per_rank = {}
        if self.world > 1:  # every rank's stream, so a resumed run continues each of them
            per_rank = {
                "rng_ranks": dist_utils.all_gather_object(rng, what="gathering RNG states"),
                "world_size": self.world,
            }
        spe = self.plan.steps_per_epoch
        return {
            "stage": self.plan.name,
            "step": at_step,
            "optimizer": self.optimizer.state_dict(),
            "program": self.program.state_dict(),
            "rng": rng,
            **per_rank,
            "eval_history": self.eval_history,
            "seconds": self.elapsed_before + time.perf_counter() - self.started,
            "data": {"epoch": at_step // spe, "batch": at_step % spe},
        }

    def save(self, at_step: int, complete: bool = False) -> None:
        """An atomic checkpoint (rank 0 writes; every rank gathers its RNG state)."""
        if self.checkpoint_dir is None:
            return
        data = dict(self.state(at_step), complete=complete)
        if dist_utils.is_main():
            name = f"{self.plan.name}-step-{at_step:08d}"
            resume.save_checkpoint(
                self.checkpoint_dir, name, self.data.model, data, keep=self.keep_checkpoints
            )


def _reduce_step(
    loss: torch.Tensor,
    weight: float,
    interrupted: bool,
    program: Program,
    world: int,
    stage: str,
    step: int,
) -> tuple[float, bool]:
    """One small all-reduce per step: global mean loss, any rank's Ctrl-C, mask-version agreement."""
    version = float(program.masks.version)
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
        resume.set_rng_state(per_rank[rank])
        return
    resume.set_rng_state(state["rng"])
    if world > 1:
        dist_utils.seed_rank(reseed)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

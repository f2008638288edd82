"""The recipe schema: pydantic v2 specs, pure data, strict (``extra="forbid"`` everywhere).

Units are in the field names. Every point or interval in time accepts either steps or epochs
(``start_step`` or ``start_epoch``, never both); :mod:`recipec.plan` converts epochs to
optimizer steps once, given ``steps_per_epoch``. Sparsities are fractions in [0, 1).

No torch import here: validating a recipe must stay instant.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from recipec.recipe.structure import parse_structure

ENCODER_TARGETS = "encoder"
"""``targets: encoder`` (the default): every encoder linear layer of the model's architecture
(Q, K, V or a fused QKV, the attention output, the FFN input (or fused GLU input) and output of
each block), found from the model's structure by :mod:`recipec.architectures` when the recipe
is applied. Embeddings, poolers and task heads are never in it (guideline 1 of the paper)."""

TARGETS_HELP = (
    "'encoder' (the default): every encoder linear layer of the model's architecture (Q, K, V or "
    "fused QKV, attention output, FFN in or fused GLU in, FFN out), found from its structure; "
    "or a list of regexes matched with re.search against parameter names (a list is always "
    "regexes: ['encoder'] is the regex 'encoder')."
)

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
PositiveInt = Annotated[int, Field(gt=0, le=10**9)]
NonNegInt = Annotated[int, Field(ge=0, le=10**9)]
NonNegEpoch = Annotated[float, Field(ge=0.0, le=10**6)]
PositiveEpoch = Annotated[float, Field(gt=0.0, le=10**6)]
LearningRate = Annotated[float, Field(gt=0.0, le=10.0)]


class Spec(BaseModel):
    """Base of every spec: strict, immutable, no coercion of strings to numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True)


def _check_regexes(patterns: list[str] | None) -> list[str] | None:
    if patterns is None:
        return None
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
    return patterns


def _validate_structure(cls: type, value: str) -> str:
    parse_structure(value)
    return value


def _one_of(spec: BaseModel, *names: str, required: bool) -> None:
    given = [n for n in names if getattr(spec, n) is not None]
    if len(given) > 1:
        raise ValueError(f"give only one of {' or '.join(names)}, not both")
    if required and not given:
        raise ValueError(f"one of {' or '.join(names)} is required")


class ModifierSpec(Spec):
    """Base of every modifier spec. Its traits are class-level facts (pure data) that the
    planner, the checks, the compiler, the drivers and the CLI ask, instead of comparing type
    names: adding a modifier type means its spec (with its traits), its runtime module, the
    registry entry and its tests."""

    type: str

    #: Acts on the sparsity of its targets (pruners and CrAM): pruning-kind overlap checks.
    prunes: ClassVar[bool] = False
    #: Installs masks on its targets (gmp, obert, constant); CrAM keeps the model dense.
    sets_masks: ClassVar[bool] = False
    #: Prunes on a schedule (init -> final sparsity at planned pruning steps).
    schedules_sparsity: ClassVar[bool] = False
    #: Owns the learning rate inside its window (shapes ``StagePlan.lr_at``).
    sets_lr: ClassVar[bool] = False
    #: Needs the training loss *and its mini-batch* (a Trainer callback alone cannot serve it).
    needs_loss_inputs: ClassVar[bool] = False
    #: Runs a second forward/backward pass per step on dense weights (no sparse kernels, no
    #: fp16 loss scaling, no DataParallel/FSDP/DeepSpeed).
    second_pass: ClassVar[bool] = False
    #: Needs a teacher model (``teacher:``).
    needs_teacher: ClassVar[bool] = False
    #: Collects its own gradients from training batches (``grad_batches=`` in compile).
    needs_grad_batches: ClassVar[bool] = False
    #: Acts on training steps only: an error in a prune-only stage (``training.steps: 0``).
    training_only: ClassVar[bool] = False
    #: Two modifiers of the same kind may not share steps ("pruning" also needs shared targets).
    overlap_kind: ClassVar[str | None] = None
    #: Fake-quantizes its targets (int8 QAT/PTQ): must start after the last pruning step,
    #: runs after the pruners at a step, and sparse kernels stay off in its stage.
    quantizes: ClassVar[bool] = False

    def describe(self) -> str:
        """One line of this modifier's settings for ``recipec plan`` (pruning schedules are
        printed by the plan itself)."""
        return ""

    def plan_fields(self) -> dict[str, Any]:
        """This modifier's settings for ``recipec plan --json`` (beyond its window)."""
        return {}


class TrainingSpec(Spec):
    """Training-loop settings (the driver's defaults; modifiers may override the LR)."""

    epochs: PositiveEpoch | None = Field(None, description="Training length in epochs.")
    steps: NonNegInt | None = Field(
        None,
        description="Training length in optimizer steps; 0 makes a prune-only stage (see prune_only).",
    )
    batch_size: Annotated[int, Field(gt=0, le=65536)] = 16
    learning_rate: LearningRate = 5e-5
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    warmup_steps: NonNegInt | None = None
    warmup_epochs: NonNegEpoch | None = None
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 42
    max_seq_length: Annotated[int, Field(gt=0, le=8192)] = 128
    eval_every_steps: PositiveInt | None = None
    eval_every_epochs: PositiveEpoch | None = None
    max_grad_norm: Annotated[float, Field(gt=0.0)] | None = 1.0
    checkpoint_every_steps: PositiveInt | None = None

    @field_validator("epochs", mode="before")
    @classmethod
    def _epochs(cls, value: object) -> object:
        if type(value) in (int, float) and value == 0:
            raise ValueError(
                "epochs must be greater than 0; for a stage that only prunes (one-shot, no "
                "training) write steps: 0"
            )
        return value

    @property
    def prune_only(self) -> bool:
        """``steps: 0``: a stage that trains nothing. Its pruning modifiers (gmp, obert, constant)
        prune once, at step 0 (oBERT with its own gradients of the training data), and the stage
        evaluates before and after; lr, distill and cram there are errors."""
        return self.steps == 0

    def length_text(self) -> str:
        """``"3 epochs"``, ``"100 steps"`` or ``"prune-only"`` (for one-line summaries)."""
        if self.prune_only:
            return "prune-only"
        return f"{self.epochs:g} epochs" if self.epochs is not None else f"{self.steps} steps"

    @model_validator(mode="after")
    def _exclusive(self) -> TrainingSpec:
        _one_of(self, "epochs", "steps", required=False)
        _one_of(self, "warmup_steps", "warmup_epochs", required=False)
        _one_of(self, "eval_every_steps", "eval_every_epochs", required=False)
        return self


class _Window(Spec):
    """A window in training time, in steps or epochs (resolved to steps by the planner)."""

    start_step: NonNegInt | None = None
    start_epoch: NonNegEpoch | None = None
    end_step: NonNegInt | None = None
    end_epoch: NonNegEpoch | None = None

    @model_validator(mode="after")
    def _window(self) -> _Window:
        _one_of(self, "start_step", "start_epoch", required=False)
        _one_of(self, "end_step", "end_epoch", required=False)
        for unit in ("step", "epoch"):
            start, end = getattr(self, f"start_{unit}"), getattr(self, f"end_{unit}")
            if start is not None and end is not None and end < start:
                raise ValueError(f"end_{unit} ({end}) must not be before start_{unit} ({start})")
        return self


Targets = Literal["encoder"] | list[str]
"""A target selection: :data:`ENCODER_TARGETS` or a list of regexes (see :data:`TARGETS_HELP`)."""


def _check_targets(value: object) -> object:
    """A clear message for a string that is not ``encoder`` (before the union's two errors)."""
    if isinstance(value, str) and value != ENCODER_TARGETS:
        raise ValueError(
            f"targets is the word {ENCODER_TARGETS!r} (every encoder linear layer) or a list of "
            f"regular expressions such as ['{value}'], not the string {value!r}"
        )
    return value


def _check_recipe_targets(value: object) -> object:
    if isinstance(value, list) and not value:
        raise ValueError(
            f"targets must list at least one regular expression (or be {ENCODER_TARGETS!r}, "
            "the default)"
        )
    return _check_targets(value)


def _check_target_regexes(value: Targets | None) -> Targets | None:
    return value if isinstance(value, str) else _check_regexes(value)


class _Targets(Spec):
    targets: Targets | None = Field(
        None, description=f"Default: the recipe's targets. {TARGETS_HELP}"
    )
    exclude: list[str] | None = Field(
        None,
        description="Regexes removing parameters from targets (default: the recipe's exclude). "
        "An encoder linear layer left out of every pruning modifier must be named here.",
    )

    _targets_given = field_validator("targets", mode="before")(_check_targets)
    _targets = field_validator("targets")(_check_target_regexes)
    _regexes = field_validator("exclude")(_check_regexes)


class _Structured(Spec):
    structure: str = Field("unstructured", description="unstructured | block4 | N:M (e.g. 2:4)")

    _structure = field_validator("structure")(_validate_structure)

    @property
    def group_size(self) -> int:
        """Weights per pruning group along the input dimension (1 for unstructured)."""
        return parse_structure(self.structure).group

    @property
    def is_nm(self) -> bool:
        return parse_structure(self.structure).kind == "nm"

    def nm_sparsity(self) -> float | None:
        """The only sparsity an N:M structure allows (1 - N/M); None for other structures."""
        return parse_structure(self.structure).nm_sparsity


class _Pruning(_Window, _Targets, _Structured):
    init_sparsity: Fraction = Field(
        0.0,
        description="Sparsity applied at the first pruning step (the paper's large first step).",
    )
    final_sparsity: Fraction = Field(..., description="Sparsity reached at the last pruning step.")
    update_every_steps: PositiveInt | None = None
    update_every_epochs: PositiveEpoch | None = None
    schedule: Literal["cubic", "linear"] = "cubic"
    scope: Literal["global", "per_layer"] = "global"

    @model_validator(mode="after")
    def _pruning(self) -> _Pruning:
        _one_of(self, "update_every_steps", "update_every_epochs", required=False)
        if self.init_sparsity > self.final_sparsity:
            raise ValueError(
                f"init_sparsity ({self.init_sparsity}) must not exceed final_sparsity ({self.final_sparsity})"
            )
        expected = self.nm_sparsity()
        if expected is not None:
            if abs(self.final_sparsity - expected) > 1e-9:
                raise ValueError(
                    f"structure {self.structure} prunes exactly {expected:g} of the weights: "
                    f"set final_sparsity to {expected:g}"
                )
        return self


class _PruningSchedule(ModifierSpec, _Pruning):
    prunes: ClassVar[bool] = True
    sets_masks: ClassVar[bool] = True
    schedules_sparsity: ClassVar[bool] = True
    overlap_kind: ClassVar[str | None] = "pruning"

    def plan_fields(self) -> dict[str, Any]:
        return {"structure": self.structure, "scope": self.scope}


class GMPSpec(_PruningSchedule):
    """Gradual magnitude pruning: cubic/linear ramp from init to final sparsity."""

    type: Literal["gmp"]


class OBertSpec(_PruningSchedule):
    """oBERT: second-order (block empirical Fisher) pruning on the GMP schedule."""

    needs_grad_batches: ClassVar[bool] = True

    type: Literal["obert"]
    num_grads: Annotated[int, Field(gt=0, le=100_000)] = 1024
    fisher_block_size: Annotated[int, Field(gt=0, le=100_000)] = 50
    damp: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-7
    grad_batch_size: Annotated[int, Field(gt=0, le=4096)] = 16
    recomputations: Annotated[int, Field(gt=0, le=64)] = 1
    fisher: Literal["block", "mfac"] = "block"
    max_memory_gb: Annotated[float, Field(gt=0.0, le=4096)] | None = None
    woodbury_batch: Annotated[int, Field(gt=0, le=1024)] = Field(
        1,
        description="Gradients per rank-k Woodbury update of the inverse Fisher: the same Fisher "
        "up to float rounding, faster per gradient at B=50 for k*numel*4 more bytes; 1 is the "
        "exact rank-1 recursion.",
    )

    @model_validator(mode="after")
    def _blocks(self) -> OBertSpec:
        if self.fisher_block_size % self.group_size:
            raise ValueError(
                f"fisher_block_size ({self.fisher_block_size}) must be divisible by the "
                f"structure's group size ({self.group_size}); e.g. 32 for block4"
            )
        return self


class ConstantSpec(ModifierSpec, _Window, _Targets):
    """Keep the current zeros of the targets fixed (sparse transfer / fine-tune after pruning)."""

    prunes: ClassVar[bool] = True
    sets_masks: ClassVar[bool] = True
    overlap_kind: ClassVar[str | None] = "pruning"

    type: Literal["constant"]


class DistillSpec(ModifierSpec, _Window):
    """Knowledge distillation: (1-h)*task + h*T^2*KL(softmax(t/T) || softmax(s/T))."""

    needs_loss_inputs: ClassVar[bool] = True
    needs_teacher: ClassVar[bool] = True
    training_only: ClassVar[bool] = True
    overlap_kind: ClassVar[str | None] = "distillation"

    type: Literal["distill"]
    teacher: str = Field(
        "auto", min_length=1, description="'auto' (fine-tune one first) or a path / hub name."
    )
    hardness: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    temperature: Annotated[float, Field(gt=0.0, le=100.0)] = Field(
        5.5,
        description="Softmax temperature T; 5.5 is the value of 'How to Prune Your Language "
        "Model' (at T in {1, 2} the teacher's outputs are too confident to teach much).",
    )
    teacher_epochs: PositiveEpoch | None = Field(
        None,
        description="With teacher: auto, epochs of dense fine-tuning for the teacher (default: the stage's).",
    )

    def describe(self) -> str:
        return (
            f"teacher {self.teacher}, hardness {self.hardness:g}, temperature {self.temperature:g}"
        )

    def plan_fields(self) -> dict[str, Any]:
        return {"teacher": self.teacher, "hardness": self.hardness, "temperature": self.temperature}


class LRSpec(ModifierSpec, _Window):
    """Learning-rate schedule; owns the optimizer's LR inside its window."""

    sets_lr: ClassVar[bool] = True
    training_only: ClassVar[bool] = True
    overlap_kind: ClassVar[str | None] = "learning-rate"

    type: Literal["lr"]
    schedule: Literal["constant", "linear", "cosine", "cyclic_linear"] = "linear"
    init_lr: LearningRate
    final_lr: Annotated[float, Field(ge=0.0, le=10.0)] = 0.0
    warmup_steps: NonNegInt | None = None
    warmup_epochs: NonNegEpoch | None = None
    cycle_steps: PositiveInt | None = None
    cycle_epochs: PositiveEpoch | None = None

    @model_validator(mode="after")
    def _lr(self) -> LRSpec:
        _one_of(self, "warmup_steps", "warmup_epochs", required=False)
        _one_of(self, "cycle_steps", "cycle_epochs", required=self.schedule == "cyclic_linear")
        if self.schedule != "cyclic_linear" and (self.cycle_steps or self.cycle_epochs):
            raise ValueError("cycle_steps/cycle_epochs only apply to schedule: cyclic_linear")
        return self


class CrAMSpec(ModifierSpec, _Window, _Targets, _Structured):
    """CrAM: compression-aware training (sharpness-style step at a sampled sparsity).

    Trains the model dense so that it keeps its accuracy when pruned one-shot afterwards to any
    of ``sparsities``; it sets no masks itself."""

    prunes: ClassVar[bool] = True
    needs_loss_inputs: ClassVar[bool] = True
    second_pass: ClassVar[bool] = True
    training_only: ClassVar[bool] = True
    overlap_kind: ClassVar[str | None] = "pruning"

    type: Literal["cram"]
    rho: Annotated[float, Field(gt=0.0, le=10.0)] = Field(
        0.05,
        description="Perturbation size: w' = w + rho * g (with normalize: w + rho * g / ||g||).",
    )
    normalize: bool = Field(
        False,
        description="Scale the ascent step to length rho (g divided by its L2 norm over every parameter "
        "that has a gradient, as in SAM), so that rho does not depend on the gradient's scale.",
    )
    sparsities: list[Fraction] = Field(
        default_factory=lambda: [0.5, 0.7, 0.9],
        min_length=1,
        max_length=64,
        description="Sparsities sampled (uniformly, one per step) for the compressed point.",
    )
    variant: Literal["cram", "cram_plus"] = Field(
        "cram_plus",
        description="cram: step with the compressed point's gradient; cram_plus: plus the dense one.",
    )
    scope: Literal["global", "per_layer"] = "per_layer"

    @model_validator(mode="after")
    def _cram(self) -> CrAMSpec:
        if len(set(self.sparsities)) != len(self.sparsities):
            raise ValueError("sparsities must not repeat (each is drawn with equal probability)")
        expected = self.nm_sparsity()
        if expected is not None and any(abs(s - expected) > 1e-9 for s in self.sparsities):
            raise ValueError(
                f"structure {self.structure} prunes exactly {expected:g} of the weights: set sparsities to [{expected:g}]"
            )
        return self

    def describe(self) -> str:
        return (
            f"{self.variant}, rho {self.rho:g}{' (normalized)' if self.normalize else ''}, "
            f"sparsities {'/'.join(f'{s:g}' for s in self.sparsities)} "
            f"({self.structure}, {self.scope}); "
            "2 forward+backward passes per step, the model stays dense"
        )

    def plan_fields(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "rho": self.rho,
            "sparsities": list(self.sparsities),
            "structure": self.structure,
            "scope": self.scope,
        }


class QuantizeSpec(ModifierSpec, _Window, _Targets):
    """INT8 quantization of linear layers: fake-quant of their weights (symmetric int8 per output
    channel) and inputs (int8 per tensor, observed then frozen) from the window's start to the
    end of the run, trained with the straight-through estimator (QAT) or only calibrated (PTQ,
    in a ``training.steps: 0`` stage). Pruned weights stay exact zeros."""

    quantizes: ClassVar[bool] = True
    overlap_kind: ClassVar[str | None] = "quantization"

    type: Literal["quantize"]
    weights: Literal["int8_per_channel_symmetric"] = Field(
        "int8_per_channel_symmetric",
        description="Weight scheme: scale[o] = max|W[o]| / 127, q = round(W / scale) in -127..127.",
    )
    activations: Literal["int8_per_tensor_symmetric"] = Field(
        "int8_per_tensor_symmetric",
        description="Input scheme: scale = max|observed input| / 127, q in -128..127, zero point 0.",
    )
    freeze_observers_at_step: NonNegInt | None = Field(
        None,
        description="Step at which the input ranges stop being observed and stay fixed "
        "(default: the window's end; a stage's end freezes them in any case).",
    )
    freeze_observers_at_epoch: NonNegEpoch | None = None
    calibration_batches: Annotated[int, Field(ge=0, le=100_000)] = Field(
        0,
        description="Training batches run (no gradients, eval mode) at the window's start to "
        "observe the input ranges first; required (> 0) in a steps: 0 stage (PTQ).",
    )

    @model_validator(mode="after")
    def _quantize(self) -> QuantizeSpec:
        _one_of(self, "freeze_observers_at_step", "freeze_observers_at_epoch", required=False)
        for unit in ("step", "epoch"):
            freeze = getattr(self, f"freeze_observers_at_{unit}")
            start, end = getattr(self, f"start_{unit}"), getattr(self, f"end_{unit}")
            if freeze is not None and start is not None and freeze < start:
                raise ValueError(
                    f"freeze_observers_at_{unit} ({freeze:g}) is before start_{unit} ({start:g})"
                )
            if freeze is not None and end is not None and freeze > end:
                raise ValueError(
                    f"freeze_observers_at_{unit} ({freeze:g}) is after end_{unit} ({end:g})"
                )
        return self

    def describe(self) -> str:
        calib = (
            f"; calibration {self.calibration_batches} batches" if self.calibration_batches else ""
        )
        return (
            "int8: weights per output channel (symmetric), inputs per tensor; fake-quant from "
            f"the window's start to the end of the run, observers frozen at the window's end{calib}"
        )

    def plan_fields(self) -> dict[str, Any]:
        return {
            "weights": self.weights,
            "activations": self.activations,
            "calibration_batches": self.calibration_batches,
        }


Modifier = Annotated[
    GMPSpec | OBertSpec | ConstantSpec | DistillSpec | LRSpec | CrAMSpec | QuantizeSpec,
    Field(discriminator="type"),
]
MODIFIER_TYPES: dict[str, type[ModifierSpec]] = {
    "gmp": GMPSpec,
    "obert": OBertSpec,
    "constant": ConstantSpec,
    "distill": DistillSpec,
    "lr": LRSpec,
    "cram": CrAMSpec,
    "quantize": QuantizeSpec,
}


class StageSpec(Spec):
    """A named stage: its own training settings and modifiers, run after the previous one."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    training: TrainingSpec | None = None
    modifiers: list[Modifier] = Field(default_factory=list, max_length=256)


# Training fields given in one of two units: setting one in a stage drops the other inherited one.
TRAINING_PAIRS = (
    ("epochs", "steps"),
    ("warmup_steps", "warmup_epochs"),
    ("eval_every_steps", "eval_every_epochs"),
)


class Recipe(Spec):
    """A whole recipe. Either top-level ``modifiers`` or ``stages``, not both."""

    version: Literal[1] = 1
    description: Annotated[str, Field(max_length=10_000)] | None = None
    variables: dict[str, float | int] = Field(default_factory=dict)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    targets: Targets = Field(ENCODER_TARGETS, description=TARGETS_HELP)
    exclude: list[str] = Field(
        default_factory=list,
        description="Regexes removing parameters from the targets. recipec apply and plan refuse a "
        "recipe that leaves an encoder linear layer unpruned unless an exclude names it.",
    )
    stages: list[StageSpec] | None = Field(None, min_length=1, max_length=32)
    modifiers: list[Modifier] | None = Field(None, max_length=256)

    _targets_given = field_validator("targets", mode="before")(_check_recipe_targets)
    _targets = field_validator("targets")(_check_target_regexes)
    _regexes = field_validator("exclude")(_check_regexes)

    @model_validator(mode="after")
    def _stages(self) -> Recipe:
        if self.stages is not None and self.modifiers is not None:
            raise ValueError("give either top-level 'modifiers' or 'stages', not both")
        if self.stages is not None:
            names = [s.name for s in self.stages]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"stage names must be unique; repeated: {', '.join(dupes)}")
        for stage in self.resolved_stages():
            training = self.stage_training(stage)
            if training.epochs is None and training.steps is None:
                where = f"stage {stage.name!r}" if self.stages else "training"
                raise ValueError(f"{where}: set training.epochs or training.steps")
        return self

    def targets_of(self, spec: Any = None) -> tuple[str | tuple[str, ...], tuple[str, ...]]:
        """``(targets, exclude)`` a modifier acts on, hashable: its own, else the recipe's (an
        empty ``targets`` list, like a missing one, means the recipe's). ``targets`` is
        :data:`ENCODER_TARGETS` or a tuple of regexes; ``spec=None`` gives the recipe's."""
        targets = getattr(spec, "targets", None) or self.targets
        exclude = getattr(spec, "exclude", None)
        return (
            targets if isinstance(targets, str) else tuple(targets),
            tuple(self.exclude if exclude is None else exclude),
        )

    def resolved_stages(self) -> list[StageSpec]:
        """The stages to run; a recipe without ``stages`` is one stage called ``main``."""
        if self.stages is not None:
            return list(self.stages)
        return [StageSpec(name="main", training=None, modifiers=list(self.modifiers or []))]

    def summary(self) -> str:
        """One line: each stage with its training length and modifier types."""
        parts = []
        for stage in self.resolved_stages():
            kinds = ", ".join(m.type for m in stage.modifiers) or "no modifiers"
            parts.append(f"{stage.name}: {self.stage_training(stage).length_text()}, {kinds}")
        return "; ".join(parts)

    def stage_training(self, stage: StageSpec) -> TrainingSpec:
        """A stage's training settings: the recipe's, overridden field by field by the stage's."""
        if stage.training is None:
            return self.training
        update = {name: getattr(stage.training, name) for name in stage.training.model_fields_set}
        for pair in TRAINING_PAIRS:
            for name in pair:
                if name in update:
                    update.update(
                        {other: None for other in pair if other != name and other not in update}
                    )
        return TrainingSpec.model_validate({**self.training.model_dump(), **update})

"""The sparse checkpoint format: the one writer and the one reader.

:func:`write_checkpoint` writes what ``recipec apply`` leaves in ``RUN_DIR/model`` (see
docs/contracts.md): a Hugging Face ``save_pretrained`` folder whose pruned weights are exact
zeros, the tokenizer, ``masks.safetensors`` (``{param_name: uint8, 1 = keep}``) and the
resolved ``recipe.yaml``. Tests and benchmarks build their checkpoints with it too.

:func:`load_checkpoint` reads ``RUN_DIR`` (with ``RUN_DIR/model/``) or any Hugging Face folder,
optionally with ``masks.safetensors`` and ``recipe.yaml``; without a masks file the masks are
the nonzero pattern of the encoder's linear weights. Models and tokenizers are loaded by
:mod:`recipec.models`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from recipec import architectures, models
from recipec.models import ModelLoadError
from recipec.outputs import share_like_umask, write_text_atomic
from recipec.sparsity.masks import apply_masks_

MASKS_FILE = "masks.safetensors"
RECIPE_FILES = ("recipe.yaml", "recipe.yml")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")

# The fallback for models whose blocks recipec.architectures cannot read: a linear layer inside
# a numbered block, "encoder.layer.3.", "transformer.layer.3.", "layers.3.", "h.3.", "block.3.".
_ENCODER_BLOCK = re.compile(r"(^|\.)(layer|layers|h|block)\.\d+\.")


class CheckpointError(Exception):
    """A checkpoint that cannot be read as asked (a user error)."""


@dataclass
class SparseCheckpoint:
    """A loaded model with its masks and the files that travel with it."""

    model: torch.nn.Module
    model_dir: Path
    task: str
    masks: dict[str, torch.Tensor]
    masks_source: str
    run_dir: Path | None = None
    recipe_path: Path | None = None
    squashed: dict[str, int] = field(default_factory=dict)

    @property
    def config(self):
        """The model's Hugging Face config."""
        return self.model.config

    def weights(self) -> dict[str, torch.Tensor]:
        """The (squashed) weights of every masked tensor."""
        params = dict(self.model.named_parameters())
        return {name: params[name].detach() for name in self.masks}


def resolve_model_dir(path: str | Path) -> tuple[Path, Path | None]:
    """Return ``(model_dir, run_dir)`` for a run directory or a model folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if not path.is_dir():
        hint = (
            ": this ONNX file is already exported (time its folder with recipec bench FOLDER)"
            if path.suffix.lower() == ".onnx"
            else ""
        )
        raise CheckpointError(f"{path}: expected a run directory or a model folder{hint}")
    if (path / "model" / "config.json").is_file():
        return path / "model", path
    if (path / "config.json").is_file():
        run_dir = path.parent if path.name == "model" and (path.parent / "model").is_dir() else None
        return path, run_dir
    raise CheckpointError(f"{path}: no config.json here nor in {path / 'model'}")


def read_config(model_dir: Path):
    """The folder's Hugging Face config."""
    try:
        return models.load_config(model_dir)
    except ModelLoadError as err:
        exc = err.__cause__ if err.__cause__ is not None else err
        raise CheckpointError(f"{model_dir}: cannot read config.json: {exc}") from None


def detect_task(config, task: str = "auto") -> str:
    """The head to load (``recipec.models.head_for``): ``task`` when given, else from the config."""
    try:
        return models.head_for(config, head=task)
    except ModelLoadError as exc:
        raise CheckpointError(str(exc)) from None


def load_model(model_dir: Path, task: str) -> torch.nn.Module:
    """Load the Hugging Face model for ``task`` in float32, eval mode (dropout off)."""
    if not any((model_dir / name).exists() for name in WEIGHT_FILES):
        raise CheckpointError(f"{model_dir}: no model weights (model.safetensors) in this folder")
    try:
        loaded = models.load_model(model_dir, head=task, dtype=torch.float32, quiet=False)
    except ModelLoadError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{model_dir}: cannot load as {task}: {first}") from err
    if loaded.resized_head:
        raise CheckpointError(
            f"{model_dir}: cannot load as {task}: its saved head does not fit a {task} head "
            f"({', '.join(loaded.resized_head)}); pass the head it was trained with (--task)"
        )
    return loaded.model.eval()


def encoder_linear_weights(model: torch.nn.Module) -> list[str]:
    """Names of the weights of every ``nn.Linear`` of the encoder blocks, each once
    (:func:`recipec.architectures.encoder_linears`: ALBERT's shared layer, ModernBERT's fused
    ``Wqkv`` too); for a model whose blocks it cannot read, those inside a numbered block."""
    try:
        names = [info.param_name for info in architectures.encoder_linears(model)]
    except architectures.ArchitectureError:
        names = []
    if names:
        return names
    for mod_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and _ENCODER_BLOCK.search(mod_name + "."):
            names.append(f"{mod_name}.weight")
    return names


def infer_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Masks (True = keep) taken as the nonzero pattern of the encoder linear weights."""
    params = dict(model.named_parameters())
    return {name: params[name].detach() != 0 for name in encoder_linear_weights(model)}


def _match_param_name(name: str, params: dict[str, torch.nn.Parameter]) -> str | None:
    if name in params:
        return name
    # Tolerate a wrapper prefix on either side (e.g. "model." or a bare-encoder save).
    hits = [p for p in params if p.endswith("." + name) or name.endswith("." + p)]
    return hits[0] if len(hits) == 1 else None


def load_masks(path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Read ``masks.safetensors`` and check every entry against the model's parameters."""
    from safetensors.torch import load_file

    try:
        raw = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: cannot read masks: {exc}") from exc
    params = dict(model.named_parameters())
    masks: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        target = _match_param_name(name, params)
        if target is None:
            raise CheckpointError(f"{path}: mask {name!r} names no parameter of the model")
        if tuple(tensor.shape) != tuple(params[target].shape):
            raise CheckpointError(
                f"{path}: mask {name!r} has shape {tuple(tensor.shape)}, "
                f"the parameter has {tuple(params[target].shape)}"
            )
        masks[target] = tensor != 0
    return masks


@torch.no_grad()
def squash(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, int]:
    """Write exact zeros where a mask is False; return how many nonzeros each tensor lost."""
    params = dict(model.named_parameters())
    changed = {}
    for name, mask in masks.items():
        stray = int(((params[name] != 0) & ~mask.to(params[name].device)).sum())
        if stray:
            changed[name] = stray
    apply_masks_(params, masks)
    return changed


def find_recipe(model_dir: Path, run_dir: Path | None) -> Path | None:
    """The resolved recipe next to the weights, or in the run directory."""
    for folder in (model_dir, run_dir):
        if folder is None:
            continue
        for name in RECIPE_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


def load_checkpoint(path: str | Path, task: str = "auto") -> SparseCheckpoint:
    """Load a run directory or model folder, its masks, and squash the masks into zeros."""
    model_dir, run_dir = resolve_model_dir(path)
    task = detect_task(read_config(model_dir), task)
    model = load_model(model_dir, task)
    masks, source = {}, MASKS_FILE
    if (model_dir / MASKS_FILE).is_file():
        masks = load_masks(model_dir / MASKS_FILE, model)
    if not masks:  # no masks file, or an empty one (a dense run of recipec apply)
        masks = infer_masks(model)
        source = "inferred (nonzero pattern of encoder linear weights)"
    if not masks:
        raise CheckpointError(f"{model_dir}: no masks given and no encoder linear layers found")
    squashed = squash(model, masks)
    return SparseCheckpoint(
        model=model,
        model_dir=model_dir,
        task=task,
        masks=masks,
        masks_source=source,
        run_dir=run_dir,
        recipe_path=find_recipe(model_dir, run_dir),
        squashed=squashed,
    )


def load_tokenizer(model_dir: Path):
    """The folder's tokenizer, or None when it has none (or it cannot be read)."""
    return models.load_tokenizer(model_dir, required=False, quiet=False)


@torch.no_grad()
def magnitude_masks(
    model: torch.nn.Module, sparsity: float, names: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """Per-tensor unstructured magnitude masks (True = keep) for tests and benchmarks.

    The real pruning algorithms live in ``recipec.sparsity``; this only makes a checkpoint
    of a given sparsity to export or time.
    """
    params = dict(model.named_parameters())
    masks = {}
    for name in names if names is not None else encoder_linear_weights(model):
        weight = params[name].detach()
        k = int(round(sparsity * weight.numel()))
        mask = torch.ones_like(weight, dtype=torch.bool)
        if k > 0:
            idx = torch.argsort(weight.abs().flatten())[:k]
            mask.view(-1)[idx] = False
        masks[name] = mask
    return masks


def write_checkpoint(
    model: torch.nn.Module,
    out_dir: str | Path,
    masks: dict[str, torch.Tensor] | None = None,
    tokenizer=None,
    recipe_text: str | None = None,
    *,
    weights: bool = True,
) -> Path:
    """Write the sparse checkpoint folder ``recipec apply`` writes (``RUN_DIR/model``).

    Args:
        model: The model; its pruned weights are squashed into exact zeros first (in place).
        out_dir: The folder (created if needed).
        masks: Masks (True = keep) saved as ``masks.safetensors`` (uint8, 1 = keep); None
            writes no masks file.
        tokenizer: Saved beside the weights when given.
        recipe_text: The resolved recipe, saved as ``recipe.yaml`` when given.
        weights: False writes the config instead of the weights and masks (an ONNX-only
            deployment folder).

    Returns:
        ``out_dir`` as a ``Path``.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not weights:
        model.config.save_pretrained(str(out))
    else:
        if masks:
            squash(model, masks)
        model.save_pretrained(str(out))
        if masks is not None:
            uint8 = {n: m.to(torch.uint8).cpu().contiguous() for n, m in masks.items()}
            save_file(uint8, str(out / MASKS_FILE))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    if recipe_text is not None:
        write_text_atomic(out / RECIPE_FILES[0], recipe_text)
    share_like_umask(out)
    return out

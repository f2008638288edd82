"""``recipec export``: a sparse checkpoint -> a verified ONNX deployment folder."""

from __future__ import annotations

from pathlib import Path

import click

from recipec.cli._common import fail, quiet_hf, to_stderr
from recipec.models import HEADS


@click.command("export")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--onnx", "to_onnx", is_flag=True, help="Export to ONNX (the only format today).")
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path),
    default=None,
    help="Deployment folder [default: RUN_DIR/onnx, or <model folder>-onnx].",
)
@click.option(
    "--opset", type=int, default=17, show_default=True, help="ONNX opset (DeepSparse needs <= 18)."
)
@click.option(
    "--task",
    type=click.Choice(["auto", *HEADS]),
    default="auto",
    show_default=True,
    help="Head to load; auto reads config.architectures.",
)
@click.option(
    "--atol",
    type=float,
    default=None,
    help="onnxruntime vs PyTorch tolerance on the logits [default: 1e-4; 2e-2 for an INT8 "
    "export, against the fake-quant model].",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing output folder that an earlier export wrote "
    "(never one holding the checkpoint or the current folder).",
)
@click.option(
    "--no-torch-weights",
    is_flag=True,
    help="Leave model.safetensors/masks.safetensors out (no torch-csr, no re-verification).",
)
def command(
    path: Path,
    to_onnx: bool,
    output: Path | None,
    opset: int,
    task: str,
    atol: float | None,
    overwrite: bool,
    no_torch_weights: bool,
) -> None:
    """Export RUN_DIR_OR_CHECKPOINT to ONNX with masks squashed into exact zeros.

    Before reporting success it checks that every pruned tensor's zeros in the ONNX
    initializers equal the checkpoint's masks, and that onnxruntime and PyTorch agree within
    --atol on sample inputs. A checkpoint with quantization.json (a recipe with a quantize
    modifier) exports as INT8 QDQ with int8 weights, checked against the fake-quant model, plus
    model.int8.safetensors. The folder holds model.onnx (dynamic batch and sequence axes),
    config, tokenizer, recipe, sparsity.json and, by default, the torch weights and masks.

    \b
    Example:
      recipec export runs/quickstart --onnx
      recipec bench runs/quickstart/onnx --dense-baseline
    """
    if not to_onnx:
        fail("choose an export format: pass --onnx")
    quiet_hf()
    from recipec.checkpoint import CheckpointError
    from recipec.export.onnx import ExportError, VerificationError, export

    try:
        result = export(
            path,
            output,
            opset=opset,
            task=task,
            atol=atol,
            overwrite=overwrite,
            torch_weights=not no_torch_weights,
            log=to_stderr("  "),
        )
    except (CheckpointError, ExportError) as exc:
        fail(str(exc).splitlines()[0])
    except VerificationError as exc:
        fail(f"verification failed, nothing written: {exc}", code=1)
    pruned = sum(1 for t in result.tensors.values() if t["zeros"])
    click.echo(f"exported {result.onnx_path} ({result.task})")
    click.echo(
        f"  verified: zeros of {len(result.tensors)} tensors ({pruned} pruned) match the masks; "
        f"onnxruntime vs PyTorch max |diff| {result.ort_max_abs_diff:.1e}"
    )
    if result.int8_layers:
        click.echo(
            f"  INT8 (QDQ): {result.int8_layers} linears with int8 weights per output channel and "
            "int8 inputs per tensor; pruned weights are 0 in the int8 weights"
        )
    click.echo(
        f"  sparsity of masked tensors: {result.overall_sparsity:.2%} ({result.masks_source})"
    )
    click.echo(
        f"  inputs: {', '.join(result.input_names)}; details in {result.output_dir / 'sparsity.json'}"
    )

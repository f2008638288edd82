"""The ``recipec`` command line: one module per subcommand, loaded only when invoked.

Each module ``recipec.cli.<name>`` defines a click command called ``command``. Keeping the
imports lazy keeps ``recipec --help`` free of torch/transformers (well under a second).
"""

from __future__ import annotations

import importlib

import click

# name -> (module, one-line help shown by `recipec --help` without importing the module)
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": (
        "recipec.cli.validate",
        "Check a recipe; print a summary or every error with FILE:LINE:COL.",
    ),
    "plan": (
        "recipec.cli.plan",
        "Print the compiled schedule (steps, sparsity, LR) and the model's cost table.",
    ),
    "apply": (
        "recipec.cli.apply",
        "Fine-tune and prune a model with a recipe; write a sparse checkpoint and report.",
    ),
    "export": ("recipec.cli.export", "Export a sparse checkpoint to verified, masked ONNX."),
    "bench": (
        "recipec.cli.bench",
        "Benchmark dense vs sparse CPU latency: onnxruntime (FP32/INT8), DeepSparse, torch-csr, "
        "recipec's engine.",
    ),
    "predict": (
        "recipec.cli.predict",
        "Labels and scores for raw text from a deployment folder, on recipec's CPU engine.",
    ),
    "convert": ("recipec.cli.convert", "Convert a SparseML recipe into a recipec recipe."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module_name, _ = COMMANDS[cmd_name]
        module = importlib.import_module(module_name)
        return module.command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, short) for name, (_, short) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="recipec")
def main() -> None:
    """recipec: compile sparsity recipes for BERT-family models into training hooks.

    \b
    Examples:
      recipec validate recipes/downstream_gmp_90.yaml
      recipec plan recipes/quickstart.yaml --steps-per-epoch 100 --plot plan.png
      recipec apply recipes/quickstart.yaml
      recipec export runs/quickstart --onnx
      recipec bench runs/quickstart/onnx --dense-baseline
      recipec predict runs/quickstart/onnx --text "a charming, funny film"
    """

"""``recipec plan``: print the compiled schedule, and the model's cost/benefit table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from recipec.cli._common import check_image_path, fail, load_or_exit, set_option


def _grouped_tensors(matched) -> list[str]:
    """Tensor names with the same shape that differ only in their layer number, one line each:
    ``bert.encoder.layer.{0-5}.attention.self.query.weight [384, 384]`` (in first-seen order)."""
    from recipec.sparsity.selection import grouped_names

    return grouped_names(list(matched), matched)


def _format_plan(plans) -> list[str]:
    lines: list[str] = []
    for plan in plans:
        prune_only = plan.training.prune_only
        if prune_only:
            lines.append(
                f"stage {plan.name!r}: prune-only (training.steps: 0): one-shot pruning at step 0, "
                "no optimizer step, then evaluation"
            )
        else:
            lines.append(
                f"stage {plan.name!r}: {plan.total_steps} steps ({plan.steps_per_epoch} steps/epoch), "
                f"warm-up {plan.warmup_steps}, eval every {plan.eval_every or 'end'}"
            )
        for mod in plan.modifiers:
            head = f"  [{mod.index}] {mod.type:<8} steps {mod.window.start}..{mod.window.end}"
            if mod.pruning_steps:
                spec = mod.spec
                when = (
                    f"{spec.schedule}, every {mod.update_every} steps"
                    if len(mod.pruning_steps) > 1
                    else f"one-shot at step {mod.pruning_steps[0]}"
                )
                lines.append(f"{head}  {spec.structure}, {spec.scope}, {when}")
                for step, sparsity in zip(mod.pruning_steps, mod.sparsities):
                    lr = "" if prune_only else f"   lr {plan.lr_at(step):.3g}"
                    lines.append(f"        step {step:>7}: sparsity {100 * sparsity:6.2f}%{lr}")
            elif mod.describe():
                lines.append(f"{head}  {mod.describe()}")
            else:
                lines.append(head)
        if not prune_only:
            warmups = [plan.warmup_steps] + [
                m.window.start + m.warmup for m in plan.with_trait("sets_lr") if m.warmup
            ]
            marks = sorted(
                {
                    0,
                    plan.total_steps - 1,
                    *[m.window.start for m in plan.modifiers if m.window.start < plan.total_steps],
                    *[w for w in warmups if 0 < w < plan.total_steps],
                }
            )  # the peak after a warm-up
            lines.append("  lr: " + ", ".join(f"step {s}: {plan.lr_at(s):.3g}" for s in marks))
    return lines


def _plot(plans, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(plans), 1, figsize=(8, 3.2 * len(plans)), squeeze=False)
    for ax, plan in zip(axes[:, 0], plans):
        steps = list(range(plan.total_steps))
        ax.plot(steps, [plan.lr_at(s) for s in steps], color="tab:blue", label="learning rate")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("learning rate", color="tab:blue")
        ax2 = ax.twinx()
        events = plan.pruning_events()
        if events:
            xs, ys, current = [0], [0.0], 0.0
            for step, _, sparsity in events:
                xs += [step, step]
                ys += [current, sparsity]
                current = sparsity
            xs.append(max(plan.total_steps, 1))
            ys.append(current)
            ax2.plot(xs, [100 * y for y in ys], color="tab:red", label="target sparsity")
        ax2.set_ylabel("sparsity (%)", color="tab:red")
        ax2.set_ylim(0, 100)
        ax.set_title(f"stage {plan.name}" + (" (prune-only)" if plan.training.prune_only else ""))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _model_section(
    recipe, plans, model_name: str, seq_len: int, as_json: bool
) -> tuple[dict, str | None]:
    """The matched tensors and cost/benefit table of every stage (printed unless ``as_json``),
    and why the recipe's targets do not fit the model, if they do not
    (:func:`recipec.sparsity.selection.check_targets`)."""
    from recipec.architectures import ArchitectureError
    from recipec.models import meta_model
    from recipec.sparsity.selection import check_targets, cost_table

    try:
        loaded = meta_model(None if model_name in ("", "embedded") else model_name)
    except Exception as exc:  # a model that cannot be built: one clear line
        fail(f"cannot build model {model_name!r}: {exc}")
    model = _after_layer_drops(plans, loaded, model_name)
    check = check_targets(model, recipe)
    params = dict(model.named_parameters())
    out: dict = {
        "model": model_name,
        "family": check.family,
        "seq_len": seq_len,
        "stages": [],
        "problems": check.problems,
        "dense_encoder_linears": check.dense,
        "excluded_encoder_linears": check.excluded,
    }
    for plan in plans:
        matched = {n: tuple(params[n].shape) for n in check.stage_names(plan.name)}
        try:
            table = cost_table(model, seq_len, matched)
        except ArchitectureError as exc:
            fail(f"{model_name}: {exc}")
        total_params = sum(c.params for c in table)
        total_flops = sum(c.flops for c in table)
        columns = ("component", "params", "params_pct", "flops_pct", "targeted_params")
        entry = {
            "stage": plan.name,
            "matched": [{"name": n, "shape": list(s)} for n, s in matched.items()],
            "components": [dict(zip(columns, c.row(total_params, total_flops))) for c in table],
        }
        obert = [m for m in plan.with_trait("needs_grad_batches") if not m.spec.structured]
        if obert:
            from recipec.sparsity.obs import estimate_fisher_bytes

            spec = obert[0].spec
            numels = [int(math.prod(s)) for s in matched.values()]
            entry["fisher_bytes"] = estimate_fisher_bytes(
                numels, spec.fisher_block_size, spec.fisher, spec.num_grads
            )
        out["stages"].append(entry)
        if not as_json:
            _print_stage_costs(model_name, check.family, seq_len, plan.name, entry, table, matched)
    if check.excluded and not as_json:
        click.echo(f"\nencoder linear layers left dense by exclude ({len(check.excluded)}):")
        for line in _grouped_tensors({n: tuple(params[n].shape) for n in check.excluded}):
            click.echo(f"    {line}")
    from recipec.cli._structure import structure_section

    structure = structure_section(plans, loaded, model_name, seq_len, as_json)
    if structure is not None:
        out["structure"] = structure
    return out, check.error()


def _after_layer_drops(plans, model, model_name: str):
    """A copy of the (weightless) model with the recipe's ``layers`` drops done, as the compiler
    does before it matches any target: the matched tensors and costs are those of the layers
    that train (``model`` itself when the recipe drops none)."""
    import copy

    from recipec.modifiers.layers import kept_layers
    from recipec.sparsity.shrink import drop_layers_
    from recipec.sparsity.structured import StructureError

    specs = [m.spec for p in plans for m in p.modifiers if m.spec.structured == "layers"]
    if not specs:
        return model
    model = copy.deepcopy(model)
    for spec in specs:
        try:
            drop_layers_(model, kept_layers(spec, model))
        except (StructureError, ValueError) as exc:
            fail(f"{model_name}: layers modifier: {exc}")
    return model


def _print_stage_costs(model_name, family, seq_len, stage, entry, table, matched) -> None:
    total_params = sum(c.params for c in table)
    total_flops = sum(c.flops for c in table)
    kind = f"{family}, " if family else "architecture not in recipec's family table, "
    click.echo(
        f"\nmodel {model_name} ({kind}seq {seq_len}), stage {stage!r}: "
        f"{len(matched)} target tensors"
    )
    click.echo(f"  {'component':<18}{'params':>12}{'% params':>10}{'% FLOPs':>10}{'targeted':>12}")
    for c in table:
        name, params, pp, fp, pruned = c.row(total_params, total_flops)
        click.echo(f"  {name:<18}{params:>12,}{pp:>9.1f}%{fp:>9.1f}%{pruned:>12,}")
    for line in _grouped_tensors(matched):
        click.echo(f"    {line}")
    if "fisher_bytes" in entry:
        click.echo(
            f"  oBERT inverse Fisher estimate: {entry['fisher_bytes'] / 2**30:.2f} GiB (fp32)"
        )


def _check_against_model(recipe: str, overrides, loaded, model_name: str) -> None:
    """Structured modifiers against the model (file:line errors, exit 2), e.g. every head of a
    layer removed."""
    if not any(m.structured for s in loaded.resolved_stages() for m in s.modifiers):
        return
    from recipec.models import meta_model
    from recipec.sparsity.structured import model_facts

    try:
        facts = model_facts(meta_model(None if model_name in ("", "embedded") else model_name))
    except Exception:  # reported by the model section
        return
    load_or_exit(recipe, overrides, model=facts)


@click.command("plan")
@click.argument("recipe")
@click.option(
    "--steps-per-epoch",
    type=click.IntRange(min=1),
    default=None,
    help="Optimizer steps per epoch (needed when the recipe uses epochs).",
)
@set_option
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Write a PNG of sparsity and LR against steps.",
)
@click.option(
    "--model",
    default=None,
    help="Also print the cost/benefit table and the matched tensors for this model "
    "('embedded' for all-MiniLM-L6-v2, a local folder or a hub name).",
)
@click.option(
    "--seq-len",
    type=click.IntRange(min=1),
    default=128,
    show_default=True,
    help="Sequence length for the FLOPs shares.",
)
def command(
    recipe: str,
    steps_per_epoch: int | None,
    overrides: tuple[str, ...],
    as_json: bool,
    plot: str | None,
    model: str | None,
    seq_len: int,
) -> None:
    """Print RECIPE's schedule resolved to optimizer steps.

    \b
    Examples:
      recipec plan recipes/downstream_gmp_90.yaml --steps-per-epoch 4210
      recipec plan quickstart --steps-per-epoch 125 --plot plan.png --model embedded
      recipec plan my.yaml --steps-per-epoch 100 --json > plan.json
    """
    from recipec.plan import PlanError, plan_to_dict, resolve

    loaded = load_or_exit(recipe, overrides)
    if model is not None:
        _check_against_model(recipe, overrides, loaded, model)
    if plot:
        check_image_path(plot, "--plot")
    if steps_per_epoch is None:
        uses_epochs = "_epoch" in loaded.model_dump_json(exclude_none=True) or any(
            loaded.stage_training(s).epochs is not None for s in loaded.resolved_stages()
        )
        if uses_epochs:
            fail("this recipe uses epochs: pass --steps-per-epoch N (dataset size / batch size)")
        steps_per_epoch = 1
    try:
        plans = resolve(loaded, steps_per_epoch)
    except PlanError as exc:
        fail(f"{exc}")
    data = plan_to_dict(plans)
    if not as_json:
        for line in _format_plan(plans):
            click.echo(line)
    problems = None
    if model is not None:
        data["model"], problems = _model_section(loaded, plans, model, seq_len, as_json)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    if plot:
        _plot(plans, plot)
        if not as_json:
            click.echo(f"plot written to {plot}")
    if problems:  # after the tables: they show what the targets select
        fail(f"the recipe's targets do not fit {model}:\n{problems}")

"""``layers``: drop whole encoder layers when the stage is compiled, before it trains.

The model is changed in place (:func:`recipec.sparsity.shrink.drop_layers_`): the dropped
blocks leave the block list, the remaining ones are renumbered and the config's layer count
(ModernBERT: its ``layer_types``) follows, so the model stays a stock model of fewer layers
(``save_pretrained`` / ``from_pretrained`` as usual) and trains faster. The kept layers are
recorded in the config (``recipec_structure.source_layers``), which makes the drop idempotent:
compiling the stage again (a resumed run) changes nothing. Masks carried from an earlier stage
follow the renamed parameters (the compiler renames them). The teacher of a distillation keeps
its full size: it is a separate model.

Which layers by default (``keep: N``, ``select: spread``): the first and the last layer and the
others evenly between, as oBERT's published 6-layer BERT (layers 0, 2, 4, 6, 8, 11 of 12). The
first layer reads the embeddings and the last one writes the representation the pooler and the
task head were trained on; keeping both leaves the model's two interfaces as pretrained, and
spreading the rest keeps layers of every depth.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from recipec.modifiers.base import CompileError, Modifier
from recipec.recipe.checks import layer_selection
from recipec.sparsity.shrink import drop_layers_, read_record
from recipec.sparsity.structured import StructureError, model_facts


def kept_layers(spec: Any, model: nn.Module) -> list[int]:
    """The layers (numbered as in the model as loaded) that ``spec`` keeps in ``model``."""
    record = read_record(model)
    executed = model_facts(model)["executed"]
    source = record.get("source_layers") or list(range(executed))
    return layer_selection(spec, source, executed)


def prepare_model(spec: Any, model: nn.Module) -> dict[str, str]:
    """Drop the layers ``spec`` does not keep; returns old -> new parameter names."""
    try:
        return drop_layers_(model, kept_layers(spec, model))
    except (StructureError, ValueError) as exc:
        raise CompileError(f"layers modifier: {exc}") from None


class LayersModifier(Modifier):
    """Nothing to do at run time: the compiler dropped the layers (:func:`prepare_model`)."""

    prepare = staticmethod(prepare_model)

    def __init__(self, resolved, ctx):
        super().__init__(resolved, ctx)
        self.kept = kept_layers(self.spec, ctx.model)
        ctx.log(f"{self.name}: encoder layers kept: {', '.join(map(str, self.kept))}")

    def state_dict(self) -> dict[str, Any]:
        return {"kept": list(self.kept)}

    def load_state_dict(self, state) -> None:
        kept = list(state.get("kept", []))
        if kept and kept != self.kept:
            raise CompileError(
                f"{self.name}: the checkpoint kept layers {kept}, this model has {self.kept}"
            )

"""Runtime modifiers, one module per recipe ``type:``, built through this registry.

Every spec type in :data:`recipec.recipe.schema.MODIFIER_TYPES` has exactly one builder here
(a test checks it). A new modifier type: its spec (with its traits) in the schema, its module
here, its entry below, and its tests in ``tests/unit/modifiers/``.
"""

from __future__ import annotations

from collections.abc import Callable

from recipec.modifiers.base import CompileContext, CompileError, Modifier
from recipec.modifiers.constant import ConstantModifier
from recipec.modifiers.cram import CrAMModifier
from recipec.modifiers.distill import DistillModifier
from recipec.modifiers.gmp import GMPModifier
from recipec.modifiers.lr import LRModifier
from recipec.modifiers.obert import OBertModifier
from recipec.modifiers.quantize import QuantizeModifier
from recipec.plan import ResolvedModifier

Builder = Callable[[ResolvedModifier, CompileContext], Modifier]

BUILDERS: dict[str, Builder] = {
    "gmp": GMPModifier,
    "obert": OBertModifier,
    "constant": ConstantModifier,
    "lr": LRModifier,
    "distill": DistillModifier,
    "cram": CrAMModifier,
    "quantize": QuantizeModifier,
}


def build(resolved: ResolvedModifier, ctx: CompileContext) -> Modifier:
    """Build the runtime modifier for a resolved spec."""
    try:
        builder = BUILDERS[resolved.type]
    except KeyError:
        raise CompileError(f"no runtime registered for modifier type {resolved.type!r}") from None
    return builder(resolved, ctx)


__all__ = ["BUILDERS", "CompileContext", "CompileError", "Modifier", "build"]

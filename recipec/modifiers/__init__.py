"""Runtime modifiers, built through a registry keyed by spec ``type`` (explicit imports)."""

from __future__ import annotations

from collections.abc import Callable

from recipec.modifiers.base import CompileContext, CompileError, MaskState, Modifier
from recipec.modifiers.cram import CrAMModifier
from recipec.modifiers.pruning import ConstantModifier, GMPModifier, OBertModifier
from recipec.modifiers.training import DistillModifier, LRModifier
from recipec.plan import ResolvedModifier

Builder = Callable[[ResolvedModifier, CompileContext], Modifier]

BUILDERS: dict[str, Builder] = {
    "gmp": GMPModifier,
    "obert": OBertModifier,
    "constant": ConstantModifier,
    "lr": LRModifier,
    "distill": DistillModifier,
    "cram": CrAMModifier,
}


def build(resolved: ResolvedModifier, ctx: CompileContext) -> Modifier:
    """Build the runtime modifier for a resolved spec."""
    try:
        builder = BUILDERS[resolved.type]
    except KeyError:
        raise CompileError(f"no runtime registered for modifier type {resolved.type!r}") from None
    return builder(resolved, ctx)


__all__ = ["BUILDERS", "CompileContext", "CompileError", "MaskState", "Modifier", "build"]

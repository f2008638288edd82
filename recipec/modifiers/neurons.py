"""``neurons``: remove whole FFN neurons on the GMP schedule (see ``structured``)."""

from __future__ import annotations

from recipec.modifiers.structured import StructuredPruner


class NeuronsModifier(StructuredPruner):
    """FFN neurons: a row of the up projection (both GLU halves) and the down projection's
    column, masked together."""

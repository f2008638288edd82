"""``heads``: remove whole attention heads on the GMP schedule (see ``structured``)."""

from __future__ import annotations

from recipec.modifiers.structured import StructuredPruner


class HeadsModifier(StructuredPruner):
    """Attention heads: a head's Q/K/V rows and attention-output columns, masked together."""

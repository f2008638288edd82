"""The sparsity structure grammar, parsed in one place: ``unstructured | block<K> | N:M``.

- ``unstructured``: every weight is its own group.
- ``block<K>``: all-or-nothing groups of ``K`` consecutive weights along the input dimension
  (the last dim of an ``nn.Linear.weight``), ``K >= MIN_BLOCK``.
- ``N:M``: at most ``N`` kept in each group of ``M`` consecutive weights along the input
  dimension, ``1 <= N < M <= MAX_NM_GROUP``.

Pure Python (no torch): the recipe schema, the mask code and the SparseML converter all parse
structures with :func:`parse_structure`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["KINDS", "MAX_NM_GROUP", "MIN_BLOCK", "Structure", "parse_structure"]

KINDS = ("unstructured", "block", "nm")
MIN_BLOCK = 2
"""Smallest block size (a block of 1 is ``unstructured``)."""
MAX_NM_GROUP = 64
"""Largest M of an ``N:M`` structure."""

_BLOCK_RE = re.compile(r"block(\d+)")
_NM_RE = re.compile(r"(\d+):(\d+)")
_GRAMMAR = (
    f"'unstructured', 'block<K>' (K >= {MIN_BLOCK}, e.g. block4) "
    f"or 'N:M' (1 <= N < M <= {MAX_NM_GROUP}, e.g. 2:4)"
)


@dataclass(frozen=True)
class Structure:
    """A sparsity structure.

    Attributes:
        kind: ``"unstructured"``, ``"block"`` (all-or-nothing groups of ``block`` weights) or
            ``"nm"`` (at most ``n`` kept in each group of ``m`` weights).
        block: Group size for ``kind="block"`` (1 for unstructured).
        n: Kept weights per group for ``kind="nm"``.
        m: Group size for ``kind="nm"``.
    """

    kind: str = "unstructured"
    block: int = 1
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown structure kind {self.kind!r}; expected one of {KINDS}")
        if self.kind == "block" and self.block < MIN_BLOCK:
            raise ValueError(f"block size must be >= {MIN_BLOCK}, got {self.block}")
        if self.kind == "nm" and not (1 <= self.n < self.m <= MAX_NM_GROUP):
            raise ValueError(
                f"N:M structure needs 1 <= N < M <= {MAX_NM_GROUP}, got {self.n}:{self.m}"
            )

    @property
    def group(self) -> int:
        """Number of consecutive weights in one group (1 for unstructured)."""
        if self.kind == "block":
            return self.block
        if self.kind == "nm":
            return self.m
        return 1

    @property
    def nm_sparsity(self) -> float | None:
        """The only sparsity an N:M structure allows, ``(M - N) / M``; None for the others."""
        return (self.m - self.n) / self.m if self.kind == "nm" else None

    def __str__(self) -> str:
        if self.kind == "block":
            return f"block{self.block}"
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        return "unstructured"


def parse_structure(s: str | Structure) -> Structure:
    """Parse ``"unstructured"``, ``"block<K>"`` or ``"N:M"`` (the bounds are in the module doc).

    Args:
        s: The structure string as written in a recipe (a ``Structure`` passes through).

    Returns:
        The parsed ``Structure``.

    Raises:
        ValueError: If the string is not one of the accepted forms; the message names it.
    """
    if isinstance(s, Structure):
        return s
    if not isinstance(s, str):
        raise ValueError(f"structure must be a string, got {type(s).__name__}")
    if s == "unstructured":
        return Structure("unstructured")
    found = _BLOCK_RE.fullmatch(s)
    if found:
        k = int(found.group(1))
        if k < MIN_BLOCK:
            raise ValueError(
                f"invalid structure {s!r}: block size must be at least {MIN_BLOCK} "
                "(use 'unstructured' for 1)"
            )
        return Structure("block", block=k)
    found = _NM_RE.fullmatch(s)
    if found:
        n, m = int(found.group(1)), int(found.group(2))
        if not 1 <= n < m <= MAX_NM_GROUP:
            raise ValueError(f"invalid structure {s!r}: N:M needs 1 <= N < M <= {MAX_NM_GROUP}")
        return Structure("nm", n=n, m=m)
    raise ValueError(f"invalid structure {s!r}: expected {_GRAMMAR}")

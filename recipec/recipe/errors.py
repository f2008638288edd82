"""Recipe problems that carry a location people can act on: ``FILE:LINE:COL: field.path: message``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Location:
    """Where a value came from: a file position, or a ``--set`` override (line/col None)."""

    source: str
    line: int | None = None
    col: int | None = None

    def __str__(self) -> str:
        if self.line is None:
            return self.source
        return f"{self.source}:{self.line}:{self.col or 1}"


@dataclass(frozen=True)
class Problem:
    """One error in a recipe."""

    location: Location
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.location}: "
        return f"{where}{self.path}: {self.message}" if self.path else f"{where}{self.message}"


class RecipeError(ValueError):
    """A recipe that failed to load; ``problems`` lists every error found, in file order."""

    def __init__(self, problems: list[Problem]):
        self.problems = sorted(
            problems,
            key=lambda p: (p.location.source, p.location.line or 0, p.location.col or 0, p.path),
        )
        super().__init__("\n".join(str(p) for p in self.problems))


def format_path(path: tuple[object, ...]) -> str:
    """``("modifiers", 0, "final_sparsity")`` -> ``"modifiers.0.final_sparsity"``."""
    return ".".join(str(part) for part in path)

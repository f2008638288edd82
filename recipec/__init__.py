"""recipec: a sparsity recipe compiler for BERT-family language models.

Heavy dependencies (torch, transformers) are imported lazily so that ``recipec --help`` and
``recipec validate`` stay instant.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "compile", "load_recipe", "load_recipe_text"]


def __getattr__(name: str):
    if name == "compile":
        from recipec.compiler import compile as _compile

        return _compile
    if name in ("load_recipe", "load_recipe_text"):
        from recipec.recipe import load

        return getattr(load, name)
    raise AttributeError(f"module 'recipec' has no attribute {name!r}")

"""Converters from other sparsity-recipe formats into recipec recipes.

Only SparseML is supported today (:mod:`recipec.convert.sparseml`, ``recipec convert``).
"""

from recipec.convert.sparseml import (
    Conversion,
    ConvertError,
    Finding,
    convert_file,
    convert_text,
)

__all__ = ["Conversion", "ConvertError", "Finding", "convert_file", "convert_text"]

"""Without Lightning, importing recipec.train.lightning says how to install it (and nothing else
of recipec needs it)."""

from __future__ import annotations

import importlib
import sys

import pytest


def test_importing_the_lightning_callback_without_lightning_says_how_to_install(monkeypatch):
    for name in [m for m in sys.modules if m == "lightning" or m.startswith("lightning.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lightning", None)  # import lightning -> ImportError
    monkeypatch.delitem(sys.modules, "recipec.train.lightning", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'recipec\[lightning\]'") as info:
        importlib.import_module("recipec.train.lightning")
    assert info.value.__cause__ is None and "\n" not in str(info.value)  # one clear line
    importlib.import_module("recipec.train.hf")  # the other drivers do not need it
    assert "recipec.train.lightning" not in sys.modules

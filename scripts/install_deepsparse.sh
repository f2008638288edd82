#!/usr/bin/env bash
# Install DeepSparse 1.8.0 into its own virtual environment for `recipec bench --runtime deepsparse`.
#
# Why a separate venv: deepsparse==1.8.0 (the only release that installs here) pins onnx<1.15
# and needs numpy<2. Installing it beside recipec downgrades onnx/numpy and breaks the exporter;
# forcing it in with --no-deps under numpy 2 makes it return silently wrong outputs.
# recipec runs DeepSparse in a subprocess of this venv's python (recipec/runtime/deepsparse_worker.py),
# and checks its outputs against onnxruntime before timing anything.
#
# Usage: scripts/install_deepsparse.sh [VENV_DIR]
#   VENV_DIR defaults to $RECIPEC_DEEPSPARSE_VENV or ~/.cache/recipec/deepsparse-venv.
#   Set PYTHON to choose the interpreter (DeepSparse 1.8.0 ships wheels for CPython 3.8-3.11).
# Afterwards: export RECIPEC_DEEPSPARSE_PYTHON=VENV_DIR/bin/python  (or pass --deepsparse-python).
set -euo pipefail

VENV="${1:-${RECIPEC_DEEPSPARSE_VENV:-$HOME/.cache/recipec/deepsparse-venv}}"
PY="${PYTHON:-python3}"

"$PY" - <<'PYCHECK'
import sys
if not ((3, 8) <= sys.version_info[:2] <= (3, 11)):
    sys.exit(f"deepsparse 1.8.0 needs CPython 3.8-3.11; {sys.version.split()[0]} given (set PYTHON=...)")
PYCHECK

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
# numpy<2: DeepSparse 1.8.0 was built against numpy 1.x (under numpy 2 its outputs are wrong).
"$VENV/bin/python" -m pip install --quiet "deepsparse==1.8.0" "numpy<2"
"$VENV/bin/python" - <<'PYCHECK'
import numpy, onnx
import deepsparse
print(f"deepsparse {deepsparse.__version__}, numpy {numpy.__version__}, onnx {onnx.__version__}: OK")
PYCHECK
echo "export RECIPEC_DEEPSPARSE_PYTHON=$VENV/bin/python"

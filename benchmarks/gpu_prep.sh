#!/usr/bin/env bash
# Build .gpu_data/ in the repository root for benchmarks/gpu_plan.sh on a lent GPU machine,
# which reaches no network and gets only the repository (plus the paths named in `carry`, 64 MiB
# in all). Run it here, on the CPU machine, before the device session; then carry [".gpu_data"].
#
#   benchmarks/gpu_prep.sh [DATA_ROOT]     # default ../shared/data (sst2/, csqa/)
#
# .gpu_data/ (ignored by git through .git/info/exclude, ~55 MB):
#   sst2/, csqa/   the task data, copied (it never enters the repository's history)
#   minilm/        the embedded all-MiniLM-L6-v2: config and tokenizer files, its weights in
#                  fp16 (model.fp16.safetensors, 45 MB; the fp32 file is 91 MB, over the carry
#                  limit); gpu_plan.sh restores them to fp32 (each weight rounded to fp16 once)
#   wheels/        pydantic and its pure dependencies for the device's Python 3.12 (its image
#                  has torch, transformers, safetensors, click, yaml, rich, but no pydantic)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_ROOT="${1:-$ROOT/../shared/data}"
DEST="$ROOT/.gpu_data"
PY="${PYTHON:-python}"

mkdir -p "$DEST"
for task in sst2 csqa; do
    [[ -d "$DATA_ROOT/$task" ]] || { echo "$DATA_ROOT/$task is absent" >&2; exit 2; }
    rm -rf "${DEST:?}/$task"
    cp -r "$DATA_ROOT/$task" "$DEST/$task"
done

"$PY" - "$DEST/minilm" <<'EOF'
import pathlib, shutil, sys
from safetensors.torch import load_file, save_file
from recipec.models import embedded_model_dir

src, dst = embedded_model_dir(), pathlib.Path(sys.argv[1])
if dst.exists():
    shutil.rmtree(dst)
dst.mkdir(parents=True)
for f in src.iterdir():
    if f.is_file() and f.suffix in (".json", ".txt") and f.name != "data_config.json":
        shutil.copy(f, dst / f.name)
weights = load_file(str(src / "model.safetensors"))
save_file({k: v.half() for k, v in weights.items()}, str(dst / "model.fp16.safetensors"), {"format": "pt"})
print(f"minilm: {len(weights)} tensors from {src}")
EOF

mkdir -p "$DEST/wheels"
rm -f "$DEST"/wheels/*.whl
versions="$("$PY" -c 'import importlib.metadata as m; print(" ".join(f"{n}=={m.version(n)}" for n in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection")))')"
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST/wheels" $versions

# never committed, and never sent unless carried: .gpu_data/ and gpu_plan.sh's run folder
# .gpu_runs/ are ignored in every checkout of this repository
exclude="$(git -C "$ROOT" rev-parse --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
for path in /.gpu_data/ /.gpu_runs/; do
    grep -qx "$path" "$exclude" 2>/dev/null || echo "$path" >>"$exclude"
done

du -sh "$DEST" "$DEST"/*
echo "carry: [\".gpu_data\"]  (the repository plus .gpu_data must stay under 64 MiB)"

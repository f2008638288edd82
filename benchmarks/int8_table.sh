#!/usr/bin/env bash
# Issue 19's table: dense FP32, sparse FP32 (block4 oBERT at 80% and 90%), sparse + PTQ,
# sparse + QAT (with KD), dense INT8, on MiniLM-L6 (the embedded model) and SST-2; dev accuracy
# from each run's report.json, latency of every exported folder timed side by side
# (benchmarks/int8_latency.py: onnxruntime, DeepSparse where installed, recipec's engine).
#
# One budget for every row (stated in the table's header): MAX_TRAIN training examples,
# SEQ tokens, the sparse runs at 1 dense + 4 pruning + 1 fine-tuning epochs (one oBERT step per
# epoch, m = 64 gradients, 30% first step for a 6-layer model) with KD from the dense teacher
# (`teacher: auto`: fine-tuned for the same 6 epochs; it is the dense FP32 row); PTQ calibrates
# on 64 batches (no training); QAT trains 2 more epochs (LR 1e-5 -> 0, KD), observers frozen
# after the first. Usage (from the repository root, ../shared/data beside it):
#
#   OMP_NUM_THREADS=1 bash benchmarks/int8_table.sh            # MAX_TRAIN=4000 SEQ=64
#
# Estimate on one quiet core: ~2.5-3 h (teacher ~20 min, each sparse run ~35-40 min, each QAT
# ~15 min, PTQ/export/bench a few minutes each); see docs/export_and_bench.md.
# Smoke test (minutes): MODEL=<tiny model folder> MAX_TRAIN=32 MAX_EVAL=16 SEQ=16 bash ...
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/int8}
MAX_TRAIN=${MAX_TRAIN:-4000}
SEQ=${SEQ:-64}
DATA=${DATA:-../shared/data/sst2}
MODEL_ARGS=()
[ -n "${MODEL:-}" ] && MODEL_ARGS=(--model "$MODEL")
EVAL_ARGS=()
[ -n "${MAX_EVAL:-}" ] && EVAL_ARGS=(--max-eval "$MAX_EVAL")
BUDGET=(--data "$DATA" --max-train "$MAX_TRAIN" "${EVAL_ARGS[@]}" --set "training.max_seq_length=$SEQ" --quiet)
PAPER=(--set dense_epochs=1 --set pruning_epochs=4 --set finetune_epochs=1
       --set pruning_steps_per_epoch=1 --set init_sparsity=0.3 --set num_grads=64)
recipec() { python -c "from recipec.cli import main; main()" "$@"; }
set -x
mkdir -p "$OUT"
for s in 80 90; do
  [ -f "$OUT/sparse_$s/report.json" ] || recipec apply "recipes/obert_block4_$s.yaml" \
    "${MODEL_ARGS[@]}" "${BUDGET[@]}" "${PAPER[@]}" --output "$OUT/sparse_$s"
done
TEACHER=$(python -c "import json; print(json.load(open('$OUT/sparse_90/report.json'))['teacher']['path'])")
for s in 80 90; do
  [ -f "$OUT/ptq_$s/report.json" ] || recipec apply recipes/ptq.yaml \
    --model "$OUT/sparse_$s/model" "${BUDGET[@]}" --output "$OUT/ptq_$s"
  [ -f "$OUT/qat_$s/report.json" ] || recipec apply recipes/qat.yaml \
    --model "$OUT/sparse_$s/model" --teacher "$TEACHER" "${BUDGET[@]}" --output "$OUT/qat_$s"
done
[ -f "$OUT/dense_int8/report.json" ] || recipec apply recipes/ptq.yaml \
  --model "$TEACHER" "${BUDGET[@]}" --output "$OUT/dense_int8"
recipec export "$TEACHER" --onnx --output "$OUT/dense_fp32/onnx" --overwrite
for run in sparse_80 sparse_90 ptq_80 ptq_90 qat_80 qat_90 dense_int8; do
  recipec export "$OUT/$run" --onnx --overwrite
done
set +x
# Accuracy of every row, and every row timed side by side (onnxruntime, DeepSparse where
# installed, recipec's engine on the sparse rows): RUNS/int8_table.md
python benchmarks/int8_latency.py "$OUT" --threads "${THREADS:-1}" --seq-len "${LAT_SEQ:-128}" \
  ${LATENCY_ARGS:-} --budget "first $MAX_TRAIN SST-2 training examples, seq $SEQ, \
1 dense + 4 pruning + 1 fine-tuning epochs, oBERT block4 m=64, KD from the dense teacher; \
PTQ 64 calibration batches; QAT 2 epochs"

"""Issue 19's table script (benchmarks/int8_table.sh, then benchmarks/int8_latency.py) end to
end on a tiny model and 32 SST-2 examples (marked slow): every row trains, exports and is timed
in one interleaved run; the INT8 rows run on the engine from their int8 weights file."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROWS = ["dense_fp32", "dense_int8", "sparse_80", "ptq_80", "qat_80", "sparse_90", "ptq_90",
        "qat_90"]  # fmt: skip


@pytest.mark.slow
def test_the_int8_table_runs_end_to_end(shared_data_dir, tiny_encoder, tmp_path):
    out = tmp_path / "int8"
    env = dict(
        os.environ,
        OUT=str(out),
        MODEL=str(tiny_encoder),
        MAX_TRAIN="32",
        MAX_EVAL="16",
        SEQ="16",
        DATA=str(shared_data_dir / "sst2"),
        LAT_SEQ="16",
        LATENCY_ARGS="--repeats 2 --block 1 --batch-sizes 1,2 --no-deepsparse",
        RECIPEC_CACHE=str(tmp_path / "cache"),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    done = subprocess.run(
        ["bash", "benchmarks/int8_table.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=1800,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((out / "int8_table.json").read_text())
    assert all(report["rows"][r] is not None for r in ROWS) and not report["refused"]
    timed = {(m["model"], m["runtime"], m["batch"]) for m in report["latency"]}
    for batch in (1, 2):
        assert {(r, "ort", batch) for r in ROWS} <= timed
        assert {
            (r, "engine-int8", batch) for r in ("ptq_80", "qat_80", "ptq_90", "qat_90")
        } <= timed
        assert {(r, "engine-fp32", batch) for r in ("sparse_80", "sparse_90")} <= timed
    table = (out / "int8_table.md").read_text()
    assert table.count("\n| ") == 2 * (1 + len(ROWS))  # per batch: header + one line per row
    assert "| sparse 90% + QAT |" in table and "first 32 SST-2 training examples" in table

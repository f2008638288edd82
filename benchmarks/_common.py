"""Small helpers shared by the benchmark scripts (machine facts, writing a result pair)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages, rounded; None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def add_ab_training_options(parser, *, rounds: int, block: int, what: str) -> None:
    """The options of the A/B training-step benchmarks (``overhead.py``, ``sparse_backprop.py``):
    model, rounds of alternating blocks, warm-up, batch shape, clipping, threads, output folder."""
    parser.add_argument("--model", choices=("minilm", "tiny"), default="minilm")
    parser.add_argument(
        "--rounds", type=int, default=rounds, help=f"A/B block pairs{what} (default {rounds})"
    )
    parser.add_argument(
        "--block", type=int, default=block, help=f"steps per block (default {block})"
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps of each loop first (default 2)"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")


def save_report(out: Path, stem: str, report: dict, markdown: str) -> None:
    """Write ``out/stem.json`` (the report) and ``out/stem.md`` (its table)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)

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


def save_report(out: Path, stem: str, report: dict, markdown: str) -> None:
    """Write ``out/stem.json`` (the report) and ``out/stem.md`` (its table)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)

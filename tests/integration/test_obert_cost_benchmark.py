"""benchmarks/obert_cost.py: merging reports (fast) and its own code path end to end (marked)."""

import json

import pytest


def _row(m, k, ratio):
    return {
        "num_grads": m,
        "grad_batch": k,
        "step_seconds": 10.0 * ratio,
        "grad_seconds_in_step": 10.0,
        "fisher_update_seconds": 1.0,
        "score_mask_update_seconds": 0.5,
        "ratio_in_step": ratio,
        "grads_alone_seconds": 9.0,
        "ratio": ratio,
        "rss_delta_bytes": 2**30,
        "estimate_total_bytes": 2**30,
        "estimate_fisher_bytes": 2**30,
        "estimate_buffer_bytes": 0,
    }


def _report(command, rows, setting="S"):
    return {
        "command": command,
        "machine": {"cpus": 2, "torch": "t", "threads": 1},
        "setting": setting,
        "loadavg_start": [0.1],
        "loadavg_end": [0.2],
        "goal": 1.25,
        "results": rows,
    }


def test_append_keeps_earlier_rows_with_their_own_run_and_replaces_a_remeasured_one(load_benchmark):
    oc = load_benchmark("obert_cost")
    old = _report("run A", [_row(64, 1, 1.2), _row(256, 1, 1.3)])
    new = _report("run B", [_row(256, 1, 1.1), _row(1024, 1, 1.15)])
    merged = oc.merge_reports(old, new)
    assert [merged["runs"][r["run"]]["command"] for r in merged["results"]] == [
        "run A",
        "run B",
        "run B",
    ]
    assert [(r["num_grads"], r["ratio_in_step"]) for r in merged["results"]] == [
        (64, 1.2),
        (256, 1.1),
        (1024, 1.15),
    ]
    # Merging again is stable, and a different setting is a different row.
    again = oc.merge_reports(merged, _report("run C", [_row(64, 1, 1.0)], setting="T"))
    assert len(again["results"]) == 4 and len(again["runs"]) == 3
    md = oc.render_md(again)
    assert "1. `run A`" in md and "3. `run C`" in md
    assert "| 2 | 1024 | 1 |" in md and "| 3 | 64 | 1 |" in md
    assert "Setting: S" in md and "Setting: T" in md
    # A run all of whose rows are measured again disappears from the report.
    redo = oc.merge_reports(again, _report("run D", [_row(64, 1, 0.9)]))
    assert [run["command"] for run in redo["runs"]] == ["run B", "run C", "run D"]
    assert [(redo["runs"][r["run"]]["command"], r["num_grads"]) for r in redo["results"]] == [
        ("run B", 256),
        ("run B", 1024),
        ("run C", 64),
        ("run D", 64),
    ]


@pytest.mark.integration
def test_quick_run_appends_to_an_existing_report(tmp_path, load_benchmark):
    oc = load_benchmark("obert_cost")
    (tmp_path / "obert_cost.json").write_text(
        json.dumps(_report("earlier", [_row(64, 1, 1.2)], setting="other"))
    )
    assert oc.main(["--quick", "--threads", "1", "--out", str(tmp_path), "--append"]) == 0
    report = json.loads((tmp_path / "obert_cost.json").read_text())
    assert [run["command"].split()[-1] for run in report["runs"]] == ["earlier", "--append"]
    fresh = [r for r in report["results"] if r["run"] == 1]
    assert [(r["num_grads"], r["grad_batch"]) for r in fresh] == [(8, 1), (8, 4)]
    for r in fresh:
        assert "error" not in r, r
        assert r["ratio_in_step"] >= 1.0  # the step contains its gradients
        assert r["grad_calls_in_step"] == 8
        assert (
            r["rss_delta_bytes"] > 0.5 * r["estimate_fisher_bytes"]
        )  # the inverse is really allocated
    assert "| 1 | 64 | 1 |" in (tmp_path / "obert_cost.md").read_text()

"""The sample-efficiency benchmark's quick mode end to end: results.json, plots and the markdown table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sample_efficiency.py"


def _run(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    # a fresh interpreter: the benchmark forks its workers, which must not inherit pytest's torch threads
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.timeout(300)
def test_quick_benchmark_writes_results_plots_and_table(tmp_path, default_policy_dir):
    out = tmp_path / "bench"
    done = _run("--quick", "--out", str(out), "--model", str(default_policy_dir), "--workers", "2")
    assert done.returncode == 0, done.stdout + done.stderr

    results = json.loads((out / "results.json").read_text())
    for key in ("benchmark", "command", "date", "machine", "config", "timing", "cells", "runs"):
        assert key in results
    assert "--quick" in results["command"]
    machine = results["machine"]
    assert machine["nproc"] >= 1 and "cpu_model" in machine and "git_commit" in machine
    cfg = results["config"]
    assert cfg["algos"] == ["r2vpo", "grpo"] and cfg["lags"] == [0, 4] and cfg["seeds"] == [0]

    runs = results["runs"]
    grid = {(r["regime"], r["algo"], r["lag"]) for r in runs}
    assert {("mild", a, lag) for a in ("r2vpo", "grpo") for lag in (0, 4)} <= grid
    for run in runs:
        assert run["status"] == "ok", run
        assert run["rollouts_consumed"] == cfg["steps"] * 16 * 8
        assert 0.0 <= run["final_accuracy"] <= 1.0 and 0.0 <= run["auc"] <= 1.0
        assert run["best_accuracy"] >= run["final_accuracy"]
        assert run["rollouts_to_target"] is None or run["rollouts_to_target"] <= run["rollouts_consumed"]
        assert (run["final_lam"] is not None) == (run["algo"] == "r2vpo")
        assert [p["step"] for p in run["curve"]] == [0, 2, 4]
        # checkpoints are deleted after each run; the run directory keeps metrics and summary
        run_dir = out / "runs" / run["name"]
        assert (run_dir / "summary.json").is_file() and not (run_dir / "checkpoints").exists()

    # at lag 0 with one update per batch the ratio is ≡ 1: R²VPO and GRPO take the same steps
    by_name = {(r["algo"], r["lag"]): r for r in runs if r["regime"] == "mild"}
    assert by_name["r2vpo", 0]["curve"] == by_name["grpo", 0]["curve"]

    for cell in results["cells"].values():
        for metric in ("final_accuracy", "best_accuracy", "auc", "wall_time_s", "rollouts_to_target"):
            assert {"n", "mean", "std", "ci95"} <= set(cell[metric])
        assert {"reached", "of"} <= set(cell["rollouts_to_target"])
    sweep = [c for c in results["cells"].values() if c["algo"] == "r2vpo" and c["lag"] == cfg["sweep_lag"]]
    assert sorted(c["dual_lr"] for c in sweep) == [0.1, 1.0]

    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "accuracy_vs_rollouts_mild.png" in pngs and "r2vpo_sensitivity.png" in pngs
    assert all((out / p).stat().st_size > 1000 for p in pngs)

    table = _run("--report", str(out / "results.json"), timeout=60)
    assert table.returncode == 0, table.stderr
    header = "| regime | lag | algo |"
    lines = table.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    assert sorted((r[0], r[2], int(r[1])) for r in rows) == sorted(
        ("mild", a, lag) for a in ("r2vpo", "grpo") for lag in (0, 4)
    )

    # a second invocation resumes: every run is found done and nothing is re-run
    again = _run("--quick", "--out", str(out), "--model", str(default_policy_dir))
    assert again.returncode == 0, again.stderr
    assert "0 to run" in again.stdout

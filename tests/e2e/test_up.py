"""`r2vpo up` end to end: every service its own process, a real redis-server, real HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest

pytestmark = pytest.mark.e2e


def _up(
    tmp_path, default_policy_dir, *args: str, timeout: float = 900
) -> tuple[subprocess.CompletedProcess, dict]:
    run_dir = tmp_path / "run"
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    command = [sys.executable, "-m", "services.cli", "up", "--run-dir", str(run_dir)]
    command += ["--model", str(default_policy_dir), *args]
    env = os.environ | {"COLUMNS": "200"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    leftovers = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not leftovers, f"processes left behind: {[p.cmdline() for p in leftovers]}"
    summary = json.loads((run_dir / "summary.json").read_text()) if result.returncode == 0 else {}
    return result, summary


def _no_service_left(run_dir) -> None:
    needle = str(run_dir)
    for proc in psutil.process_iter(["cmdline"]):
        assert needle not in " ".join(proc.info["cmdline"] or []), f"left running: {proc.info['cmdline']}"


@pytest.mark.timeout(900)
def test_async_up_learns_from_stale_data_and_accounts_for_every_group(tmp_path, default_policy_dir):
    result, summary = _up(tmp_path, default_policy_dir, "--mode", "async", "--steps", "30", "--max-lag", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary["mode"] == "async"
    lags = {int(k): v for k, v in summary["staleness_histogram"].items()}
    assert any(lag >= 1 and n > 0 for lag, n in lags.items()), lags
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.05, summary
    acc = summary["accounting"]
    assert acc["produced"] == acc["trained"] + acc["dead_lettered"] + acc["dropped"] + acc["pending"] + acc[
        "duplicates_skipped"]  # fmt: skip
    assert acc["trained_twice"] == 0 and acc["trained"] == 30 * 16
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["version"] for r in rows] == list(range(1, 31))
    _no_service_left(tmp_path / "run")


@pytest.mark.timeout(600)
def test_sync_up_trains_in_lock_step_and_exits_cleanly(tmp_path, default_policy_dir):
    result, summary = _up(tmp_path, default_policy_dir, "--mode", "sync", "--steps", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary["mode"] == "sync" and summary["steps"] == 4
    assert set(summary["staleness_histogram"]) == {"0"}, summary["staleness_histogram"]
    _no_service_left(tmp_path / "run")

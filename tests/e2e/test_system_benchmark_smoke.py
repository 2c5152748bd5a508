"""The system benchmark's quick mode end to end: every section runs and the results JSON has its shape.

No timing is asserted (speed lives in benchmarks/README.md); only that each figure carries a value, the
baseline measured next to it and their ratio, and that the machine facts are recorded.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "system.py"
SECTIONS = {"e2e", "queue", "weights", "engine", "learner", "memory"}


def _run(*args: str, timeout: int = 840) -> subprocess.CompletedProcess:
    # a fresh interpreter: the benchmark pins torch threads and starts `r2vpo up` (signal handlers, children)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout
    )


def _number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.timeout(900)
def test_quick_system_benchmark_writes_every_figure_with_its_baseline(tmp_path, default_policy_dir):
    out, readme = tmp_path / "system.json", tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\n## Sample efficiency\n\nsomeone else's section\n")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    done = _run("--quick", "--out", str(out), "--readme", str(readme), "--model", str(default_policy_dir))
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    leftovers = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not leftovers, f"processes left behind: {[p.cmdline() for p in leftovers]}"

    results = json.loads(out.read_text())
    assert results["benchmark"] == "system" and results["mode"] == "quick" and "--quick" in results["command"]
    machine = results["machine"]
    for key in ("nproc", "cpu_model", "loadavg", "git_commit", "torch"):
        assert key in machine, key
    assert machine["nproc"] >= 1 and len(machine["loadavg"]) == 3
    assert set(results["sections"]) == SECTIONS
    for name, section in results["sections"].items():
        assert "error" not in section, (name, section.get("error"))
        assert len(section["loadavg_before"]) == 3 and len(section["loadavg_after"]) == 3

    figures = results["figures"]
    assert {f["section"] for f in figures} == SECTIONS
    for f in figures:
        for key in ("value", "baseline", "ratio"):
            assert _number(f[key]) and f[key] > 0, (f["name"], key, f[key])
        assert f["unit"] and f["what"] and f["baseline_what"] and f["better"] in ("higher", "lower")
        assert len(f["values"]) == f["reps"] >= 1
    names = {f["name"] for f in figures}
    assert {"async_up_vs_sync_up", "async_up_vs_sync_trainer", "groups_per_s", "publish_to_serving_tiny",
            "torch_engine_vs_generate_tiny", "r2vpo_lam0_vs_grpo", "r2vpo_lam1_vs_grpo",
            "peak_rss_inference", "peak_rss_learner", "peak_rss_redis"} <= names  # fmt: skip
    queue = next(f for f in figures if f["name"] == "groups_per_s")
    assert _number(queue["overhead_us_per_group"])

    # the README keeps the other sections and gains exactly one System section with this run's row
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\n## Sample efficiency\n\nsomeone else's section\n")
    assert text.count("## System") == 1 and "| async_up_vs_sync_up" not in text.split("## System")[0]

    again = _run("--report", str(out), timeout=120)
    assert again.returncode == 0, again.stderr
    assert "## System" in again.stdout and "publish_to_serving_tiny" in again.stdout


def test_cuda_variant_refuses_clearly_without_cuda():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    done = _run("--quick", "--device", "cuda", timeout=120)
    assert done.returncode == 2
    assert "CUDA is not available" in done.stderr and "--device cpu" in done.stderr


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("system_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_update_replaces_only_its_own_section(tmp_path):
    system = _load_script()
    f = system.figure("queue", "groups_per_s", [2.0, 3.0], [4.0, 6.0], unit="groups/s", what="w",
                      baseline_what="b", overhead_us_per_group=1.0)  # fmt: skip
    results = {
        "date": "2026-01-02T03:04:05+00:00", "mode": "full", "device": "cpu", "seconds": 60.0,
        "machine": {"nproc": 2, "cpu_model": "cpu", "loadavg": [1.0, 2.0, 3.0], "git_commit": "abc"},
        "sections": {"queue": {"figures": [f]}}, "figures": [f],
    }  # fmt: skip
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\n## Sample efficiency\n\ntheirs\n")
    system.update_readme(readme, results, "results.json")
    system.update_readme(readme, results, "results.json")  # the same run again: its row is replaced
    later = results | {"date": "2026-01-03T03:04:05+00:00"}
    system.update_readme(readme, later, "results2.json")
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\n## Sample efficiency\n\ntheirs\n")
    assert text.count("## System") == 1 and "results2.json" in text
    assert [line[:19] for line in text.splitlines() if line.startswith("| 2026-")] == [
        "| 2026-01-02 03:04 ",
        "| 2026-01-03 03:04 ",
    ]
    assert f["ratio"] == 0.5 and f["value"] == 2.5 and f["baseline"] == 5.0

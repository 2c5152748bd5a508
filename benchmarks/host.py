"""Facts about the machine a benchmark ran on, shared by the benchmark packages (efficiency, sysbench)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path


def cpu_model() -> str | None:
    """The first "model name" of /proc/cpuinfo (None where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def usable_cores() -> int | None:
    """`nproc` (the cores this process may use), else the affinity mask, else the machine's count."""
    try:
        return int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout)
    except (OSError, subprocess.CalledProcessError, ValueError):
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def git(repo: Path, *args: str) -> str | None:
    """stdout of `git <args>` in ``repo``, stripped; None if git is missing, slow or fails."""
    try:
        out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None

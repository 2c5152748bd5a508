"""Machine facts recorded with every run: cores, CPU, memory, load average, versions, git commit."""

from __future__ import annotations

import contextlib
import os
import platform
from typing import Any

from ..host import cpu_model, usable_cores
from ..host import git as run_git
from .config import REPO


def loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_facts(device: str) -> dict[str, Any]:
    import psutil
    import torch

    facts: dict[str, Any] = {
        "nproc": usable_cores(),
        "cpu_model": cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "loadavg": loadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    if device == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["cuda"] = torch.version.cuda
    with contextlib.suppress(ImportError):
        import transformers

        facts["transformers"] = transformers.__version__
    facts |= git_facts()
    return facts


def git_facts() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        return run_git(REPO, *args)

    status = git("status", "--porcelain")
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(status) if status is not None else None}

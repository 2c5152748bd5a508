"""Machine and git facts stored with the results: the cores, and the trainer code the runs ran."""

from __future__ import annotations

import hashlib
import os
import platform
from typing import Any

from host import cpu_model, usable_cores
from host import git as run_git

from efficiency import REPO


def machine_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {
        "nproc": usable_cores(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import torch

        facts["torch"] = torch.__version__
    except ImportError:
        pass
    facts |= git_facts()
    return facts


def git_facts() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        return run_git(REPO, *args)

    status = git("status", "--porcelain", "--untracked-files=no")
    trainer_status = git("status", "--porcelain", "--untracked-files=no", "--", "trainer")
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        # what the numbers depend on: the trainer package (its committed tree, and local edits to it)
        "git_trainer_tree": git("rev-parse", "HEAD:trainer"),
        "trainer_dirty": bool(trainer_status) if trainer_status is not None else None,
        "trainer_sha256": trainer_digest(),
    }


def trainer_digest() -> str:
    """sha256 over trainer/*.py as they are on disk (workers run the code the parent imported at start)."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "trainer").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]

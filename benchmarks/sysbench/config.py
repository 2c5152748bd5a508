"""Where the system benchmark lives and writes, its sections, its sizes per mode, and its log line."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ENTRY_SCRIPT = REPO / "benchmarks" / "system.py"  # the command line; the vLLM worker is started through it
RESULTS_DIR = REPO / "benchmarks" / "results" / "system"
README = REPO / "benchmarks" / "README.md"
SECTIONS = ("e2e", "queue", "weights", "engine", "learner", "memory")

# Sizes per mode. `quick` is a smoke test of every section (seconds of measurement, numbers meaningless);
# `full` is sized to finish in about ten minutes on 2 loaded cores.
SIZES: dict[str, dict[str, Any]] = {
    "quick": {
        "e2e_steps": 4, "e2e_skip": 1, "e2e_reps": 1,
        "queue_groups": 256, "queue_reps": 2,
        "weights_models": ["tiny"], "weights_reps": 2, "weights_large_reps": 0,
        "engine_models": ["tiny"], "engine_reps": 2, "engine_large_reps": 0, "vllm": False,
        "learner_reps": 4,
    },
    "full": {
        "e2e_steps": 30, "e2e_skip": 5, "e2e_reps": 2,
        "queue_groups": 2048, "queue_reps": 5,
        "weights_models": ["tiny", "large"], "weights_reps": 8, "weights_large_reps": 4,
        "engine_models": ["tiny", "large"], "engine_reps": 10, "engine_large_reps": 3, "vllm": True,
        "learner_reps": 30,
    },
}  # fmt: skip


def log(message: str) -> None:
    print(f"[system {time.strftime('%H:%M:%S')}] {message}", flush=True)

"""One run's numbers, read back from its directory: rollouts to target, normalised AUC, binned per-step series
and the record results.json keeps about the run."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from efficiency.grid import RunSpec
from efficiency.seed_stats import mean_or_none

# Per-step metrics.jsonl keys kept (binned means) for the dynamics plots.
SERIES_KEYS = (
    "lam",
    "lam_next",
    "ratio_var",
    "penalty_var",  # what R²VPO's budget constrains (Var(log r) under the log-ratio penalty)
    "ratio_max",
    "entropy",
    "grad_norm",
    "penalty_share",  # grad_norm_penalty / (grad_norm_penalty + grad_norm_surrogate), pre-clip
    "reward_mean",
)
SERIES_POINTS = 60


def rollouts_to_target(curve: Sequence[dict], target: float) -> int | None:
    """Rollouts consumed at the first evaluation whose held-out accuracy is ≥ target; None if never."""
    for point in curve:
        if point["accuracy"] >= target:
            return int(point["rollouts"])
    return None


def normalised_auc(curve: Sequence[dict], budget: int) -> float:
    """Trapezoid area under accuracy-vs-rollouts, divided by the rollout budget (= mean accuracy)."""
    xs = [float(p["rollouts"]) for p in curve]
    ys = [float(p["accuracy"]) for p in curve]
    area = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:], strict=False))
    return area / budget if budget else math.nan


def binned_series(rows: Sequence[dict], key: str, points: int = SERIES_POINTS) -> list[float | None]:
    """Per-step values of ``key`` averaged into at most ``points`` equal bins of steps."""
    values = [r.get(key) for r in rows]
    n = len(values)
    if n == 0:
        return []
    bins = min(points, n)
    out: list[float | None] = []
    for b in range(bins):
        chunk = [v for v in values[b * n // bins : (b + 1) * n // bins] if isinstance(v, int | float)]
        out.append(sum(chunk) / len(chunk) if chunk else None)
    return out


def run_record(spec: RunSpec, run_dir: Path, target: float) -> dict:
    """Everything results.json keeps about one run (read back from its directory)."""
    record: dict[str, Any] = {"name": spec.name, **asdict(spec), "lr": spec.lr}
    record["updates_per_batch"] = spec.updates_per_batch
    record["command"] = spec.cli()
    if not (run_dir / "summary.json").is_file():
        if not (run_dir / "error.json").is_file():
            return record | {"status": "missing"}
        error = json.loads((run_dir / "error.json").read_text())
        return record | {
            "status": "failed",
            "error": error.get("error"),
            "wall_time_s": error.get("wall_time_s"),
        }
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    for row in rows:
        if "grad_norm_penalty" in row and "grad_norm_surrogate" in row:
            both = row["grad_norm_penalty"] + row["grad_norm_surrogate"]
            row["penalty_share"] = row["grad_norm_penalty"] / both if both > 0 else 0.0
    curve = summary["accuracy_curve"]
    tail = [p["accuracy"] for p in curve[-3:]]
    learner = json.loads((run_dir / "config.json").read_text())["learner"]
    stamp = json.loads((run_dir / "code.json").read_text()) if (run_dir / "code.json").is_file() else {}
    record["code"] = {k: stamp.get(k) for k in ("git_commit", "trainer_sha256", "reused_from") if k in stamp}
    record |= {
        "status": "ok",
        "learner_config": {k: learner.get(k) for k in ("loss_options", "dual", "grad_clip", "staleness")},
        "initial_accuracy": summary["initial_accuracy"],
        "final_accuracy": summary["final_accuracy"],
        "best_accuracy": summary["best_accuracy"],
        "tail_accuracy": sum(tail) / len(tail),
        "auc": normalised_auc(curve, spec.rollout_budget),
        "rollouts_to_target": rollouts_to_target(curve, target),
        "rollouts_consumed": summary["rollouts_consumed"],
        "dropped_groups": summary.get("dropped_groups", 0),
        "final_lam": summary["lam"] if spec.algo == "r2vpo" else None,
        "max_lam": max((r.get("lam_next", 0.0) for r in rows), default=0.0) if spec.algo == "r2vpo" else None,
        "mean_ratio_var": mean_or_none(r.get("ratio_var") for r in rows),
        "max_ratio_var": max((r["ratio_var"] for r in rows if "ratio_var" in r), default=None),
        "max_grad_norm": max((r["grad_norm"] for r in rows if "grad_norm" in r), default=None),
        "mean_penalty_share": (
            mean_or_none(r.get("penalty_share") for r in rows) if spec.algo == "r2vpo" else None
        ),
        "final_entropy": mean_or_none(r.get("entropy") for r in rows[-10:]),
        "wall_time_s": summary["wall_time_s"],
        "curve": [{k: p[k] for k in ("step", "rollouts", "accuracy")} for p in curve],
        "series": {k: binned_series(rows, k) for k in SERIES_KEYS if any(k in r for r in rows)},
        "series_steps": binned_series([{"b": r["batch"]} for r in rows], "b"),
    }
    return record

"""The runs read back from their directories (accuracy, AUC, rollouts to target, the training dynamics) and
aggregated per cell (regime, variant, lag) over seeds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sample_efficiency as se

from benchmarks.variant_study.grid import parse_name

TARGET = 0.45  # held-out greedy accuracy (warm start ~0.335); the stressed regime rarely reaches 0.5
SERIES = (
    "lam_next",
    "ratio_var",
    "penalty_var",
    "would_clip_frac",
    "grad_norm",
    "grad_norm_surrogate",
    "grad_norm_penalty",
    "ratio_p999",
    "ess",
    "entropy",
    "reward_mean",
    "zero_var_group_frac",
)


def collect(out: Path, target: float = TARGET) -> list[dict[str, Any]]:
    records = []
    for run_dir in sorted((out / "runs").iterdir()):
        regime, variant, lag, seed = parse_name(run_dir.name)
        record: dict[str, Any] = {"regime": regime, "variant": variant, "lag": lag, "seed": seed}
        if not (run_dir / "summary.json").is_file():
            record["status"] = "failed" if (run_dir / "error.json").is_file() else "missing"
            records.append(record)
            continue
        summary = json.loads((run_dir / "summary.json").read_text())
        cfg = json.loads((run_dir / "config.json").read_text())
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        curve = summary["accuracy_curve"]
        tail = [p["accuracy"] for p in curve[-3:]]
        budget = cfg["steps"] * cfg["prompts_per_batch"] * cfg["group_size"]
        record |= {
            "status": "ok",
            "final_accuracy": summary["final_accuracy"],
            "tail_accuracy": sum(tail) / len(tail),
            "auc": se.normalised_auc(curve, budget),
            "rollouts_to_target": se.rollouts_to_target(curve, target),
            "budget": budget,
            "curve": [{k: p[k] for k in ("step", "rollouts", "accuracy")} for p in curve],
            "series": {k: se.binned_series(rows, k, 50) for k in SERIES if any(k in r for r in rows)},
            "max_lam": max((r.get("lam_next", 0.0) for r in rows), default=0.0),
            "max_grad_norm_penalty": max((r.get("grad_norm_penalty", 0.0) for r in rows), default=0.0),
            "final_lam": rows[-1].get("lam_next", 0.0) if rows else 0.0,
            "penalty_share": se._mean(
                r["grad_norm_penalty"] / (r["grad_norm_penalty"] + r["grad_norm_surrogate"] + 1e-12)
                for r in rows
                if "grad_norm_penalty" in r
            ),
            "final_entropy": se._mean(r.get("entropy") for r in rows[-10:]),
            "mean_ratio_var": se._mean(r.get("ratio_var") for r in rows),
            "mean_would_clip": se._mean(r.get("would_clip_frac") for r in rows),
            "wall_time_s": summary["wall_time_s"],
        }
        records.append(record)
    return records


def cells(records: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["status"] != "missing":
            groups.setdefault((r["regime"], r["variant"], r["lag"]), []).append(r)
    out = {}
    for key, runs in groups.items():
        ok = [r for r in runs if r["status"] == "ok"]
        cell: dict[str, Any] = {"runs": len(runs), "failed": len(runs) - len(ok)}
        for metric in (
            "final_accuracy",
            "tail_accuracy",
            "auc",
            "max_lam",
            "final_lam",
            "penalty_share",
            "final_entropy",
            "mean_ratio_var",
            "mean_would_clip",
            "wall_time_s",
        ):
            cell[metric] = se.stats([r[metric] for r in ok])
        # not reaching the target counts as the full budget (a lower bound on the true number)
        hits = [r["rollouts_to_target"] for r in ok]
        cell["reached"] = sum(h is not None for h in hits)
        spent = [h if h is not None else r["budget"] for h, r in zip(hits, ok, strict=True)]
        cell["rollouts_to_target"] = se.stats(spent)
        out[key] = cell
    return out

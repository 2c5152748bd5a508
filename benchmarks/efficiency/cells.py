"""Per-cell numbers: the runs of one (regime, algo, lag, δ, η_λ) aggregated over seeds, the grid and sweep
cells in table order, and rollouts-to-target recomputed for another target."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from efficiency.grid import DEFAULT_DELTA, DEFAULT_DUAL_LR
from efficiency.run_metrics import SERIES_KEYS, rollouts_to_target
from efficiency.seed_stats import mean_or_none, stats

CELL_METRICS = (
    "final_accuracy",
    "best_accuracy",
    "tail_accuracy",
    "auc",
    "final_lam",
    "max_lam",
    "mean_ratio_var",
    "max_ratio_var",
    "final_entropy",
    "mean_penalty_share",
    "wall_time_s",
)


def cell_key(record: dict) -> tuple:
    return (record["regime"], record["algo"], record["lag"], record["delta"], record["dual_lr"])


def aggregate(records: Sequence[dict]) -> dict:
    """One cell per (regime, algo, lag, δ, η_λ) over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["status"] == "missing":  # not run (yet): --no-run on a partial benchmark
            continue
        groups.setdefault(cell_key(r), []).append(r)
    cells = {}
    for key, runs in groups.items():
        regime, algo, lag, delta, dual_lr = key
        ok = [r for r in runs if r["status"] == "ok"]
        cell: dict[str, Any] = {
            "regime": regime,
            "algo": algo,
            "lag": lag,
            "delta": delta,
            "dual_lr": dual_lr,
            "seeds": sorted(r["seed"] for r in ok),
            "failed_seeds": sorted(r["seed"] for r in runs if r["status"] != "ok"),
        }
        for metric in CELL_METRICS:
            cell[metric] = stats([r[metric] for r in ok if r.get(metric) is not None])
        reached = [r["rollouts_to_target"] for r in ok if r["rollouts_to_target"] is not None]
        cell["rollouts_to_target"] = stats(reached) | {"reached": len(reached), "of": len(ok)}
        cell["curve"] = _mean_curve([r["curve"] for r in ok])
        cell["series"] = _mean_series(ok)
        name = f"{regime}-{algo}" + ("" if algo != "r2vpo" else f"-d{delta:g}-eta{dual_lr:g}") + f"-lag{lag}"
        cells[name] = cell
    return cells


def _mean_curve(curves: Sequence[Sequence[dict]]) -> dict[str, list]:
    if not curves:
        return {"step": [], "rollouts": [], "mean": [], "std": []}
    n = min(len(c) for c in curves)
    out: dict[str, list] = {"step": [], "rollouts": [], "mean": [], "std": []}
    for i in range(n):
        accs = [c[i]["accuracy"] for c in curves]
        s = stats(accs)
        out["step"].append(curves[0][i]["step"])
        out["rollouts"].append(sum(c[i]["rollouts"] for c in curves) / len(curves))
        out["mean"].append(s["mean"])
        out["std"].append(s["std"])
    return out


def _mean_series(runs: Sequence[dict]) -> dict[str, list]:
    if not runs:
        return {}
    out: dict[str, list] = {"step": runs[0]["series_steps"]}
    for key in SERIES_KEYS:
        per_run = [r["series"][key] for r in runs if key in r["series"]]
        if not per_run:
            continue
        n = min(len(s) for s in per_run)
        out[key] = [mean_or_none(s[i] for s in per_run) for i in range(n)]
        if key == "lam_next":  # the worst seed's λ, for the dynamics plot
            out[key + "_max"] = [
                max((s[i] for s in per_run if s[i] is not None), default=None) for i in range(n)
            ]
    return out


def _is_grid_cell(cell: dict) -> bool:
    return cell["algo"] != "r2vpo" or (cell["delta"] == DEFAULT_DELTA and cell["dual_lr"] == DEFAULT_DUAL_LR)


def grid_cells(results: dict) -> list[dict]:
    """Cells of the algo × lag × regime grid (sweep-only points excluded), in table order."""
    grid = results["config"]
    cells = [c for c in results["cells"].values() if _is_grid_cell(c)]
    cells = [c for c in cells if c["regime"] in grid["regimes"] and c["lag"] in grid["lags"]]
    cells = [c for c in cells if c["algo"] in grid["algos"]]
    order = {a: i for i, a in enumerate(grid["algos"])}
    regimes = {r: i for i, r in enumerate(grid["regimes"])}
    return sorted(cells, key=lambda c: (regimes[c["regime"]], c["lag"], order[c["algo"]]))


def sweep_cells(results: dict) -> list[dict]:
    cfg = results["config"]
    if cfg.get("no_sweep"):
        return []
    cells = [
        c
        for c in results["cells"].values()
        if c["algo"] == "r2vpo" and c["regime"] == cfg["sweep_regime"] and c["lag"] == cfg["sweep_lag"]
    ]
    return sorted(cells, key=lambda c: (c["delta"], c["dual_lr"]))


def retarget(results: dict, target: float) -> dict:
    """The results with rollouts-to-target recomputed for another target from the stored curves."""
    results = json.loads(json.dumps(results))
    results["config"]["target"] = target
    by_cell: dict[tuple, list[int]] = {}
    oks: dict[tuple, int] = {}
    for run in results["runs"]:
        if run["status"] != "ok":
            continue
        run["rollouts_to_target"] = rollouts_to_target(run["curve"], target)
        oks[cell_key(run)] = oks.get(cell_key(run), 0) + 1
        if run["rollouts_to_target"] is not None:
            by_cell.setdefault(cell_key(run), []).append(run["rollouts_to_target"])
    for cell in results["cells"].values():
        key = (cell["regime"], cell["algo"], cell["lag"], cell["delta"], cell["dual_lr"])
        reached = by_cell.get(key, [])
        cell["rollouts_to_target"] = stats(reached) | {"reached": len(reached), "of": oks.get(key, 0)}
    return results

"""The markdown tables (mean ± half-width of the 95% t-interval over seeds, variant × regime and lag) and
results.json beside them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.variant_study.results import TARGET, cells, collect
from benchmarks.variant_study.variants import variant_order


def _ci(s: dict[str, Any], digits: int = 3, scale: float = 1.0) -> str:
    if not s["n"]:
        return "–"
    mean = s["mean"] / scale
    if s["n"] < 2:
        return f"{mean:.{digits}f} (n=1)"
    half = (s["ci95"][1] - s["mean"]) / scale
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def table(cell_map: dict[tuple, dict[str, Any]], metric: str, digits: int = 3, scale: float = 1.0) -> str:
    regimes = sorted({k[0] for k in cell_map})
    lags = sorted({k[2] for k in cell_map})
    variants = list(dict.fromkeys(k[1] for k in sorted(cell_map, key=lambda k: variant_order(k[1]))))
    head = "| variant | " + " | ".join(f"{r} lag {lag}" for r in regimes for lag in lags) + " |"
    lines = [head, "|" + "---|" * (1 + len(regimes) * len(lags))]
    for v in variants:
        row = [v]
        for r in regimes:
            for lag in lags:
                c = cell_map.get((r, v, lag))
                if c is None:
                    row.append("")
                    continue
                txt = _ci(c[metric], digits, scale)
                if metric == "rollouts_to_target":
                    txt += f" [{c['reached']}/{c[metric]['n']}]"
                row.append(txt)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def report(out: Path, target: float = TARGET) -> str:
    records = collect(out, target)
    cell_map = cells(records)
    n_ok = sum(r["status"] == "ok" for r in records)
    parts = [
        f"Runs: {n_ok} ok, {sum(r['status'] == 'failed' for r in records)} failed. "
        "Mean ± half-width of the 95% t-interval over seeds (n=1: no interval).",
        "\n**Final held-out greedy accuracy**\n",
        table(cell_map, "final_accuracy"),
        "\n**Tail accuracy (mean of the last 3 evaluations)**\n",
        table(cell_map, "tail_accuracy"),
        f"\n**Rollouts to target {target} (×1000; not reached = budget) [reached/n]**\n",
        table(cell_map, "rollouts_to_target", 1, 1000.0),
        "\n**AUC (mean accuracy over training)**\n",
        table(cell_map, "auc"),
        "\n**Dynamics: final λ**\n",
        table(cell_map, "final_lam", 2),
        "\n**Dynamics: penalty share of the pre-clip gradient, mean gp / (gp + gs)**\n",
        table(cell_map, "penalty_share", 2),
        "\n**Dynamics: entropy over the last 10 batches**\n",
        table(cell_map, "final_entropy", 2),
        "\n**Dynamics: mean Var(r) (behaviour ratio)**\n",
        table(cell_map, "mean_ratio_var", 3),
    ]
    (out / "results.json").write_text(
        json.dumps(
            {
                "target": target,
                "cells": [
                    {"regime": k[0], "variant": k[1], "lag": k[2], **v} for k, v in sorted(cell_map.items())
                ],
                "runs": records,
            },
            indent=1,
        )
    )
    return "\n".join(parts)

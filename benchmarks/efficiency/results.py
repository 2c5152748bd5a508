"""results.json: the runs collected from an output directory with their cells, config, machine and timing,
and its compact text (rounded floats, short lists on one line)."""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from efficiency.cells import aggregate
from efficiency.grid import REGIMES, RunSpec
from efficiency.provenance import machine_facts
from efficiency.run_metrics import run_record


def collect(specs: list[RunSpec], args: argparse.Namespace, wall_s: float, started_at: str) -> dict:
    records = [run_record(s, args.out / "runs" / s.name, args.target) for s in specs]
    keys = "mode algos lags seeds regimes steps eval_every target deltas dual_lrs sweep_lag sweep_regime"
    config = {k: getattr(args, k) for k in (*keys.split(), "no_sweep", "workers")}
    config |= {"prompts_per_batch": specs[0].prompts_per_batch, "group_size": specs[0].group_size}
    config["regime_settings"] = REGIMES
    config["model"] = str(args.model) if args.model else "embedded tiny policy (trainer/tiny.py)"
    run_walls = [r["wall_time_s"] for r in records if r.get("wall_time_s") is not None]
    cells = aggregate(records)
    for r in records:  # per-step series are kept per cell only (results.json stays small)
        r.pop("series", None)
        r.pop("series_steps", None)
    return {
        "benchmark": "sample_efficiency",
        # the command that reproduces these numbers (a --no-run re-collection gives the same results)
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv if a != "--no-run"),
        "date": _first_start(args.out) or started_at,
        "machine": machine_facts(),
        "config": config,
        "timing": {
            "runs": sum(r["status"] != "missing" for r in records),
            "runs_planned": len(records),
            "total_s": _total_wall(args.out) or wall_s,
            "run_wall_s_mean": sum(run_walls) / len(run_walls) if run_walls else None,
            "run_wall_s_max": max(run_walls, default=None),
            "note": "total_s: wall time of all invocations that ran runs into this --out "
            "(invocations.jsonl); run_wall_s: one run's training time (runs share the cores)",
        },
        "invocations": _invocations(args.out),
        "cells": cells,
        "runs": records,
    }


def _rounded(obj: Any, digits: int = 5) -> Any:
    """Floats to ``digits`` significant digits (accuracies are multiples of 1/200; the rest is noise)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_rounded(v, digits) for v in obj]
    return obj


_SCALAR = r'(?:[-+0-9.eE]+|null|true|false|"[^"\n]*")'
_SCALAR_LIST = re.compile(r"\[\s*(" + _SCALAR + r"(?:,\s*" + _SCALAR + r")*)\s*\]")
_FLAT_VALUE = r"(?:" + _SCALAR + r"|\[[^\[\]\n]*\])"
_FLAT_DICT = re.compile(
    r'\{\s*("[^"\n]+": ' + _FLAT_VALUE + r'(?:,\s*"[^"\n]+": ' + _FLAT_VALUE + r")*)\s*\}"
)


def _one_line(match: re.Match) -> str:
    body = ", ".join(part.strip() for part in match.group(1).split(",\n"))
    return match.group(0)[0] + body + match.group(0)[-1]


def dump_results(results: dict) -> str:
    """results.json text: rounded floats; lists of scalars and flat objects on one line (small to commit)."""
    text = json.dumps(_rounded(results), indent=1, ensure_ascii=False)
    return _FLAT_DICT.sub(_one_line, _SCALAR_LIST.sub(_one_line, text)) + "\n"


def _first_start(out: Path) -> str | None:
    path = out / "invocations.jsonl"
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return json.loads(lines[0])["started"] if lines else None


def _invocations(out: Path) -> list[dict]:
    path = out / "invocations.jsonl"
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    )


def _total_wall(out: Path) -> float | None:
    path = out / "invocations.jsonl"
    if not path.is_file():
        return None
    return sum(json.loads(line)["wall_s"] for line in path.read_text().splitlines() if line.strip())

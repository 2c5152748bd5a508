"""The benchmark's command line: flags and mode presets, and the driver (run, collect, report, plot)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from efficiency import REPO
from efficiency.cells import retarget
from efficiency.execution import execute, log_line
from efficiency.grid import (
    ALGOS,
    DEFAULT_DELTA,
    DEFAULT_DUAL_LR,
    DEFAULT_TARGET,
    LAGS,
    REGIMES,
    grid_specs,
    sweep_specs,
    unique,
)
from efficiency.plots import make_plots
from efficiency.provenance import git_facts
from efficiency.report import report
from efficiency.results import collect, dump_results

# Mode presets; explicit flags override them.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "algos": ["r2vpo", "grpo"],
        "lags": [0, 4],
        "seeds": [0],
        "steps": 4,
        "eval_every": 2,
        "regimes": ["mild"],
        "deltas": [DEFAULT_DELTA],
        "dual_lrs": [DEFAULT_DUAL_LR, 1.0],
        "sweep_lag": 4,
        "sweep_regime": "mild",
    },
    # Sized on the measured run time (benchmarks/README.md): one regime's grid (6 algos × 4 lags × 3 seeds
    # = 72 runs) plus the sweep in about an hour with 2 workers on 2 otherwise idle cores.
    "full": {
        "algos": list(ALGOS),
        "lags": list(LAGS),
        "seeds": [0, 1, 2],
        "steps": 150,
        "eval_every": 5,
        "regimes": ["mild"],
        "deltas": [0.01, 0.04, 0.16],
        "dual_lrs": [0.01, 0.1, 1.0],
        "sweep_lag": 4,
        "sweep_regime": "stressed",
    },
}


def parse_args(argv: Sequence[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """The flags, with the mode's preset filled in where a flag is not given; ``description`` heads --help."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smoke test: 2 algos × 2 lags × 1 seed × 4 steps")
    mode.add_argument("--full", action="store_true", help="the full grid (default when no mode is given)")
    mode.add_argument("--report", type=Path, metavar="RESULTS_JSON", help="print the markdown table and exit")
    mode.add_argument("--replot", type=Path, metavar="RESULTS_JSON", help="redraw the plots next to it")
    p.add_argument("--algos", nargs="+", choices=ALGOS)
    p.add_argument("--lags", nargs="+", type=int)
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--regimes", nargs="+", choices=list(REGIMES))
    p.add_argument("--steps", type=int, help="learner batches per run (the rollout budget / 128)")
    p.add_argument("--eval-every", type=int, help="held-out evaluation every N batches")
    p.add_argument(
        "--target",
        type=float,
        help="held-out accuracy for rollouts-to-target [0.5]; with --report: recomputed",
    )
    p.add_argument("--deltas", nargs="+", type=float, help="R²VPO δ values of the sweep")
    p.add_argument("--dual-lrs", nargs="+", type=float, help="R²VPO η_λ values of the sweep")
    p.add_argument("--sweep-lag", type=int)
    p.add_argument("--sweep-regime", choices=list(REGIMES), help="regime of the sweep [full: stressed]")
    p.add_argument("--no-sweep", action="store_true", help="skip the δ / η_λ sensitivity sweep")
    p.add_argument("--workers", type=int, default=2, help="parallel runs (one torch thread each)")
    p.add_argument("--out", type=Path, help="output dir [default: benchmarks/results/sample_efficiency/…]")
    p.add_argument("--model", type=Path, help="policy directory [default: the embedded tiny policy]")
    p.add_argument("--no-run", action="store_true", help="only collect the runs already in --out")
    p.add_argument(
        "--allow-code-change", action="store_true", help="resume runs made with another trainer/ version"
    )
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints/ folder")
    args = p.parse_args(argv)
    if args.report or args.replot:
        return args
    args.target = DEFAULT_TARGET if args.target is None else args.target
    preset = PRESETS["quick" if args.quick else "full"]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.mode = "quick" if args.quick else "full"
    if args.out is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = REPO / "benchmarks" / "results" / "sample_efficiency" / f"{args.mode}-{stamp}"
    if args.workers < 1 or args.steps < 1 or args.eval_every < 1:
        p.error("--workers, --steps and --eval-every must be ≥ 1")
    return args


def main(argv: Sequence[str] | None = None, description: str | None = None) -> int:
    args = parse_args(argv, description)
    if args.report:
        results = json.loads(args.report.read_text())
        if args.target is not None:
            results = retarget(results, args.target)
        print(report(results))
        return 0
    if args.replot:
        for path in make_plots(json.loads(args.replot.read_text()), args.replot.parent):
            print(path)
        return 0
    started_at = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    code = git_facts()  # before any run: the trainer code this invocation's workers run
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.model
    if model_dir is None:  # build (or find) the cached warm-started policy once, before the workers start
        from trainer.tiny import ensure_default_policy

        model_dir = ensure_default_policy(progress=False)
    # seed-major over regimes and sweep: an interrupted benchmark has the same seeds in every cell
    specs = sorted(unique(grid_specs(args) + sweep_specs(args)), key=lambda spec: spec.seed)
    wall_s = 0.0 if args.no_run else execute(specs, args, model_dir, code)
    if not args.no_run:
        with (args.out / "invocations.jsonl").open("a") as log:  # total time over resumed invocations
            entry = {"started": started_at, "wall_s": wall_s, "command": sys.argv, "code": code}
            log.write(json.dumps(entry) + "\n")
    results = collect(specs, args, wall_s, started_at)
    (args.out / "results.json").write_text(dump_results(results))
    table = report(results)
    (args.out / "report.md").write_text(table + "\n")
    plots = make_plots(results, args.out)
    log_line(f"results: {args.out / 'results.json'}; plots: {', '.join(p.name for p in plots)}")
    print(table)
    return 0

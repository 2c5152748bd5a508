"""The command line: `run` (or resume) a grid and report it; `report`: tables (and --plots) of a study."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from benchmarks.variant_study import REPO
from benchmarks.variant_study.execution import execute
from benchmarks.variant_study.grid import REGIMES, specs_from
from benchmarks.variant_study.plots import plots
from benchmarks.variant_study.report import report
from benchmarks.variant_study.results import TARGET
from benchmarks.variant_study.variants import VARIANTS

OUT = REPO / "benchmarks" / "results" / "r2vpo_study"


def parse_args(argv: Sequence[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """The arguments; `description` is the `--help` text (r2vpo_study.py passes its docstring)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) a grid of variant × regime × lag × seed")
    run.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["r2vpo", "grpo"])
    run.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=["stressed"])
    run.add_argument("--lags", nargs="+", type=int, default=[4])
    run.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    run.add_argument("--steps", type=int, default=100)
    run.add_argument("--eval-every", type=int, default=10)
    run.add_argument("--workers", type=int, default=2)
    run.add_argument("--out", type=Path, default=OUT / "screen")
    rep = sub.add_parser("report", help="tables (and --plots) from a study directory")
    rep.add_argument("out", type=Path)
    rep.add_argument("--plots", action="store_true")
    rep.add_argument("--target", type=float, default=TARGET)
    rep.add_argument("--variants", nargs="+", help="variants shown in the plots [all]")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None, description: str | None = None) -> int:
    args = parse_args(argv, description)
    if args.command == "run":
        execute(specs_from(args), args.out, args.workers)
        print(report(args.out))
        return 0
    text = report(args.out, args.target)
    (args.out / "report.md").write_text(text + "\n")
    print(text)
    if args.plots:
        for path in plots(args.out, args.variants):
            print(path)
    return 0

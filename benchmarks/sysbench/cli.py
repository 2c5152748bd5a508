"""The command line of `python benchmarks/system.py`: parse, run or report, write the results and README."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .config import README, REPO, RESULTS_DIR, SECTIONS, log
from .engine import vllm_worker
from .report import history_row, markdown_table, section_markdown, update_readme
from .runner import run


def default_out(args: argparse.Namespace) -> Path:
    stamp = dt.date.today().isoformat() + ("" if args.device == "cpu" else f"-{args.device}")
    if args.quick:
        return Path(tempfile.gettempdir()) / f"r2vpo-system-quick-{stamp}.json"
    return RESULTS_DIR / f"{stamp}.json"


def parse_args(argv: Sequence[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """The arguments; `description` is the `--help` text (system.py passes its docstring)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smoke test: every section at its smallest size")
    mode.add_argument("--full", action="store_true", help="the full measurement (default)")
    mode.add_argument(
        "--report", type=Path, metavar="RESULTS_JSON", help="print the markdown of a results file"
    )
    mode.add_argument("--vllm-worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    p.add_argument("--skip", nargs="+", choices=SECTIONS, help="leave these sections out")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: engines, inference service and learner comparison on the GPU, with a "
                   "Qwen2-0.5B-shaped random model as the large model [default: cpu]")  # fmt: skip
    p.add_argument(
        "--model", type=Path, help="the small policy directory [default: the embedded tiny policy]"
    )
    p.add_argument("--out", type=Path, help="results JSON [full: benchmarks/results/system/<date>.json]")
    p.add_argument("--readme", type=Path, help=f"update this README's System section [full: {README}]")
    p.add_argument("--no-readme", action="store_true", help="do not touch any README")
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM engine part [full: run if present]")
    p.add_argument("--with-vllm", action="store_true", help="run the vLLM engine part in --quick too")
    p.add_argument("--keep-scratch", action="store_true", help="keep the scratch directory (run dirs, logs)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None, description: str | None = None) -> int:
    args = parse_args(argv, description)
    if args.vllm_worker:
        return vllm_worker(args.vllm_worker)
    if args.report:
        results = json.loads(args.report.read_text())
        print(section_markdown(results, [history_row(results)], str(args.report)))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print(
                f"error: --device cuda, but CUDA is not available here (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda or 'none'}, {torch.cuda.device_count()} GPUs visible). "
                "Run it on a GPU machine with a CUDA build of torch, or use --device cpu.",
                file=sys.stderr,
            )
            return 2
    out = args.out or default_out(args)
    results = run(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    log(f"results: {out}")
    readme = None if args.no_readme else (args.readme or (None if args.quick else README))
    if readme is not None:
        try:
            shown = str(out.resolve().relative_to(REPO))
        except ValueError:
            shown = str(out)
        update_readme(readme, results, shown)
        log(f"README section updated: {readme}")
    print(markdown_table(results))
    failed = [name for name, s in results["sections"].items() if s.get("error")]
    if failed:
        log(f"sections that failed: {', '.join(failed)}")
        return 1
    return 0

"""The command line: the flags (and the internal `client` subcommand), the phases run, results and report."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.loadtest import REPO
from benchmarks.loadtest.client import client_main
from benchmarks.loadtest.inference import inference_load
from benchmarks.loadtest.queue import queue_load
from benchmarks.loadtest.report import checks, machine, markdown, write_section


def main(argv: Sequence[str] | None = None, description: str | None = None) -> int:
    """Run the load test (or, as `client`, the client process); `description` heads --help (load.py's first
    paragraph). Exit code 1 if any check fails."""
    parser = argparse.ArgumentParser(description=description)
    sub = parser.add_subparsers(dest="command_name")
    client = sub.add_parser("client", help="(internal) the client process")
    client.add_argument("--url", required=True)
    client.add_argument("--requests", type=int, required=True)
    client.add_argument("--concurrency", type=int, required=True)
    client.add_argument("--deadline-s", type=float, required=True)
    client.add_argument("--n", type=int, default=8)
    client.add_argument("--max-tokens", type=int, default=8)
    client.add_argument("--timeout-s", type=float, default=60.0)
    client.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few requests, few groups")
    parser.add_argument("--requests", type=int, default=400, help="requests of the concurrent phase")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--n", type=int, default=8, help="completions per request (G)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--model", type=Path, default=None, help="HF model dir [default: the tiny policy]")
    parser.add_argument("--queue-groups", type=int, default=4000)
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument("--burst", type=int, default=64)
    parser.add_argument("--burst-pause-s", type=float, default=0.05)
    parser.add_argument("--max-len", type=int, default=256, help="stream bound")
    parser.add_argument("--step-ms", type=float, default=60.0, help="consumer's simulated step per 16 groups")
    parser.add_argument("--phase-s", type=float, default=60.0, help="time bound of each phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", choices=["inference", "queue"], action="append", default=[])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "load" / "results.json")
    parser.add_argument("--readme", type=Path, default=None, help="write the Load section into this file")
    args = parser.parse_args(argv)
    if args.command_name == "client":
        print(json.dumps(asyncio.run(client_main(args))))
        return 0
    if args.quick:
        args.requests, args.queue_groups, args.max_len, args.phase_s = 32, 300, 64, 20.0
    results: dict[str, Any] = {
        "benchmark": "load",
        "command": "python benchmarks/load.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
    }
    with tempfile.TemporaryDirectory(prefix="r2vpo-load-") as tmp:
        if "inference" not in args.skip:
            results["inference"] = inference_load(args, Path(tmp))
        if "queue" not in args.skip:
            results["queue"] = queue_load(args, Path(tmp))
    results["failed_checks"] = checks(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    text = markdown(results)
    print(text)
    if args.readme:
        write_section(args.readme, text)
    return 1 if results["failed_checks"] else 0

"""Runs the chosen sections in order, each with its load average and time, into one results dict."""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import SECTIONS, log
from .context import Context
from .e2e import bench_e2e
from .engine import bench_engine
from .learner import bench_learner
from .machine import loadavg, machine_facts
from .memory import bench_memory
from .queue import bench_queue
from .weights import bench_weights

BENCHES: dict[str, Callable[[Context], dict[str, Any]]] = {
    "e2e": bench_e2e,
    "queue": bench_queue,
    "weights": bench_weights,
    "engine": bench_engine,
    "learner": bench_learner,
    "memory": bench_memory,
}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    if args.device == "cpu":
        torch.set_num_threads(1)  # as `r2vpo up` runs every service (torch_threads=1)
    started_at = dt.datetime.now().astimezone()
    machine = machine_facts(args.device)
    sections = [s for s in SECTIONS if s in (args.only or SECTIONS) and s not in (args.skip or [])]
    scratch = Path(tempfile.mkdtemp(prefix="r2vpo-system-"))
    ctx = Context(args, scratch, machine)
    results: dict[str, Any] = {
        "benchmark": "system",
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "mode": ctx.mode,
        "device": args.device,
        "date": started_at.isoformat(timespec="seconds"),
        "machine": machine,
        "sizes": ctx.sizes,
        "sections": {},
        "figures": [],
    }
    started = time.perf_counter()
    try:
        for name in sections:
            section_started, load_before = time.perf_counter(), loadavg()
            log(f"== {name} (load {load_before})")
            try:
                got = BENCHES[name](ctx)
            except Exception as exc:  # noqa: BLE001 - one failed section is reported, the others still run
                import traceback

                traceback.print_exc()
                got = {"error": f"{type(exc).__name__}: {exc}", "figures": []}
            got["seconds"] = time.perf_counter() - section_started
            got["loadavg_before"], got["loadavg_after"] = load_before, loadavg()
            results["sections"][name] = got
            results["figures"] += got.get("figures", [])
        results["models"] = ctx.models.info
    finally:
        if args.keep_scratch:
            log(f"scratch kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    results["seconds"] = time.perf_counter() - started
    results["machine"]["loadavg_end"] = loadavg()
    return results

"""One run of the synchronous trainer (a diverged run is a result) and the resumable process pool over the
specs: a run directory that already holds `summary.json` is not run again."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import sample_efficiency as se

from benchmarks.variant_study.grid import Spec
from benchmarks.variant_study.variants import VARIANTS


def sync_config(spec: Spec, run_dir: Path) -> Any:
    from trainer.sync import SyncTrainConfig

    return SyncTrainConfig(
        run_dir=run_dir,
        steps=spec.steps,
        eval_every=spec.eval_every,
        lag=spec.lag,
        seed=spec.seed,
        learner=spec.learner(),
    )


def _init_worker() -> None:
    se._init_worker()
    os.nice(10)


def run_one(spec: Spec, run_dir: Path) -> dict[str, Any]:
    from trainer.sync import run_sync

    started = time.perf_counter()
    try:
        summary = run_sync(sync_config(spec, run_dir))
    except Exception as exc:  # a diverged run is a result
        summary = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        summary["wall_time_s"] = time.perf_counter() - started
        (run_dir / "error.json").write_text(json.dumps(summary, indent=1))
    finally:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return summary


def execute(specs: list[Spec], out: Path, workers: int) -> None:
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    variants_dir = out / "variants"
    variants_dir.mkdir(exist_ok=True)
    with (out / "commands.txt").open("a") as f:
        for spec in specs:
            f.write(f"{spec.name}: {spec.cli()}\n")
    for variant in {s.variant for s in specs}:
        overrides = VARIANTS[variant][1]
        if overrides:
            (variants_dir / f"{variant}.json").write_text(json.dumps({"learner": overrides}, indent=1))
    todo = [s for s in specs if not (runs / s.name / "summary.json").is_file()]
    print(f"{len(specs)} runs, {len(todo)} to do", flush=True)
    started = time.time()
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
        futures = {pool.submit(run_one, s, runs / s.name): s for s in todo}
        for i, fut in enumerate(as_completed(futures), 1):
            spec, summary = futures[fut], fut.result()
            acc = "ERROR " + summary["error"] if "error" in summary else f"{summary['final_accuracy']:.3f}"
            elapsed = (time.time() - started) / 60
            print(f"[{time.strftime('%H:%M:%S')}] {i}/{len(todo)} {spec.name}: {acc} ({elapsed:.1f} min)")
            sys.stdout.flush()

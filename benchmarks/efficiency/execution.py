"""Running the specs: one training run in a worker process, the check that a finished run matches its spec,
and the resumable process pool over the runs not done yet."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

from efficiency.grid import RunSpec


def init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # already set in this process
        torch.set_num_interop_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars per run
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def sync_config(spec: RunSpec, run_dir: Path, model_dir: Path | None) -> Any:
    from trainer.learner import DualConfig, LearnerConfig
    from trainer.sync import SyncTrainConfig

    return SyncTrainConfig(
        run_dir=run_dir,
        model=model_dir,
        steps=spec.steps,
        eval_every=spec.eval_every,
        lag=spec.lag,
        seed=spec.seed,
        prompts_per_batch=spec.prompts_per_batch,
        group_size=spec.group_size,
        learner=LearnerConfig(
            algo=spec.algo,
            lr=spec.lr,
            updates_per_batch=spec.updates_per_batch,
            dual=DualConfig(budget=spec.delta, lr=spec.dual_lr),
        ),
    )


def run_one(
    spec: RunSpec,
    run_dir: Path,
    model_dir: Path | None,
    keep_checkpoints: bool = False,
    code: dict | None = None,
) -> dict:
    """Run one training job; returns its summary (or {"error": ...}). Never raises."""
    init_worker()
    from trainer.sync import run_sync

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "code.json").write_text(json.dumps(code or {}, indent=1))  # the trainer code that ran
    started = time.perf_counter()
    try:
        summary = run_sync(sync_config(spec, run_dir, model_dir))
    except Exception as exc:  # a diverged run is a result, not a crash of the benchmark
        error = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        error["wall_time_s"] = time.perf_counter() - started
        (run_dir / "error.json").write_text(json.dumps(error, indent=1))
        summary = error
    finally:
        if not keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return summary


def _compatible(stored: Any, expected: Any, default: Any) -> bool:
    """Does a stored config dump match the expected one? A key the stored dump lacks (a field added to the
    trainer since that run) matches only where the expected value is that field's plain default."""
    if isinstance(stored, dict) and isinstance(expected, dict):
        default = default if isinstance(default, dict) else {}
        for key, value in expected.items():
            if key in stored:
                if not _compatible(stored[key], value, default.get(key)):
                    return False
            elif key not in default or default[key] != value:
                return False
        return all(key in expected for key in stored)
    return stored == expected


def _check_existing(spec: RunSpec, run_dir: Path, model_dir: Path | None, code: dict, allow: bool) -> None:
    """A finished run must have the spec's configuration (else budgets or objectives would mix) and, unless
    ``allow``, the same trainer code as this invocation (resuming across a trainer change mixes versions)."""
    from trainer.learner import LearnerConfig

    stored = json.loads((run_dir / "config.json").read_text())
    expected = json.loads(sync_config(spec, run_dir, model_dir).model_dump_json())
    plain = LearnerConfig.model_construct().model_dump(mode="json")  # field defaults, no per-algo ones
    for key in ("steps", "eval_every", "lag", "seed", "prompts_per_batch", "group_size", "learner"):
        if not _compatible(stored.get(key), expected.get(key), plain if key == "learner" else None):
            raise SystemExit(
                f"{run_dir} was run with {key}={stored.get(key)!r}, this benchmark asks for "
                f"{expected.get(key)!r}: use another --out"
            )
    stamp_path = run_dir / "code.json"
    stamp = json.loads(stamp_path.read_text()) if stamp_path.is_file() else {}
    same = stamp.get("trainer_sha256") in (None, code.get("trainer_sha256")) or "reused_from" in stamp
    if not (same or allow):
        raise SystemExit(
            f"{run_dir} ran trainer/ {stamp.get('trainer_sha256')}, this checkout has "
            f"{code.get('trainer_sha256')}: use another --out, or --allow-code-change if the change cannot "
            f"alter the numbers"
        )


def log_line(message: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {message}", flush=True)


def execute(specs: list[RunSpec], args: argparse.Namespace, model_dir: Path | None, code: dict) -> float:
    """Run the specs that have no summary.json yet; returns the wall time spent."""
    runs_dir = args.out / "runs"
    todo = []
    for spec in specs:
        run_dir = runs_dir / spec.name
        if (run_dir / "summary.json").is_file():
            _check_existing(spec, run_dir, model_dir, code, args.allow_code_change)
        else:
            todo.append(spec)
    log_line(
        f"{len(specs)} runs, {len(specs) - len(todo)} already done, {len(todo)} to run "
        f"with {args.workers} worker(s) → {args.out}"
    )
    started = time.perf_counter()
    if not todo:
        return 0.0
    done = 0
    # fork (Linux) shares the parent's imported torch/transformers: workers start in well under a second
    # instead of re-importing them; the parent has run no torch computation, so no thread pool is forked.
    import trainer.sync  # noqa: F401  (imported before the fork)

    ctx = get_context("fork" if "fork" in get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx, initializer=init_worker) as pool:
        futures = {
            pool.submit(run_one, s, runs_dir / s.name, model_dir, args.keep_checkpoints, code): s
            for s in todo
        }
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                spec = futures[future]
                summary = future.result()
                done += 1
                elapsed = time.perf_counter() - started
                eta = elapsed / done * (len(todo) - done)
                if "error" in summary:
                    what = f"FAILED {summary['error']}"
                else:
                    what = (
                        f"acc {summary['initial_accuracy']:.3f} → {summary['final_accuracy']:.3f} "
                        f"λ {summary['lam']:.3f} in {summary['wall_time_s']:.0f} s"
                    )
                log_line(
                    f"{done}/{len(todo)} {spec.name}: {what} (elapsed {elapsed / 60:.1f} min, "
                    f"eta {eta / 60:.1f} min)"
                )
    return time.perf_counter() - started

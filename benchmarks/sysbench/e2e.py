"""e2e: rollouts/s the learner consumes, async `r2vpo up` vs the lock-step loop and `run_sync`."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from .config import log
from .context import Context
from .machine import loadavg
from .measure import figure, median, rotated
from .monitors import ProcSampler, VersionPoller


def _window_rate(rows: list[dict], skip: int, clock: str) -> dict[str, Any]:
    """Rollouts consumed per second between the end of step `skip` and the last step (learner clock)."""
    if len(rows) <= skip:
        raise RuntimeError(f"only {len(rows)} learner steps recorded; need more than {skip}")
    first, last = rows[skip - 1] if skip else rows[0], rows[-1]
    window = rows[skip - 1 :] if skip else rows
    seconds = last[clock] - first[clock]
    rollouts = last["rollouts_consumed"] - first["rollouts_consumed"]
    half = len(window) // 2
    out = {
        "rate": rollouts / seconds,
        "window_steps": len(window) - 1,
        "window_s": seconds,
        "window_start": first[clock],
        "window_end": last[clock],
        "step_s_median": median([b[clock] - a[clock] for a, b in zip(window, window[1:], strict=False)]),
    }
    if half >= 2:  # a backlog queued during start-up would show as a faster first half
        for label, part in (("first_half", window[: half + 1]), ("second_half", window[half:])):
            out[f"rate_{label}"] = (part[-1]["rollouts_consumed"] - part[0]["rollouts_consumed"]) / (
                part[-1][clock] - part[0][clock]
            )
    return out


def run_up_once(
    mode: str, rep: int, scratch: Path, model: Path, sizes: dict, device: str
) -> tuple[dict, ProcSampler]:
    from services.up import UpConfig, run_up

    steps, skip = sizes["e2e_steps"], sizes["e2e_skip"]
    run_dir = scratch / f"up-{mode}-{rep}"
    extra: dict[str, Any] = {}
    if device == "cuda":
        extra["overrides"] = {"inference": {"device": "cuda"}}
    cfg = UpConfig(
        run=f"bench-{mode}-{rep}", run_dir=run_dir, mode=mode, steps=steps, model=model,
        eval_every=steps + 1000, seed=rep, **extra,
    )  # fmt: skip
    sampler = ProcSampler()
    pollers: list[VersionPoller] = []

    def on_progress(event: dict) -> None:
        if event.get("event") == "started" and not pollers:
            poller = VersionPoller(event["urls"]["inference"])
            poller.start()
            pollers.append(poller)

    sampler.start()
    started = time.time()
    try:
        summary = run_up(cfg, on_progress=on_progress)
    finally:
        sampler.stop()
        for poller in pollers:
            poller.stop()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    measured = _window_rate(rows, skip, "time")
    window = rows[skip - 1 :] if skip else rows
    publish_latency = []
    if pollers:
        for row in window:
            seen = pollers[0].first_serving(row["version"])
            if seen is not None:
                publish_latency.append(seen - row["time"])
    learner_part = [
        r.get("learner_s", 0.0) + prev.get("commit_s", 0.0)
        for prev, r in zip(window, window[1:], strict=False)
    ]
    result = {
        "mode": mode,
        "rep": rep,
        **measured,
        "startup_s": rows[0]["time"] - started,
        "total_s": summary.get("wall_time_s"),
        "steps": len(rows),
        "finished": summary.get("finished"),
        "accounting": summary.get("accounting"),
        "staleness_histogram": summary.get("staleness_histogram"),
        "learner_s_median": median([r.get("learner_s") for r in window]),
        "commit_s_median": median([r.get("commit_s") for r in window if "commit_s" in r]),
        "learner_part_s_median": median(learner_part),
        "step_to_serving_s_median": median(publish_latency),
        "step_to_serving_s_max": max(publish_latency) if publish_latency else None,
        "cores_used": sampler.cores_used(measured["window_start"], measured["window_end"]),
        "loadavg": loadavg(),
    }
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    shutil.rmtree(run_dir / "weights", ignore_errors=True)
    return result, sampler


def _sync_trainer_once(rep: int, scratch: Path, model: Path, sizes: dict) -> dict:
    from trainer.sync import SyncTrainConfig, run_sync

    steps, skip = sizes["e2e_steps"], sizes["e2e_skip"]
    run_dir = scratch / f"sync-trainer-{rep}"
    cfg = SyncTrainConfig(run_dir=run_dir, model=model, steps=steps, eval_every=steps + 1000, seed=rep)
    summary = run_sync(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    measured = _window_rate(rows, skip, "wall_s")
    window = rows[skip - 1 :] if skip else rows
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return {
        "mode": "sync_trainer",
        "rep": rep,
        **measured,
        "setup_s": summary.get("setup_s"),
        "learner_s_median": median([r.get("learner_s") for r in window]),
        "loadavg": loadavg(),
    }


def bench_e2e(ctx: Context) -> dict[str, Any]:
    sizes, model = ctx.sizes, ctx.models.tiny()
    kinds = ("async", "sync", "sync_trainer")
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for rep in range(sizes["e2e_reps"]):
        for kind in rotated(kinds, rep):
            log(f"e2e rep {rep}: {kind} ({sizes['e2e_steps']} steps), load {loadavg()}")
            if kind == "sync_trainer":
                runs[kind].append(_sync_trainer_once(rep, ctx.scratch, model, sizes))
            else:
                result, sampler = run_up_once(kind, rep, ctx.scratch, model, sizes, ctx.device)
                runs[kind].append(result)
                if kind == "async" and "async_up" not in ctx.memory_samples:
                    ctx.memory_samples["async_up"] = sampler
            log(f"  {kind}: {runs[kind][-1]['rate']:.1f} rollouts/s")
    rate = {k: [r["rate"] for r in runs[k]] for k in kinds}
    unit, per = (
        "rollouts/s",
        f"rollouts consumed per second of learner time, steps {sizes['e2e_skip']}…{sizes['e2e_steps']}",
    )
    figures = [
        figure("e2e", "async_up_vs_sync_up", rate["async"], rate["sync"], unit=unit,
               what=f"`r2vpo up --mode async` (max_lag 4): {per}",
               baseline_what="`r2vpo up --mode sync` (lock-step), same settings"),
        figure("e2e", "async_up_vs_sync_trainer", rate["async"], rate["sync_trainer"], unit=unit,
               what=f"`r2vpo up --mode async`: {per}",
               baseline_what="`run_sync` (in-process synchronous trainer, one torch thread)"),
        figure("e2e", "sync_up_vs_sync_trainer", rate["sync"], rate["sync_trainer"], unit=unit,
               what=f"`r2vpo up --mode sync`: {per}",
               baseline_what="`run_sync` (in-process synchronous trainer, one torch thread)"),
    ]  # fmt: skip
    return {"figures": figures, "runs": runs, "analysis": e2e_analysis(runs, ctx.machine.get("nproc"))}


def e2e_analysis(runs: dict[str, list[dict]], nproc: int | None) -> dict[str, Any]:
    """Why the async pipeline gains what it gains: the lock-step step split into learner work and the rest,
    the perfect-overlap ceiling that split allows, and the cores the services actually got."""
    sync, asyn = runs.get("sync") or [], runs.get("async") or []
    step = median([r["step_s_median"] for r in sync])
    learner = median([r["learner_part_s_median"] for r in sync])
    out: dict[str, Any] = {"nproc": nproc}
    if step and learner:
        rest = max(step - learner, 1e-9)
        out |= {
            "sync_step_s": step,
            "sync_learner_part_s": learner,  # train_on + checkpoint/publish/ack of the previous step
            "sync_other_part_s": rest,  # generation, scoring, HTTP, Redis, waiting for the weight swap
            "overlap_ceiling": step / max(learner, rest),
        }
    for label, group in (("async", asyn), ("sync", sync)):
        used = [r["cores_used"] for r in group if r.get("cores_used")]
        if used:
            out[f"{label}_service_cores"] = median([u["services"] for u in used])
            out[f"{label}_machine_busy_cores"] = median([u["machine"] for u in used])
        out[f"{label}_step_to_serving_s"] = median([r.get("step_to_serving_s_median") for r in group])
        out[f"{label}_learner_s"] = median([r.get("learner_s_median") for r in group])
        out[f"{label}_startup_s"] = median([r.get("startup_s") for r in group])
        hists = [r.get("staleness_histogram") or {} for r in group]
        n = sum(v for h in hists for v in h.values())
        if n:
            out[f"{label}_mean_lag"] = sum(int(k) * v for h in hists for k, v in h.items()) / n
    return out

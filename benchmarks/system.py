"""System benchmark: the system's speed against its floors (issue "Benchmarks … the system's speed").

Every figure is a value, the baseline or floor it is judged against, and their ratio, measured in the same
run, side by side: repetitions are interleaved (the order rotates every repetition), `value` and `baseline`
are medians and `ratio` is the median of the per-repetition ratios (each value over the baseline measured
next to it), with a 95% bootstrap interval when there are at least three repetitions. Timings on a shared
machine are noisy; ratios measured side by side are not (much). The load average is recorded per section.

    section  value                                              baseline / floor
    e2e      rollouts/s the learner consumes, `r2vpo up         `r2vpo up --mode sync` (lock-step), and the
             --mode async` (from its metrics: start-up and the  in-process sync trainer (`run_sync`), same
             first max_lag + 1 = 5 steps excluded)              settings, same measurement
    queue    groups/s through TrajectoryQueue push+read+ack     raw pipelined XADD / XREADGROUP / XACK of the
             (G=8 completions of ~10 tokens, JSON)              same bytes on the same redis-server
    weights  learner step end → /v1/models serves the version   writing (+fsync) and reading the same bytes
             (publish → announce → watcher fetch, verify, swap)  (memcpy, disk write and read bandwidth too)
    engine   tokens/s of TorchEngine (and VllmEngine, in        transformers `generate` (KV cache, sampling,
             .venv-vllm) on one batch                           same model, batch, max_new_tokens)
    learner  tokens/s of Learner.train_on with R²VPO at λ = 0,  the same step with GRPO (clipping), paired
             at λ = 1, and at λ = 1 with one backward pass
    memory   peak RSS of each `r2vpo up` service                a bare python that imported what it needs
                                                                (torch + transformers, or the web stack);
                                                                redis: an empty redis-server

    python benchmarks/system.py --quick                  # smoke test: every section at its smallest
    python benchmarks/system.py --full                   # results/system/<date>.json + README table
    python benchmarks/system.py --full --only queue learner
    python benchmarks/system.py --full --device cuda     # on a GPU machine: Qwen2-0.5B-shaped model
    python benchmarks/system.py --report RESULTS_JSON    # print the markdown of a results file

CPU runs pin this process to one torch thread, as `r2vpo up` pins its services (torch_threads=1), so the
in-process sync trainer and the engine/learner comparisons run under the same setting as the services.
`--device cuda` runs the inference service, the engines and the learner comparison on the GPU with a
randomly initialised model of the Qwen2-0.5B shape; the learner *service* and `run_sync` have no device
setting yet and stay on the CPU. Without CUDA it refuses with exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime as dt
import json
import math
import os
import platform
import random
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/system.py` from anywhere
    sys.path.insert(0, str(REPO))

RESULTS_DIR = REPO / "benchmarks" / "results" / "system"
README = REPO / "benchmarks" / "README.md"
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
SECTIONS = ("e2e", "queue", "weights", "engine", "learner", "memory")
BEGIN = "<!-- system-benchmark:begin (written by benchmarks/system.py --full; edit the script) -->"
END = "<!-- system-benchmark:end -->"
HISTORY_HEADER = "| date | device | machine | load avg (1 min) | commit |"

# Model shapes built locally, randomly initialised (no downloads), with the tiny character tokenizer.
LARGE_MODELS: dict[str, dict[str, Any]] = {
    # ~99M parameters: GPT-2-small-like width and depth, Llama blocks.
    "llama-100m": {"arch": "llama", "hidden": 768, "layers": 12, "heads": 12, "kv_heads": 12,
                   "intermediate": 2560, "vocab": None, "max_positions": 512},
    # Qwen2-0.5B's shape (its real vocabulary size; the tokenizer only ever produces the first 99 ids).
    "qwen2-0.5b-shape": {"arch": "qwen2", "hidden": 896, "layers": 24, "heads": 14, "kv_heads": 2,
                         "intermediate": 4864, "vocab": 151936, "max_positions": 2048},
}  # fmt: skip

# Sizes per mode. `quick` is a smoke test of every section (seconds of measurement, numbers meaningless);
# `full` is sized to finish in about ten minutes on 2 loaded cores.
SIZES: dict[str, dict[str, Any]] = {
    "quick": {
        "e2e_steps": 4, "e2e_skip": 1, "e2e_reps": 1,
        "queue_groups": 256, "queue_reps": 2,
        "weights_models": ["tiny"], "weights_reps": 2, "weights_large_reps": 0,
        "engine_models": ["tiny"], "engine_reps": 2, "engine_large_reps": 0, "vllm": False,
        "learner_reps": 4,
    },
    "full": {
        "e2e_steps": 30, "e2e_skip": 5, "e2e_reps": 2,
        "queue_groups": 2048, "queue_reps": 5,
        "weights_models": ["tiny", "large"], "weights_reps": 8, "weights_large_reps": 4,
        "engine_models": ["tiny", "large"], "engine_reps": 10, "engine_large_reps": 3, "vllm": True,
        "learner_reps": 30,
    },
}  # fmt: skip

# Batch shapes of the engine comparison: (prompts, n, max_new_tokens). The tiny one is what a rollout
# worker asks for (16 prompts × G 8 × 8 tokens); the large ones are sized to the device.
ENGINE_SHAPES = {
    ("cpu", "tiny"): (16, 8, 8),
    ("cpu", "large"): (8, 2, 16),
    ("cuda", "tiny"): (16, 8, 8),
    ("cuda", "large"): (64, 8, 64),
}


def log(message: str) -> None:
    print(f"[system {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------------------
# Statistics and figures
# --------------------------------------------------------------------------------------------------------


def median(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else None


def bootstrap_ci(xs: Sequence[float], *, n: int = 2000, seed: int = 0) -> list[float] | None:
    """95% percentile interval of the median of `xs` (None with fewer than three values)."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if len(xs) < 3:
        return None
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(n))
    return [meds[int(0.025 * n)], meds[int(0.975 * n) - 1]]


def figure(
    section: str,
    name: str,
    values: Sequence[float],
    baselines: Sequence[float],
    *,
    unit: str,
    what: str,
    baseline_what: str,
    better: str = "higher",
    **extra: Any,
) -> dict[str, Any]:
    """One figure: medians of value and baseline, the median of paired ratios and its interval."""
    values, baselines = list(values), list(baselines)
    paired = len(values) == len(baselines)
    if paired:
        ratios = [v / b if b else math.nan for v, b in zip(values, baselines, strict=True)]
        ratio = median(ratios)
    else:
        ratios = []
        value, baseline = median(values), median(baselines)
        ratio = value / baseline if value is not None and baseline else None
    return {
        "section": section,
        "name": name,
        "value": median(values),
        "baseline": median(baselines),
        "ratio": ratio,
        "interval": bootstrap_ci(ratios) if paired else None,
        "unit": unit,
        "what": what,
        "baseline_what": baseline_what,
        "better": better,
        "reps": len(values),
        "values": values,
        "baselines": baselines,
        "ratios": ratios,
        **extra,
    }


def rotated(items: Sequence[str], rep: int) -> list[str]:
    """`items` rotated by `rep`: each kind takes each position in turn (no fixed order bias)."""
    k = rep % len(items)
    return list(items[k:]) + list(items[:k])


# --------------------------------------------------------------------------------------------------------
# Machine facts
# --------------------------------------------------------------------------------------------------------


def loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_facts(device: str) -> dict[str, Any]:
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    try:
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout)
    except (OSError, subprocess.CalledProcessError, ValueError):
        nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import psutil
    import torch

    facts: dict[str, Any] = {
        "nproc": nproc,
        "cpu_model": cpu_model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "loadavg": loadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    if device == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["cuda"] = torch.version.cuda
    with contextlib.suppress(ImportError):
        import transformers

        facts["transformers"] = transformers.__version__
    facts |= git_facts()
    return facts


def git_facts() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain")
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(status) if status is not None else None}


# --------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------


def build_large_model(name: str, directory: Path) -> dict[str, Any]:
    """Build a randomly initialised model of shape `name` (fp32) with the tiny tokenizer; save it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from trainer.policy import Policy
    from trainer.tiny import BOS_ID, EOS_ID, PAD_ID, build_tokenizer

    shape = LARGE_MODELS[name]
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = shape["max_positions"]
    common = {
        "vocab_size": shape["vocab"] or len(tokenizer),
        "hidden_size": shape["hidden"],
        "intermediate_size": shape["intermediate"],
        "num_hidden_layers": shape["layers"],
        "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv_heads"],
        "max_position_embeddings": shape["max_positions"],
        "tie_word_embeddings": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
    }
    config_cls, model_cls = (
        (LlamaConfig, LlamaForCausalLM) if shape["arch"] == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    )
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_cls(config_cls(**common)).to(torch.float32)
    for key, value in (("bos_token_id", BOS_ID), ("eos_token_id", EOS_ID), ("pad_token_id", PAD_ID)):
        setattr(model.generation_config, key, value)
    Policy(model, tokenizer).save(directory)
    params = sum(p.numel() for p in model.parameters())
    info = {"name": name, "shape": shape, "parameters": params, "build_s": time.perf_counter() - started}
    (directory / "r2vpo_bench_model.json").write_text(json.dumps(info, indent=1))
    return info


class Models:
    """The tiny default policy (cached) and, built on first use, the large random model of the device."""

    def __init__(self, scratch: Path, device: str, tiny: Path | None) -> None:
        self.scratch, self.device = scratch, device
        self.large_name = "qwen2-0.5b-shape" if device == "cuda" else "llama-100m"
        self._tiny = tiny
        self._large: Path | None = None
        self.info: dict[str, Any] = {}

    def tiny(self) -> Path:
        if self._tiny is None:
            from trainer.tiny import ensure_default_policy

            self._tiny = ensure_default_policy(progress=False)
        return self._tiny

    def get(self, which: str) -> Path:
        if which == "tiny":
            return self.tiny()
        if self._large is None:
            directory = self.scratch / self.large_name
            log(f"building the randomly initialised {self.large_name} model in {directory}")
            self.info[self.large_name] = build_large_model(self.large_name, directory)
            self._large = directory
        return self._large

    def label(self, which: str) -> str:
        return "tiny" if which == "tiny" else self.large_name


# --------------------------------------------------------------------------------------------------------
# Process sampling (RSS, CPU) and the served policy version
# --------------------------------------------------------------------------------------------------------


def _vm_hwm(pid: int) -> int | None:
    """Peak resident set size (VmHWM) of a process in bytes, Linux only."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def service_label(cmdline: list[str]) -> str | None:
    """`inference`, `rollout-0`, `redis`, … for a child of `r2vpo up` (None for anything else)."""
    if cmdline and "redis-server" in cmdline[0]:  # redis rewrites its title: "…/redis-server 127.0.0.1:…"
        return "redis"
    if "serve" in cmdline and "--config" in cmdline:
        with contextlib.suppress(IndexError):
            return Path(cmdline[cmdline.index("--config") + 1]).stem
    return None


def _maps_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


class ProcSampler(threading.Thread):
    """Samples RSS, peak RSS and CPU time of this process's service children, and machine CPU time."""

    def __init__(self, interval: float = 0.25) -> None:
        super().__init__(daemon=True, name="proc-sampler")
        self.interval = interval
        self.halt = threading.Event()
        self.samples: dict[str, list[tuple[float, int, float]]] = {}  # name → (time, rss, cpu seconds)
        self.peak_rss: dict[str, int] = {}
        self.uses_torch: dict[str, bool] = {}  # libtorch mapped into the process
        self.machine: list[tuple[float, float, float]] = []  # (time, busy cpu seconds, all cpu seconds)
        self._names: dict[tuple[int, float], str] = {}  # (pid, start time) → service name

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.halt.is_set():
            now = time.time()
            cpu = psutil.cpu_times()
            idle = cpu.idle + getattr(cpu, "iowait", 0.0)
            total = sum(cpu)
            self.machine.append((now, total - idle, total))
            for proc in me.children(recursive=True):
                try:
                    key = (proc.pid, proc.create_time())
                    if key not in self._names:  # between fork and exec a child still shows our cmdline
                        label = service_label(proc.cmdline())
                        if label is None:
                            continue
                        self._names[key] = label
                    name = self._names[key]
                    with proc.oneshot():
                        rss = proc.memory_info().rss
                        times = proc.cpu_times()
                    hwm = _vm_hwm(proc.pid) or rss
                    self.samples.setdefault(name, []).append((now, rss, times.user + times.system))
                    self.peak_rss[name] = max(self.peak_rss.get(name, 0), hwm, rss)
                    if not self.uses_torch.get(name) and len(self.samples[name]) % 8 == 1:
                        self.uses_torch[name] = _maps_torch(proc.pid)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            self.halt.wait(self.interval)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=5)

    def cores_used(self, start: float, end: float) -> dict[str, float] | None:
        """CPU seconds per wall second between `start` and `end` (nearest samples): services, machine."""

        def nearest(rows: list, t: float) -> Any:
            return min(rows, key=lambda r: abs(r[0] - t)) if rows else None

        per_service = {}
        for name, rows in self.samples.items():
            a, b = nearest(rows, start), nearest(rows, end)
            if a is not None and b is not None and b[0] > a[0]:
                per_service[name] = round((b[2] - a[2]) / (b[0] - a[0]), 3)
        a, b = nearest(self.machine, start), nearest(self.machine, end)
        if a is None or b is None or b[0] <= a[0]:
            return None
        return {
            "services": round(sum(per_service.values()), 3),
            "machine": round((b[1] - a[1]) / (b[0] - a[0]), 3),
            "per_service": per_service,
        }


class VersionPoller(threading.Thread):
    """Polls GET /v1/models and records when each policy version is first served."""

    def __init__(self, url: str, interval: float = 0.05) -> None:
        super().__init__(daemon=True, name="version-poller")
        self.url, self.interval = url.rstrip("/"), interval
        self.halt = threading.Event()
        self.seen: list[tuple[float, int]] = []

    def run(self) -> None:
        import httpx

        last = None
        with httpx.Client(timeout=2.0) as client:
            while not self.halt.is_set():
                try:
                    version = client.get(f"{self.url}/v1/models").json()["data"][0]["policy_version"]
                except Exception:  # noqa: BLE001 - not up yet, or shutting down
                    version = None
                if version is not None and version != last:
                    self.seen.append((time.time(), int(version)))
                    last = version
                self.halt.wait(self.interval)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=5)

    def first_serving(self, version: int) -> float | None:
        return next((t for t, v in self.seen if v >= version), None)


# --------------------------------------------------------------------------------------------------------
# e2e: async pipeline vs the synchronous loop
# --------------------------------------------------------------------------------------------------------


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


def _up_once(
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
                result, sampler = _up_once(kind, rep, ctx.scratch, model, sizes, ctx.device)
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


# --------------------------------------------------------------------------------------------------------
# queue: TrajectoryQueue vs raw stream commands
# --------------------------------------------------------------------------------------------------------


def realistic_group(group_size: int = 8, tokens: int = 10, prompt_tokens: int = 8) -> Any:
    """A trajectory group shaped like the default task's: G completions of `tokens` ids with log-probs."""
    from client.schemas import Completion, TrajectoryGroup

    rng = random.Random(0)
    completions = [
        Completion(
            token_ids=[rng.randrange(4, 99) for _ in range(tokens)],
            behavior_logprobs=[-rng.random() * 3 for _ in range(tokens)],
            reward=float(rng.random() < 0.5),
            policy_version=7,
            text="".join(chr(rng.randrange(48, 58)) for _ in range(tokens - 1)),
            finish_reason="stop",
        )
        for _ in range(group_size)
    ]
    return TrajectoryGroup(
        group_id=uuid.uuid4().hex, run="bench", task="chain_sum", problem_id="p123", prompt="4-1-7=",
        prompt_token_ids=[1] + [rng.randrange(4, 99) for _ in range(prompt_tokens - 1)],
        completions=completions, generation_s=0.05, scoring_s=0.01,
    )  # fmt: skip


async def _queue_path(redis: Any, run: str, groups: list, per_read: int) -> dict[str, float]:
    from services.queue import TrajectoryQueue

    queue = TrajectoryQueue(redis, run, consumer="bench", max_len=len(groups) + 1)
    await queue.ensure_group()
    started = time.perf_counter()
    for group in groups:  # one XADD per group, as a rollout worker pushes them
        await queue.push(group)
    pushed = time.perf_counter()
    done = 0
    while done < len(groups):  # read a learner step's worth, then settle it, as the learner does
        deliveries = await queue.read(per_read, block_ms=200)
        await queue.ack(deliveries)
        done += len(deliveries)
    finished = time.perf_counter()
    await redis.delete(*[getattr(queue.keys, k) for k in ("trajectories", "trained", "counters")])
    return {"push_s": pushed - started, "consume_s": finished - pushed, "total_s": finished - started}


async def _raw_path(redis: Any, stream: str, payload: bytes, n: int, per_read: int, pipelined: bool) -> dict:
    from services.queue import _entries  # parses the XREADGROUP reply whatever its RESP shape

    await redis.xgroup_create(stream, "g", id="0", mkstream=True)
    started = time.perf_counter()
    if pipelined:
        for start in range(0, n, 64):
            async with redis.pipeline(transaction=False) as pipe:
                for _ in range(min(64, n - start)):
                    pipe.xadd(stream, {"data": payload})
                await pipe.execute()
    else:
        for _ in range(n):
            await redis.xadd(stream, {"data": payload})
    pushed = time.perf_counter()
    done = 0
    while done < n:
        reply = await redis.xreadgroup("g", "c", {stream: ">"}, count=per_read, block=200)
        ids = [entry_id for entry_id, _ in _entries(reply)]
        if ids:
            await redis.xack(stream, "g", *ids)
        done += len(ids)
    finished = time.perf_counter()
    await redis.delete(stream)
    return {"push_s": pushed - started, "consume_s": finished - pushed, "total_s": finished - started}


def bench_queue(ctx: Context) -> dict[str, Any]:
    return asyncio.run(_bench_queue(ctx))


async def _bench_queue(ctx: Context) -> dict[str, Any]:
    from services.queue import connect_redis
    from services.redis_server import RedisServer

    sizes = ctx.sizes
    n, per_read = sizes["queue_groups"], 16  # the learner reads groups_per_step = 16 at a time
    template = realistic_group()
    payload = template.model_dump_json().encode()
    server = RedisServer(
        ctx.scratch / "redis-queue", password=secrets.token_hex(8)
    ).start()  # as `up` runs it
    redis = await connect_redis(server.url)
    kinds = ("queue", "raw_pipelined", "raw_serial")
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    try:
        for rep in range(sizes["queue_reps"]):
            groups = [template.model_copy(update={"group_id": uuid.uuid4().hex}) for _ in range(n)]
            for kind in rotated(kinds, rep):
                if kind == "queue":
                    r = await _queue_path(redis, f"bench{rep}", groups, per_read)
                else:
                    r = await _raw_path(
                        redis, f"raw:{rep}:{kind}", payload, n, per_read, kind == "raw_pipelined"
                    )
                r["groups_per_s"] = n / r["total_s"]
                runs[kind].append(r)
            log(f"queue rep {rep}: " + ", ".join(f"{k} {runs[k][-1]['groups_per_s']:.0f}/s" for k in kinds))
    finally:
        await redis.aclose()
        server.stop()
    rate = {k: [r["groups_per_s"] for r in runs[k]] for k in kinds}
    us = {k: [1e6 / x for x in rate[k]] for k in kinds}
    overhead = median([a - b for a, b in zip(us["queue"], us["raw_pipelined"], strict=True)])
    fig = figure(
        "queue", "groups_per_s", rate["queue"], rate["raw_pipelined"], unit="groups/s",
        what=f"TrajectoryQueue push (one per group) + read ({per_read}) + ack, G=8 × 10 tokens, "
        f"{len(payload)} B of JSON",
        baseline_what="raw XADD (pipelined, 64 per round trip) + XREADGROUP + XACK of the same bytes",
        overhead_us_per_group=overhead,
    )  # fmt: skip
    serial = figure(
        "queue", "groups_per_s_vs_unpipelined", rate["queue"], rate["raw_serial"], unit="groups/s",
        what="TrajectoryQueue push + read + ack (as above)",
        baseline_what="raw XADD one round trip each (the queue's call pattern) + XREADGROUP + XACK",
        overhead_us_per_group=median([a - b for a, b in zip(us["queue"], us["raw_serial"], strict=True)]),
    )  # fmt: skip
    details = {
        "payload_bytes": len(payload),
        "groups": n,
        "per_read": per_read,
        "us_per_group": {k: median(us[k]) for k in kinds},
        "push_us_per_group": {k: median([1e6 * r["push_s"] / n for r in runs[k]]) for k in kinds},
        "consume_us_per_group": {k: median([1e6 * r["consume_s"] / n for r in runs[k]]) for k in kinds},
    }
    return {"figures": [fig, serial], "details": details, "runs": runs}


# --------------------------------------------------------------------------------------------------------
# weights: publication latency vs the bytes' write + read floor
# --------------------------------------------------------------------------------------------------------


def start_service(
    kind: str, settings: dict[str, Any], directory: Path, *, ready_timeout: float = 600
) -> tuple[subprocess.Popen, str]:
    """`r2vpo serve <kind> --config …` as a child on a free port; returns it once /readyz answers 200."""
    import httpx

    from services.redis_server import free_port

    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = directory / f"{kind}.json"
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the Redis password
    with os.fdopen(fd, "w") as f:
        json.dump(settings | {"host": "127.0.0.1", "port": port}, f)
    log_file = (directory / f"{kind}.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", kind, "--config", str(config)],
        cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    log_file.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} exited with {proc.returncode}; see {directory / f'{kind}.log'}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        time.sleep(0.2)
    stop_process(proc)
    raise RuntimeError(f"{kind} not ready within {ready_timeout:.0f} s")


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def io_floor(data: bytearray, directory: Path) -> dict[str, float]:
    """memcpy, write + fsync and read (page cache, as the service reads a just-written file) of `data`."""
    target = bytearray(len(data))
    started = time.perf_counter()
    target[:] = data
    memcpy_s = time.perf_counter() - started
    del target
    path = directory / f".floor-{uuid.uuid4().hex}.tmp"
    started = time.perf_counter()
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    with path.open("rb") as f:
        back = f.read()
    read_s = time.perf_counter() - started
    assert len(back) == len(data)
    path.unlink()
    return {"memcpy_s": memcpy_s, "write_s": write_s, "read_s": read_s, "floor_s": write_s + read_s}


def weight_components(state_dict: dict, directory: Path) -> dict[str, float]:
    """One pass of each step of publish + fetch + verify + load, timed alone (where the time goes)."""
    import hashlib

    import safetensors.torch
    import torch

    from services.weights import _to_serialisable

    times: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        out = fn()
        times[name] = time.perf_counter() - started
        return out

    tensors = timed("to_serialisable", lambda: _to_serialisable(state_dict))
    data = timed("safetensors_save", lambda: safetensors.torch.save(tensors, metadata={"version": "1"}))
    path = directory / ".components.tmp"

    def write() -> None:
        with path.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    timed("write_fsync", write)
    timed("sha256", lambda: hashlib.sha256(data).hexdigest())
    back = timed("read", path.read_bytes)
    loaded = timed("safetensors_load", lambda: safetensors.torch.load(back))
    timed("finite_check", lambda: all(bool(torch.isfinite(t).all()) for t in loaded.values()))
    target = {k: torch.empty_like(v) for k, v in loaded.items()}
    timed("copy_into_model", lambda: [target[k].copy_(v) for k, v in loaded.items()])
    path.unlink()
    times["bytes"] = len(data)
    return times


async def _publish_reps(
    ctx: Context, which: str, model_dir: Path, reps: int, redis_url: str, directory: Path
) -> dict[str, Any]:
    import httpx

    from services.queue import TrajectoryQueue, connect_redis
    from services.weights import WeightStore
    from trainer.policy import Policy

    run = f"weights-{which}"
    settings = {
        "run": run, "redis_url": redis_url, "model": str(model_dir), "admin_token": secrets.token_hex(16),
        "watch_weights": True, "torch_threads": 1, "device": ctx.device,
    }  # fmt: skip
    policy = Policy.from_pretrained(model_dir)
    state_dict = {k: v.detach().cpu() for k, v in policy.model.state_dict().items()}  # as LearnerService does
    store = WeightStore(directory / "weights")
    components = await asyncio.to_thread(weight_components, state_dict, directory)
    nbytes = int(components["bytes"])
    block = os.urandom(1 << 20)
    data = bytearray((block * (nbytes // len(block) + 1))[:nbytes])
    proc, url = start_service("inference", settings, directory / "inference")
    redis = await connect_redis(redis_url)
    queue = TrajectoryQueue(redis, run, consumer="bench")
    runs: list[dict[str, float]] = []
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            for rep in range(reps + 1):  # rep 0 warms up (first fetch, first load_state_dict)
                order = rotated(("floor", "publish"), rep)
                row: dict[str, float] = {}
                for kind in order:
                    if kind == "floor":
                        row |= await asyncio.to_thread(io_floor, data, directory)
                        continue
                    version = rep + 1
                    started = time.perf_counter()
                    announcement = await asyncio.to_thread(store.publish, version, state_dict)
                    published = time.perf_counter()
                    await queue.announce(announcement)
                    announced = time.perf_counter()
                    while True:
                        body = (await http.get(f"{url}/v1/models")).json()
                        if body["data"][0]["policy_version"] >= version:
                            break
                        await asyncio.sleep(0.002)
                    served = time.perf_counter()
                    await asyncio.to_thread(store.prune, 4)
                    row |= {
                        "publish_s": published - started,
                        "announce_s": announced - published,
                        "to_serving_s": served - announced,
                        "latency_s": served - started,
                    }
                if rep:
                    runs.append(row)
            metrics = (await http.get(f"{url}/metrics")).text
    finally:
        await redis.aclose()
        stop_process(proc)
        shutil.rmtree(directory / "weights", ignore_errors=True)
    swap_sum = _prom_value(metrics, "r2vpo_inference_weight_swap_seconds_sum")
    swap_count = _prom_value(metrics, "r2vpo_inference_weight_swap_seconds_count")
    label = ctx.models.label(which)
    fig = figure(
        "weights", f"publish_to_serving_{label}",
        [r["latency_s"] for r in runs], [r["floor_s"] for r in runs], unit="s", better="lower",
        what=f"{label} ({nbytes / 2**20:.1f} MiB): learner step end → publish → announce → watcher "
        "fetch + verify + swap → /v1/models serves it",
        baseline_what="write + fsync + read of the same bytes (same directory)",
    )  # fmt: skip
    details = {
        "model": label,
        "bytes": nbytes,
        "parameters": sum(p.numel() for p in policy.model.parameters()),
        "memcpy_gb_s": median([nbytes / r["memcpy_s"] / 1e9 for r in runs]),
        "write_gb_s": median([nbytes / r["write_s"] / 1e9 for r in runs]),
        "read_gb_s": median([nbytes / r["read_s"] / 1e9 for r in runs]),
        "publish_s": median([r["publish_s"] for r in runs]),
        "announce_s": median([r["announce_s"] for r in runs]),
        "announce_to_serving_s": median([r["to_serving_s"] for r in runs]),
        "service_fetch_verify_swap_s_mean": swap_sum / swap_count if swap_count else None,
        "components_s": components,
        "loadavg": loadavg(),
    }
    return {"figure": fig, "details": details, "runs": runs}


def _prom_value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def bench_weights(ctx: Context) -> dict[str, Any]:
    from services.redis_server import RedisServer

    server = RedisServer(ctx.scratch / "redis-weights", password=secrets.token_hex(8)).start()
    out: dict[str, Any] = {"figures": [], "details": {}, "runs": {}}
    try:
        for which in ctx.sizes["weights_models"]:
            reps = ctx.sizes["weights_reps"] if which == "tiny" else ctx.sizes["weights_large_reps"]
            if reps <= 0:
                continue
            model_dir = ctx.models.get(which)
            label = ctx.models.label(which)
            log(f"weights: {label}, {reps} versions, load {loadavg()}")
            got = asyncio.run(
                _publish_reps(ctx, which, model_dir, reps, server.url, ctx.scratch / f"w-{label}")
            )
            out["figures"].append(got["figure"])
            out["details"][label] = got["details"]
            out["runs"][label] = got["runs"]
            f = got["figure"]
            log(f"  {label}: {f['value']:.3f} s vs floor {f['baseline']:.3f} s ({f['ratio']:.1f}×)")
    finally:
        server.stop()
    return out


# --------------------------------------------------------------------------------------------------------
# engine: TorchEngine (and VllmEngine) vs transformers generate
# --------------------------------------------------------------------------------------------------------


def engine_prompts(model_dir: Path, prompts: int) -> list[list[int]]:
    """`prompts` train problems of the default task as token ids (bos first), as the rollout worker sends."""
    from transformers import AutoTokenizer

    from trainer.task import Task

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    problems = Task().sample_train(prompts, random.Random(0))
    bos = tokenizer.bos_token_id
    return [[bos, *tokenizer(p.prompt, add_special_tokens=False)["input_ids"]] for p in problems]


def hf_generate(
    model: Any, rows: list[list[int]], *, max_new_tokens: int, pad_id: int, eos_id: int, seed: int
) -> int:
    """transformers `generate` (KV cache, multinomial sampling at temperature 1, no top-k / top-p) on the
    left-padded rows, plus the sampled tokens' log-probs; returns the tokens generated (to eos, incl.)."""
    import torch

    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r)
        attn[i, width - len(r) :] = 1
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids.to(device), attention_mask=attn.to(device), do_sample=True,
            temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, min_new_tokens=0,
            pad_token_id=pad_id, eos_token_id=eos_id, use_cache=True,
            return_dict_in_generate=True, output_scores=True,
        )  # fmt: skip
        new = out.sequences[:, width:]
        scores = torch.stack(out.scores, dim=1).float()  # [B, T, V], the distribution sampled from
        logp = torch.log_softmax(scores, -1).gather(-1, new[..., None]).squeeze(-1)
        del logp
        is_eos = new == eos_id
        after = is_eos.cumsum(-1) - is_eos.long()  # eos tokens before this position
        return int((after == 0).sum())


def bench_engine(ctx: Context) -> dict[str, Any]:
    out: dict[str, Any] = {"figures": [], "details": {}, "runs": {}}
    for which in ctx.sizes["engine_models"]:
        reps = ctx.sizes["engine_reps"] if which == "tiny" else ctx.sizes["engine_large_reps"]
        if reps <= 0:
            continue
        label = ctx.models.label(which)
        model_dir = ctx.models.get(which)
        prompts, n, max_tokens = ENGINE_SHAPES[(ctx.device, which)]
        log(
            f"engine: {label}, {prompts} prompts × n {n} × {max_tokens} tokens, {reps} reps, load {loadavg()}"
        )
        got = asyncio.run(_engine_reps(ctx, model_dir, label, prompts, n, max_tokens, reps))
        out["figures"].append(got["figure"])
        out["details"][label] = got["details"]
        out["runs"][label] = got["runs"]
        log(f"  torch engine / generate: {got['figure']['ratio']:.2f}")
    if (ctx.sizes["vllm"] or ctx.args.with_vllm) and not ctx.args.no_vllm:
        vllm = run_vllm_part(ctx)
        out["details"]["vllm"] = vllm.get("details")
        out["figures"] += vllm.get("figures", [])
    return out


async def _engine_reps(
    ctx: Context, model_dir: Path, label: str, prompts: int, n: int, max_tokens: int, reps: int
) -> dict[str, Any]:
    from services.inference.torch_engine import TorchEngine

    rows_prompt = engine_prompts(model_dir, prompts)
    engine = TorchEngine(model_dir, device=ctx.device, max_batch_size=4096)
    model = engine.policy.model  # the very same model object for both
    pad, eos = engine.policy.pad_id, engine.policy.eos_id
    rows = [p for p in rows_prompt for _ in range(n)]
    runs: dict[str, list[float]] = {"torch_engine": [], "generate": []}
    tokens: dict[str, list[int]] = {"torch_engine": [], "generate": []}
    try:
        for rep in range(reps + 1):  # rep 0 warms up
            for kind in rotated(("torch_engine", "generate"), rep):
                _sync_device(ctx.device)
                started = time.perf_counter()
                if kind == "torch_engine":
                    gens = await engine.generate(
                        rows_prompt, n=n, max_tokens=max_tokens, temperature=1.0, seed=rep
                    )
                    count = sum(len(g.token_ids) for per in gens for g in per)
                else:
                    count = await asyncio.to_thread(
                        hf_generate, model, rows, max_new_tokens=max_tokens, pad_id=pad, eos_id=eos, seed=rep
                    )
                _sync_device(ctx.device)
                seconds = time.perf_counter() - started
                if rep:
                    runs[kind].append(count / seconds)
                    tokens[kind].append(count)
    finally:
        engine.close()
    fig = figure(
        "engine", f"torch_engine_vs_generate_{label}", runs["torch_engine"], runs["generate"],
        unit="tokens/s",
        what=f"TorchEngine.generate, {label}, {prompts} prompts × n {n}, ≤ {max_tokens} new tokens, T=1",
        baseline_what="transformers generate (KV cache, sampling; same model object, batch, max_new_tokens)",
    )  # fmt: skip
    details = {
        "model": label,
        "batch_rows": len(rows),
        "max_new_tokens": max_tokens,
        "tokens_per_call": {k: median(v) for k, v in tokens.items()},
        "loadavg": loadavg(),
    }
    return {"figure": fig, "details": details, "runs": runs}


def _sync_device(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def run_vllm_part(ctx: Context) -> dict[str, Any]:
    """The vLLM engine against generate, in the vLLM venv (CPU) or this interpreter (GPU, if it has vLLM)."""
    python = None
    if ctx.device == "cpu" and VLLM_PYTHON.exists():
        python = str(VLLM_PYTHON)
    elif ctx.device == "cuda":
        import importlib.util

        if importlib.util.find_spec("vllm") is not None:
            python = sys.executable
    if python is None:
        log("engine: no vLLM environment (.venv-vllm) here; the vLLM figure is skipped")
        return {"details": {"skipped": "no vLLM environment"}}
    which = "tiny" if ctx.device == "cpu" else "large"  # on a GPU, the model vLLM is meant for
    label = ctx.models.label(which)
    prompts, n, max_tokens = ENGINE_SHAPES[(ctx.device, which)]
    if ctx.device == "cuda":  # hand the cached GPU memory back before vLLM sizes its KV cache
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()
    spec = {
        "model": str(ctx.models.get(which)), "label": label, "device": ctx.device, "prompts": prompts, "n": n,
        "max_tokens": max_tokens, "reps": ctx.sizes["engine_reps"], "out": str(ctx.scratch / "vllm.json"),
        "scratch": str(ctx.scratch / "vllm-scratch"),
    }  # fmt: skip
    spec_path = ctx.scratch / "vllm-spec.json"
    spec_path.write_text(json.dumps(spec))
    log(f"engine: vLLM engine vs generate in {python} ({label}), load {loadavg()}")
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "WARNING"}
    try:
        done = subprocess.run(
            [python, str(Path(__file__).resolve()), "--vllm-worker", str(spec_path)],
            cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"details": {"error": "the vLLM part timed out after 600 s"}}
    if done.returncode != 0 or not Path(spec["out"]).exists():
        tail = (done.stdout + done.stderr)[-3000:]
        log(f"engine: the vLLM part failed (exit {done.returncode}):\n{tail}")
        return {"details": {"error": f"exit {done.returncode}", "output_tail": tail}}
    result = json.loads(Path(spec["out"]).read_text())
    fig = figure(
        "engine", f"vllm_engine_vs_generate_{label}", result["vllm_engine"], result["generate"],
        unit="tokens/s",
        what=f"VllmEngine.generate (vLLM {result.get('vllm')}, in-process, fp32, eager), {label}, "
        f"{prompts} prompts × n {n}, ≤ {max_tokens} new tokens, T=1",
        baseline_what="transformers generate in the same process (vLLM venv), same batch",
    )  # fmt: skip
    log(f"  vLLM engine / generate: {fig['ratio']:.2f}")
    return {"figures": [fig], "details": result}


def vllm_worker(spec_path: Path) -> int:
    """Runs inside the vLLM venv: VllmEngine vs generate on one model and batch, interleaved."""
    spec = json.loads(spec_path.read_text())
    scratch = Path(spec["scratch"])
    scratch.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_CACHE_ROOT", str(scratch / "cache"))
    tempfile.tempdir = str(scratch)
    import torch
    import vllm
    from transformers import AutoModelForCausalLM

    from services.inference.vllm_engine import VllmEngine

    if spec["device"] == "cpu":
        torch.set_num_threads(1)  # as in the main process (vLLM in-process freezes the count after this)
    model_dir = Path(spec["model"])
    rows_prompt = engine_prompts(model_dir, spec["prompts"])
    n, max_tokens = spec["n"], spec["max_tokens"]
    engine = VllmEngine(
        model_dir, device=spec["device"], max_batch_size=1024, seed=0, gpu_memory_utilization=0.5
    )  # on a GPU, half of it: this process also holds the transformers copy of the model
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    model = model.to(spec["device"]).eval()
    rows = [p for p in rows_prompt for _ in range(n)]
    eos, pad = engine.eos_id, engine.tokenizer.pad_token_id
    runs: dict[str, list[float]] = {"vllm_engine": [], "generate": []}
    tokens: dict[str, list[int]] = {"vllm_engine": [], "generate": []}

    async def main() -> None:
        for rep in range(spec["reps"] + 1):
            for kind in rotated(("vllm_engine", "generate"), rep):
                _sync_device(spec["device"])
                started = time.perf_counter()
                if kind == "vllm_engine":
                    gens = await engine.generate(
                        rows_prompt, n=n, max_tokens=max_tokens, temperature=1.0, seed=rep
                    )
                    count = sum(len(g.token_ids) for per in gens for g in per)
                else:
                    count = hf_generate(
                        model, rows, max_new_tokens=max_tokens, pad_id=pad, eos_id=eos, seed=rep
                    )
                _sync_device(spec["device"])
                if rep:
                    runs[kind].append(count / (time.perf_counter() - started))
                    tokens[kind].append(count)

    try:
        asyncio.run(main())
    finally:
        engine.close()
    out = runs | {
        "tokens_per_call": {k: median(v) for k, v in tokens.items()},
        "vllm": vllm.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg": loadavg(),
    }
    Path(spec["out"]).write_text(json.dumps(out))
    return 0


# --------------------------------------------------------------------------------------------------------
# learner: R²VPO vs GRPO step cost
# --------------------------------------------------------------------------------------------------------


def _to_device_batch(build: Callable, device: str) -> Callable:
    """Wrap `trainer.learner.build_batch` so the batch's tensors live on `device` (the learner leaves them
    on the CPU, which only works for a CPU policy)."""
    import dataclasses

    import torch

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        batch = build(*args, **kwargs)
        moved = {
            f.name: getattr(batch, f.name).to(device)
            for f in dataclasses.fields(batch)
            if isinstance(getattr(batch, f.name), torch.Tensor)
        }
        return dataclasses.replace(batch, **moved)

    return wrapped


def _joint_backward(loss_fn: Callable) -> Callable:
    """`loss_fn` with its `parts` dropped: the learner then backpropagates the total loss once."""
    import dataclasses

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return dataclasses.replace(loss_fn(*args, **kwargs), parts=None)

    return wrapped


def bench_learner(ctx: Context) -> dict[str, Any]:
    import torch

    import trainer.learner as learner_mod
    from trainer.learner import Learner, LearnerConfig
    from trainer.policy import Policy
    from trainer.rollout import generate_groups
    from trainer.task import Task

    which = "large" if ctx.device == "cuda" else "tiny"
    label = ctx.models.label(which)
    model_dir = ctx.models.get(which)
    base = Policy.from_pretrained(model_dir, device=ctx.device)
    task = Task()
    problems = task.sample_train(16, random.Random(0))
    generator = torch.Generator(device=base.device).manual_seed(0)
    max_new_tokens = 8 if ctx.device == "cpu" else 64  # the default task's length; longer on a GPU
    groups = generate_groups(
        base, task, problems, group_size=8, max_new_tokens=max_new_tokens, temperature=1.0, version=0,
        generator=generator,
    )  # fmt: skip
    configs = {
        "grpo": LearnerConfig(algo="grpo"),
        # λ held at 0: the variance is computed and logged, its gradient is zero (one backward pass)
        "r2vpo_lam0": LearnerConfig(algo="r2vpo", dual={"lam_init": 0.0, "lr": 0.0}),
        # λ held at 1: the penalty's gradient is live; the learner then takes two backward passes (one per
        # part, to log each part's gradient norm)
        "r2vpo_lam1": LearnerConfig(algo="r2vpo", dual={"lam_init": 1.0, "lr": 0.0}),
        # the same, with the loss's parts hidden so the learner takes one joint backward pass: the cost of
        # the variance term itself, without the per-part logging
        "r2vpo_lam1_joint": LearnerConfig(algo="r2vpo", dual={"lam_init": 1.0, "lr": 0.0}),
    }
    learners = {}
    for name, cfg in configs.items():
        policy = Policy(copy.deepcopy(base.model), base.tokenizer, device=ctx.device)
        learners[name] = Learner(policy, cfg, seed=0)
    learners["r2vpo_lam1_joint"].loss_fn = _joint_backward(learners["r2vpo_lam1_joint"].loss_fn)
    original = learner_mod.build_batch
    if ctx.device != "cpu":
        learner_mod.build_batch = _to_device_batch(original, ctx.device)
    runs: dict[str, list[float]] = {k: [] for k in configs}
    lams: dict[str, list[float]] = {k: [] for k in configs}
    tokens = 0
    log(f"learner: {label}, 16 groups × 8, {ctx.sizes['learner_reps']} reps, load {loadavg()}")
    try:
        for rep in range(ctx.sizes["learner_reps"] + 1):  # rep 0 warms up
            for name in rotated(tuple(configs), rep):
                learner = learners[name]
                learner.version = learner.step = 0  # every step sees lag-0 groups: none dropped as stale
                _sync_device(ctx.device)
                started = time.perf_counter()
                result = learner.train_on(groups)
                _sync_device(ctx.device)
                seconds = time.perf_counter() - started
                tokens = result.metrics["tokens"]
                if rep:
                    runs[name].append(tokens / seconds)
                    lams[name].append(result.metrics.get("lam", 0.0))
    finally:
        learner_mod.build_batch = original
    baseline_what = "the same step with GRPO (PPO-clip 0.2), interleaved"
    figures = [
        figure(
            "learner", "r2vpo_lam0_vs_grpo", runs["r2vpo_lam0"], runs["grpo"], unit="tokens/s",
            what=f"Learner.train_on, R²VPO at λ = 0 (variance computed, no penalty gradient), {label}, "
            f"16 groups × 8, {tokens} tokens",
            baseline_what=baseline_what,
        ),
        figure(
            "learner", "r2vpo_lam1_vs_grpo", runs["r2vpo_lam1"], runs["grpo"], unit="tokens/s",
            what=f"Learner.train_on, R²VPO at λ = 1 (penalty gradient live; the learner's two backward "
            f"passes), {label}",
            baseline_what=baseline_what,
        ),
        figure(
            "learner", "r2vpo_lam1_joint_vs_grpo", runs["r2vpo_lam1_joint"], runs["grpo"], unit="tokens/s",
            what=f"R²VPO at λ = 1 with one joint backward pass (parts hidden from the learner), {label}",
            baseline_what=baseline_what,
        ),
    ]  # fmt: skip
    details = {"model": label, "tokens": tokens, "lam_seen": {k: sorted(set(v)) for k, v in lams.items()}}
    return {"figures": figures, "details": details, "runs": runs, "loadavg": loadavg()}


# --------------------------------------------------------------------------------------------------------
# memory: peak RSS per service
# --------------------------------------------------------------------------------------------------------


def bench_memory(ctx: Context) -> dict[str, Any]:
    sampler = ctx.memory_samples.get("async_up")
    source = "the first `r2vpo up --mode async` run of the e2e section"
    if sampler is None:
        steps = {"e2e_steps": 3, "e2e_skip": 1}
        log("memory: a short `r2vpo up --mode async` (3 steps)")
        _, sampler = _up_once("async", 99, ctx.scratch, ctx.models.tiny(), steps, ctx.device)
        source = "a 3-step `r2vpo up --mode async` run"
    python_torch = baseline_python_rss("torch, transformers")
    python_web = baseline_python_rss("fastapi, uvicorn, httpx, redis, pydantic")
    redis_rss = baseline_redis_rss(ctx.scratch)
    figures = []
    for name in sorted(sampler.peak_rss):
        if name == "redis":
            base, base_what = redis_rss, "an empty redis-server"
        elif sampler.uses_torch.get(name):
            base, base_what = python_torch, "a bare python that imported torch + transformers"
        else:
            base, base_what = (
                python_web,
                "a bare python that imported fastapi, uvicorn, httpx, redis, pydantic",
            )
        figures.append(
            figure(
                "memory", f"peak_rss_{name}", [sampler.peak_rss[name] / 2**20], [base / 2**20], unit="MiB",
                better="lower", what=f"peak RSS (VmHWM) of `{name}` during {source}", baseline_what=base_what,
            )
        )  # fmt: skip
    total = sum(sampler.peak_rss.values()) / 2**20
    return {
        "figures": figures,
        "details": {"sum_of_peaks_mib": total, "python_torch_mib": python_torch / 2**20,
                    "python_web_mib": python_web / 2**20, "redis_empty_mib": redis_rss / 2**20,
                    "uses_torch": sampler.uses_torch, "source": source},
    }  # fmt: skip


def baseline_python_rss(modules: str) -> int:
    """RSS of a fresh interpreter once it has imported `modules` (the floor of a service that needs them)."""
    code = (
        f"import pathlib, {modules}\n"
        "s = pathlib.Path('/proc/self/status').read_text().splitlines()\n"
        "print(next(int(l.split()[1]) * 1024 for l in s if l.startswith('VmRSS:')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    return int(done.stdout.strip().splitlines()[-1])


def baseline_redis_rss(scratch: Path) -> int:
    import psutil

    from services.redis_server import RedisServer

    server = RedisServer(scratch / "redis-empty", password=secrets.token_hex(8)).start()
    try:
        time.sleep(0.5)
        assert server.process is not None
        return psutil.Process(server.process.pid).memory_info().rss
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------------------
# Driver, results, README
# --------------------------------------------------------------------------------------------------------


class Context:
    def __init__(self, args: argparse.Namespace, scratch: Path, machine: dict[str, Any]) -> None:
        self.args = args
        self.mode = "quick" if args.quick else "full"
        self.sizes = SIZES[self.mode]
        self.device = args.device
        self.scratch = scratch
        self.machine = machine
        self.models = Models(scratch, args.device, args.model)
        self.memory_samples: dict[str, ProcSampler] = {}


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


def _fmt(x: float | None, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if unit == "s":
        return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"
    if abs(x) >= 100:
        return f"{x:,.0f}".replace(",", " ") + (f" {unit}" if unit else "")
    return f"{x:.3g}" + (f" {unit}" if unit else "")


def _fmt_ratio(f: dict[str, Any]) -> str:
    if f.get("ratio") is None:
        return "–"
    text = f"**{f['ratio']:.2f}×**"
    if f.get("interval"):
        lo, hi = f["interval"]
        text += f" [{lo:.2f}, {hi:.2f}]"
    return text


def machine_line(results: dict[str, Any]) -> str:
    m = results["machine"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    load = m.get("loadavg") or ["?"] * 3
    end = m.get("loadavg_end") or ["?"] * 3
    commit = (m.get("git_commit") or "unknown")[:12] + (" (dirty tree)" if m.get("git_dirty") else "")
    return (
        f"{results['date'][:16].replace('T', ' ')}, `--{results['mode']} --device {results['device']}`: "
        f"{m['nproc']} cores ({m.get('cpu_model')}){gpu}, load average {load[0]}/{load[1]}/{load[2]} at the "
        f"start, {end[0]}/{end[1]}/{end[2]} at the end; commit {commit}; torch {m.get('torch')}; "
        f"{results.get('seconds', 0) / 60:.1f} min"
    )


def markdown_table(results: dict[str, Any]) -> str:
    lines = [
        "| section | figure | value | baseline / floor | ratio [95% CI] | reps |",
        "|---|---|---|---|---|---|",
    ]
    for f in results["figures"]:
        what = f"{f['what']} — vs {f['baseline_what']}"
        extra = ""
        if "overhead_us_per_group" in f:
            extra = f"; overhead {f['overhead_us_per_group']:.0f} µs/group"
        lines.append(
            f"| {f['section']} | {f['name']}: {what}{extra} | {_fmt(f['value'], f['unit'])} | "
            f"{_fmt(f['baseline'], f['unit'])} | {_fmt_ratio(f)} | {f['reps']} |"
        )
    return "\n".join(lines)


def _by_name(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["name"]: f for f in results["figures"]}


HISTORY_COLUMNS = (
    ("async/sync up", "async_up_vs_sync_up"),
    ("async up/run_sync", "async_up_vs_sync_trainer"),
    ("queue/raw", "groups_per_s"),
    ("publish/floor tiny", "publish_to_serving_tiny"),
    ("publish/floor large", None),  # publish_to_serving_<large model>
    ("torch engine/generate tiny", "torch_engine_vs_generate_tiny"),
    ("R²VPO λ=0/GRPO", "r2vpo_lam0_vs_grpo"),
    ("R²VPO λ=1/GRPO", "r2vpo_lam1_vs_grpo"),
)


def history_row(results: dict[str, Any]) -> str:
    m, figs = results["machine"], _by_name(results)
    cells = [
        results["date"][:16].replace("T", " "),
        f"{results['device']} ({results['mode']})",
        f"{m['nproc']}× {m.get('cpu_model') or '?'}" + (f", {m['gpu']}" if m.get("gpu") else ""),
        str((m.get("loadavg") or ["?"])[0]),
        (m.get("git_commit") or "?")[:10] + ("+" if m.get("git_dirty") else ""),
    ]
    for _, key in HISTORY_COLUMNS:
        if key is None:
            f = next(
                (f for n, f in figs.items() if n.startswith("publish_to_serving_") and "tiny" not in n), None
            )
        else:
            f = figs.get(key)
        cells.append(f"{f['ratio']:.2f}×" if f and f.get("ratio") is not None else "–")
    return "| " + " | ".join(cells) + " |"


def analysis_text(results: dict[str, Any]) -> str:
    """The e2e figures explained from the run's own measurements (README prose)."""
    e2e = results["sections"].get("e2e", {})
    a, figs = e2e.get("analysis") or {}, _by_name(results)
    if "async_up_vs_sync_up" not in figs or not a.get("overlap_ceiling"):
        return ""
    f, lines = figs["async_up_vs_sync_up"], []
    text = (
        f"**Async vs sync on {a.get('nproc')} CPU cores: {f['ratio']:.2f}×** (peers report 1.6–2.8× on "
        f"GPUs). A lock-step step took {a['sync_step_s']:.2f} s: {a['sync_learner_part_s']:.2f} s of learner "
        f"work (train_on + checkpoint/publish/ack) and {a['sync_other_part_s']:.2f} s of everything else "
        "(generation, scoring, HTTP, Redis, waiting for the weight swap). Overlapping the two perfectly "
        f"would give at most {a['overlap_ceiling']:.2f}×, and only with idle cores to overlap into."
    )
    if a.get("async_machine_busy_cores") is not None:
        text += (
            f" There were none: the machine was busy on {a['async_machine_busy_cores']:.2f} of its "
            f"{a.get('nproc')} cores throughout (load average {results['machine']['loadavg'][0]}: other jobs "
            f"share them), and the services got {a.get('async_service_cores', 0):.2f} cores in async mode, "
            f"{a.get('sync_service_cores', 0):.2f} in sync mode."
        )
    if a.get("async_learner_s") and a.get("sync_learner_s"):
        lag = f" (mean lag {a['async_mean_lag']:.1f} versions)" if a.get("async_mean_lag") is not None else ""
        text += (
            f" In async mode the rollouts run ahead of the learner{lag}, so the learner is the bottleneck, "
            f"and its train_on took {a['async_learner_s']:.2f} s instead of {a['sync_learner_s']:.2f} s "
            "because generation now competes with it for the same cores."
        )
    text += (
        " On a GPU the sampler and the learner run on different devices and the pipeline approaches its "
        "ceiling; on 2 shared CPU cores async only wins back the serial waits of the lock-step loop."
    )
    lines.append(text)
    if "async_up_vs_sync_trainer" in figs:
        g = figs["async_up_vs_sync_trainer"]
        lines.append(
            f"The in-process synchronous trainer (`run_sync`) consumed {_fmt(g['baseline'], g['unit'])}: "
            f"async `r2vpo up` reaches {g['ratio']:.2f}× of it. With one model on one machine the services "
            "pay for HTTP, JSON, Redis and a checkpoint + weight publication after every learner step "
            f"({(a.get('sync_learner_part_s', 0) - a.get('sync_learner_s', 0)) * 1000:.0f} ms a step here) "
            "that the single process does not; the services buy fault tolerance and scale-out, not speed on "
            "2 cores."
        )
    if a.get("sync_step_to_serving_s") is not None:
        lines.append(
            f"Learner step end → inference serving the new version inside the running system: "
            f"{a['sync_step_to_serving_s'] * 1000:.0f} ms in sync mode (on the critical path of every "
            f"lock-step step), {(a.get('async_step_to_serving_s') or 0) * 1000:.0f} ms in async mode (the "
            "swap waits for the batch being sampled)."
        )
    return "\n\n".join(lines)


INTRO = (
    "`python benchmarks/system.py --full` (about ten minutes; `--quick` is the smoke test, `--device cuda` "
    "the GPU variant) measures the system's speed against its floors, every figure side by side with its "
    "baseline in the same run: repetitions interleaved, value and baseline are medians, the ratio is the "
    "median of per-repetition ratios with a 95% bootstrap interval. Timings on this shared machine are "
    "noisy; read the ratios, not the absolute numbers. Sections: e2e (rollouts/s the learner consumes, "
    "start-up excluded), queue (TrajectoryQueue vs raw stream commands), weights (step end → /v1/models "
    "serves it, vs writing + reading the bytes), engine (tokens/s vs transformers generate), learner "
    "(R²VPO vs GRPO step), memory (peak RSS per service of `r2vpo up`)."
)


def section_markdown(results: dict[str, Any], history: list[str], json_path: str) -> str:
    parts = [
        BEGIN,
        "## System",
        "",
        INTRO,
        "",
        f"Latest run: {machine_line(results)}. Results: `{json_path}`.",
        "",
        markdown_table(results),
        "",
    ]
    text = analysis_text(results)
    if text:
        parts += [text, ""]
    parts += [
        "Runs so far (ratios; publish/floor is × the write + read floor, lower is better):",
        "",
        HISTORY_HEADER + "".join(f" {name} |" for name, _ in HISTORY_COLUMNS),
        "|" + "---|" * (5 + len(HISTORY_COLUMNS)),
        *history,
        "",
        END,
    ]
    return "\n".join(parts)


def _row_key(row: str) -> tuple[str, str]:
    """(day, device) of a history row: one row per day and device, as there is one results file."""
    cells = [c.strip() for c in row.split("|")]
    return cells[1][:10], cells[2]


def update_readme(path: Path, results: dict[str, Any], json_path: str) -> None:
    """Insert or replace this benchmark's own section of `path` (between its markers); the rest of the
    file, other engineers' sections included, is left byte for byte as it is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    row = history_row(results)
    if BEGIN in text and END in text:
        before, rest = text.split(BEGIN, 1)
        old, after = rest.split(END, 1)
        history, in_history = [], False
        for line in old.splitlines():
            if line.startswith(HISTORY_HEADER):
                in_history = True
            elif in_history and line.startswith("| ") and not line.startswith("|---"):
                history.append(line)
        history = [h for h in history if _row_key(h) != _row_key(row)]
        path.write_text(before + section_markdown(results, [*history, row], json_path) + after)
    else:
        path.write_text(text.rstrip("\n") + "\n\n" + section_markdown(results, [row], json_path) + "\n")


def default_out(args: argparse.Namespace) -> Path:
    stamp = dt.date.today().isoformat() + ("" if args.device == "cpu" else f"-{args.device}")
    if args.quick:
        return Path(tempfile.gettempdir()) / f"r2vpo-system-quick-{stamp}.json"
    return RESULTS_DIR / f"{stamp}.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())

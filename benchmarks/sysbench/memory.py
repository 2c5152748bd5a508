"""memory: peak RSS of each `r2vpo up` service vs a bare python with its imports (redis: an empty one)."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .config import log
from .context import Context
from .e2e import run_up_once
from .measure import figure


def bench_memory(ctx: Context) -> dict[str, Any]:
    sampler = ctx.memory_samples.get("async_up")
    source = "the first `r2vpo up --mode async` run of the e2e section"
    if sampler is None:
        steps = {"e2e_steps": 3, "e2e_skip": 1}
        log("memory: a short `r2vpo up --mode async` (3 steps)")
        _, sampler = run_up_once("async", 99, ctx.scratch, ctx.models.tiny(), steps, ctx.device)
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

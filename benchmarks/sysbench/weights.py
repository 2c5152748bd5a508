"""weights: learner step end → /v1/models serves the version, vs writing + reading the same bytes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import REPO, log
from .context import Context
from .machine import loadavg
from .measure import figure, median, rotated


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

"""`r2vpo up`: the whole system on one machine, each service its own process, on loopback.

Starts a real redis-server (unless a URL is given), builds or reuses the embedded tiny policy, then launches
reward, inference, learner and rollout worker(s) as `r2vpo serve …` child processes configured through JSON
files in the run directory (mode 0600: they hold the Redis password and the admin token). It supervises them
as compose or Kubernetes would: a child that dies is restarted after a backoff (0.5 s, doubling, at most
`max_restarts` times per service), and each restart is recorded (`restarts`, `restart_events` with the time
to ready in summary.json). It shows progress and stops everything when the learner reaches `steps`.

SIGTERM or Ctrl-C: the children are stopped in order (rollout workers first, so that no new work starts;
then the learner, which commits the step in flight; then the rest), each with SIGTERM and a bounded wait
(`stop_timeout_s`, then SIGKILL of its process group); summary.json is written with `finished: false`,
the accounting and each child's stop time, and the exit code is 128 + the signal number. On Linux the
children also get SIGTERM if `r2vpo up` itself dies (PR_SET_PDEATHSIG), so none is left behind.

This module is the orchestration (the run's config, the services' configs, following the learner, the
summary); `services/supervisor.py` manages the child processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.redis_server import RedisServer, free_port
from services.supervisor import Child, Supervisor
from trainer.learner import LearnerConfig
from trainer.task import TaskConfig

log = logging.getLogger("r2vpo.up")
SERVICE_KINDS = ("reward", "inference", "learner", "rollout", "dashboard")


class UpConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run: str = "local"
    run_dir: Path = Path("runs/up")
    mode: Literal["sync", "async"] = "async"
    steps: int = Field(150, ge=1, description="learner steps before the run stops")
    rollout_workers: int = Field(1, ge=1, le=16)
    model: Path | None = None
    task: TaskConfig = Field(default_factory=TaskConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    groups_per_step: int = Field(16, ge=1)
    group_size: int = Field(8, ge=2)
    max_new_tokens: int = Field(8, ge=1)
    max_lag: int = Field(4, ge=1, description="async admission bound in versions (sync mode uses 0)")
    eval_every: int = Field(25, ge=1)
    redis_url: str | None = Field(None, description="use this Redis instead of starting one")
    reward_plugin: str = Field("builtin:reasoning_gym", description="builtin:<name> or module:function")
    dashboard: bool = True
    seed: int = 0
    timeout_s: float = Field(3600, gt=0)
    max_restarts: int = Field(3, ge=0, description="restarts per service before the run fails")
    stop_timeout_s: float = Field(30, gt=0, le=600, description="wait for a child after SIGTERM, then kill")
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="extra settings per service kind (reward, inference, learner, rollout, dashboard), "
        "merged into its JSON config; each service refuses keys it does not know",
    )

    @field_validator("overrides")
    @classmethod
    def _known_kinds(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        unknown = sorted(set(value) - set(SERVICE_KINDS))
        if unknown:
            raise ValueError(
                f"overrides for unknown services {unknown}; services: {', '.join(SERVICE_KINDS)}"
            )
        return value


class Interrupted(Exception):
    """SIGTERM or SIGINT reached `r2vpo up`."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """Turn the first SIGTERM / SIGINT into `Interrupted` (later ones are ignored so that the orderly stop
    is not cut short). Only in the main thread, where Python can install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        _ignore_signals()
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _ignore_signals() -> None:
    """From here on SIGTERM / SIGINT do nothing (the orderly stop is under way); main thread only."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (service configs hold the Redis password and admin token)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _serve(name: str, config_path: Path) -> list[str]:
    return [sys.executable, "-m", "services.cli", "serve", name, "--config", str(config_path)]


def run_up(cfg: UpConfig, *, on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    started = time.time()
    run_dir = cfg.run_dir.resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    (run_dir / "services").mkdir(exist_ok=True)
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=1))
    supervisor = Supervisor(cfg.max_restarts)
    interrupted: Interrupted | None = None
    error: Exception | None = None
    status: dict[str, Any] = {}
    redis: RedisServer | None = None
    redis_url = cfg.redis_url
    accounting: dict[str, int] | None = None
    stop_s: dict[str, float] = {}
    with _signals_interrupt():
        try:
            if redis_url is None:
                redis = RedisServer(run_dir / "redis", password=secrets.token_hex(8)).start()
                redis_url = redis.url
            children = _children(cfg, run_dir, redis_url)
            supervisor.launch_all(children)
            if on_progress:
                on_progress({"event": "started", "urls": {c.name: c.url for c in supervisor.children}})
            learner = next(c for c in children if c.name == "learner")
            status = _follow(learner.url, supervisor, cfg, on_progress)
        except Interrupted as exc:
            interrupted = exc
            log.warning("%s: stopping the services", exc)
        except Exception as exc:  # noqa: BLE001 - summarised, then raised again
            error = exc
        finally:
            _ignore_signals()  # a signal now must not cut the stop short (the handlers come back after)
            stop_s = supervisor.stop_all(cfg.stop_timeout_s)
            if redis_url is not None:
                try:
                    accounting = asyncio.run(_accounting(redis_url, cfg.run))
                except Exception as exc:  # noqa: BLE001 - reported in the summary as null
                    log.error("accounting not available: %s", exc)
            if redis is not None:
                redis.stop()
    learner_summary_path = run_dir / "learner_summary.json"
    learner_summary = json.loads(learner_summary_path.read_text()) if learner_summary_path.exists() else {}
    summary = learner_summary | {
        "mode": cfg.mode,
        "rollout_workers": cfg.rollout_workers,
        "wall_time_s": time.time() - started,
        "finished": interrupted is None and error is None,
        "interrupted": str(interrupted) if interrupted else None,
        "error": f"{type(error).__name__}: {error}" if error else None,
        "accounting": accounting,
        "restarts": {c.name: c.restarts for c in supervisor.children if c.restarts},
        "restart_events": supervisor.events,
        "stop_s": stop_s,
        "last_status": {k: status.get(k) for k in ("version", "step", "lam")},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if error is not None:
        raise error
    if interrupted is not None:
        raise SystemExit(128 + interrupted.signum)
    return summary


def _children(cfg: UpConfig, run_dir: Path, redis_url: str) -> list[Child]:
    """One `r2vpo serve` child per service, each with its JSON config written (0600) in the run dir."""
    if cfg.model is None:
        from trainer.tiny import ensure_default_policy

        model = ensure_default_policy(task_cfg=cfg.task, progress=True)
    else:
        model = cfg.model
    admin_token = secrets.token_hex(16)
    ports = {name: free_port() for name in ("reward", "inference", "learner", "dashboard")}
    common = {"run": cfg.run, "redis_url": redis_url, "host": "127.0.0.1"}
    settings: dict[str, dict[str, Any]] = {
        "reward": {
            "host": "127.0.0.1",
            "port": ports["reward"],
            "dataset": cfg.task.name,
            "plugin": cfg.reward_plugin,
        },
        "inference": common
        | {
            "port": ports["inference"],
            "model": str(model),
            "admin_token": admin_token,
            "watch_weights": True,
            "torch_threads": 1,
        },
        "learner": common
        | {
            "port": ports["learner"],
            "model": str(model),
            "run_dir": str(run_dir),
            "learner": cfg.learner.model_dump(mode="json"),
            "task": cfg.task.model_dump(mode="json"),
            "groups_per_step": cfg.groups_per_step,
            "max_steps": cfg.steps,
            "eval_every": cfg.eval_every,
            "max_new_tokens": cfg.max_new_tokens,
            "seed": cfg.seed,
            "torch_threads": 1,
        },
    }
    for i in range(cfg.rollout_workers):
        settings[f"rollout-{i}"] = common | {
            "port": free_port(),
            "inference_url": f"http://127.0.0.1:{ports['inference']}",
            "reward_url": f"http://127.0.0.1:{ports['reward']}",
            "task": cfg.task.model_dump(mode="json"),
            "group_size": cfg.group_size,
            "prompts_per_request": cfg.groups_per_step,
            "groups_per_step": cfg.groups_per_step,
            "max_new_tokens": cfg.max_new_tokens,
            "temperature": cfg.learner.temperature,
            "max_lag": 0 if cfg.mode == "sync" else cfg.max_lag,
            "seed": cfg.seed,
            "worker_id": f"w{i}",
        }
    if cfg.dashboard:
        settings["dashboard"] = common | {
            "port": ports["dashboard"],
            "run_dir": str(run_dir),
            "inference_urls": [f"http://127.0.0.1:{ports['inference']}"],
        }
    children = []
    for name, values in settings.items():
        kind = name.split("-")[0]
        values = values | cfg.overrides.get(kind, {})
        path = run_dir / "services" / f"{name}.json"
        _write_private(path, json.dumps(values, indent=1))
        url = f"http://127.0.0.1:{values['port']}"
        children.append(Child(name, _serve(kind, path), url, run_dir / "logs" / f"{name}.log"))
    return children


def _follow(
    learner_url: str, supervisor: Supervisor, cfg: UpConfig, on_progress: Callable | None
) -> dict[str, Any]:
    deadline = time.monotonic() + cfg.timeout_s
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        for name in supervisor.check():
            if on_progress:
                on_progress({"event": "restarted", "service": name})
        try:
            status = httpx.get(f"{learner_url}/status", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            time.sleep(0.5)
            continue
        if on_progress:
            on_progress({"event": "status", **status})
        if status.get("finished"):
            return status
        time.sleep(0.5)
    raise TimeoutError(f"the learner did not reach {cfg.steps} steps within {cfg.timeout_s:.0f} s")


async def _accounting(redis_url: str, run: str) -> dict[str, int]:
    from services.queue import TrajectoryQueue, connect_redis

    redis = await connect_redis(redis_url, attempts=5)
    try:
        return await TrajectoryQueue(redis, run, consumer="up").accounting()
    finally:
        await redis.aclose()

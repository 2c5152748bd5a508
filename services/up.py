"""`r2vpo up`: the whole system on one machine, each service its own process, on loopback.

Starts a real redis-server (unless a URL is given), builds or reuses the embedded tiny policy, then launches
reward, inference, learner and rollout worker(s) as `r2vpo serve …` child processes configured through JSON
files in the run directory. It supervises them (a child that dies is restarted, as compose or Kubernetes
would), shows progress, and stops everything when the learner reaches `steps` or on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field

from services.redis_server import RedisServer, free_port
from trainer.learner import LearnerConfig
from trainer.task import TaskConfig


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
    dashboard: bool = True
    seed: int = 0
    timeout_s: float = Field(3600, gt=0)
    max_restarts: int = Field(3, ge=0, description="restarts per service before the run fails")


@dataclass
class Child:
    name: str
    args: list[str]
    url: str
    log_path: Path
    process: subprocess.Popen | None = None
    restarts: int = 0
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.args, stdout=log, stderr=subprocess.STDOUT, env=os.environ | self.env, start_new_session=True
        )
        log.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        if not self.alive():
            return
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class Supervisor:
    """Starts children in order, waits for health, restarts the dead, stops everything in reverse."""

    def __init__(self, max_restarts: int) -> None:
        self.children: list[Child] = []
        self.max_restarts = max_restarts

    def launch(self, child: Child, *, ready_timeout: float = 300.0) -> None:
        self.children.append(child)
        child.start()
        wait_healthy(child, ready_timeout)

    def check(self) -> list[str]:
        """Restart children that died; returns the names restarted. Raises when one died too often."""
        restarted = []
        for child in self.children:
            if child.alive():
                continue
            if child.restarts >= self.max_restarts:
                raise RuntimeError(f"{child.name} died {child.restarts + 1} times; see {child.log_path}")
            child.restarts += 1
            child.start()
            restarted.append(child.name)
        return restarted

    def stop_all(self) -> None:
        for child in reversed(self.children):
            child.stop()


def wait_healthy(child: Child, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited during start-up; see {child.log_path}")
        try:
            if httpx.get(f"{child.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{child.name} not ready after {timeout:.0f} s; see {child.log_path}")


def _serve(name: str, config_path: Path) -> list[str]:
    return [sys.executable, "-m", "services.cli", "serve", name, "--config", str(config_path)]


def run_up(cfg: UpConfig, *, on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    started = time.time()
    run_dir = cfg.run_dir.resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    (run_dir / "services").mkdir(exist_ok=True)
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=1))
    redis = None if cfg.redis_url else RedisServer(run_dir / "redis", password=secrets.token_hex(8)).start()
    redis_url = cfg.redis_url or redis.url  # type: ignore[union-attr]
    if cfg.model is None:
        from trainer.tiny import ensure_default_policy

        model = ensure_default_policy(task_cfg=cfg.task, progress=True)
    else:
        model = cfg.model
    admin_token = secrets.token_hex(16)
    ports = {name: free_port() for name in ("reward", "inference", "learner", "dashboard")}
    common = {"run": cfg.run, "redis_url": redis_url, "host": "127.0.0.1"}
    settings: dict[str, dict[str, Any]] = {
        "reward": {"host": "127.0.0.1", "port": ports["reward"], "dataset": cfg.task.name},
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
    supervisor = Supervisor(cfg.max_restarts)
    try:
        for name, values in settings.items():
            path = run_dir / "services" / f"{name}.json"
            path.write_text(json.dumps(values, indent=1))
            kind = name.split("-")[0]
            child = Child(
                name,
                _serve(kind, path),
                f"http://127.0.0.1:{values['port']}",
                run_dir / "logs" / f"{name}.log",
            )
            supervisor.launch(child)
        if on_progress:
            on_progress({"event": "started", "urls": {c.name: c.url for c in supervisor.children}})
        learner_url = f"http://127.0.0.1:{ports['learner']}"
        status = _follow(learner_url, supervisor, cfg, on_progress)
    finally:
        supervisor.stop_all()
    accounting = asyncio.run(_accounting(redis_url, cfg.run))
    if redis is not None:
        redis.stop()
    learner_summary = json.loads((run_dir / "learner_summary.json").read_text())
    summary = learner_summary | {
        "mode": cfg.mode,
        "rollout_workers": cfg.rollout_workers,
        "wall_time_s": time.time() - started,
        "accounting": accounting,
        "restarts": {c.name: c.restarts for c in supervisor.children if c.restarts},
        "last_status": {k: status.get(k) for k in ("version", "step", "lam")},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


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

"""Learner service core: consume groups from Redis, train, checkpoint, publish weights, then acknowledge.

Exactly-once training *effect* on at-least-once delivery (DESIGN §4): groups are acknowledged only after a
checkpoint that contains the steps that used them, and weights are published only at those checkpoints. A
learner killed between checkpoints restarts from the last one; the groups it had read since are still
pending in Redis, are read again (its own pending list, or XAUTOCLAIM by another consumer) and trained once.
Published versions are always checkpointed versions, so the version sequence has no gaps and no repeats.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from services.learner.metrics import LearnerMetrics
from services.queue import Delivery, TrajectoryQueue, connect_redis
from services.settings import ServiceSettings
from services.weights import WeightStore
from trainer.checkpoint import latest_checkpoint, load_trainer_state, prune_checkpoints, save_checkpoint
from trainer.learner import Learner, LearnerConfig
from trainer.policy import Policy, greedy_accuracy
from trainer.task import Task, TaskConfig

log = logging.getLogger("r2vpo.learner")


class LearnerSettings(ServiceSettings, env_prefix="R2VPO_LEARNER_"):
    port: int = 8004
    model: Path | None = Field(None, description="initial HF model directory; None = embedded tiny policy")
    run_dir: Path = Path("runs/async")
    weights_dir: Path | None = Field(None, description="weight store; default <run_dir>/weights")
    weights_base_url: str | None = Field(None, description="serve weights over HTTP at this base URL")
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    groups_per_step: int = Field(16, ge=1)
    commit_every: int = Field(1, ge=1, description="checkpoint + publish + ack every N steps")
    max_steps: int | None = Field(None, ge=1, description="stop after this many learner steps")
    eval_every: int = Field(25, ge=1)
    max_new_tokens: int = Field(8, ge=1)
    read_block_ms: int = Field(500, ge=1)
    reclaim_idle_ms: int = Field(30_000, ge=100, description="take over pending groups idle this long")
    consumer: str = "learner-0"
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads; None = torch default")
    seed: int = 0


class LearnerService:
    def __init__(self, settings: LearnerSettings) -> None:
        self.settings = settings
        self.run_dir = settings.run_dir
        self.ckpt_root = self.run_dir / "checkpoints"
        self.store = WeightStore(
            settings.weights_dir or self.run_dir / "weights", base_url=settings.weights_base_url
        )
        self.task = Task(settings.task)
        self.rng = random.Random(settings.seed)
        checkpoint = latest_checkpoint(self.ckpt_root)
        model_dir = checkpoint / "model" if checkpoint else _initial_model(settings)
        torch.manual_seed(settings.seed)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.policy = Policy.from_pretrained(model_dir)
        self.learner = Learner(self.policy, settings.learner, seed=settings.seed)
        self.counters: dict[str, Any] = {
            "rollouts_consumed": 0,
            "groups_trained": 0,
            "groups_dropped": 0,
            "staleness_histogram": {},
        }
        if checkpoint:
            state = load_trainer_state(checkpoint, self.learner.optimizer, self.rng)
            self.learner.load_state(state)
            self.counters |= state.get("counters", {})
            log.info("resumed from %s at version %d", checkpoint.name, self.learner.version)
        self.queue: TrajectoryQueue | None = None
        self.uncommitted: list[Delivery] = []
        self.uncommitted_dropped: list[Delivery] = []
        self.last_metrics: dict[str, Any] = {}
        self.accuracy: float | None = None
        self.started = time.time()
        self.finished = False
        self.metrics = LearnerMetrics()

    @property
    def status(self) -> dict[str, Any]:
        return {
            "version": self.learner.version,
            "step": self.learner.step,
            "lam": self.learner.dual.lam,
            "algo": self.settings.learner.algo,
            "accuracy": self.accuracy,
            **self.counters,
        }

    async def start(self) -> None:
        s = self.settings
        self.queue = TrajectoryQueue(
            await connect_redis(s.redis_url.get_secret_value()), s.run, consumer=s.consumer
        )
        await self.queue.ensure_group()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        latest = await self.queue.latest_weights()
        if latest is None or latest.version < self.learner.version:
            await self._publish()
        if self.accuracy is None:
            self.accuracy = await asyncio.to_thread(self._evaluate)
            self.counters.setdefault("initial_accuracy", self.accuracy)
        await self.queue.set_state(
            {
                "version": self.learner.version,
                "lam": self.learner.dual.lam,
                "groups_per_step": s.groups_per_step,
                "algo": s.learner.algo,
            }
        )

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        own_pending = True  # first, re-read what this consumer held before a crash
        while not stop.is_set() and (s.max_steps is None or self.learner.step < s.max_steps):
            deliveries = await self._collect(stop, own_pending)
            own_pending = False
            if not deliveries:
                continue
            await self.train_step(deliveries)
        await self.commit()
        self.accuracy = await asyncio.to_thread(self._evaluate)
        (self.run_dir / "learner_summary.json").write_text(json.dumps(self.summary(), indent=1))
        self.finished = True

    async def _collect(self, stop: asyncio.Event, own_pending: bool) -> list[Delivery]:
        assert self.queue is not None
        s = self.settings
        batch: list[Delivery] = []
        # After a restart the groups this learner held (read, never acknowledged) are taken back at once;
        # later only those idle longer than reclaim_idle_ms (a dead consumer's) are.
        idle_ms = 0 if own_pending else s.reclaim_idle_ms
        batch += await self.queue.reclaim(idle_ms, count=s.groups_per_step)
        while len(batch) < s.groups_per_step and not stop.is_set():
            batch += await self.queue.read(s.groups_per_step - len(batch), block_ms=s.read_block_ms)
        return batch

    async def train_step(self, deliveries: list[Delivery]) -> dict[str, Any]:
        groups = [d.group for d in deliveries]
        result = await asyncio.to_thread(self.learner.train_on, groups)
        trained, dropped = set(result.trained), set(result.dropped)
        self.uncommitted += [d for d in deliveries if d.group.group_id in trained]
        self.uncommitted_dropped += [d for d in deliveries if d.group.group_id in dropped]
        self.counters["rollouts_consumed"] += sum(len(g.completions) for g in groups if g.group_id in trained)
        self.counters["groups_trained"] += len(trained)
        self.counters["groups_dropped"] += len(dropped)
        hist = self.counters["staleness_histogram"]
        for lag, n in result.metrics.get("staleness_histogram", {}).items():
            hist[str(lag)] = hist.get(str(lag), 0) + n
        record = {
            **result.metrics,
            "rollouts_consumed": self.counters["rollouts_consumed"],
            "wall_s": time.time() - self.started,
            "time": time.time(),
        }
        if self.learner.step % self.settings.eval_every == 0:
            self.accuracy = record["accuracy"] = await asyncio.to_thread(self._evaluate)
        if self.learner.step % self.settings.commit_every == 0:
            record |= await self.commit()
        self.last_metrics = record
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        assert self.queue is not None
        await self.queue.append_metrics(record)
        hist = {int(k): v for k, v in result.metrics.get("staleness_histogram", {}).items()}
        self.metrics.observe_step(
            record, hist, max(1.0, result.metrics.get("samples", 1) / max(1, len(groups)))
        )
        self.metrics.observe_queue(await self.queue.accounting(), await self.queue.length())
        return record

    async def commit(self) -> dict[str, float]:
        """Checkpoint, publish the new version, then acknowledge the groups that went into it."""
        assert self.queue is not None
        if not self.uncommitted and not self.uncommitted_dropped:
            return {}
        started = time.perf_counter()
        state = self.learner.state() | {"counters": self.counters}
        await asyncio.to_thread(
            save_checkpoint,
            self.ckpt_root,
            policy=self.policy,
            optimizer=self.learner.optimizer,
            state=state,
            rng=self.rng,
        )
        await asyncio.to_thread(prune_checkpoints, self.ckpt_root, 2)
        publish_s = await self._publish()
        await self.queue.ack(self.uncommitted, [d.group.group_id for d in self.uncommitted])
        if self.uncommitted_dropped:
            await self.queue.drop(self.uncommitted_dropped, reason="stale beyond max_lag")
        self.uncommitted, self.uncommitted_dropped = [], []
        await self.queue.set_state(
            {"version": self.learner.version, "lam": self.learner.dual.lam, "step": self.learner.step}
        )
        return {"commit_s": time.perf_counter() - started, "publish_s": publish_s}

    async def _publish(self) -> float:
        assert self.queue is not None
        started = time.perf_counter()
        state_dict = {k: v.detach().cpu() for k, v in self.policy.model.state_dict().items()}
        announcement = await asyncio.to_thread(self.store.publish, self.learner.version, state_dict)
        await self.queue.announce(announcement)
        await asyncio.to_thread(self.store.prune, 4)
        return time.perf_counter() - started

    def _evaluate(self) -> float:
        with torch.no_grad():
            return greedy_accuracy(
                self.policy,
                self.task,
                self.task.heldout_problems,
                max_new_tokens=self.settings.max_new_tokens,
            )

    def summary(self) -> dict[str, Any]:
        return {
            "algo": self.settings.learner.algo,
            "steps": self.learner.step,
            "version": self.learner.version,
            "initial_accuracy": self.counters.get("initial_accuracy"),
            "final_accuracy": self.accuracy,
            "rollouts_consumed": self.counters["rollouts_consumed"],
            "lam": self.learner.dual.lam,
            "staleness_histogram": {int(k): v for k, v in self.counters["staleness_histogram"].items()},
            "groups_trained": self.counters["groups_trained"],
            "groups_dropped": self.counters["groups_dropped"],
        }


def _initial_model(settings: LearnerSettings) -> Path:
    if settings.model is not None:
        return settings.model
    from trainer.tiny import ensure_default_policy

    return ensure_default_policy(task_cfg=settings.task, progress=False)

"""Learner service core: consume groups from Redis, train, checkpoint, publish weights, then acknowledge.

Exactly-once training *effect* on at-least-once delivery (DESIGN §4): groups are acknowledged only after a
checkpoint that contains the steps that used them, and weights are published only at those checkpoints. A
learner killed between checkpoints restarts from the last one; the groups it had read since are still
pending in Redis, are read again (its own pending list, or XAUTOCLAIM by another consumer) and trained once.
Published versions are always checkpointed versions, so the version sequence has no gaps and no repeats.

Crash windows, and what a restarted learner does about each (`_recover`):
- killed before the checkpoint: the step is rolled back; its groups are still pending and are trained again.
- killed after the checkpoint, before publish/ack: the checkpoint lists the groups it contains
  (`unacked`); the restarted learner publishes the checkpointed version if it was not announced and
  acknowledges those groups (skipping any already in the trained set), so they are not trained twice.
- metrics of rolled-back steps: `metrics.jsonl` is cut back to the rows the checkpoint covers (rewritten
  atomically; the row of the checkpointed step itself is restored from the checkpoint if it was never
  written) and the Redis metrics stream loses the entries written after it, so both list each version once.

Every Redis call is retried with exponential backoff (a Redis restart is ridden out); an acknowledgement is
retried idempotently (group ids already in the trained set are not acknowledged again). If Redis stays away
longer than `redis_retries` allow, the loop fails and the process exits for its supervisor to restart it.
On stop (SIGTERM) the step in flight finishes and is committed; a batch still being collected is not
trained and stays pending in Redis for the next learner.

A batch whose update is not finite (NaN/inf; `trainer.learner`) is not applied (weights, optimizer, version
unchanged) and its groups are dead-lettered at once (`_dead_letter`, `TrajectoryQueue.dead_letter_deliveries`:
record, acknowledgement, dead-lettered set and count in one atomic, idempotent step, so never trained later);
the learner warns, counts them and goes on with the next batch. Settling them before any checkpoint is safe
because they changed nothing. After `max_consecutive_nonfinite` such batches in a row (`trainer.circuit`) the
loop fails with `NonFiniteStreak` and the process exits (non-zero) rather than dead-letter every later batch.
The streak is kept in the run's state hash, so a restarted learner stops again at its next non-finite batch
instead of draining another `max_consecutive_nonfinite`; an applied batch resets it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import torch

from client.schemas import TrajectoryGroup
from services.learner.metrics import LearnerMetrics
from services.learner.recovery import cut_metrics_rows, recover_metrics_stream
from services.learner.settings import LearnerSettings
from services.queue import TRANSIENT, Delivery, QueueUnavailable, TrajectoryQueue, connect_redis, with_retry
from services.weights import WeightStore
from trainer.checkpoint import latest_checkpoint, load_trainer_state, prune_checkpoints, save_checkpoint
from trainer.circuit import NonFiniteCircuit
from trainer.device import resolve_device, to_cpu
from trainer.learner import Learner, StepResult
from trainer.policy import Policy, greedy_accuracy
from trainer.task import Task

log = logging.getLogger("r2vpo.learner")
T = TypeVar("T")
FAILPOINTS_ENV = "R2VPO_FAILPOINTS"
STALE_REASON = "stale beyond max_lag"


def failpoint(name: str, version: int) -> None:
    """Fault injection: with `R2VPO_FAILPOINTS="learner.after_checkpoint@5"` the process SIGKILLs itself when
    it passes that point at that version: a real crash at a precise place, for the fault tests."""
    if f"{name}@{version}" in os.environ.get(FAILPOINTS_ENV, "").split(","):
        log.warning("failpoint %s@%d: killing this process", name, version)
        os.kill(os.getpid(), signal.SIGKILL)


class LearnerService:
    def __init__(self, settings: LearnerSettings) -> None:
        device = resolve_device(settings.learner.device)  # DeviceUnavailable before anything is loaded
        self.settings = settings
        self.run_dir = settings.run_dir
        self.ckpt_root = self.run_dir / "checkpoints"
        self.store = WeightStore(
            settings.weights_dir or self.run_dir / "weights", base_url=settings.weights_base_url
        )
        self.task = Task(settings.task)
        self.rng = random.Random(settings.seed)
        checkpoint = latest_checkpoint(self.ckpt_root)
        model_dir = checkpoint / "model" if checkpoint else settings.initial_model()
        torch.manual_seed(settings.seed)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.policy = Policy.from_pretrained(model_dir, device=device)
        log.info("training on %s (learner.device %r)", device, settings.learner.device)
        self.learner = Learner(self.policy, settings.learner, seed=settings.seed)
        self.circuit = NonFiniteCircuit(settings.max_consecutive_nonfinite)  # streak restored by `start`
        self.counters: dict[str, Any] = {
            "rollouts_consumed": 0,
            "groups_trained": 0,
            "groups_dropped": 0,
            "groups_dead_lettered": 0,  # groups of batches whose update was not finite
            "batches_skipped_nonfinite": 0,
            "staleness_histogram": {},
        }
        self.accuracy: float | None = None
        self.resumed: dict[str, Any] | None = None  # the checkpoint's state, until `_recover` used it
        if checkpoint:
            state = load_trainer_state(checkpoint, self.learner.optimizer, self.rng)
            self.learner.load_state(state)
            self.counters |= state.get("counters", {})
            self.accuracy = state.get("accuracy")
            self.resumed = state
            log.info("resumed from %s at version %d", checkpoint.name, self.learner.version)
        self.queue: TrajectoryQueue | None = None
        self.uncommitted: list[Delivery] = []
        self.uncommitted_dropped: list[Delivery] = []
        self.last_metrics: dict[str, Any] = {}
        self.rows = 0  # rows in metrics.jsonl (set by `_recover`)
        self.last_stream_id = "0-0"  # id of the last entry this learner appended to the metrics stream
        self.own_pending = True  # first, take back what this consumer held before a crash
        self.backlog: list[Delivery] = []  # groups taken back, not yet trained
        self.started = time.time()
        self.finished = False
        self.stopped = False
        self.metrics = LearnerMetrics()

    @property
    def status(self) -> dict[str, Any]:
        return {
            "version": self.learner.version,
            "step": self.learner.step,
            "lam": self.learner.dual.lam,
            "algo": self.settings.learner.algo,
            "accuracy": self.accuracy,
            "device": str(self.policy.device),
            **self.counters,
        }

    async def _redis(self, op: Callable[[], Awaitable[T]]) -> T:
        """`await op()` retried with backoff on connection errors (rides out a Redis restart)."""
        return await with_retry(
            op, attempts=self.settings.redis_retries, backoff=0.2, max_backoff=2.0, log=log
        )

    async def start(self) -> None:
        s = self.settings
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.queue = TrajectoryQueue(
            await connect_redis(s.redis_url.get_secret_value(), log=log), s.run, consumer=s.consumer
        )
        queue = self.queue
        await self._redis(queue.ensure_group)
        await self._recover()
        self.circuit.restore(await self._redis(queue.get_state))
        if self.circuit.streak:
            log.warning("resuming after %d consecutive non-finite batches", self.circuit.streak)
        latest = await self._redis(queue.latest_weights)
        if latest is None or latest.version < self.learner.version:
            await self._publish()
        if self.accuracy is None:
            self.accuracy = await asyncio.to_thread(self._evaluate)
            self.counters.setdefault("initial_accuracy", self.accuracy)
        state = {"version": self.learner.version, "lam": self.learner.dual.lam,
                 "groups_per_step": s.groups_per_step, "algo": s.learner.algo}  # fmt: skip
        await self._redis(lambda: queue.set_state(state))

    async def _recover(self) -> None:
        """Make Redis and the metrics agree with the checkpoint this learner starts from (module doc)."""
        state, self.resumed = self.resumed or {}, None
        if "metrics_rows" not in state and state:
            return  # a checkpoint written before rows were tracked: leave everything as it is
        self.rows = cut_metrics_rows(self.run_dir / "metrics.jsonl", state)
        unacked = state.get("unacked", {})
        await self._settle(unacked.get("trained", []), unacked.get("dropped", []))
        assert self.queue is not None
        self.last_stream_id = await recover_metrics_stream(self.queue, state, self._redis)

    async def _settle(self, trained: Sequence[Sequence[str]], dropped: Sequence[Sequence[str]]) -> None:
        """Acknowledge (entry id, group id) pairs as trained / dropped, idempotently: each attempt first
        leaves out the groups already in the trained / dropped set, so a retry after a lost reply (or a
        restart after a crash between checkpoint and ack) never counts a group twice."""
        assert self.queue is not None
        queue = self.queue

        async def missing(key: str, pairs: Sequence[Sequence[str]]) -> list[tuple[str, str]]:
            absent = await self._absent(key, [g for _, g in pairs])
            return [(e, g) for e, g in pairs if g in absent]

        async def once() -> None:
            todo = await missing(queue.keys.trained, trained)
            if todo:
                await queue.ack([e for e, _ in todo], [g for _, g in todo])
            todo = await missing(queue.keys.dropped, dropped)
            if todo:
                stubs = [Delivery(e, TrajectoryGroup.model_construct(group_id=g), 1) for e, g in todo]
                await queue.drop(stubs, reason=STALE_REASON)

        await self._redis(once)

    async def _absent(self, key: str, group_ids: Sequence[str]) -> set[str]:
        """The group ids that are not members of the set `key` (one pipelined round trip)."""
        assert self.queue is not None
        if not group_ids:
            return set()
        async with self.queue.redis.pipeline(transaction=False) as pipe:
            for group_id in group_ids:
                pipe.sismember(key, group_id)
            present = await pipe.execute()
        return {g for g, p in zip(group_ids, present, strict=True) if not p}

    async def _dead_letter(self, deliveries: list[Delivery], result: StepResult) -> dict[str, Any]:
        """A batch whose update was not finite: its groups to the dead-letter stream; at the end of a streak
        of them, stop (module doc)."""
        assert self.queue is not None
        queue, skipped, stale = self.queue, set(result.skipped), set(result.dropped)
        poisoned = [d for d in deliveries if d.group.group_id in skipped]
        reason = f"{result.skip_reason}; the batch was not applied"
        log.warning("%s: %d groups dead-lettered", reason, len(poisoned))
        await self._redis(lambda: queue.dead_letter_deliveries(poisoned, reason))  # idempotent: retry-safe
        await self._settle([], [[d.entry_id, g] for d in deliveries if (g := d.group.group_id) in stale])
        self.counters["groups_dropped"] += len(stale)
        self.counters["groups_dead_lettered"] += len(poisoned)
        self.counters["batches_skipped_nonfinite"] += 1
        self.metrics.observe_skipped(len(poisoned), len(stale))
        await self._observe_queue()
        await self._record_outcome(applied=False, skip_reason=result.skip_reason)
        return result.metrics | {"skipped": reason, "groups_dead_lettered": len(poisoned)}

    async def _record_outcome(self, *, applied: bool, skip_reason: str | None = None) -> None:
        """Count a batch towards (or reset) the non-finite streak, kept in Redis; at the limit, commit the
        steps trained before it and raise `NonFiniteStreak` (the batch's groups are settled already)."""
        assert self.queue is not None
        queue, before = self.queue, self.circuit.streak
        self.circuit.record(applied=applied, skip_reason=skip_reason)
        if self.circuit.streak != before:
            await self._redis(lambda: queue.set_state(self.circuit.state()))
        if self.circuit.tripped:
            await self.commit()
            self.circuit.check()

    async def _observe_queue(self) -> None:
        assert self.queue is not None
        try:  # gauges only: not worth waiting for Redis
            self.metrics.observe_queue(await self.queue.accounting(), await self.queue.length())
        except (*TRANSIENT, QueueUnavailable) as exc:
            log.warning("queue gauges not updated: %s", exc)

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        while not stop.is_set() and (s.max_steps is None or self.learner.step < s.max_steps):
            deliveries = await self._collect(stop)
            if not deliveries:
                continue
            if stop.is_set() and len(deliveries) < s.groups_per_step:
                break  # a partial batch is not trained: it stays pending in Redis for the next learner
            await self.train_step(deliveries)
        await self.commit()
        self.stopped = stop.is_set()
        if not self.stopped:  # a stop (SIGTERM) exits promptly and keeps the last evaluation
            self.accuracy = await asyncio.to_thread(self._evaluate)
        (self.run_dir / "learner_summary.json").write_text(json.dumps(self.summary(), indent=1))
        self.finished = not self.stopped

    async def _collect(self, stop: asyncio.Event) -> list[Delivery]:
        assert self.queue is not None
        queue, s = self.queue, self.settings
        if self.own_pending:
            # After a restart, every group this consumer held (read, never acknowledged) is taken back at
            # once; later only those idle longer than reclaim_idle_ms (a dead consumer's) are.
            self.own_pending = False
            while got := await self._redis(lambda: queue.reclaim(0, count=256)):
                self.backlog += got
        batch, self.backlog = self.backlog[: s.groups_per_step], self.backlog[s.groups_per_step :]
        if len(batch) < s.groups_per_step:
            batch += await self._redis(
                lambda: queue.reclaim(s.reclaim_idle_ms, count=s.groups_per_step - len(batch))
            )
        while len(batch) < s.groups_per_step and not stop.is_set():
            need = s.groups_per_step - len(batch)
            batch += await self._redis(lambda n=need: queue.read(n, block_ms=s.read_block_ms))
        return batch

    async def train_step(self, deliveries: list[Delivery]) -> dict[str, Any]:
        groups = [d.group for d in deliveries]
        result = await asyncio.to_thread(self.learner.train_on, groups)
        if result.skipped:  # not applied: no step, no metrics row, no commit
            return await self._dead_letter(deliveries, result)
        trained, dropped = set(result.trained), set(result.dropped)
        await self._record_outcome(applied=bool(trained))
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
            "batches_skipped_nonfinite": self.counters["batches_skipped_nonfinite"],
            "wall_s": time.time() - self.started,
            "time": time.time(),
        }
        if self.learner.step % self.settings.eval_every == 0:
            self.accuracy = record["accuracy"] = await asyncio.to_thread(self._evaluate)
        if self.learner.step % self.settings.commit_every == 0:
            record |= await self.commit(row=dict(record))
        self.last_metrics = record
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.rows += 1
        assert self.queue is not None
        queue = self.queue
        self.last_stream_id = await self._redis(lambda: queue.append_metrics(record))
        hist = {int(k): v for k, v in result.metrics.get("staleness_histogram", {}).items()}
        self.metrics.observe_step(
            record, hist, max(1.0, result.metrics.get("samples", 1) / max(1, len(groups)))
        )
        await self._observe_queue()
        return record

    async def commit(self, row: dict[str, Any] | None = None) -> dict[str, float]:
        """Checkpoint, publish the new version, then acknowledge the groups that went into it.

        `row` is the metrics row of the step being committed (written after this returns); the checkpoint
        keeps it, the row count and the metrics-stream position so a restart can cut rolled-back rows."""
        assert self.queue is not None
        queue = self.queue
        if not self.uncommitted and not self.uncommitted_dropped:
            return {}
        started = time.perf_counter()
        trained = [[d.entry_id, d.group.group_id] for d in self.uncommitted]
        dropped = [[d.entry_id, d.group.group_id] for d in self.uncommitted_dropped]
        state = self.learner.state() | {
            "counters": self.counters,
            "accuracy": self.accuracy,
            "unacked": {"trained": trained, "dropped": dropped},
            "metrics_rows": self.rows,
            "metrics_row": row,
            "metrics_stream_id": self.last_stream_id,
        }
        await asyncio.to_thread(
            save_checkpoint,
            self.ckpt_root,
            policy=self.policy,
            optimizer=self.learner.optimizer,
            state=state,
            rng=self.rng,
        )
        await asyncio.to_thread(prune_checkpoints, self.ckpt_root, 2)
        failpoint("learner.after_checkpoint", self.learner.version)
        publish_s = await self._publish()
        failpoint("learner.after_publish", self.learner.version)
        await self._settle(trained, dropped)
        self.uncommitted, self.uncommitted_dropped = [], []
        state = {"version": self.learner.version, "lam": self.learner.dual.lam, "step": self.learner.step}
        await self._redis(lambda: queue.set_state(state))
        return {"commit_s": time.perf_counter() - started, "publish_s": publish_s}

    async def _publish(self) -> float:
        assert self.queue is not None
        queue = self.queue
        started = time.perf_counter()
        state_dict = to_cpu(self.policy.model.state_dict())
        announcement = await asyncio.to_thread(self.store.publish, self.learner.version, state_dict)
        await self._redis(lambda: queue.announce(announcement))
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
            "groups_dead_lettered": self.counters["groups_dead_lettered"],
            "batches_skipped_nonfinite": self.counters["batches_skipped_nonfinite"],
            "stopped_early": self.stopped,
        }

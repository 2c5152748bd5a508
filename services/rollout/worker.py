"""Rollout worker: prompts → G completions (inference service) → rewards (plug-ins) → Redis stream.

Admission control bounds staleness the way AReaL does: a worker may start a batch only while the groups
produced so far (less those that never take a training slot: dead-lettered, dropped, duplicates) stay within
(learner_version + max_lag + 1) × groups_per_step, and the stream is under its length bound. A group
whose scoring fails goes to the dead-letter stream with the reason — never reward 0.

Faults: a group is pushed whole, as one XADD, or not at all (a worker killed mid-batch leaves no half group),
and a group without exactly `group_size` completions is never pushed. Inference and reward calls are
retried with backoff under timeouts (reward responses are size-limited and range-checked, and a circuit
breaker stops calling a failing reward service; while it is open no new batch is started). Any failure of a
batch (inference down, Redis restarting) is retried with exponential backoff, reset by the next success;
Redis writes are retried so a scored group survives a Redis restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import Field, field_validator

from client.inference import AsyncInferenceClient
from client.reward import AsyncRewardClient, CircuitBreaker, RewardError
from client.schemas import Completion, CompletionRequest, ScoreRequest, TrajectoryGroup
from services.queue import TrajectoryQueue, connect_redis, with_retry
from services.settings import ServiceSettings
from trainer.task import Task, TaskConfig

log = logging.getLogger("r2vpo.rollout")
T = TypeVar("T")


class IncompleteGroup(RuntimeError):
    """The inference answer did not hold `group_size` completions for every prompt: nothing is pushed."""


class RolloutSettings(ServiceSettings, env_prefix="R2VPO_ROLLOUT_"):
    port: int = 8003
    inference_url: str = "http://127.0.0.1:8001"
    reward_url: str = "http://127.0.0.1:8002"
    task: TaskConfig = Field(default_factory=TaskConfig)
    group_size: int = Field(8, ge=2)
    prompts_per_request: int = Field(16, ge=1, le=256)
    max_new_tokens: int = Field(8, ge=1, le=4096)
    temperature: float = Field(1.0, gt=0)
    max_lag: int = Field(4, ge=0, description="admission: stay within this many versions of the learner")
    groups_per_step: int = Field(16, ge=1, description="groups the learner trains per step")
    max_stream_len: int = Field(256, ge=1, description="pause while the stream holds this many groups")
    reward_timeout_s: float = Field(10.0, gt=0, le=600, description="per reward call")
    reward_retries: int = Field(2, ge=0, le=10)
    reward_backoff_s: float = Field(0.2, ge=0, le=60, description="first retry delay (doubles)")
    reward_range: tuple[float, float] | None = Field(None, description="rewards outside are errors")
    reward_max_response_bytes: int = Field(1 << 20, ge=1024, description="larger reward answers are errors")
    reward_circuit_failures: int = Field(5, ge=1, description="consecutive failed calls that open it")
    reward_circuit_reset_s: float = Field(10.0, ge=0, le=3600, description="open this long, then one probe")
    inference_timeout_s: float = Field(60.0, gt=0, le=3600)
    inference_retries: int = Field(3, ge=0, le=20)
    inference_backoff_s: float = Field(0.5, ge=0, le=60, description="first retry delay (doubles)")
    retry_backoff_s: float = Field(0.5, gt=0, le=60, description="after a failed batch (doubles)")
    max_backoff_s: float = Field(10.0, gt=0, le=600)
    redis_retries: int = Field(20, ge=1, description="attempts per Redis write (backoff up to 2 s)")
    seed: int = 0

    @field_validator("reward_range")
    @classmethod
    def _ordered(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not value[0] <= value[1]:
            raise ValueError(f"reward_range must be (lo, hi) with lo <= hi, got {value}")
        return value

    worker_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:8])


class RolloutWorker:
    """Produces trajectory groups until `stop` is set. Testable without HTTP routes of its own."""

    def __init__(self, settings: RolloutSettings) -> None:
        self.settings = settings
        self.task = Task(settings.task)
        self.rng = random.Random(f"{settings.seed}-{settings.worker_id}")
        self.stats: dict[str, Any] = {
            "groups_produced": 0,
            "groups_dead_lettered": 0,
            "paused_s": 0.0,
            "batches": 0,
            "batch_errors": 0,
            "last_error": None,
            "reward_circuit": "closed",
            "reward_circuit_opened": 0,
            "reward_circuit_closed": 0,
        }
        self.queue: TrajectoryQueue | None = None
        self.inference: AsyncInferenceClient | None = None
        self.reward: AsyncRewardClient | None = None

    async def start(self) -> None:
        s = self.settings
        redis = await connect_redis(s.redis_url.get_secret_value(), log=log)
        self.queue = TrajectoryQueue(
            redis, s.run, consumer=f"rollout-{s.worker_id}", max_len=s.max_stream_len
        )
        await self._redis(self.queue.ensure_group)
        self.inference = AsyncInferenceClient(
            s.inference_url, timeout=s.inference_timeout_s, retries=s.inference_retries,
            backoff=s.inference_backoff_s,
        )  # fmt: skip
        self.reward = AsyncRewardClient(
            s.reward_url,
            timeout=s.reward_timeout_s,
            retries=s.reward_retries,
            backoff=s.reward_backoff_s,
            max_response_bytes=s.reward_max_response_bytes,
            reward_range=s.reward_range,
            circuit=CircuitBreaker(s.reward_circuit_failures, s.reward_circuit_reset_s),
        )

    async def _redis(self, op: Callable[[], Awaitable[T]]) -> T:
        return await with_retry(
            op, attempts=self.settings.redis_retries, backoff=0.2, max_backoff=2.0, log=log
        )

    def _observe_circuit(self) -> None:
        """Count the reward circuit's transitions (seen after each call) into `stats`."""
        assert self.reward is not None
        before, now = self.stats["reward_circuit"], self.reward.circuit.state
        if now == "open" and before != "open":
            self.stats["reward_circuit_opened"] += 1
            log.warning("reward circuit opened: new batches wait until it half-opens")
        elif now == "closed" and before != "closed":
            self.stats["reward_circuit_closed"] += 1
            log.info("reward circuit closed again")
        self.stats["reward_circuit"] = now

    async def close(self) -> None:
        for client in (self.inference, self.reward):
            if client is not None:
                await client.aclose()
        if self.queue is not None:
            await self.queue.redis.aclose()

    async def run(self, stop: asyncio.Event, *, max_batches: int | None = None) -> None:
        s = self.settings
        delay = s.retry_backoff_s
        while not stop.is_set() and (max_batches is None or self.stats["batches"] < max_batches):
            try:
                if not await self._admitted(stop):
                    continue
                await self.produce_batch()
                delay = s.retry_backoff_s
            except Exception as exc:  # inference down, Redis restarting: back off and go on
                self.stats["batch_errors"] += 1
                self.stats["last_error"] = f"{type(exc).__name__}: {exc}"[:500]
                log.warning("rollout batch failed (%s); retrying in %.1f s", self.stats["last_error"], delay)
                await _sleep_or_stop(stop, delay)
                delay = min(delay * 2, s.max_backoff_s)

    async def _admitted(self, stop: asyncio.Event) -> bool:
        """Wait (bounded) until the stream has room and the learner is close enough; False to re-check."""
        s, queue = self.settings, self.queue
        assert queue is not None and self.reward is not None
        if self.reward.circuit.state == "open":  # the reward service is failing: generate nothing
            await _sleep_or_stop(stop, 0.2)
            self.stats["paused_s"] += 0.2
            return False
        try:
            paused = await queue.wait_for_room(timeout_s=1.0)
        except TimeoutError:  # still full: the learner is behind; look again
            self.stats["paused_s"] += 1.0
            return False
        state = await queue.get_state()
        learner_version = int(state.get("version", 0))
        acc = await queue.accounting()
        # Groups that will never take a training slot (dead-lettered, dropped, duplicates) do not count,
        # or a reward outage would use the budget up with groups the learner never sees: a deadlock.
        produced = acc["produced"] - acc["dead_lettered"] - acc["dropped"] - acc["duplicates_skipped"]
        budget = (learner_version + s.max_lag + 1) * s.groups_per_step
        if produced >= budget:
            await _sleep_or_stop(stop, 0.05)
            self.stats["paused_s"] += paused + 0.05
            return False
        if s.max_lag == 0 and not await self._inference_serves(learner_version):
            await _sleep_or_stop(stop, 0.05)  # lock-step: wait for the swap to the learner's version
            self.stats["paused_s"] += paused + 0.05
            return False
        self.stats["paused_s"] += paused
        return await queue.length() < s.max_stream_len

    async def _inference_serves(self, version: int) -> bool:
        assert self.inference is not None
        models = await self.inference.models()
        return min(m.policy_version for m in models.data) >= version

    async def produce_batch(self) -> list[TrajectoryGroup]:
        """One inference request for `prompts_per_request` prompts × G, scored, pushed group by group."""
        s, queue = self.settings, self.queue
        assert self.inference is not None and self.reward is not None and queue is not None
        problems = self.task.sample_train(s.prompts_per_request, self.rng)
        started = time.perf_counter()
        response = await self.inference.complete(
            CompletionRequest(
                prompt=[p.prompt for p in problems],
                n=s.group_size,
                max_tokens=s.max_new_tokens,
                temperature=s.temperature,
                logprobs=0,
                seed=self.rng.getrandbits(31),
            )
        )
        generation_s = time.perf_counter() - started
        choices = sorted(response.choices, key=lambda c: c.index)
        if len(choices) != len(problems) * s.group_size:
            raise IncompleteGroup(
                f"inference returned {len(choices)} completions for {len(problems)} prompts x {s.group_size}"
            )
        produced = []
        for i, problem in enumerate(problems):
            group_choices = choices[i * s.group_size : (i + 1) * s.group_size]
            group_id = uuid.uuid4().hex
            requests = [
                ScoreRequest(
                    id=f"{group_id}:{j}",
                    prompt=problem.prompt,
                    completion=c.text,
                    task=self.task.config.name,
                    metadata={"entry": problem.entry, "answer": problem.answer},
                )
                for j, c in enumerate(group_choices)
            ]
            scored_at = time.perf_counter()
            try:
                scores = await self.reward.score_batch(requests)
            except RewardError as exc:
                self._observe_circuit()
                payload = {"problem_id": problem.id, "prompt": problem.prompt}
                reason = f"reward {exc.kind}: {exc.message}"[:2000]
                await self._redis(
                    functools.partial(queue.dead_letter, payload, reason, group_id=group_id, produced=True)
                )
                self.stats["groups_dead_lettered"] += 1
                continue
            self._observe_circuit()
            group = TrajectoryGroup(
                group_id=group_id,
                run=s.run,
                task=self.task.config.name,
                problem_id=problem.id,
                prompt=problem.prompt,
                prompt_token_ids=group_choices[0].prompt_token_ids,
                completions=[
                    Completion(
                        token_ids=c.token_ids,
                        behavior_logprobs=c.logprobs.token_logprobs,
                        reward=score.reward,
                        policy_version=c.policy_version,
                        text=c.text,
                        finish_reason=c.finish_reason,
                    )
                    for c, score in zip(group_choices, scores, strict=True)
                ],
                generation_s=generation_s / len(problems),
                scoring_s=time.perf_counter() - scored_at,
            )
            await self._redis(functools.partial(queue.push, group))  # one XADD: the whole group or nothing
            produced.append(group)
            self.stats["groups_produced"] += 1
        self.stats["batches"] += 1
        return produced


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)

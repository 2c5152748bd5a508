"""Rollout worker: prompts → G completions (inference service) → rewards (plug-ins) → Redis stream.

Admission control bounds staleness the way AReaL does: a worker may start a batch only while the groups
produced so far stay within (learner_version + max_lag + 1) × groups_per_step, and the stream is under its
length bound. A group whose scoring fails goes to the dead-letter stream with the reason — never reward 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid

from pydantic import Field

from client.inference import AsyncInferenceClient
from client.reward import AsyncRewardClient, RewardError
from client.schemas import Completion, CompletionRequest, ScoreRequest, TrajectoryGroup
from services.queue import TrajectoryQueue, connect_redis
from services.settings import ServiceSettings
from trainer.task import Task, TaskConfig

log = logging.getLogger("r2vpo.rollout")


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
    reward_timeout_s: float = Field(10.0, gt=0)
    reward_retries: int = Field(2, ge=0)
    inference_timeout_s: float = Field(60.0, gt=0)
    seed: int = 0
    worker_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:8])


class RolloutWorker:
    """Produces trajectory groups until `stop` is set. Testable without HTTP routes of its own."""

    def __init__(self, settings: RolloutSettings) -> None:
        self.settings = settings
        self.task = Task(settings.task)
        self.rng = random.Random(f"{settings.seed}-{settings.worker_id}")
        self.stats = {"groups_produced": 0, "groups_dead_lettered": 0, "paused_s": 0.0, "batches": 0}
        self.queue: TrajectoryQueue | None = None
        self.inference: AsyncInferenceClient | None = None
        self.reward: AsyncRewardClient | None = None

    async def start(self) -> None:
        s = self.settings
        redis = await connect_redis(s.redis_url.get_secret_value())
        self.queue = TrajectoryQueue(
            redis, s.run, consumer=f"rollout-{s.worker_id}", max_len=s.max_stream_len
        )
        await self.queue.ensure_group()
        self.inference = AsyncInferenceClient(s.inference_url, timeout=s.inference_timeout_s)
        self.reward = AsyncRewardClient(s.reward_url, timeout=s.reward_timeout_s, retries=s.reward_retries)

    async def close(self) -> None:
        for client in (self.inference, self.reward):
            if client is not None:
                await client.aclose()
        if self.queue is not None:
            await self.queue.redis.aclose()

    async def run(self, stop: asyncio.Event, *, max_batches: int | None = None) -> None:
        while not stop.is_set() and (max_batches is None or self.stats["batches"] < max_batches):
            if not await self._admitted(stop):
                continue
            try:
                await self.produce_batch()
            except Exception as exc:  # inference down, Redis blip: back off and go on
                log.warning("rollout batch failed, retrying: %s", exc)
                await _sleep_or_stop(stop, 1.0)

    async def _admitted(self, stop: asyncio.Event) -> bool:
        """Wait (bounded) until the stream has room and the learner is close enough; False to re-check."""
        s, queue = self.settings, self.queue
        assert queue is not None
        paused = await queue.wait_for_room(timeout_s=1.0)
        state = await queue.get_state()
        learner_version = int(state.get("version", 0))
        produced = int((await queue.accounting())["produced"])
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
        s = self.settings
        assert self.inference is not None and self.reward is not None and self.queue is not None
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
                await self.queue.dead_letter(
                    {"problem_id": problem.id, "prompt": problem.prompt},
                    f"reward {exc.kind}: {exc}",
                    group_id=group_id,
                    produced=True,
                )
                self.stats["groups_dead_lettered"] += 1
                continue
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
            await self.queue.push(group)
            produced.append(group)
            self.stats["groups_produced"] += 1
        self.stats["batches"] += 1
        return produced


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)

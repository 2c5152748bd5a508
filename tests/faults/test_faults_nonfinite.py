"""A batch with a non-finite update no longer crash-loops the learner service: it is not applied, its groups
go to the dead-letter stream with the reason (counted as dead-lettered in the queue's accounting), the learner
counts it and trains the next batch; groups are settled exactly once and nothing is trained twice, also across
a restart and a re-pushed poisoned group.

Real pieces only: a real redis-server (append-only file read back), the learner app under uvicorn with real
HTTP, groups sampled from the embedded tiny policy. The poison is real data: a group whose rewards are finite
(valid on the wire) but overflow float32, so its advantages are NaN and the update cannot be finite.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import httpx
import pytest
import torch
from harness import accounting_identity, announced_versions, keys, redis_client, wait_for

from client.schemas import TrajectoryGroup
from services.learner.app import create_app
from services.learner.service import LearnerSettings
from services.queue import RedisKeys, TrajectoryQueue, connect_redis
from trainer.policy import Policy
from trainer.rollout import generate_groups
from trainer.task import Task, TaskConfig

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
RUN, G, PER_STEP = "nonfinite", 4, 4


def real_groups(model: Path, n: int) -> list[TrajectoryGroup]:
    policy, task = Policy.from_pretrained(model), Task(TaskConfig(heldout_size=0))
    problems = task.sample_train(n, random.Random(1))
    return generate_groups(policy, task, problems, group_size=G, max_new_tokens=8, temperature=1.0,
                           version=0, generator=torch.Generator().manual_seed(1), run=RUN)  # fmt: skip


def with_huge_rewards(group: TrajectoryGroup) -> TrajectoryGroup:
    raw = json.loads(group.model_dump_json())
    for c, reward in zip(raw["completions"], (3e38, 3e38, 3e38, 0.0), strict=True):
        c["reward"] = reward  # finite, but three of them overflow float32: NaN advantages
    return TrajectoryGroup.model_validate(raw)


def push(r, groups: list[TrajectoryGroup]) -> None:
    k = RedisKeys(RUN)
    for group in groups:
        r.xadd(k.trajectories, {"data": group.model_dump_json()})
        r.hincrby(k.counters, "produced", 1)


def run_learner(app_server, settings: LearnerSettings, steps: int) -> tuple[dict, str]:
    """Serve the learner app until it has taken `steps` steps and finished; its /status and /metrics."""
    with app_server(create_app(settings), ready_path="/readyz") as url:
        status = wait_for(lambda: (s := httpx.get(f"{url}/status").json())["finished"] and s, 150, "the run")
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}  # the loop did not fail
        assert status["step"] == steps
        return status, httpx.get(f"{url}/metrics").text


def accounting(url: str) -> dict[str, int]:
    """The run's accounting as the queue computes it (`TrajectoryQueue.accounting`)."""

    async def read() -> dict[str, int]:
        queue = TrajectoryQueue(await connect_redis(url, attempts=3), RUN, consumer="check")
        try:
            return await queue.accounting()
        finally:
            await queue.redis.aclose()

    return asyncio.run(read())


def metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_nonfinite_batch_is_dead_lettered_and_training_goes_on(app_server, redis_server, tmp_path,
                                                              default_policy_dir):  # fmt: skip
    groups = real_groups(default_policy_dir, 4 * PER_STEP)
    poison = with_huge_rewards(groups[PER_STEP])
    batches = [groups[:PER_STEP], [poison, *groups[PER_STEP + 1 : 2 * PER_STEP]], groups[2 * PER_STEP : 12]]
    r, k = redis_client(redis_server.url), keys(RUN)
    push(r, [g for batch in batches for g in batch])  # read in order, PER_STEP at a time
    settings = {"run": RUN, "redis_url": redis_server.url, "model": default_policy_dir,
                "run_dir": tmp_path / "run", "groups_per_step": PER_STEP, "eval_every": 1000,
                "read_block_ms": 100, "max_new_tokens": 2, "task": {"heldout_size": 8},
                "learner": {"device": "cpu"}, "torch_threads": 1}  # fmt: skip

    status, metrics = run_learner(app_server, LearnerSettings(**settings, max_steps=2), steps=2)

    skipped = {g.group_id for g in batches[1]}
    assert status["version"] == 2 and status["device"] == "cpu"  # the poisoned batch made no version
    assert status["groups_dead_lettered"] == PER_STEP and status["batches_skipped_nonfinite"] == 1
    assert status["groups_trained"] == 2 * PER_STEP
    letters = r.xrange(k["deadletter"])
    assert {f["group_id"] for _, f in letters} == skipped and len(letters) == PER_STEP
    for _, fields in letters:
        assert fields["reason"].startswith("non-finite advantages") and "not applied" in fields["reason"]
        assert TrajectoryGroup.model_validate_json(fields["data"]).group_id == fields["group_id"]
        assert fields["entry_id"]  # the stream entry it was read from (acknowledged and deleted)
    assert r.smembers(RedisKeys(RUN).dead_lettered) == skipped and not r.smembers(k["dropped"])
    assert not r.smembers(k["trained"]) & skipped
    assert r.hget(k["counters"], "dead_lettered") == str(PER_STEP)
    assert metric(metrics, "r2vpo_learner_nonfinite_updates_total") == 1
    assert metric(metrics, "r2vpo_learner_groups_dead_lettered_total") == PER_STEP
    assert metric(metrics, "r2vpo_queue_dead_lettered") == PER_STEP  # the queue's gauge tells the same
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], row["version"]) for row in rows] == [(1, 1), (2, 2)]  # one row per step, no more
    assert [row["batches_skipped_nonfinite"] for row in rows] == [0, 1]
    summary = json.loads((tmp_path / "run" / "learner_summary.json").read_text())
    assert summary["groups_dead_lettered"] == PER_STEP and summary["batches_skipped_nonfinite"] == 1

    # A restarted learner resumes from the checkpoint; the poisoned group pushed again is a duplicate, never
    # trained; the next batch trains as version 3.
    push(r, [poison, *groups[12:]])
    status, _ = run_learner(app_server, LearnerSettings(**settings, max_steps=3), steps=3)
    assert status["version"] == 3 and status["groups_dead_lettered"] == PER_STEP

    acc = accounting(redis_server.url)
    accounting_identity(acc)  # produced = trained + dead_lettered + dropped + duplicates + pending
    counts = tuple(acc[n] for n in ("produced", "trained", "dead_lettered", "dropped", "duplicates_skipped"))
    assert counts == (17, 12, 4, 0, 1), acc
    assert acc["pending"] == 0 and r.smembers(k["trained"]) == {g.group_id for g in groups} - skipped
    assert announced_versions(Path(redis_server.data_dir) / "appendonly.aof", RUN) == [0, 1, 2, 3]

"""Non-finite batches, counted and stopped: dead-lettering a delivered group is counted once however often it
is retried, and a learner service stops (non-zero exit) after `max_consecutive_nonfinite` non-finite batches
in a row instead of dead-lettering the whole queue; so does a restarted one, at its next non-finite batch.
(The sync trainer's abort: tests/unit/test_nonfinite_circuit.py.)

Real pieces only: a real redis-server, `r2vpo serve learner` as a subprocess, groups sampled from the embedded
tiny policy. The poison is real data: rewards finite on the wire but beyond float32 (NaN advantages).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest
from harness import REPO, accounting_identity, descendants, redis_client, serve_command
from test_faults_nonfinite import RUN, accounting, push, real_groups, with_huge_rewards

from client.schemas import TrajectoryGroup
from services.queue import RedisKeys, TrajectoryQueue, connect_redis
from services.redis_server import free_port
from services.supervisor import EXIT_DO_NOT_RESTART

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]
PER_STEP = 4


def test_dead_lettering_deliveries_counts_each_entry_once_across_retries_and_consumers(
    redis_server, default_policy_dir
):
    groups = real_groups(default_policy_dir, 3)
    r, k = redis_client(redis_server.url), RedisKeys(RUN)
    push(r, groups)

    async def scenario() -> tuple[list[int], int]:
        a, b = [TrajectoryQueue(await connect_redis(redis_server.url, attempts=3), RUN, consumer=c)
                for c in ("learner-a", "learner-b")]  # fmt: skip
        try:
            await a.ensure_group()
            delivered = await a.read(3, block_ms=0)
            # learner-a dies before settling; learner-b takes its entries over and dead-letters one of them
            taken = await b.reclaim(0)
            settled = [await b.dead_letter_deliveries(taken[:1], "poison")]
            settled.append(await b.dead_letter_deliveries(taken[:1], "poison"))  # a retry (reply lost)
            settled.append(await a.dead_letter_deliveries(delivered, "poison"))  # the late first consumer
            push(r, groups[:1])  # the dead-lettered group pushed again: a duplicate, never delivered
            return settled, len(await b.read(3, block_ms=0))
        finally:
            await a.redis.aclose()
            await b.redis.aclose()

    settled, redelivered = asyncio.run(scenario())

    # b's first call settles one entry, its retry nothing; a's late call only the two b never touched
    assert settled == [1, 0, 2] and redelivered == 0
    letters = r.xrange(k.deadletter)
    assert sorted(f["group_id"] for _, f in letters) == sorted(g.group_id for g in groups)  # one record each
    assert all(f["reason"] == "poison" and f["entry_id"] for _, f in letters)
    assert r.smembers(k.dead_lettered) == {g.group_id for g in groups} and r.xlen(k.trajectories) == 0
    acc = accounting(redis_server.url)
    accounting_identity(acc)
    assert (acc["produced"], acc["dead_lettered"], acc["duplicates_skipped"], acc["pending"]) == (4, 3, 1, 0)


def serve_learner(tmp_path: Path, settings: dict, name: str) -> tuple[int, str]:
    """`r2vpo serve learner` until it exits by itself; its exit status and log."""
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps(settings | {"port": free_port()}))
    result = subprocess.run(serve_command("learner", config), cwd=REPO, capture_output=True, text=True,
                            timeout=240)  # fmt: skip
    return result.returncode, result.stdout + result.stderr


def test_learner_stops_after_consecutive_nonfinite_batches_and_a_restart_stops_at_the_next(
    redis_server, tmp_path, default_policy_dir
):
    groups = real_groups(default_policy_dir, 7 * PER_STEP)
    batches = [groups[i : i + PER_STEP] for i in range(0, len(groups), PER_STEP)]
    order = dict(zip("ABCDEGF", batches, strict=True))  # read in this order, one batch per step
    for name in "BDEG":  # poisoned; A, C and F are not
        order[name] = [with_huge_rewards(order[name][0]), *order[name][1:]]
    r, k = redis_client(redis_server.url), RedisKeys(RUN)
    push(r, [g for batch in order.values() for g in batch])
    settings = {"run": RUN, "redis_url": redis_server.url, "model": str(default_policy_dir),
                "run_dir": str(tmp_path / "run"), "groups_per_step": PER_STEP, "eval_every": 1000,
                "read_block_ms": 100, "max_new_tokens": 2, "task": {"heldout_size": 8},
                "learner": {"device": "cpu"}, "torch_threads": 1, "max_consecutive_nonfinite": 2}  # fmt: skip
    before = descendants()

    # A trains, B is not finite, C trains (the count starts again), D and E are not finite: stop, G and F
    # stay pending.
    code, log = serve_learner(tmp_path, settings, "first")

    assert code == EXIT_DO_NOT_RESTART, (code, log[-3000:])
    assert "NonFiniteStreak: 2 consecutive batches were not applied" in log, log[-3000:]
    assert "max_consecutive_nonfinite=2" in log and "the last one: non-finite advantages" in log
    ids = {name: {g.group_id for g in batch} for name, batch in order.items()}
    assert r.smembers(k.trained) == ids["A"] | ids["C"]
    assert r.smembers(k.dead_lettered) == ids["B"] | ids["D"] | ids["E"]
    acc = accounting(redis_server.url)
    accounting_identity(acc)
    assert (acc["produced"], acc["trained"], acc["dead_lettered"], acc["pending"]) == (28, 8, 12, 8), acc
    assert r.hget(k.state, "nonfinite_streak") == "2" and r.hget(k.state, "version") == "2"

    # Restarted (as a supervisor would), the learner keeps the count: G alone is enough to stop it again.
    code, log = serve_learner(tmp_path, settings, "second")

    assert code == EXIT_DO_NOT_RESTART and "NonFiniteStreak: 3 consecutive batches" in log, log[-3000:]
    assert r.smembers(k.dead_lettered) == ids["B"] | ids["D"] | ids["E"] | ids["G"]
    acc = accounting(redis_server.url)
    accounting_identity(acc)
    assert (acc["trained"], acc["dead_lettered"], acc["pending"]) == (8, 16, 4), acc  # F still pending
    assert not r.smembers(k.trained) & (ids["B"] | ids["D"] | ids["E"] | ids["G"])
    for _, fields in r.xrange(k.deadletter):
        assert TrajectoryGroup.model_validate_json(fields["data"]).group_id == fields["group_id"]
    assert descendants() <= before

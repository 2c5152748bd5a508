"""Crashes inside a real `r2vpo up` run (every service its own process, a real redis-server, real HTTP):
the learner (SIGKILL right after a checkpoint, and again in the middle of a step), a rollout worker in the
middle of a batch and the inference service are killed; the run still finishes, every group produced is
trained exactly once in effect, and the published version sequence has no gap and no repeat."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from harness import (
    GROUP_SIZE,
    GROUPS_PER_STEP,
    UpRun,
    accounting_identity,
    announced_versions,
    check_whole_groups,
    get_json,
    keys,
    produced_groups,
    redis_client,
    small_run_config,
    wait_for,
)

pytestmark = pytest.mark.e2e

STEPS = 24
FAILPOINT_VERSION = 4


@pytest.mark.timeout(420)
def test_killed_services_are_restarted_and_every_group_is_trained_exactly_once(
    tmp_path, redis_server, default_policy_dir
):
    r, k = redis_client(redis_server.url), keys()
    timings: dict[str, float] = {}
    failpoint = {"R2VPO_FAILPOINTS": f"learner.after_checkpoint@{FAILPOINT_VERSION}"}
    with UpRun(tmp_path / "run", default_policy_dir, steps=STEPS, config=small_run_config(),
               redis_url=redis_server.url, env=failpoint) as up:  # fmt: skip
        # 1. The learner SIGKILLs itself right after checkpointing v4, before publishing and acknowledging
        #    it (failpoint); `up` restarts it and it resumes from that checkpoint.
        first = wait_for(lambda: up.pid("learner"), 120, "the learner process")
        up.wait_ready("learner", not_pid=first, timeout=180)
        assert up.step() >= FAILPOINT_VERSION

        # 2. A rollout worker is killed in the middle of a batch (right after one of its groups landed),
        #    and the inference service with it. The new rollout worker finds no inference service: it
        #    retries with backoff and goes on once the new inference process serves the latest weights.
        up.wait_step(FAILPOINT_VERSION + 2)
        produced = int(r.hget(k["counters"], "produced") or 0)
        wait_for(lambda: int(r.hget(k["counters"], "produced") or 0) > produced, 60, "a group pushed", 0.005)
        killed_rollout = up.kill("rollout-0")
        announced = int(r.hget(k["weights"], "version"))
        killed_inference = up.kill("inference")
        started = time.monotonic()
        rollout = up.wait_ready("rollout-0", not_pid=killed_rollout)
        timings["rollout_restart_s"] = time.monotonic() - started
        up.wait_ready("inference", not_pid=killed_inference)
        timings["inference_restart_s"] = time.monotonic() - started
        served = get_json(f"{up.url('inference')}/v1/models")["data"][0]["policy_version"]
        assert served >= announced > 0
        status = get_json(f"{up.url('rollout-0')}/status")
        produced = status["groups_produced"]
        wait_for(
            lambda: get_json(f"{up.url('rollout-0')}/status")["groups_produced"] > produced, 60, "groups"
        )
        assert up.pid("rollout-0") == rollout  # it waited for inference; it did not crash
        assert get_json(f"{up.url('rollout-0')}/status")["batch_errors"] >= 1, status

        # 4. The learner is killed in the middle of a step: right after it logged the previous one.
        up.wait_step(up.step() + 2)
        rows = len(up.metrics_rows())
        wait_for(lambda: len(up.metrics_rows()) > rows, 60, "a new metrics row", 0.005)
        killed = up.kill("learner")
        killed_at_step = len(up.metrics_rows())
        started = time.monotonic()
        up.wait_ready("learner", not_pid=killed)
        timings["learner_restart_s"] = time.monotonic() - started
        assert killed_at_step < STEPS, "the run ended before the last kill: raise STEPS"

        assert up.wait_exit(300) == 0, up.output()[-3000:]
        summary = up.summary()
    print(f"\nrestart timings (kill -> ready): {json.dumps({k_: round(v, 1) for k_, v in timings.items()})}")
    print(f"supervisor restart events: {summary['restart_events']}")

    assert summary["finished"] and summary["steps"] == STEPS
    assert summary["restarts"] == {"learner": 2, "rollout-0": 1, "inference": 1}
    assert all(e["ready_s"] is not None for e in summary["restart_events"]), summary["restart_events"]

    # Accounting: every group produced is trained, dead-lettered, dropped or still pending; none twice.
    acc = summary["accounting"]
    accounting_identity(acc)
    assert acc["trained"] == acc["trained_groups"] == STEPS * GROUPS_PER_STEP
    assert summary["groups_trained"] == STEPS * GROUPS_PER_STEP  # the learner's own (checkpointed) count
    assert summary["rollouts_consumed"] == STEPS * GROUPS_PER_STEP * GROUP_SIZE

    # Ground truth from Redis's append-only file: every entry ever added is a whole group of G.
    aof = Path(redis_server.data_dir) / "appendonly.aof"
    groups = produced_groups(aof)
    check_whole_groups(groups, GROUP_SIZE)
    produced_ids = [g["group_id"] for g in groups]
    assert len(set(produced_ids)) == len(produced_ids)
    assert acc["produced"] == len(produced_ids) + r.xlen(k["deadletter"])
    trained = r.smembers(k["trained"])
    pending = {json.loads(f["data"])["group_id"] for _, f in r.xrange(k["trajectories"])}
    dropped = r.smembers(k["dropped"])
    assert len(trained) == STEPS * GROUPS_PER_STEP
    assert not (trained & pending) and not (trained & dropped) and not (pending & dropped)
    assert trained | pending | dropped == set(produced_ids)  # none lost

    # Published versions: 0, 1, …, STEPS, each announced exactly once, in order.
    assert announced_versions(aof) == list(range(STEPS + 1))
    # Metrics: one row per version in metrics.jsonl and in the Redis metrics stream (rolled-back rows cut).
    assert [row["version"] for row in up.metrics_rows()] == list(range(1, STEPS + 1))
    stream_versions = [json.loads(f["data"])["version"] for _, f in r.xrange(k["metrics"])]
    assert stream_versions == list(range(1, STEPS + 1))

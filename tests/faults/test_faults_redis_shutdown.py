"""`r2vpo up --redis-url` against an existing redis-server (append-only persistence on) that is restarted in
the middle of the run; invalid groups pushed by a broken producer; then SIGTERM to `r2vpo up`."""

from __future__ import annotations

import json
import math
import signal
import time

import pytest
from harness import UpRun, accounting_identity, get_json, keys, redis_client, small_run_config, wait_for

pytestmark = pytest.mark.e2e

SERVICES = ("reward", "inference", "learner", "rollout-0", "dashboard")


def push_invalid_groups(r, k) -> int:
    """What a broken producer could put on the stream; each counted as produced, like `push` does."""
    good = {"group_id": "template", "prompt_token_ids": [1, 2],
            "completions": [{"token_ids": [3, 4], "behavior_logprobs": [-0.1, -0.2], "reward": 1.0,
                             "policy_version": 0}]}  # fmt: skip

    def variant(group_id: str, **completion) -> bytes:
        group = json.loads(json.dumps(good)) | {"group_id": group_id}
        group["completions"][0] |= completion
        return json.dumps(group).encode()  # json.dumps writes NaN as the bare literal NaN

    entries = [
        {"data": b"\xff\x00 not json at all"},
        {"data": variant("bad-lengths", behavior_logprobs=[-0.1])},
        {"data": variant("bad-nan-reward", reward=math.nan)},
        {"data": variant("bad-positive-logprob", behavior_logprobs=[0.5, -0.1])},
        {"data": json.dumps({"group_id": "bad-type", "prompt_token_ids": "abc", "completions": 3})},
        {"no_data_field": b"x"},
    ]
    for fields in entries:
        with r.pipeline(transaction=True) as pipe:
            pipe.xadd(k["trajectories"], fields)
            pipe.hincrby(k["counters"], "produced", 1)
            pipe.execute()
    return len(entries)


def live_pids(up: UpRun) -> dict[str, int | None]:
    return {name: up.pid(name) for name in SERVICES}


@pytest.mark.timeout(360)
def test_redis_restart_loses_nothing_and_sigterm_stops_every_service_in_bounded_time(
    tmp_path, redis_server, default_policy_dir
):
    k = keys()
    config = small_run_config() | {"dashboard": True}
    timings: dict[str, float] = {}
    fixture_redis = lambda: {redis_server.process.pid} if redis_server.process else set()  # noqa: E731
    with UpRun(tmp_path / "run", default_policy_dir, steps=100_000, config=config,
               redis_url=redis_server.url, keep=fixture_redis) as up:  # fmt: skip
        r = redis_client(redis_server.url)
        up.wait_step(3, timeout=180)
        invalid = push_invalid_groups(r, k)
        pids = live_pids(up)
        assert all(pids.values()), pids
        trained_before = r.smembers(k["trained"])
        counters_before = {name: int(v) for name, v in r.hgetall(k["counters"]).items()}
        version_before = int(r.hget(k["weights"], "version"))
        produced_before = get_json(f"{up.url('rollout-0')}/status")["groups_produced"]
        r.close()

        # Redis goes away for 3 s and comes back on the same port with its append-only file.
        redis_server.stop()
        outage_started = time.monotonic()
        live = f"{up.url('dashboard')}/api/live"  # answers during the outage: Redis reported down, not failed
        wait_for(lambda: get_json(live)["redis"]["ok"] is False, 10, "the dashboard to report the outage")
        time.sleep(max(0.0, 3.0 - (time.monotonic() - outage_started)))
        assert live_pids(up) == pids  # nobody crashed while Redis was away
        redis_server.start()
        back = time.monotonic()
        r = redis_client(redis_server.url)

        # Nothing acknowledged was lost: the trained set and the counters survived the restart.
        assert trained_before <= r.smembers(k["trained"])
        counters_after = {name: int(v) for name, v in r.hgetall(k["counters"]).items()}
        assert all(counters_after.get(name, 0) >= n for name, n in counters_before.items())

        # Every service reconnected: the learner trains and publishes, the inference watcher follows,
        # the rollout worker produces, the dashboard reads Redis again.
        step = up.step()
        up.wait_step(step + 3, timeout=120)
        timings["learner_progress_after_redis_back_s"] = time.monotonic() - back
        latest = wait_for(lambda: int(r.hget(k["weights"], "version")) >= version_before + 2 and
                          int(r.hget(k["weights"], "version")), 60, "new announcements")  # fmt: skip
        served = wait_for(
            lambda: (
                (v := get_json(f"{up.url('inference')}/v1/models")["data"][0]["policy_version"]) >= latest
                and v
            ),
            60,
            "the inference watcher to follow",
        )
        assert served >= latest
        wait_for(lambda: get_json(f"{up.url('rollout-0')}/status")["groups_produced"] > produced_before, 60,
                 "new groups from the rollout worker")  # fmt: skip
        wait_for(lambda: get_json(live)["redis"]["ok"], 60, "the dashboard to read Redis again")
        assert live_pids(up) == pids  # no restart, no crash loop

        # The invalid groups never reached the learner: dead-lettered, with the reason.
        reasons = [f["reason"] for _, f in r.xrange(k["deadletter"])]
        assert sum(reason.startswith("invalid trajectory group") for reason in reasons) == invalid, reasons

        # SIGTERM: everything stops in order, in bounded time, nothing in flight is lost.
        started = time.monotonic()
        up.process.send_signal(signal.SIGTERM)
        code = up.wait_exit(120)
        timings["sigterm_to_exit_s"] = time.monotonic() - started
        assert code == 128 + signal.SIGTERM, up.output()[-3000:]
        summary = up.summary()
        rows = up.metrics_rows()
        announced = int(r.hget(k["weights"], "version"))
    print(f"\ntimings: {json.dumps({name: round(v, 1) for name, v in timings.items()})}")
    print(f"per-service SIGTERM -> exit (s): {summary['stop_s']}")

    assert summary["finished"] is False and summary["interrupted"] == "SIGTERM"
    assert summary["restarts"] == {}
    assert set(summary["stop_s"]) == set(SERVICES)
    assert all(seconds < 30 for seconds in summary["stop_s"].values()), summary["stop_s"]  # none killed
    acc = summary["accounting"]
    accounting_identity(acc)  # groups in flight went back to the queue (pending), none lost
    assert acc["dead_lettered"] >= invalid
    # The learner's last step was committed: its row, its checkpoint and its announcement agree.
    assert summary["stopped_early"] is True
    assert rows[-1]["version"] == summary["version"] == announced
    assert [row["version"] for row in rows] == list(range(1, announced + 1))

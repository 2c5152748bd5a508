"""A failing reward plug-in inside a real pipeline: bounded by timeouts and retries, the circuit breaker opens
and closes, affected groups go to the dead-letter stream with the reason, training goes on with the rest."""

from __future__ import annotations

import asyncio
import json
import stat
from urllib.parse import urlsplit

import pytest
import redis
from fastapi import FastAPI, Request
from fastapi.responses import Response
from harness import (
    GROUPS_PER_STEP,
    UpRun,
    accounting_identity,
    check_whole_groups,
    get_json,
    keys,
    redis_client,
    small_run_config,
    wait_for,
)

from services.rollout.worker import RolloutSettings, RolloutWorker

STEPS = 10
# What each failure of the `fault_plugins:flaky` plug-in looks like in a dead-letter reason.
REASONS = {
    "hang": "took longer than",
    "raise": "raised RuntimeError",
    "nan": "non-finite reward (nan)",
    "inf": "non-finite reward (inf)",
    "range": "outside the declared range",
    "outage": "raised ConnectionError",
    "circuit": "reward circuit_open",
}


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_failing_reward_plugin_dead_letters_its_groups_and_training_goes_on(tmp_path, default_policy_dir):
    outage = tmp_path / "outage"
    config = small_run_config() | {"reward_plugin": "fault_plugins:flaky"}
    config["overrides"] = config["overrides"] | {
        "reward": {"timeout_s": 0.5, "reward_range": [0.0, 1.0]},
        "rollout": config["overrides"]["rollout"] | {
            "reward_timeout_s": 3.0, "reward_retries": 1, "reward_backoff_s": 0.05,
            "reward_circuit_failures": 3, "reward_circuit_reset_s": 1.0,
        },
    }  # fmt: skip
    env = {"FLAKY_OUTAGE_FILE": str(outage)}
    with UpRun(tmp_path / "run", default_policy_dir, steps=STEPS, config=config, env=env) as up:
        status_url = f"{up.url('rollout-0')}/status"
        redis_url = up.service_config("rollout-0")["redis_url"]

        # The Redis that `up` started wants its password; the service configs holding it are private.
        parts = urlsplit(redis_url)
        assert parts.password
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=parts.hostname, port=parts.port, socket_timeout=5).get("anything")
        for path in (up.run_dir / "services").glob("*.json"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path

        up.wait_step(2, timeout=180)
        outage.touch()  # every call fails now: the circuit opens, no new batch starts while it is open
        wait_for(lambda: get_json(status_url)["reward_circuit_opened"] >= 1, 60, "the circuit to open")
        outage.unlink()
        closed = wait_for(
            lambda: (s := get_json(status_url))["reward_circuit_closed"] >= 1 and s, 60, "close"
        )
        assert closed["reward_circuit"] == "closed"

        r, k = redis_client(redis_url), keys()

        def reasons() -> list[str]:
            return [f["reason"] for _, f in r.xrange(k["deadletter"])]

        def all_kinds_seen() -> bool:
            return all(any(words in reason for reason in reasons()) for words in REASONS.values())

        wait_for(all_kinds_seen, 120, f"dead letters of every kind {list(REASONS)}", poll=0.5)
        letters = r.xrange(k["deadletter"])
        assert up.wait_exit(240) == 0, up.output()[-3000:]
        summary = up.summary()

    assert summary["finished"] and summary["steps"] == STEPS  # training went on with the other groups
    acc = summary["accounting"]
    accounting_identity(acc)
    assert acc["trained"] == STEPS * GROUPS_PER_STEP
    assert acc["dead_lettered"] >= len(letters) >= len(REASONS)
    assert all(f["group_id"] and f["reason"].startswith("reward ") for _, f in letters)


# --- a reward service that breaks the protocol itself (cannot be produced through the SDK) -----------------


def misbehaving_reward_app() -> FastAPI:
    """Answers /score_batch by the call's position: a non-JSON body, a NaN literal, a reward outside the
    declared range, an oversized body, then correct answers (reward 0.5)."""
    app, calls = FastAPI(), []
    behaviours = ("not_json", "nan_literal", "out_of_range", "oversized")

    @app.post("/score_batch")
    async def score_batch(request: Request) -> Response:
        items = (await request.json())["items"]
        kind = behaviours[len(calls)] if len(calls) < len(behaviours) else "ok"
        calls.append(kind)
        if kind == "not_json":
            return Response(b"<html>502 from a proxy</html>", media_type="text/html")
        if kind == "nan_literal":
            body = '{"results": [' + ", ".join('{"reward": NaN}' for _ in items) + "]}"
            return Response(body, media_type="application/json")
        reward = {"out_of_range": 7.0, "oversized": 0.5, "ok": 0.5}[kind]
        details = {"pad": "x" * 2_000_000} if kind == "oversized" else {}
        body = json.dumps({"results": [{"reward": reward, "details": details} for _ in items]})
        return Response(body, media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    return app


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_protocol_breaking_reward_answers_are_dead_lettered_not_trained(app_server, redis_url, tmp_path):
    from services.inference import InferenceSettings
    from services.inference import create_app as inference_app
    from trainer.policy import Policy
    from trainer.tiny import build_tiny_model

    model_dir = tmp_path / "tiny"
    Policy(*build_tiny_model()).save(model_dir)
    inference = inference_app(
        InferenceSettings(model=model_dir, watch_weights=False, admin_token="t", torch_threads=1)
    )
    settings = dict(redis_url=redis_url, group_size=2, prompts_per_request=8, groups_per_step=8, max_lag=8,
                    max_new_tokens=4, reward_range=(0.0, 1.0), reward_max_response_bytes=65536,
                    reward_retries=0, reward_circuit_failures=10, worker_id="t")  # fmt: skip

    async def produce(inference_url: str, reward_url: str) -> dict:
        worker = RolloutWorker(
            RolloutSettings(inference_url=inference_url, reward_url=reward_url, **settings)
        )
        await worker.start()
        try:
            await worker.run(asyncio.Event(), max_batches=1)
            return dict(worker.stats)
        finally:
            await worker.close()

    with (
        app_server(inference, ready_path="/readyz") as inference_url,
        app_server(misbehaving_reward_app()) as reward_url,
    ):
        stats = asyncio.run(asyncio.wait_for(produce(inference_url, reward_url), 90))

    r, k = redis_client(redis_url), keys("default")
    reasons = [f["reason"] for _, f in r.xrange(k["deadletter"])]
    assert len(reasons) == 4 and stats["groups_dead_lettered"] == 4 and stats["groups_produced"] == 4
    for words in ("not JSON", "finite number", "outside declared range [0.0, 1.0]", "larger than 65536"):
        assert sum(words in reason for reason in reasons) == 1, (words, reasons)
    pushed = [json.loads(f["data"]) for _, f in r.xrange(k["trajectories"])]
    check_whole_groups(pushed, group_size=2)
    assert {c["reward"] for g in pushed for c in g["completions"]} == {0.5}
    acc = {name: int(v) for name, v in r.hgetall(k["counters"]).items()}
    assert acc == {"produced": 8, "dead_lettered": 4}

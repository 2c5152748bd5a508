"""The reward plug-in contract over real HTTP: SDK services under uvicorn, typed clients, errors that
stay errors (never a reward of 0), the circuit breaker, and the contract check."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response

from client.plugin import Score, check_reward_main, check_reward_service, create_reward_app
from client.reward import AsyncRewardClient, CircuitBreaker, RewardClient, RewardError
from client.schemas import ScoreRequest
from services.reward import RewardSettings, create_app

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def req(completion: str = "4", answer: str = "4", **metadata: object) -> ScoreRequest:
    return ScoreRequest(
        id=f"r-{completion}", prompt="2 + 2 =", completion=completion, metadata={"answer": answer} | metadata
    )


def match(prompt: str, completion: str, metadata: dict) -> float:
    return float(completion.strip() == metadata["answer"])


class Counting:
    """A scoring function that counts its calls and can be switched between failing and healthy."""

    def __init__(self, failing: bool = True) -> None:
        self.calls, self.failing = 0, failing
        self.__name__ = "counting"

    def __call__(self, prompt: str, completion: str, metadata: dict) -> float:
        self.calls += 1
        if self.failing:
            raise RuntimeError("scorer is broken")
        return 1.0


def test_plain_function_is_served_to_async_and_sync_clients(app_server):
    with app_server(create_reward_app(match, reward_range=(0.0, 1.0))) as url:
        with RewardClient(url) as client:
            assert client.health()
            assert client.score(req("4")).reward == 1.0
            assert client.score(req("5")).reward == 0.0

        async def run() -> list[float]:
            async with AsyncRewardClient(url) as client:
                assert await client.health()
                return [(await client.score(req(c))).reward for c in ("4", " 4 ", "x")]

        assert asyncio.run(run()) == [1.0, 1.0, 0.0]
        assert httpx.get(url + "/healthz").json() == {
            "status": "ok",
            "name": "match",
            "reward_range": [0.0, 1.0],
        }
        assert httpx.get(url + "/readyz").status_code == 200


def test_async_scoring_function_with_details_is_served(app_server):
    async def judge(prompt: str, completion: str, metadata: dict) -> Score:
        await asyncio.sleep(0.01)
        return Score(reward=0.5, details={"length": len(completion)})

    with app_server(create_reward_app(judge)) as url, RewardClient(url) as client:
        result = client.score(req("abc"))
        assert (result.reward, result.details) == (0.5, {"length": 3})


def test_batch_endpoint_preserves_order(app_server):
    def by_number(prompt: str, completion: str, metadata: dict) -> float:
        time.sleep(0.05 * (5 - int(completion)))  # later items finish first
        return float(completion)

    items = [req(str(i)) for i in range(5)]
    with app_server(create_reward_app(by_number)) as url:
        with RewardClient(url) as client:
            assert [r.reward for r in client.score_batch(items)] == [0.0, 1.0, 2.0, 3.0, 4.0]

        async def run() -> list[float]:
            async with AsyncRewardClient(url) as client:
                return [r.reward for r in await client.score_batch(items)]

        assert asyncio.run(run()) == [0.0, 1.0, 2.0, 3.0, 4.0]
        raw = httpx.post(url + "/score_batch", json={"items": [i.model_dump() for i in items]})
        assert [r["reward"] for r in raw.json()["results"]] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_client_batch_falls_back_to_single_calls_without_batch_route(app_server):
    app, hits = FastAPI(), []

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/score")
    def score(body: ScoreRequest) -> dict:
        hits.append(body.id)
        return {"reward": float(body.completion)}

    with app_server(app) as url, RewardClient(url) as client:
        assert [r.reward for r in client.score_batch([req("1"), req("2"), req("3")])] == [1.0, 2.0, 3.0]
        assert sorted(hits) == ["r-1", "r-2", "r-3"]

        async def run() -> list[float]:
            async with AsyncRewardClient(url) as aclient:
                return [r.reward for r in await aclient.score_batch([req("7"), req("8")])]

        assert asyncio.run(run()) == [7.0, 8.0]


def test_function_error_is_500_error_response_and_client_retries(app_server):
    fn = Counting(failing=True)
    with app_server(create_reward_app(fn)) as url:
        raw = httpx.post(url + "/score", json=req().model_dump())
        assert raw.status_code == 500
        body = raw.json()
        assert body["status"] == "error" and "RuntimeError: scorer is broken" in body["error"]
        fn.calls = 0
        with RewardClient(url, retries=2, backoff=0.01) as client, pytest.raises(RewardError) as err:
            client.score(req())
        assert err.value.kind == "http" and err.value.status_code == 500
        assert fn.calls == 3  # 1 + retries
        fn.calls = 0

        async def run() -> None:
            async with AsyncRewardClient(url, retries=1, backoff=0.01) as client:
                await client.score(req())

        with pytest.raises(RewardError, match="HTTP 500"):
            asyncio.run(run())
        assert fn.calls == 2


def test_client_error_4xx_is_not_retried(app_server):
    app, hits = FastAPI(), []

    @app.post("/score")
    def score() -> Response:
        hits.append(1)
        return PlainTextResponse('{"status": "error", "error": "no such task"}', status_code=400)

    with app_server(app, ready_path="/score") as url, RewardClient(url, retries=3, backoff=0.01) as client:
        hits.clear()
        with pytest.raises(RewardError) as err:
            client.score(req())
        assert (err.value.kind, err.value.status_code, len(hits)) == ("http", 400, 1)
        assert "no such task" in err.value.message


def test_hanging_function_times_out_in_client_and_server(app_server):
    release = threading.Event()

    def hang(prompt: str, completion: str, metadata: dict) -> float:
        release.wait(10)
        return 1.0

    try:
        with app_server(create_reward_app(hang, timeout_s=0.5)) as url:
            with (
                RewardClient(url, timeout=0.3, retries=1, backoff=0.01) as client,
                pytest.raises(RewardError) as err,
            ):
                client.score(req())
            assert err.value.kind == "timeout"
            raw = httpx.post(url + "/score", json=req().model_dump(), timeout=10)
            assert raw.status_code == 504 and raw.json()["status"] == "error"
            # a sync function runs on a worker thread: the service keeps answering meanwhile
            assert httpx.get(url + "/healthz", timeout=2).status_code == 200
    finally:
        release.set()


@pytest.mark.parametrize("value", [math.nan, math.inf, "1.0", None])
def test_non_finite_or_non_number_reward_is_an_error_not_zero(app_server, value):
    with app_server(create_reward_app(lambda p, c, m: value)) as url:
        raw = httpx.post(url + "/score", json=req().model_dump())
        assert raw.status_code == 500 and raw.json()["status"] == "error"
        with RewardClient(url, retries=0) as client, pytest.raises(RewardError) as err:
            client.score(req())
        assert err.value.kind == "http"


def raw_app(body: bytes, media_type: str = "application/json") -> FastAPI:
    """A service that answers /score with a fixed 200 body, whatever it is."""
    app = FastAPI()

    @app.post("/score")
    def score() -> Response:
        return Response(body, media_type=media_type)

    return app


@pytest.mark.parametrize(
    "body",
    [b"<html>ok</html>", b'{"reward": NaN}', b'{"reward": Infinity}', b'{"score": 1}', b'{"reward": "high"}'],
    ids=["not-json", "nan-literal", "inf-literal", "wrong-field", "not-a-number"],
)
def test_invalid_200_body_is_invalid_error(app_server, body):
    with app_server(raw_app(body), ready_path="/score") as url:
        with RewardClient(url, retries=2) as client, pytest.raises(RewardError) as err:
            client.score(req())
        assert err.value.kind == "invalid"

        async def run() -> None:
            async with AsyncRewardClient(url) as client:
                await client.score(req())

        with pytest.raises(RewardError, match="invalid"):
            asyncio.run(run())


def test_reward_outside_declared_range_is_invalid(app_server):
    with app_server(create_reward_app(lambda p, c, m: 2.0)) as url:
        with RewardClient(url, reward_range=(0.0, 1.0)) as client, pytest.raises(RewardError) as err:
            client.score(req())
        assert err.value.kind == "invalid" and "outside declared range" in err.value.message
    with app_server(create_reward_app(lambda p, c, m: 2.0, reward_range=(0.0, 1.0))) as url:
        raw = httpx.post(url + "/score", json=req().model_dump())
        assert raw.status_code == 500 and "outside the declared range" in raw.json()["error"]


def test_oversized_response_is_invalid(app_server):
    body = b'{"reward": 1.0, "details": {"pad": "' + b"x" * 5000 + b'"}}'
    with app_server(raw_app(body), ready_path="/score") as url:
        with RewardClient(url, max_response_bytes=1000) as client, pytest.raises(RewardError) as err:
            client.score(req())
        assert err.value.kind == "invalid" and "larger than" in err.value.message
        with RewardClient(url) as client:
            assert client.score(req()).reward == 1.0


def test_malformed_body_gets_422_with_readable_message(app_server):
    with app_server(create_reward_app(match)) as url:
        missing = httpx.post(url + "/score", json={"id": "x", "prompt": "p"})
        assert missing.status_code == 422
        assert (
            missing.json()["status"] == "error"
            and "body.completion: Field required" in missing.json()["error"]
        )
        broken = httpx.post(
            url + "/score", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert broken.status_code == 422 and broken.json()["status"] == "error"
        assert httpx.post(url + "/score_batch", json={"items": []}).status_code == 422


def test_oversized_body_gets_413(app_server):
    with app_server(create_reward_app(match, max_body_bytes=10_000)) as url:
        big = req("x" * 20_000).model_dump()
        raw = httpx.post(url + "/score", json=big)
        assert raw.status_code == 413 and raw.json()["status"] == "error"

        def chunks():  # no Content-Length: the limit holds for streamed bodies too
            yield b'{"id": "x", "prompt": "p", "completion": "'
            for _ in range(30):
                yield b"y" * 1000
            yield b'"}'

        streamed = httpx.post(url + "/score", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        assert httpx.post(url + "/score", json=req("4").model_dump()).json()["reward"] == 1.0


def test_circuit_opens_fails_fast_then_half_opens_and_closes(app_server):
    fn = Counting(failing=True)
    circuit = CircuitBreaker(failure_threshold=3, reset_after_s=0.5)
    with app_server(create_reward_app(fn)) as url, RewardClient(url, retries=0, circuit=circuit) as client:
        fn.calls = 0
        for _ in range(3):
            with pytest.raises(RewardError, match="http"):
                client.score(req())
        assert circuit.state == "open" and fn.calls == 3
        with pytest.raises(RewardError) as err:
            client.score(req())
        assert err.value.kind == "circuit_open" and fn.calls == 3  # failed fast: no HTTP call
        time.sleep(0.6)
        assert circuit.state == "half_open"
        fn.failing = False
        assert client.score(req()).reward == 1.0
        assert circuit.state == "closed" and fn.calls == 4


def test_unreachable_service_is_unreachable_error():
    from services.redis_server import free_port

    with RewardClient(f"http://127.0.0.1:{free_port()}", retries=1, backoff=0.01) as client:
        with pytest.raises(RewardError) as err:
            client.score(req())
        assert err.value.kind == "unreachable"
        assert client.health() is False


def test_metrics_count_calls_and_errors(app_server):
    def flaky(prompt: str, completion: str, metadata: dict) -> float:
        if completion == "boom":
            raise ValueError("boom")
        return 1.0

    with app_server(create_reward_app(flaky)) as url:
        for completion in ("1", "2", "boom"):
            httpx.post(url + "/score", json=req(completion).model_dump())
        httpx.post(url + "/score", json={"bad": 1})
        text = httpx.get(url + "/metrics").text
        assert "r2vpo_reward_calls_total 3.0" in text
        assert 'r2vpo_reward_errors_total{kind="exception"} 1.0' in text
        assert 'r2vpo_reward_errors_total{kind="bad_request"} 1.0' in text
        assert "r2vpo_reward_latency_seconds_count 3.0" in text


def test_builtin_service_scores_reasoning_gym_entry(app_server):
    import reasoning_gym

    entry = reasoning_gym.create_dataset("chain_sum", size=1, seed=3)[0]
    good = ScoreRequest(
        id="a", prompt=entry["question"], completion=entry["answer"], metadata={"entry": entry}
    )
    bad = good.model_copy(update={"completion": entry["answer"] + "0"})
    with (
        app_server(create_app(RewardSettings(port=0))) as url,
        RewardClient(url, reward_range=(0, 1)) as client,
    ):
        assert [r.reward for r in client.score_batch([good, bad])] == [1.0, 0.0]
        with pytest.raises(RewardError) as err:  # no entry: an error, not a 0
            client.score(good.model_copy(update={"metadata": {}}))
        assert err.value.status_code == 422 and "metadata['entry']" in err.value.message
        assert "r2vpo_reward_calls_total" in httpx.get(url + "/metrics").text


def test_user_plugin_is_served_by_module_path(app_server, tmp_path, monkeypatch):
    (tmp_path / "my_reward_plugin.py").write_text(
        "def score(prompt, completion, metadata):\n    return -1.0 if completion == 'bad' else 2.0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    settings = RewardSettings(plugin="my_reward_plugin:score")
    assert settings.effective_reward_range is None  # the built-ins' (0, 1) default is not imposed
    with app_server(create_app(settings)) as url, RewardClient(url) as client:
        assert client.score(req("bad")).reward == -1.0
        assert httpx.get(url + "/healthz").json()["name"] == "my_reward_plugin:score"


def test_check_reward_service_passes_against_builtin_services(app_server, capsys):
    for plugin in ("builtin:reasoning_gym", "builtin:exact_match", "builtin:math_verify"):
        with app_server(create_app(RewardSettings(plugin=plugin))) as url:
            results = check_reward_service(url)
            assert all(r.ok for r in results), results
            assert [r.name for r in results][0] == "healthz answers 200"
    with app_server(create_reward_app(match)) as url:
        assert check_reward_main(url) == 0
    assert "pass" in capsys.readouterr().out


def test_check_reward_service_reports_failures_against_broken_service(app_server, capsys):
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/score")
    def score() -> Response:  # takes anything, answers NaN: both are contract violations
        return Response(b'{"reward": NaN}', media_type="application/json")

    @app.post("/score_batch")
    def score_batch() -> dict:
        return {"results": [{"reward": 1.0}]}  # one result for three items

    with app_server(app) as url:
        results = {r.name: r for r in check_reward_service(url)}
        assert results["healthz answers 200"].ok
        assert not results["score returns a finite reward"].ok
        assert (
            not results["malformed body gets 4xx"].ok
            and "HTTP 200" in results["malformed body gets 4xx"].message
        )
        assert not results["score_batch keeps order"].ok
        assert check_reward_main(url) == 1
    assert "FAIL" in capsys.readouterr().out

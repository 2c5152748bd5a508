"""The inference service under real uvicorn (torch engine, untrained tiny model): OpenAI compatibility,
log-probs equal to the learner's recompute, batching, weight swaps (admin and Redis), rejections, restarts,
bad input and admin protection."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx
import openai
import pytest
import torch
from conftest import serve_app
from engine_helpers import save_tiny_policy
from safetensors.torch import save

from client.inference import AsyncInferenceClient, InferenceClient, InferenceError
from client.schemas import CompletionChoice, CompletionRequest, WeightsAnnouncement
from services.inference import InferenceSettings, create_app
from services.queue import TrajectoryQueue, connect_redis
from services.redis_server import free_port
from services.weights import WeightStore
from trainer.policy import Policy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
TOKEN = "s3cret-admin-token"
PROMPTS = ["1+2=", "7-3+4=", "9+9-1="]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """An untrained tiny policy saved once for the module (fast; no warm start)."""
    return save_tiny_policy(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="module")
def policy(model_dir) -> Policy:
    return Policy.from_pretrained(model_dir)


def settings_for(model_dir: Path, **overrides) -> InferenceSettings:
    values = dict(model=model_dir, served_model_name="tiny", admin_token=TOKEN, watch_weights=False,
                  max_n=8, max_tokens_limit=32, max_prompt_tokens=48)  # fmt: skip
    return InferenceSettings(**(values | overrides))


def complete(url: str, **body) -> dict:
    response = httpx.post(f"{url}/v1/completions", json={"model": "tiny"} | body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def served_version(url: str) -> int:
    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["policy_version"]


def recompute_diff(policy: Policy, choices: list[dict], temperature: float) -> float:
    """Largest |served − recomputed| log-prob over all tokens of `choices`."""
    with torch.no_grad():
        out = policy.token_logprobs(
            [c["prompt_token_ids"] for c in choices],
            [c["token_ids"] for c in choices],
            temperature=temperature,
        )
    diff = 0.0
    for i, c in enumerate(choices):
        served = torch.tensor(c["logprobs"]["token_logprobs"])
        assert len(served) == len(c["token_ids"]) > 0
        diff = max(diff, (served - out.logp[i, : len(served)]).abs().max().item())
    return diff


def perturbed(model_dir: Path, seed: int, scale: float = 0.05) -> tuple[Policy, dict[str, torch.Tensor]]:
    """A copy of the policy with every parameter moved by Gaussian noise, and its state dict."""
    fresh = Policy.from_pretrained(model_dir)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fresh.model.parameters():  # tied weights are one parameter: they stay tied
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return fresh, fresh.model.state_dict()


def uri_path(a: WeightsAnnouncement) -> Path:
    parts = urlsplit(a.uri)
    return Path(unquote(parts.path)) if parts.scheme == "file" else Path(a.uri)


def post_weights(url: str, a: WeightsAnnouncement, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.post(
        f"{url}/admin/load_weights", json=a.model_dump(mode="json"), headers=headers, timeout=60
    )


def announce(redis_url: str, a: WeightsAnnouncement) -> None:
    async def body() -> None:
        redis = await connect_redis(redis_url, attempts=5, backoff_s=0.05)
        try:
            await TrajectoryQueue(redis, "default", consumer="test").announce(a)
        finally:
            await redis.aclose()

    asyncio.run(body())


def wait_for_version(url: str, version: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while served_version(url) != version:
        assert time.monotonic() < deadline, f"still serving v{served_version(url)}, wanted v{version}"
        time.sleep(0.05)


# --- OpenAI compatibility and log-prob exactness ----------------------------------------------------


def test_openai_client_gets_completions_with_logprobs_and_extra_fields(app_server, model_dir):
    with app_server(create_app(settings_for(model_dir)), ready_path="/readyz") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny"]
        raw = client.completions.with_raw_response.create(
            model="tiny", prompt=PROMPTS[:2], n=3, max_tokens=6, temperature=1.0, logprobs=0, seed=7
        )
        result = raw.parse()
        assert len(result.choices) == 6 and result.usage.completion_tokens > 0
        for choice in result.choices:
            assert len(choice.logprobs.token_logprobs) == len(choice.logprobs.tokens) > 0
            assert all(math.isfinite(x) and x <= 0 for x in choice.logprobs.token_logprobs)
        body = json.loads(raw.http_response.text)
        assert [c["index"] for c in body["choices"]] == list(range(6))
        for c in body["choices"]:
            CompletionChoice.model_validate(c)
            assert c["policy_version"] == 0 and c["token_ids"] and c["prompt_token_ids"][0] == 1
        assert (
            body["choices"][4]["prompt_token_ids"] == body["choices"][3]["prompt_token_ids"]
        )  # prompt-major
        assert body["choices"][2]["prompt_token_ids"] != body["choices"][3]["prompt_token_ids"]


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_served_logprobs_equal_policy_recompute(app_server, model_dir, policy, temperature):
    with app_server(create_app(settings_for(model_dir)), ready_path="/readyz") as url:
        body = complete(url, prompt=PROMPTS, n=4, max_tokens=12, temperature=temperature, logprobs=1)
        assert recompute_diff(policy, body["choices"], temperature) < 1e-4


def test_same_seed_gives_same_completion(app_server, model_dir):
    with app_server(create_app(settings_for(model_dir)), ready_path="/readyz") as url:
        request = dict(prompt=PROMPTS, n=4, max_tokens=12, temperature=1.0, logprobs=0, seed=1234)
        first, second = complete(url, **request), complete(url, **request)
        other = complete(url, **(request | {"seed": 99}))
    ids = [[c["token_ids"] for c in b["choices"]] for b in (first, second, other)]
    assert ids[0] == ids[1] and ids[0] != ids[2]
    assert [c["logprobs"]["token_logprobs"] for c in first["choices"]] == [
        c["logprobs"]["token_logprobs"] for c in second["choices"]
    ]


def test_greedy_is_deterministic_and_prompt_ids_are_accepted(app_server, model_dir, policy):
    with app_server(create_app(settings_for(model_dir)), ready_path="/readyz") as url:
        by_text = complete(url, prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=0)
        ids = policy.encode_prompt(PROMPTS[0])
        by_ids = complete(url, prompt=ids, n=2, max_tokens=8, temperature=0)
    assert by_text["choices"][0]["prompt_token_ids"] == ids
    assert (
        by_text["choices"][0]["token_ids"]
        == by_ids["choices"][0]["token_ids"]
        == by_ids["choices"][1]["token_ids"]
    )
    assert by_ids["choices"][0]["logprobs"] is None  # only returned when asked for


def test_concurrent_requests_all_succeed_and_rows_are_not_mixed(app_server, model_dir, policy):
    app = create_app(settings_for(model_dir))
    with app_server(app, ready_path="/readyz") as url:

        def one(i: int) -> list[CompletionChoice]:
            with InferenceClient(url) as client:
                req = CompletionRequest(prompt=[f"{i}+{i}=", f"{i}-1+{i}="], n=3, max_tokens=10, logprobs=0)
                return client.complete(req).choices

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(8)))
        stats = app.state.service.engine.stats
    for i, choices in enumerate(results):
        assert [c.index for c in choices] == list(range(6))
        assert choices[0].prompt_token_ids == policy.encode_prompt(f"{i}+{i}=")
        assert choices[3].prompt_token_ids == policy.encode_prompt(f"{i}-1+{i}=")
        assert recompute_diff(policy, [c.model_dump() for c in choices], 1.0) < 1e-4
    assert stats["sequences"] == 8 * 6 and stats["batches"] <= 8


# --- weight swaps -----------------------------------------------------------------------------------


def test_admin_weight_swap_serves_new_weights(app_server, model_dir, policy, tmp_path):
    new_policy, new_weights = perturbed(model_dir, seed=1)
    a = WeightStore(tmp_path / "weights").publish(1, new_weights)
    with app_server(create_app(settings_for(model_dir)), ready_path="/readyz") as url:
        before = complete(url, prompt=PROMPTS, n=4, max_tokens=12, logprobs=0)
        response = post_weights(url, a)
        assert response.status_code == 200, response.text
        assert response.json()["policy_version"] == 1 and response.json()["changed"] is True
        assert served_version(url) == 1
        again = post_weights(url, a)  # idempotent
        assert again.status_code == 200 and again.json()["changed"] is False
        after = complete(url, prompt=PROMPTS, n=4, max_tokens=12, logprobs=0)
        metrics = httpx.get(f"{url}/metrics").text
    assert all(c["policy_version"] == 0 for c in before["choices"])
    assert all(c["policy_version"] == 1 for c in after["choices"])
    assert recompute_diff(new_policy, after["choices"], 1.0) < 1e-4
    assert recompute_diff(policy, after["choices"], 1.0) > 1e-3
    assert "r2vpo_inference_policy_version 1.0" in metrics
    assert "r2vpo_inference_weight_swap_seconds_count 1.0" in metrics


def test_completions_during_a_swap_carry_the_version_that_generated_them(
    app_server, model_dir, policy, tmp_path
):
    new_policy, new_weights = perturbed(model_dir, seed=4)
    a = WeightStore(tmp_path / "weights").publish(1, new_weights)
    policies = {0: policy, 1: new_policy}
    with app_server(create_app(settings_for(model_dir)), ready_path="/readyz") as url:

        def one(i: int) -> list[dict]:
            time.sleep(0.01 * i)
            return complete(url, prompt=PROMPTS, n=8, max_tokens=24, logprobs=0)["choices"]

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one, i) for i in range(12)]
            time.sleep(0.05)
            assert post_weights(url, a).status_code == 200
            results = [f.result() for f in futures]
    versions = set()
    for choices in results:
        assert len({c["policy_version"] for c in choices}) == 1  # one request: one batch, one version
        for version in {c["policy_version"] for c in choices}:
            versions.add(version)
            same = [c for c in choices if c["policy_version"] == version]
            assert recompute_diff(policies[version], same, 1.0) < 1e-4
    assert 1 in versions


def test_redis_announcement_is_picked_up_by_watcher(app_server, model_dir, policy, redis_url, tmp_path):
    store = WeightStore(tmp_path / "weights")
    settings = settings_for(model_dir, watch_weights=True, redis_url=redis_url, weights_poll_s=0.2)
    with app_server(create_app(settings), ready_path="/readyz") as url:
        assert served_version(url) == 0
        new_policy, new_weights = perturbed(model_dir, seed=2)
        announce(redis_url, store.publish(2, new_weights))
        wait_for_version(url, 2)
        after = complete(url, prompt=PROMPTS, n=4, max_tokens=12, logprobs=0)
    assert all(c["policy_version"] == 2 for c in after["choices"])
    assert recompute_diff(new_policy, after["choices"], 1.0) < 1e-4


def test_restart_serves_latest_announced_weights(app_server, model_dir, policy, redis_url, tmp_path):
    store = WeightStore(tmp_path / "weights")
    v3_policy, v3 = perturbed(model_dir, seed=3)
    announce(redis_url, store.publish(3, v3))
    settings = settings_for(model_dir, watch_weights=True, redis_url=redis_url)
    with app_server(create_app(settings), ready_path="/readyz") as url:
        assert served_version(url) == 3  # ready only after catching up with the announcement
        body = complete(url, prompt=PROMPTS, n=2, max_tokens=12, logprobs=0)
    assert recompute_diff(v3_policy, body["choices"], 1.0) < 1e-4


def test_unreachable_redis_keeps_serving(app_server, model_dir):
    settings = settings_for(model_dir, watch_weights=True, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with app_server(create_app(settings), ready_path="/readyz") as url:
        assert complete(url, prompt=PROMPTS[0], max_tokens=4)["choices"][0]["policy_version"] == 0


def test_engine_load_failure_is_reported_not_served(app_server, tmp_path):
    settings = settings_for(tmp_path / "no-such-model")
    with app_server(create_app(settings), ready_path="/metrics") as url:
        deadline = time.monotonic() + 20
        while (health := httpx.get(f"{url}/healthz")).status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ready = httpx.get(f"{url}/readyz")
        response = httpx.post(f"{url}/v1/completions", json={"prompt": "1+2="})
    assert health.status_code == 500 and "does not exist" in health.json()["error"]
    assert ready.status_code == 503
    assert response.status_code == 503 and "failed to load" in response.json()["error"]["message"]


# --- rejections ---------------------------------------------------------------------------------------


def _corrupt(kind: str, store: WeightStore, model_dir: Path) -> WeightsAnnouncement:
    """A version-5 announcement that must be rejected, made the way `kind` says."""
    _, good = perturbed(model_dir, seed=5)
    a = store.publish(5, good)
    path = uri_path(a)
    if kind == "wrong_sha256":
        return a.model_copy(update={"sha256": "0" * 64})
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return a
    bad = dict(good)
    if kind == "nan":
        bad["model.norm.weight"] = bad["model.norm.weight"].clone().fill_(float("nan"))
    elif kind == "wrong_shape":
        bad["model.norm.weight"] = torch.ones(bad["model.norm.weight"].shape[0] + 1)
    data = save({k: v.detach().clone() for k, v in bad.items()})  # clones: no shared (tied) memory
    path.write_bytes(data)
    return a.model_copy(update={"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})


@pytest.mark.parametrize("kind", ["wrong_sha256", "nan", "wrong_shape", "truncated"])
def test_corrupt_weights_are_rejected_and_old_version_keeps_serving(
    app_server, model_dir, policy, tmp_path, kind
):
    a = _corrupt(kind, WeightStore(tmp_path / "weights"), model_dir)
    with app_server(create_app(settings_for(model_dir)), ready_path="/readyz") as url:
        response = post_weights(url, a)
        assert response.status_code in (400, 422), response.text
        assert response.json()["error"]["message"]
        assert served_version(url) == 0
        body = complete(url, prompt=PROMPTS, n=2, max_tokens=12, logprobs=0)
        metrics = httpx.get(f"{url}/metrics").text
    assert all(c["policy_version"] == 0 for c in body["choices"])
    assert recompute_diff(policy, body["choices"], 1.0) < 1e-4
    assert 'r2vpo_inference_weight_rejections_total{reason="verification"} 1.0' in metrics


def test_watcher_skips_rejected_announcement_and_applies_the_next(
    app_server, model_dir, policy, redis_url, tmp_path
):
    store = WeightStore(tmp_path / "weights")
    settings = settings_for(model_dir, watch_weights=True, redis_url=redis_url, weights_poll_s=0.2)
    app = create_app(settings)
    with app_server(app, ready_path="/readyz") as url:
        announce(redis_url, _corrupt("nan", store, model_dir))
        deadline = time.monotonic() + 20
        while not app.state.service.rejected:
            assert time.monotonic() < deadline, "the NaN announcement was never looked at"
            time.sleep(0.05)
        assert served_version(url) == 0
        announce(redis_url, store.publish(6, perturbed(model_dir, seed=6)[1]))
        wait_for_version(url, 6)
    assert list(app.state.service.rejected) == [(5, next(iter(app.state.service.rejected))[1])]


@pytest.mark.parametrize(("token", "status"), [(None, 401), ("wrong-token", 403)])
def test_admin_endpoint_needs_the_token(app_server, model_dir, policy, tmp_path, token, status):
    a = WeightStore(tmp_path / "weights").publish(1, perturbed(model_dir, seed=1)[1])
    with app_server(create_app(settings_for(model_dir)), ready_path="/readyz") as url:
        response = post_weights(url, a, token=token)
        assert response.status_code == status
        assert served_version(url) == 0


def test_refuses_to_start_without_admin_token_on_public_host(model_dir):
    with pytest.raises(ValueError, match="admin token"):
        create_app(settings_for(model_dir, host="0.0.0.0", admin_token=None, local_only=False))
    with pytest.raises(ValueError, match="admin token"):
        create_app(settings_for(model_dir, host="0.0.0.0", admin_token=None, local_only=True))


def test_local_only_loopback_allows_admin_without_token(app_server, model_dir, policy, tmp_path):
    a = WeightStore(tmp_path / "weights").publish(1, perturbed(model_dir, seed=1)[1])
    settings = settings_for(model_dir, admin_token=None, local_only=True, host="127.0.0.1")
    with app_server(create_app(settings), ready_path="/readyz") as url:
        assert post_weights(url, a, token=None).status_code == 200
        assert served_version(url) == 1


# --- bad input ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_input_url(model_dir):
    """One server for all the bad-input cases (they change nothing)."""
    with serve_app(create_app(settings_for(model_dir)), ready_path="/readyz") as url:
        yield url


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"prompt": "1+2=", "n": 0}, 422, "n"),
        ({"prompt": "1+2=", "max_tokens": -1}, 422, "max_tokens"),
        ({"prompt": "1+2=", "temperature": -1}, 422, "temperature"),
        ({"max_tokens": 4}, 422, "prompt"),
        ({"prompt": "1+" * 30}, 413, "limit"),
        ({"prompt": "1+2=", "n": 9}, 400, "n=9"),
        ({"prompt": "1+2=", "max_tokens": 33}, 400, "max_tokens"),
        ({"prompt": "1+2=" * 10, "max_tokens": 32}, 400, "context length"),
        ({"prompt": [1, 5, 100000]}, 400, "token ids"),
        ({"prompt": []}, 400, "empty"),
        ({"prompt": "1+2=", "stream": True}, 400, "stream"),
        ({"prompt": "1+2=", "model": "gpt-4"}, 404, "gpt-4"),
        ({"prompt": {"what": "ever"}, "n": "many"}, 422, "prompt"),
        ({"prompt": "1+2=", "seed": 2**70}, 400, "seed"),
        ({"prompt": [[1, 5], []]}, 400, "prompt 1 has no tokens"),
        ([1, 2, 3], 422, "invalid"),
        (b"{not json", 422, "JSON"),
    ],
)
def test_bad_input_is_a_readable_4xx(bad_input_url, body, status, words):
    if isinstance(body, bytes):
        headers = {"Content-Type": "application/json"}
        response = httpx.post(f"{bad_input_url}/v1/completions", content=body, headers=headers, timeout=30)
    else:
        response = httpx.post(f"{bad_input_url}/v1/completions", json=body, timeout=30)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]["message"]


# --- the typed client -------------------------------------------------------------------------------------


def test_client_reports_server_message_and_retries_unreachable(app_server, model_dir):
    async def body(url: str) -> None:
        async with AsyncInferenceClient(url, retries=1, backoff=0.01) as client:
            assert await client.health()
            assert (await client.models()).data[0].policy_version == 0
            with pytest.raises(InferenceError, match="n=9 exceeds") as err:
                await client.complete(CompletionRequest(prompt="1+2=", n=9))
            assert err.value.status_code == 400
        async with AsyncInferenceClient(f"http://127.0.0.1:{free_port()}", retries=2, backoff=0.01) as dead:
            assert not await dead.health()
            started = time.monotonic()
            with pytest.raises(InferenceError) as err:
                await dead.models()
            assert err.value.status_code is None and time.monotonic() - started >= 0.03  # slept 0.01 + 0.02

    with app_server(create_app(settings_for(model_dir)), ready_path="/readyz") as url:
        asyncio.run(body(url))

"""Fuzz every service's OpenAPI schema with schemathesis against real uvicorn servers: schema-valid and
schema-violating requests alike must never get a 5xx, and every 4xx carries a readable message.

Bounded: `MAX_EXAMPLES` per operation and generation mode (positive, negative), no deadline, derandomized
(the same cases every run). The inference service runs an untrained tiny model with small limits so that
no generated request can take long.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import httpx
import pytest
import schemathesis
from conftest import serve_app
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
MAX_EXAMPLES = 30
TOKEN = "fuzz-admin-token"


def _readable(body: bytes) -> bool:
    """A 4xx body says what was wrong: JSON with a non-empty message string, or non-empty text."""
    try:
        data = json.loads(body)
    except ValueError:
        return bool(body.strip())
    strings = []

    def walk(value) -> None:
        if isinstance(value, str):
            strings.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(data)
    return any(s.strip() for s in strings)


def fuzz(
    base_url: str, *, headers: dict[str, str] | None = None, max_examples: int = MAX_EXAMPLES
) -> Counter:
    """Run the fuzzer over every operation; returns (operation, status) counts. Fails listing every 5xx and
    every unreadable 4xx (collected, not raised, so one run shows them all and nothing is shrunk)."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    seen: Counter = Counter()
    problems: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert operations
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzz_one(operation, mode, base_url, headers, max_examples, seen, problems)
            except Unsatisfiable:  # negative mode on an operation with nothing to violate (no inputs)
                assert mode == GenerationMode.NEGATIVE, operation.label
    assert not problems, "\n".join(problems[:20])
    return seen


def _fuzz_one(operation, mode, base_url, headers, max_examples, seen: Counter, problems: list[str]) -> None:
    label = operation.label

    @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=operation.as_strategy(generation_mode=mode))
    def one(case) -> None:
        response = case.call(base_url=base_url, headers=headers, timeout=60)
        seen[(label, response.status_code)] += 1
        if response.status_code >= 500:
            problems.append(f"{label} -> {response.status_code}: {case.as_curl_command()}")
        elif response.status_code >= 400 and not _readable(response.content):
            problems.append(f"{label} -> unreadable {response.status_code}: {response.content!r}")

    one()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from trainer.policy import Policy
    from trainer.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("fuzz") / "tiny"
    Policy(*build_tiny_model()).save(path)
    return path


def test_inference_api_never_answers_5xx(tiny_model):
    from services.inference import InferenceSettings, create_app

    settings_ = InferenceSettings(model=tiny_model, watch_weights=False, admin_token=TOKEN, max_n=4,
                                  max_tokens_limit=8, max_prompt_tokens=32, torch_threads=1)  # fmt: skip
    with serve_app(create_app(settings_), ready_path="/readyz") as url:
        seen = fuzz(url)
        seen_with_token = fuzz(url, headers={"Authorization": f"Bearer {TOKEN}"}, max_examples=10)
        # Still serving after all that; the limits (n, max_tokens, prompt length) were what refused them.
        ok = httpx.post(f"{url}/v1/completions", json={"prompt": "1+2=", "n": 2, "max_tokens": 4}, timeout=30)
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
    completions = {status for op, status in seen if op == "POST /v1/completions"}
    assert {400, 422} <= completions
    assert {s for op, s in seen if op == "POST /admin/load_weights"} <= {400, 401, 403, 413, 422}
    assert any(op == "POST /admin/load_weights" and s != 401 for op, s in seen_with_token)


def test_reward_api_never_answers_5xx():
    from services.reward import RewardSettings, create_app

    with serve_app(create_app(RewardSettings())) as url:
        seen = fuzz(url)
    assert 422 in {status for op, status in seen if op == "POST /score"}  # e.g. metadata without an entry


def test_dashboard_api_never_answers_5xx(tmp_path, redis_url):
    from services.dashboard import DashboardSettings, create_app

    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    rows = [{"step": i, "version": i, "reward_mean": 0.1 * i, "accuracy": 0.5} for i in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.json").write_text(json.dumps({"redis_url": "redis://:secret@h:1/0"}))
    settings_ = DashboardSettings(runs_root=tmp_path / "runs", redis_url=redis_url)
    with serve_app(create_app(settings_)) as url:
        fuzz(url)


def test_learner_api_never_answers_5xx(tiny_model, tmp_path, redis_url):
    from services.learner.app import create_app
    from services.learner.service import LearnerSettings

    settings_ = LearnerSettings(model=tiny_model, run_dir=tmp_path / "run", redis_url=redis_url,
                                task={"heldout_size": 5}, max_new_tokens=2, torch_threads=1)  # fmt: skip
    with serve_app(create_app(settings_), ready_path="/readyz") as url:
        fuzz(url)


def test_rollout_api_never_answers_5xx(redis_url):
    from services.redis_server import free_port
    from services.rollout.app import create_app
    from services.rollout.worker import RolloutSettings

    dead = f"http://127.0.0.1:{free_port()}"  # nothing to call: the worker backs off, the API still answers
    settings_ = RolloutSettings(redis_url=redis_url, inference_url=dead, reward_url=dead, inference_retries=0,
                                retry_backoff_s=0.5)  # fmt: skip
    with serve_app(create_app(settings_)) as url:
        fuzz(url)


def test_oversized_bodies_get_413_before_being_parsed(tiny_model):
    from services.inference import InferenceSettings
    from services.inference import create_app as inference_app
    from services.reward import RewardSettings
    from services.reward import create_app as reward_app

    inference = inference_app(InferenceSettings(model=tiny_model, watch_weights=False, admin_token=TOKEN,
                                                max_body_bytes=65536, torch_threads=1))  # fmt: skip
    huge = json.dumps({"prompt": "1+" * 1_000_000, "id": "x", "completion": "y"}).encode()

    def chunked():  # no Content-Length: the limit is enforced while reading
        for _ in range(40):
            yield b"[" + b"1," * 50_000

    with serve_app(inference, ready_path="/readyz") as inf, serve_app(reward_app(RewardSettings())) as rew:
        for url in (
            f"{inf}/v1/completions",
            f"{inf}/admin/load_weights",
            f"{rew}/score",
            f"{rew}/score_batch",
        ):
            for body in (huge, chunked()):
                response = httpx.post(
                    url, content=body, headers={"Content-Type": "application/json"}, timeout=30
                )
                assert response.status_code == 413, (url, response.text[:200])
                assert "larger than" in response.text

"""Concurrent HTTP clients of the inference service (torch engine, untrained tiny model, real uvicorn): each
request gets its own prompts' n completions, text decoded off the event loop, and a seeded request the same
samples whether it ran alone or batched with the others."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from conftest import serve_app
from engine_helpers import save_tiny_policy

from services.inference import InferenceSettings, create_app
from trainer.policy import Policy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
N = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_policy(tmp_path_factory.mktemp("tiny") / "tiny")


def body(i: int) -> dict:
    """Request `i`: two prompts of its own; a seed for even `i` only."""
    seed = {"seed": 100 + i} if i % 2 == 0 else {}
    return {"prompt": [f"{i}+{i}=", f"{i}-1+{i}="], "n": N, "max_tokens": 10, "logprobs": 0} | seed


def post(url: str, i: int) -> list[dict]:
    response = httpx.post(f"{url}/v1/completions", json=body(i), timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"]


def test_concurrent_requests_get_their_own_completions_and_seeds_hold(model_dir):
    policy = Policy.from_pretrained(model_dir)
    settings = InferenceSettings(model=model_dir, watch_weights=False,
                                 local_only=True, host="127.0.0.1", max_n=8, max_tokens_limit=32)  # fmt: skip
    with serve_app(create_app(settings), ready_path="/readyz") as url:
        alone = {i: post(url, i) for i in range(0, 8, 2)}
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda i: post(url, i), range(8)))
    for i, choices in enumerate(together):
        prompts = [policy.encode_prompt(p) for p in body(i)["prompt"]]
        assert [c["index"] for c in choices] == list(range(2 * N))
        assert [c["prompt_token_ids"] for c in choices] == [prompts[0]] * N + [prompts[1]] * N
        assert all(c["text"] == policy.decode(c["token_ids"]) for c in choices)
        with torch.no_grad():  # the log-probs of these tokens after these prompts: rows not mixed up
            out = policy.token_logprobs([c["prompt_token_ids"] for c in choices],
                                        [c["token_ids"] for c in choices])  # fmt: skip
        for k, c in enumerate(choices):
            served = torch.tensor(c["logprobs"]["token_logprobs"])
            assert (served - out.logp[k, : len(served)]).abs().max().item() < 1e-4
        if i in alone:
            assert [c["token_ids"] for c in choices] == [c["token_ids"] for c in alone[i]]

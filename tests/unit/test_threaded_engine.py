"""The worker-thread machinery both engines share (`ThreadedEngine`), on a fake engine without a model:
request and weight checks, swaps between batches, and waiters failing (not hanging) on close or death."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Mapping

import pytest
import torch
from engine_helpers import queued_together
from torch import Tensor

from services.inference.engine import EngineClosed, Generation, InferenceEngine
from services.inference.threaded_engine import Reply, SamplingRequest, ThreadedEngine

pytestmark = pytest.mark.timeout(60)


class EchoEngine(ThreadedEngine):
    """Answers each prompt with itself, tagged with the version it was served by. While `paused` (set
    under `_cond`) the worker leaves its queues alone."""

    engine_label = "echo engine"

    def __init__(self, *, fail_swap: bool = False, die: bool = False) -> None:
        super().__init__(max_batch_size=4, version=0)
        self.model_name = "echo"
        self._template = {
            "embed": torch.empty(3, 2, device="meta"),
            "head": torch.empty(3, 2, device="meta"),
        }
        self._aliases = {"head": "embed"}
        self._max_model_len = 32
        self._vocab_size = 10
        self.stats = {"swaps": 0}
        self.weights: dict[str, Tensor] = {}
        self.paused = False
        self.fail_swap, self.die = fail_swap, die
        self._jobs: collections.deque[tuple[Reply, SamplingRequest]] = collections.deque()
        self._start_worker("echo-engine")

    def encode(self, text: str) -> list[int]:
        return [int(c) for c in text]

    def decode(self, token_ids: list[int]) -> str:
        return "".join(map(str, token_ids))

    async def _generate(self, request: SamplingRequest) -> list[list[Generation]]:
        job = Reply()
        return await self._submit(job, lambda r: self._jobs.append((r, request)))

    def _check_weights(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        self._check_weight_names(state_dict)
        for name, tensor in state_dict.items():
            self._check_tensor(name, tensor)
        return dict(state_dict)

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (self.paused or not (self._jobs or self._staged)):
                    self._cond.wait()
                if self._closed:
                    return
                if self.die:
                    raise RuntimeError("boom")
                staged, self._staged = self._staged, []
                jobs = [] if staged else list(self._jobs)
                if jobs:
                    self._jobs.clear()
            for stage in staged:
                self._apply(stage)
            for job, request in jobs:
                gen = [Generation(list(p), [0.0] * len(p), "length", self._version) for p in request.prompts]
                job.answer([[g] * request.n for g in gen])

    def _swap_in(self, weights: dict[str, Tensor]) -> None:
        if self.fail_swap:
            raise OSError("disk on fire")
        self.weights = weights


@pytest.fixture
def engine():
    eng = EchoEngine()
    yield eng
    eng.close()


def pause(engine: EchoEngine) -> None:
    with engine._cond:
        engine.paused = True


def good_weights(value: float = 1.0) -> dict[str, Tensor]:
    return {"embed": torch.full((3, 2), value), "head": torch.full((3, 2), value)}


def test_the_fake_engine_implements_the_interface(engine):
    assert isinstance(engine, InferenceEngine)
    assert (engine.version, engine.max_model_len, engine.vocab_size) == (0, 32, 10)
    assert set(engine.state_dict_template()) == {"embed", "head"}


def test_generate_answers_each_prompt_n_times_and_empty_prompts_need_no_worker(engine):
    gens = asyncio.run(engine.generate([[1, 2], [3]], n=2))
    assert [[g.token_ids for g in per_prompt] for per_prompt in gens] == [[[1, 2], [1, 2]], [[3], [3]]]
    pause(engine)  # an empty request must not reach the worker
    assert asyncio.run(engine.generate([])) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n and max_tokens must be >= 1"),
        ({"max_tokens": 0}, "n and max_tokens must be >= 1"),
        ({"temperature": -0.5}, "need temperature >= 0"),
        ({"top_p": 0.0}, "0 < top_p <= 1"),
        ({"top_p": 1.5}, "0 < top_p <= 1"),
        ({"prompts": [[1], []]}, "prompt 1 has no tokens"),
        ({"prompts": [[1] * 20], "max_tokens": 13}, "maximum context length of 32 tokens"),
        ({"prompts": [[10]]}, r"token ids must lie in \[0, 10\)"),
        ({"prompts": [[-1]]}, r"token ids must lie in \[0, 10\)"),
    ],
)
def test_bad_requests_are_refused_before_queueing(engine, kwargs, message):
    prompts = kwargs.pop("prompts", [[1, 2]])
    with pytest.raises(ValueError, match=message):
        asyncio.run(engine.generate(prompts, **kwargs))


def test_a_swap_serves_the_next_requests_and_older_versions_are_noops(engine):
    assert asyncio.run(engine.generate([[1]]))[0][0].policy_version == 0
    assert asyncio.run(engine.load_weights(good_weights(), 3)) is True
    assert engine.version == 3 and engine.stats["swaps"] == 1
    assert asyncio.run(engine.generate([[1]]))[0][0].policy_version == 3
    assert asyncio.run(engine.load_weights(good_weights(2.0), 3)) is False
    assert asyncio.run(engine.load_weights(good_weights(2.0), 2)) is False
    assert engine.version == 3 and float(engine.weights["embed"][0, 0]) == 1.0


def test_a_tied_alias_may_be_left_out(engine):
    assert asyncio.run(engine.load_weights({"embed": torch.ones(3, 2)}, 1)) is True


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"head": torch.ones(3, 2)}, r"missing \['embed'\]"),
        (good_weights() | {"extra": torch.ones(1)}, r"unexpected \['extra'\]"),
        (good_weights() | {"head": torch.ones(2, 3)}, r"head: got \(2, 3\) torch.float32"),
        (good_weights() | {"head": torch.ones(3, 2, dtype=torch.float64)}, "torch.float64"),
        (good_weights() | {"embed": torch.full((3, 2), float("nan"))}, "embed holds NaN"),
        (good_weights() | {"embed": torch.full((3, 2), float("inf"))}, "embed holds NaN or infinite"),
    ],
)
def test_bad_weights_are_refused_and_the_old_version_keeps_serving(engine, weights, message):
    with pytest.raises(ValueError, match=message):
        asyncio.run(engine.load_weights(weights, 1))
    assert engine.version == 0 and engine.stats["swaps"] == 0
    assert asyncio.run(engine.generate([[1]]))[0][0].policy_version == 0


def test_a_failing_swap_reaches_its_caller_and_the_engine_keeps_serving():
    engine = EchoEngine(fail_swap=True)
    try:
        with pytest.raises(OSError, match="disk on fire"):
            asyncio.run(engine.load_weights(good_weights(), 1))
        assert engine.version == 0
        assert asyncio.run(engine.generate([[1]]))[0][0].policy_version == 0
    finally:
        engine.close()


def test_close_fails_waiting_requests_and_refuses_new_ones(engine):
    async def scenario() -> None:
        pause(engine)
        waiting = [asyncio.create_task(engine.generate([[1]])) for _ in range(3)]
        swap = asyncio.create_task(engine.load_weights(good_weights(), 1))
        while len(engine._jobs) < 3 or not engine._staged:  # all queued behind the paused worker
            await asyncio.sleep(0.01)
        await asyncio.to_thread(engine.close)
        for task in [*waiting, swap]:
            with pytest.raises(EngineClosed, match="the engine is closed"):
                await task
        with pytest.raises(EngineClosed):
            await engine.generate([[1]])
        with pytest.raises(EngineClosed):
            await engine.load_weights(good_weights(), 2)

    asyncio.run(scenario())


def test_a_dying_worker_fails_its_waiters_instead_of_hanging_them(caplog):
    engine = EchoEngine(die=True)
    try:
        with pytest.raises(EngineClosed, match="the engine worker died: RuntimeError"):
            asyncio.run(engine.generate([[1]]))
        engine._worker.join(timeout=10)
        assert "echo engine worker died" in caplog.text
        with pytest.raises(EngineClosed, match="the engine is closed"):
            asyncio.run(engine.generate([[1]]))
    finally:
        engine.close()


class FatalSwapEngine(EchoEngine):
    """Like `VllmEngine`: a swap that fails after the checks passed stops the worker."""

    def _swap_failed(self, stage, exc: Exception) -> None:
        stage.fail(EngineClosed(f"weight reload failed: {exc!r}"))
        raise exc


def test_updates_queued_behind_a_fatal_swap_fail_instead_of_hanging():
    """Three updates staged together; the first one's swap stops the worker: all three get an answer."""
    engine = FatalSwapEngine(fail_swap=True)
    calls = [engine.load_weights(good_weights(float(v)), v) for v in (1, 2, 3)]
    try:
        results = asyncio.run(queued_together(engine, calls, lambda: len(engine._staged) == 3))
    finally:
        engine.close()
    assert all(isinstance(r, EngineClosed) for r in results), results
    messages = sorted(str(r) for r in results)  # staged in the order their checks finished
    assert messages == ["the engine worker died: OSError('disk on fire')"] * 2 + [
        "weight reload failed: OSError('disk on fire')"
    ]
    assert engine.version == 0

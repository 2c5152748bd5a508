"""A vLLM weight reload that fails stops the engine's worker (the weights vLLM holds are then unknown): every
update and request queued with it gets an error, none waits forever. Its own engine, since this one dies
(a module of its own: one in-process vLLM engine per process, and test_vllm_engine.py's is closed by now).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from engine_helpers import WAIT_S, queued_together

from services.inference.engine import EngineClosed
from services.inference.vllm_engine import VllmEngine
from trainer.policy import Policy
from trainer.tiny import build_tiny_model

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning"),  # vLLM's
]


def test_updates_queued_behind_a_failed_reload_fail_instead_of_hanging(tmp_path: Path, monkeypatch):
    model, tokenizer = build_tiny_model()
    Policy(model, tokenizer).save(tmp_path / "tiny")
    state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
    engine = VllmEngine(tmp_path / "tiny", seed=0, max_batch_size=8, kv_cache_memory_bytes=64 << 20)
    try:
        assert asyncio.run(engine.generate([[1, 20, 21]], max_tokens=4))[0][0].policy_version == 0

        def failing_rpc(method: str, *args, **kwargs) -> None:
            raise RuntimeError(f"{method} failed on a worker")

        monkeypatch.setattr(engine.llm, "collective_rpc", failing_rpc)
        calls = [engine.load_weights(state_dict, version) for version in (1, 2, 3)]
        calls.append(engine.generate([[1, 20, 21]], max_tokens=4))
        ready = lambda: len(engine._staged) == 3 and len(engine._queue) == 1  # noqa: E731
        results = asyncio.run(queued_together(engine, calls, ready))
        assert all(isinstance(r, EngineClosed) for r in results), results
        assert sum("weight reload failed" in str(r) for r in results) == 1
        assert sum("the engine worker died" in str(r) for r in results) == 3
        engine._worker.join(timeout=WAIT_S)
        assert not engine._worker.is_alive() and engine.version == 0
        with pytest.raises(EngineClosed, match="the engine is closed"):
            asyncio.run(engine.generate([[1, 20, 21]]))
    finally:
        engine.close()

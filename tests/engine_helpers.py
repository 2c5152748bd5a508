"""For the engine tests: a tiny model on disk, and work queued on a `ThreadedEngine` while its worker is
held, so that the worker takes it all in one go (every wait bounded)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from trainer.policy import Policy
from trainer.tiny import build_tiny_model

WAIT_S = 30.0  # the longest any test waits on an engine


def save_tiny_policy(path: Path) -> Path:
    """An untrained tiny policy saved at `path` (fast: no warm start); returns `path`."""
    model, tokenizer = build_tiny_model()
    Policy(model, tokenizer).save(path)
    return path


async def queued_together(engine: Any, calls: list[Awaitable], ready: Callable[[], bool]) -> list:
    """Start `calls` while this thread owns the worker's lock (re-entrant: `_submit` on this thread still
    gets in), release it once `ready()` says all are queued; their results or exceptions, in order."""
    engine._cond.acquire()
    try:
        tasks = [asyncio.ensure_future(c) for c in calls]

        async def until_ready() -> None:
            while not ready():
                await asyncio.sleep(0.01)

        await asyncio.wait_for(until_ready(), WAIT_S)
    finally:
        engine._cond.release()
    return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WAIT_S)

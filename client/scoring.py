"""The scoring function's contract and the core of a reward service, testable without HTTP.

A scoring function is `fn(prompt, completion, metadata) -> float | Score` (sync or async). `as_score`
checks what it returned; `RewardScorer` calls it under a time limit and a concurrency limit and turns every
failure into a `ScoringError` carrying the HTTP status it maps to.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import numbers
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from client.reward_metrics import RewardMetrics
from client.schemas import ScoreRequest, ScoreResponse

__all__ = ["RewardScorer", "Score", "ScoreFn", "ScoreValue", "ScoringError", "as_score"]

log = logging.getLogger("r2vpo.reward")


class Score(BaseModel):
    """What a scoring function may return instead of a bare float: the reward plus free-form details."""

    model_config = ConfigDict(extra="forbid")

    reward: float
    details: dict[str, Any] = Field(default_factory=dict)


ScoreValue = float | Score
ScoreFn = Callable[[str, str, dict[str, Any]], ScoreValue | Awaitable[ScoreValue]]


class ScoringError(Exception):
    """A failed scoring call: the HTTP status it maps to, a metrics `kind`, and a readable message."""

    def __init__(self, status_code: int, kind: str, error: str, detail: Any = None) -> None:
        super().__init__(error)
        self.status_code, self.kind, self.error, self.detail = status_code, kind, error, detail


def as_score(value: Any, reward_range: tuple[float, float] | None = None) -> Score:
    """Check what a scoring function returned: a finite number (bools count as 0/1) or a Score, in range."""
    if isinstance(value, (Score, ScoreResponse)):
        reward, details = value.reward, value.details
    elif isinstance(value, numbers.Real):
        reward, details = float(value), {}
    else:
        raise ScoringError(
            500,
            "not_a_number",
            f"scoring function returned {type(value).__name__}, expected a number or Score",
        )
    if not math.isfinite(reward):
        raise ScoringError(500, "non_finite", f"scoring function returned a non-finite reward ({reward})")
    if reward_range is not None and not reward_range[0] <= reward <= reward_range[1]:
        raise ScoringError(
            500,
            "out_of_range",
            f"reward {reward} outside the declared range [{reward_range[0]}, {reward_range[1]}]",
        )
    try:
        details = json.loads(json.dumps(details, default=str, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ScoringError(500, "invalid_details", f"details are not JSON-serialisable: {exc}") from exc
    return Score(reward=reward, details=details)


class RewardScorer:
    """The core of a reward service, testable without HTTP: calls the function under a time limit
    (sync functions on a worker thread, so the event loop never blocks) and checks what it returns."""

    def __init__(
        self,
        fn: ScoreFn,
        *,
        reward_range: tuple[float, float] | None = None,
        timeout_s: float = 5.0,
        max_concurrency: int = 32,
        metrics: RewardMetrics | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"scoring function must be callable, got {type(fn).__name__}")
        if reward_range is not None and not reward_range[0] <= reward_range[1]:
            raise ValueError(f"reward_range must be (lo, hi) with lo <= hi, got {reward_range}")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.fn, self.reward_range, self.timeout_s = fn, reward_range, timeout_s
        self.metrics = metrics or RewardMetrics()
        call = getattr(fn, "__call__", None)  # noqa: B004  (an object with `async def __call__`)
        self._is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)
        self._slots = asyncio.Semaphore(max_concurrency)  # waiting for a slot does not use up the time limit

    async def _invoke(self, request: ScoreRequest) -> Any:
        args = (request.prompt, request.completion, dict(request.metadata))
        try:
            result = await self.fn(*args) if self._is_async else await run_in_threadpool(self.fn, *args)
            return await result if inspect.isawaitable(result) else result
        except ScoringError:
            raise  # the function chose the status itself (e.g. 422: this request cannot be scored)
        except Exception as exc:
            log.exception("scoring function raised on request %s", request.id)
            raise ScoringError(
                500,
                "exception",
                f"scoring function raised {type(exc).__name__}: {exc}",
                {"type": type(exc).__name__},
            ) from exc

    async def score(self, request: ScoreRequest) -> ScoreResponse:
        """Score one request or raise ScoringError."""
        async with self._slots:
            start = time.perf_counter()
            try:
                try:
                    value = await asyncio.wait_for(self._invoke(request), self.timeout_s)
                except asyncio.TimeoutError:
                    raise ScoringError(
                        504, "timeout", f"scoring function took longer than {self.timeout_s}s"
                    ) from None
                score = as_score(value, self.reward_range)
            except ScoringError as err:
                self.metrics.error(err.kind)
                raise
            finally:
                self.metrics.call(time.perf_counter() - start)
        return ScoreResponse(reward=score.reward, details=score.details)

    async def score_batch(self, items: list[ScoreRequest]) -> list[ScoreResponse]:
        """Score all items concurrently, results in order; any failure fails the whole batch."""
        results = await asyncio.gather(*(self.score(item) for item in items), return_exceptions=True)
        for index, result in enumerate(results):
            if isinstance(result, ScoringError):
                raise ScoringError(
                    result.status_code, result.kind, f"item {index} (id {items[index].id!r}): {result.error}",
                    {"index": index, "id": items[index].id, "detail": result.detail},
                )  # fmt: skip
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]

"""The FastAPI reward service over a scoring function: the contract of DESIGN §3.

`POST /score`, `POST /score_batch`, `GET /healthz`, `GET /readyz`, `GET /metrics`. A failure is an HTTP
error with an `ErrorResponse` body, never a reward of 0: the function raised (500), returned a non-number /
non-finite / out-of-range value (500), ran past `timeout_s` (504), the body was malformed (422) or too
large (413).
"""

from __future__ import annotations

import inspect
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from client.body_limit import BodyLimit
from client.reward_metrics import RewardMetrics
from client.schemas import ErrorResponse, ScoreBatchRequest, ScoreBatchResponse, ScoreRequest, ScoreResponse
from client.scoring import RewardScorer, ScoreFn, ScoringError

__all__ = ["create_reward_app"]


def _error(
    status_code: int, error: str, detail: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorResponse(error=error, detail=detail).model_dump()
    return JSONResponse(body, status_code=status_code, headers=headers)


def create_reward_app(
    fn: ScoreFn,
    *,
    name: str | None = None,
    reward_range: tuple[float, float] | None = None,
    timeout_s: float = 5.0,
    max_body_bytes: int = 1 << 20,
    max_concurrency: int = 32,
) -> FastAPI:
    """A FastAPI reward service over `fn(prompt, completion, metadata)`. If `fn` has a `close()` method
    (a callable object holding a resource), it is called when the app shuts down."""
    name = name or getattr(fn, "__name__", type(fn).__name__)
    metrics = RewardMetrics()
    scorer = RewardScorer(
        fn, reward_range=reward_range, timeout_s=timeout_s, max_concurrency=max_concurrency, metrics=metrics
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        yield
        close = getattr(fn, "close", None)
        if callable(close):
            result = await run_in_threadpool(close)
            if inspect.isawaitable(result):
                await result

    app = FastAPI(title=f"r2vpo reward plug-in: {name}", lifespan=lifespan)
    app.state.scorer = scorer

    def too_large() -> JSONResponse:
        metrics.error("too_large")
        detail = {"limit": max_body_bytes}
        return _error(413, f"request body larger than {max_body_bytes} bytes", detail)

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, reject=too_large)

    def get_scorer(request: Request) -> RewardScorer:
        return request.app.state.scorer

    @app.exception_handler(ScoringError)
    async def _scoring_error(request: Request, exc: ScoringError) -> JSONResponse:
        return _error(exc.status_code, exc.error, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.error("bad_request")
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        readable = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        return _error(422, f"invalid request body: {readable}", errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        metrics.error("internal")
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.post("/score", response_model=ScoreResponse, responses={500: {"model": ErrorResponse}})
    async def score(body: ScoreRequest, scorer: RewardScorer = Depends(get_scorer)) -> ScoreResponse:
        return await scorer.score(body)

    @app.post("/score_batch", response_model=ScoreBatchResponse, responses={500: {"model": ErrorResponse}})
    async def score_batch(
        body: ScoreBatchRequest, scorer: RewardScorer = Depends(get_scorer)
    ) -> ScoreBatchResponse:
        return ScoreBatchResponse(results=await scorer.score_batch(body.items))

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "name": name, "reward_range": list(reward_range) if reward_range else None}

    @app.get("/readyz")
    async def readyz() -> dict[str, Any]:
        return {"status": "ok", "name": name}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return metrics.exposition()

    return app

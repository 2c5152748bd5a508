"""The reward plug-in SDK: turn `score(prompt, completion, metadata) -> float | Score` into a service.

    from client.plugin import Score, create_reward_app

    def score(prompt: str, completion: str, metadata: dict) -> float | Score:
        return float(completion.strip() == metadata["answer"])

    app = create_reward_app(score, reward_range=(0.0, 1.0))   # uvicorn module:app

The service speaks the contract of DESIGN §3 (`POST /score`, `POST /score_batch`, `GET /healthz`,
`GET /readyz`, `GET /metrics`). A failure is an HTTP error with an `ErrorResponse` body, never a reward
of 0: the function raised (500), returned a non-number / non-finite / out-of-range value (500), ran past
`timeout_s` (504), the body was malformed (422) or too large (413). `check_reward_service` tests any
service against this contract.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import logging
import math
import numbers
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from client.schemas import ErrorResponse, ScoreBatchRequest, ScoreBatchResponse, ScoreRequest, ScoreResponse

__all__ = [
    "CheckResult",
    "PluginLoadError",
    "RewardScorer",
    "Score",
    "ScoreFn",
    "ScoringError",
    "as_score",
    "check_reward_main",
    "check_reward_service",
    "create_reward_app",
    "load_plugin",
]

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


class PluginLoadError(ValueError):
    """`load_plugin` could not turn a 'module:function' spec into a callable."""


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


class _Metrics:
    """Prometheus counters of one app, in a registry of its own (several apps may share a process)."""

    def __init__(self) -> None:
        try:
            import prometheus_client as prom
        except ImportError:  # metrics are optional for plug-in authors
            self.registry = None
            return
        self.registry = prom.CollectorRegistry()
        self.calls = prom.Counter("r2vpo_reward_calls", "Scoring function calls", registry=self.registry)
        self.errors = prom.Counter(
            "r2vpo_reward_errors",
            "Failed scoring calls and rejected requests",
            ["kind"],
            registry=self.registry,
        )
        self.latency = prom.Histogram(
            "r2vpo_reward_latency_seconds", "Time of one scoring call", registry=self.registry
        )

    def call(self, seconds: float) -> None:
        if self.registry is not None:
            self.calls.inc()
            self.latency.observe(seconds)

    def error(self, kind: str) -> None:
        if self.registry is not None:
            self.errors.labels(kind=kind).inc()

    def exposition(self) -> Response:
        if self.registry is None:
            return Response("prometheus_client is not installed\n", status_code=404, media_type="text/plain")
        import prometheus_client as prom

        return Response(prom.generate_latest(self.registry), media_type=prom.CONTENT_TYPE_LATEST)


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
        metrics: _Metrics | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"scoring function must be callable, got {type(fn).__name__}")
        if reward_range is not None and not reward_range[0] <= reward_range[1]:
            raise ValueError(f"reward_range must be (lo, hi) with lo <= hi, got {reward_range}")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.fn, self.reward_range, self.timeout_s = fn, reward_range, timeout_s
        self.metrics = metrics or _Metrics()
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


class _BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 (the rest of it is read and dropped,
    up to 64× the limit, so the client sees the answer instead of a broken pipe)."""

    def __init__(self, app: Any, max_bytes: int, on_reject: Callable[[], None]) -> None:
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        too_big = declared.isdigit() and int(declared) > self.max_bytes
        chunks: list[bytes] = []
        received, more = 0, True
        while more and received <= 64 * self.max_bytes:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk, more = message.get("body", b""), message.get("more_body", False)
            received += len(chunk)
            too_big = too_big or received > self.max_bytes
            if not too_big:
                chunks.append(chunk)
        if too_big:
            self.on_reject()
            error = ErrorResponse(
                error=f"request body larger than {self.max_bytes} bytes", detail={"limit": self.max_bytes}
            )
            return await JSONResponse(error.model_dump(), status_code=413)(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


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
    metrics = _Metrics()
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
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes, on_reject=lambda: metrics.error("too_large"))

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


def load_plugin(spec: str) -> Callable[..., Any]:
    """Import 'module:function' (or 'module:obj.attr') and return the callable, with a clear error."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise PluginLoadError(f"plug-in must be given as 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise PluginLoadError(f"module {module_name!r} not found (installed? on PYTHONPATH?)") from exc
        raise PluginLoadError(
            f"module {module_name!r} failed to import: missing module {exc.name!r}"
        ) from exc
    except Exception as exc:
        raise PluginLoadError(
            f"module {module_name!r} failed to import: {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginLoadError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise PluginLoadError(f"{spec!r} is a {type(obj).__name__}, not a callable")
    return obj


# --- contract check: `r2vpo check-reward URL` ------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    """One contract check of a reward service."""

    name: str
    ok: bool
    message: str


# Understood by the built-ins: exact_match / math_verify read "answer", reasoning_gym reads "entry".
_SAMPLE = ScoreRequest(
    id="r2vpo-check-0",
    prompt="What is 2 + 2?",
    completion="4",
    task="check",
    metadata={"answer": "4", "entry": {"question": "What is 2 + 2?", "answer": "4", "metadata": {}}},
)


def _post(http: httpx.Client, path: str, **kwargs: Any) -> tuple[int, Any]:
    response = http.post(path, **kwargs)
    try:
        return response.status_code, json.loads(response.content)  # NaN literals parse, then fail validation
    except ValueError:
        return response.status_code, response.content[:80]


def _check_health(http: httpx.Client, sample: ScoreRequest) -> tuple[bool, str]:
    status = http.get("/healthz").status_code
    return status == 200, f"HTTP {status}"


def _check_score(http: httpx.Client, sample: ScoreRequest) -> tuple[bool, str]:
    status, body = _post(http, "/score", json=sample.model_dump(mode="json"))
    if status != 200:
        return False, f"HTTP {status}: {body}"
    try:
        return True, f"reward {ScoreResponse.model_validate(body).reward} for the sample request"
    except ValidationError as exc:
        return False, f"not a valid ScoreResponse with a finite reward: {exc.errors()[0]['msg']} ({body})"


def _check_malformed(http: httpx.Client, sample: ScoreRequest) -> tuple[bool, str]:
    statuses = [
        _post(http, "/score", content=b"{not json", headers={"content-type": "application/json"})[0],
        _post(http, "/score", json={"prompt": 1})[0],
    ]
    ok = all(400 <= s < 500 for s in statuses)
    return ok, f"non-JSON body -> HTTP {statuses[0]}, missing fields -> HTTP {statuses[1]} (want 4xx)"


def _check_batch(http: httpx.Client, sample: ScoreRequest) -> tuple[bool, str]:
    items = [
        sample.model_copy(update={"id": f"{sample.id}-{i}", "completion": c}) for i, c in enumerate("454")
    ]
    status, body = _post(http, "/score_batch", json={"items": [i.model_dump(mode="json") for i in items]})
    if status in (404, 405):
        return True, "no /score_batch (optional)"
    try:
        results = ScoreBatchResponse.model_validate(body).results if status == 200 else None
    except ValidationError as exc:
        return False, f"not a valid ScoreBatchResponse: {exc.errors()[0]['msg']}"
    if results is None:
        return False, f"HTTP {status}: {body}"
    if len(results) != len(items):
        return False, f"{len(results)} results for {len(items)} items"
    singles = [
        ScoreResponse.model_validate(_post(http, "/score", json=i.model_dump(mode="json"))[1]) for i in items
    ]
    if [r.reward for r in results] != [r.reward for r in singles]:
        return (
            False,
            f"batch rewards {[r.reward for r in results]} != single rewards {[r.reward for r in singles]}",
        )
    return True, f"{len(results)} results, in order"


_CHECKS: tuple[tuple[str, Callable[[httpx.Client, ScoreRequest], tuple[bool, str]]], ...] = (
    ("healthz answers 200", _check_health),
    ("score returns a finite reward", _check_score),
    ("malformed body gets 4xx", _check_malformed),
    ("score_batch keeps order", _check_batch),
)


def check_reward_service(
    url: str, *, timeout: float = 10.0, sample: ScoreRequest | None = None
) -> list[CheckResult]:
    """Run the contract checks against the service at `url`; pass `sample` if the default request (2 + 2,
    answer 4) does not suit your scorer."""
    sample = sample or _SAMPLE
    results = []
    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout) as http:
        for name, check in _CHECKS:
            try:
                ok, message = check(http, sample)
            except (httpx.HTTPError, ValidationError) as exc:
                ok, message = False, f"{type(exc).__name__}: {exc}"
            results.append(CheckResult(name, ok, message))
    return results


def check_reward_main(url: str, *, timeout: float = 10.0) -> int:
    """Print the contract checks as a table; exit code 0 when all pass, else 1."""
    from rich.console import Console
    from rich.table import Table

    results = check_reward_service(url, timeout=timeout)
    table = Table(title=f"reward service {url}")
    for column in ("check", "result", "message"):
        table.add_column(column)
    for r in results:
        table.add_row(r.name, "[green]pass[/]" if r.ok else "[red]FAIL[/]", r.message)
    Console().print(table)
    return 0 if all(r.ok for r in results) else 1

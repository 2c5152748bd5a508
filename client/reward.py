"""Typed HTTP clients for a reward plug-in (DESIGN §3): `POST /score`, optional `POST /score_batch`.

An error is always a typed `RewardError`, never a reward of 0. The retry / validation / circuit logic is
written once, as a call protocol (`client.transport`) guarded by a `CircuitBreaker` (`client.circuit`);
the async client and the sync client only drive it with their own transport (`httpx.AsyncClient` /
`httpx.Client`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
from pydantic import ValidationError

from client.base import AsyncHttpClient, HttpClient
from client.circuit import CircuitBreaker, CircuitState
from client.errors import RewardError, RewardErrorKind
from client.schemas import ScoreBatchRequest, ScoreBatchResponse, ScoreRequest, ScoreResponse
from client.transport import AsyncTransport, Call, ResponseTooLarge, Send, Transport, with_retries

__all__ = [
    "AsyncRewardClient",
    "CircuitBreaker",
    "CircuitState",
    "RewardClient",
    "RewardError",
    "RewardErrorKind",
    "transport_error",
]

T = TypeVar("T")
_MAX_BATCH = 1024  # ScoreBatchRequest.items max_length


def transport_error(exc: httpx.HTTPError | ResponseTooLarge, path: str) -> RewardError:
    """Map an httpx exception (or a response over the size limit) to a typed RewardError."""
    if isinstance(exc, ResponseTooLarge):
        return RewardError("invalid", f"{path}: response larger than {exc.limit} bytes")
    if isinstance(exc, httpx.TimeoutException):
        return RewardError("timeout", f"{path}: {type(exc).__name__}: {exc}")
    return RewardError("unreachable", f"{path}: {type(exc).__name__}: {exc}")


def _load_json(status: int, body: bytes, path: str) -> Any:
    try:
        return json.loads(body)  # accepts NaN / Infinity literals, so the schema's check rejects them
    except (ValueError, UnicodeDecodeError) as exc:
        raise RewardError("invalid", f"{path}: HTTP {status} body is not JSON: {body[:80]!r}") from exc


def _http_error(status: int, body: bytes, path: str) -> RewardError:
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        data = body[:200].decode("utf-8", "replace")
    error, detail = (
        (data.get("error") or data.get("detail"), data.get("detail"))
        if isinstance(data, dict)
        else (data, None)
    )
    return RewardError("http", f"{path}: HTTP {status}: {error}", status_code=status, detail=detail)


class _ClientBase:
    """What both clients share: settings, response validation, and the retry / circuit protocol."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 10.0,
        retries: int = 2,
        backoff: float = 0.2,
        max_concurrency: int = 16,
        max_response_bytes: int = 1 << 20,
        reward_range: tuple[float, float] | None = None,
        circuit: CircuitBreaker | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        if retries < 0 or backoff < 0 or max_response_bytes < 1 or max_concurrency < 1:
            raise ValueError("retries, backoff >= 0; max_response_bytes, max_concurrency >= 1")
        if reward_range is not None and not reward_range[0] <= reward_range[1]:
            raise ValueError(f"reward_range must be (lo, hi) with lo <= hi, got {reward_range}")
        self.retries = retries
        self.backoff = backoff
        self.max_response_bytes = max_response_bytes
        self.reward_range = reward_range
        self._circuit = circuit if circuit is not None else CircuitBreaker()
        self._batch_supported: bool | None = None  # unknown until the first /score_batch call
        self._max_concurrency = max_concurrency
        limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
        self._open(dict(base_url=base_url.rstrip("/"), timeout=timeout, headers=headers, limits=limits))

    def _open(self, http_options: dict[str, Any]) -> None:
        """Create the httpx client (`self._http`) and the transport over it (`self._transport`)."""
        raise NotImplementedError

    @property
    def circuit(self) -> CircuitBreaker:
        """The circuit breaker guarding this service (its `.state` is "closed" | "open" | "half_open")."""
        return self._circuit

    @staticmethod
    def _request(request: ScoreRequest) -> Send:
        return Send("POST", "/score", request.model_dump(mode="json"))

    def _check(self, response: ScoreResponse, path: str) -> ScoreResponse:
        if self.reward_range is not None:
            lo, hi = self.reward_range
            if not lo <= response.reward <= hi:
                raise RewardError(
                    "invalid", f"{path}: reward {response.reward} outside declared range [{lo}, {hi}]"
                )
        return response

    def _parse_score(self, status: int, body: bytes) -> ScoreResponse:
        if status != 200:
            raise _http_error(status, body, "/score")
        try:
            return self._check(ScoreResponse.model_validate(_load_json(status, body, "/score")), "/score")
        except ValidationError as exc:
            raise RewardError("invalid", f"/score: not a ScoreResponse: {exc}") from exc

    def _parse_batch(self, status: int, body: bytes, expected: int) -> list[ScoreResponse]:
        if status != 200:
            raise _http_error(status, body, "/score_batch")
        try:
            results = ScoreBatchResponse.model_validate(_load_json(status, body, "/score_batch")).results
        except ValidationError as exc:
            raise RewardError("invalid", f"/score_batch: not a ScoreBatchResponse: {exc}") from exc
        if len(results) != expected:
            raise RewardError("invalid", f"/score_batch: {len(results)} results for {expected} items")
        return [self._check(r, "/score_batch") for r in results]

    def _call(self, send: Send, parse: Callable[[int, bytes], T]) -> Call[T]:
        """One logical call: circuit check, then attempts with exponential backoff on retryable errors."""
        self._circuit.before_call()
        try:
            result = yield from with_retries(
                send, parse, retries=self.retries, backoff=self.backoff, error=RewardError
            )
        except RewardError as exc:
            self._circuit.record(exc)
            raise
        except BaseException:  # cancelled (or a bug in parse): no outcome to count
            self._circuit.abandon()
            raise
        self._circuit.record(None)
        return result

    def _batch(self, requests: list[ScoreRequest]) -> Call[list[ScoreResponse] | None]:
        """POST /score_batch in chunks; returns None (and remembers) when the service has no batch route."""
        results: list[ScoreResponse] = []
        for start in range(0, len(requests), _MAX_BATCH):
            chunk = requests[start : start + _MAX_BATCH]
            send = Send("POST", "/score_batch", ScoreBatchRequest(items=chunk).model_dump(mode="json"))
            try:
                part = yield from self._call(send, lambda s, b, n=len(chunk): self._parse_batch(s, b, n))
            except RewardError as exc:
                if exc.kind == "http" and exc.status_code in (404, 405) and not results:
                    self._batch_supported = False
                    return None
                raise
            self._batch_supported = True
            results.extend(part)
        return results


class AsyncRewardClient(_ClientBase, AsyncHttpClient):
    """Async client of one reward service. Use as `async with AsyncRewardClient(url) as client:`."""

    def _open(self, http_options: dict[str, Any]) -> None:
        self._http = httpx.AsyncClient(**http_options)
        self._transport = AsyncTransport(
            self._http,
            transport_error,
            max_bytes=self.max_response_bytes,
            max_concurrency=self._max_concurrency,
        )

    async def score(self, request: ScoreRequest) -> ScoreResponse:
        """Score one completion; raises RewardError on any failure."""
        return await self._transport.run(self._call(self._request(request), self._parse_score))

    async def score_batch(self, requests: list[ScoreRequest]) -> list[ScoreResponse]:
        """Score many, in order: one /score_batch call per chunk, or concurrent /score calls without it."""
        if not requests:
            return []
        if self._batch_supported is not False:
            results = await self._transport.run(self._batch(requests))
            if results is not None:
                return results
        tasks = [asyncio.ensure_future(self.score(r)) for r in requests]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            raise


class RewardClient(_ClientBase, HttpClient):
    """Blocking client for scripts; same behaviour as AsyncRewardClient (the batch fallback uses threads)."""

    def _open(self, http_options: dict[str, Any]) -> None:
        self._http = httpx.Client(**http_options)
        self._transport = Transport(self._http, transport_error, max_bytes=self.max_response_bytes)

    def score(self, request: ScoreRequest) -> ScoreResponse:
        """Score one completion; raises RewardError on any failure."""
        return self._transport.run(self._call(self._request(request), self._parse_score))

    def score_batch(self, requests: list[ScoreRequest]) -> list[ScoreResponse]:
        """Score many, in order: /score_batch when the service has it, else /score calls on a thread pool."""
        if not requests:
            return []
        if self._batch_supported is not False:
            results = self._transport.run(self._batch(requests))
            if results is not None:
                return results
        pool = ThreadPoolExecutor(max_workers=min(self._max_concurrency, len(requests)))
        try:
            return list(pool.map(self.score, requests))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

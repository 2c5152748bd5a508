"""Typed HTTP clients for a reward plug-in (DESIGN §3): `POST /score`, optional `POST /score_batch`.

An error is always a typed `RewardError`, never a reward of 0. The retry / validation / circuit logic is
written once, as a generator that yields what it needs done (send a request, sleep); the async client
and the sync client only drive it with their own transport (`httpx.AsyncClient` / `httpx.Client`).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import httpx
from pydantic import ValidationError

from client.schemas import ScoreBatchRequest, ScoreBatchResponse, ScoreRequest, ScoreResponse

RewardErrorKind = Literal["timeout", "http", "invalid", "circuit_open", "unreachable"]
CircuitState = Literal["closed", "open", "half_open"]
T = TypeVar("T")
_MAX_BATCH = 1024  # ScoreBatchRequest.items max_length


class RewardError(Exception):
    """A failed reward call. `kind` says what failed; `status_code` is set for HTTP errors."""

    def __init__(
        self, kind: RewardErrorKind, message: str, *, status_code: int | None = None, detail: Any = None
    ):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.status_code = status_code
        self.detail = detail

    @property
    def retryable(self) -> bool:
        """Timeouts, unreachable services and 5xx answers may succeed on a later try; the rest will not."""
        return self.kind in ("timeout", "unreachable") or (
            self.kind == "http" and (self.status_code or 0) >= 500
        )


class CircuitBreaker:
    """Opens after `failure_threshold` consecutive failed calls; fails fast while open; after
    `reset_after_s` it is half-open and lets one probe call through, which closes it on success.

    A failed call is one that ends (after its retries) in timeout / unreachable / 5xx / invalid; a 4xx
    answer shows the service is up, so it counts as a success here. Thread-safe.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_after_s: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or reset_after_s < 0:
            raise ValueError("failure_threshold must be >= 1 and reset_after_s >= 0")
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> CircuitState:
        with self._lock:
            return self._state()

    def _state(self) -> CircuitState:
        if self._opened_at is None:
            return "closed"
        return "half_open" if self._clock() - self._opened_at >= self.reset_after_s else "open"

    def before_call(self) -> None:
        """Admit a call or raise RewardError('circuit_open')."""
        with self._lock:
            state = self._state()
            if state == "closed":
                return
            if state == "half_open" and not self._probing:
                self._probing = True
                return
            wait = max(0.0, self.reset_after_s - (self._clock() - (self._opened_at or 0.0)))
            raise RewardError(
                "circuit_open", f"circuit open after {self._failures} failures; retry in {wait:.1f}s"
            )

    def record(self, error: RewardError | None) -> None:
        """Record the outcome of an admitted call (None: success)."""
        with self._lock:
            self._probing = False
            if error is None or error.kind == "http" and (error.status_code or 0) < 500:
                self._failures, self._opened_at = 0, None
                return
            self._failures += 1
            if self._opened_at is not None or self._failures >= self.failure_threshold:
                self._opened_at = self._clock()

    def abandon(self) -> None:
        """An admitted call was cancelled without an outcome: free the half-open probe slot."""
        with self._lock:
            self._probing = False


@dataclass(frozen=True)
class _Send:
    path: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class _Sleep:
    seconds: float


# What a transport returns for a _Send: (status, body bytes) or a RewardError (timeout, unreachable, too big).
_Outcome = tuple[int, bytes] | RewardError
_Protocol = Generator[_Send | _Sleep, _Outcome | None, T]


def transport_error(exc: httpx.HTTPError, path: str) -> RewardError:
    """Map an httpx exception to a typed RewardError."""
    if isinstance(exc, httpx.TimeoutException):
        return RewardError("timeout", f"{path}: {type(exc).__name__}: {exc}")
    return RewardError("unreachable", f"{path}: {type(exc).__name__}: {exc}")


def _too_big(path: str, limit: int) -> RewardError:
    return RewardError("invalid", f"{path}: response larger than {limit} bytes")


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


def _declared_too_big(response: httpx.Response, limit: int) -> bool:
    declared = response.headers.get("content-length", "")
    return declared.isdigit() and int(declared) > limit


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
        """Create the transport (`self._http`)."""
        raise NotImplementedError

    @property
    def circuit(self) -> CircuitBreaker:
        """The circuit breaker guarding this service (its `.state` is "closed" | "open" | "half_open")."""
        return self._circuit

    @staticmethod
    def _request(request: ScoreRequest) -> _Send:
        return _Send("/score", request.model_dump(mode="json"))

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

    def _call(self, send: _Send, parse: Callable[[int, bytes], T]) -> _Protocol[T]:
        """One logical call: circuit check, then attempts with exponential backoff on retryable errors."""
        self._circuit.before_call()
        recorded = False
        try:
            attempt = 0
            while True:
                outcome = yield send
                try:
                    if isinstance(outcome, RewardError):
                        raise outcome
                    result = parse(*outcome)
                except RewardError as exc:
                    if exc.retryable and attempt < self.retries:
                        attempt += 1
                        yield _Sleep(self.backoff * 2 ** (attempt - 1))
                        continue
                    recorded = True
                    self._circuit.record(exc)
                    raise
                recorded = True
                self._circuit.record(None)
                return result
        finally:
            if not recorded:  # cancelled (or a bug in parse): no outcome to count
                self._circuit.abandon()

    def _batch(self, requests: list[ScoreRequest]) -> _Protocol[list[ScoreResponse] | None]:
        """POST /score_batch in chunks; returns None (and remembers) when the service has no batch route."""
        results: list[ScoreResponse] = []
        for start in range(0, len(requests), _MAX_BATCH):
            chunk = requests[start : start + _MAX_BATCH]
            payload = ScoreBatchRequest(items=chunk).model_dump(mode="json")
            try:
                part = yield from self._call(
                    _Send("/score_batch", payload), lambda s, b, n=len(chunk): self._parse_batch(s, b, n)
                )
            except RewardError as exc:
                if exc.kind == "http" and exc.status_code in (404, 405) and not results:
                    self._batch_supported = False
                    return None
                raise
            self._batch_supported = True
            results.extend(part)
        return results


class AsyncRewardClient(_ClientBase):
    """Async client of one reward service. Use as `async with AsyncRewardClient(url) as client:`."""

    def _open(self, http_options: dict[str, Any]) -> None:
        self._http = httpx.AsyncClient(**http_options)
        self._limit = asyncio.Semaphore(self._max_concurrency)

    async def _send(self, send: _Send) -> _Outcome:
        limit = self.max_response_bytes
        async with self._limit:
            try:
                async with self._http.stream("POST", send.path, json=send.payload) as response:
                    if _declared_too_big(response, limit):
                        return _too_big(send.path, limit)
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > limit:
                            return _too_big(send.path, limit)
                    return response.status_code, bytes(body)
            except httpx.HTTPError as exc:
                return transport_error(exc, send.path)

    async def _drive(self, protocol: _Protocol[T]) -> T:
        try:
            action = next(protocol)
            while True:
                if isinstance(action, _Sleep):
                    await asyncio.sleep(action.seconds)
                    action = protocol.send(None)
                else:
                    action = protocol.send(await self._send(action))
        except StopIteration as stop:
            return stop.value
        finally:
            protocol.close()

    async def score(self, request: ScoreRequest) -> ScoreResponse:
        """Score one completion; raises RewardError on any failure."""
        return await self._drive(self._call(self._request(request), self._parse_score))

    async def score_batch(self, requests: list[ScoreRequest]) -> list[ScoreResponse]:
        """Score many, in order: one /score_batch call per chunk, or concurrent /score calls without it."""
        if not requests:
            return []
        if self._batch_supported is not False:
            results = await self._drive(self._batch(requests))
            if results is not None:
                return results
        tasks = [asyncio.ensure_future(self.score(r)) for r in requests]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    async def health(self) -> bool:
        """True when GET /healthz answers 200 (bypasses the circuit breaker)."""
        try:
            return (await self._http.get("/healthz")).status_code == 200
        except httpx.HTTPError:
            return False

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class RewardClient(_ClientBase):
    """Blocking client for scripts; same behaviour as AsyncRewardClient (the batch fallback uses threads)."""

    def _open(self, http_options: dict[str, Any]) -> None:
        self._http = httpx.Client(**http_options)

    def _send(self, send: _Send) -> _Outcome:
        limit = self.max_response_bytes
        try:
            with self._http.stream("POST", send.path, json=send.payload) as response:
                if _declared_too_big(response, limit):
                    return _too_big(send.path, limit)
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > limit:
                        return _too_big(send.path, limit)
                return response.status_code, bytes(body)
        except httpx.HTTPError as exc:
            return transport_error(exc, send.path)

    def _drive(self, protocol: _Protocol[T]) -> T:
        try:
            action = next(protocol)
            while True:
                if isinstance(action, _Sleep):
                    time.sleep(action.seconds)
                    action = protocol.send(None)
                else:
                    action = protocol.send(self._send(action))
        except StopIteration as stop:
            return stop.value
        finally:
            protocol.close()

    def score(self, request: ScoreRequest) -> ScoreResponse:
        """Score one completion; raises RewardError on any failure."""
        return self._drive(self._call(self._request(request), self._parse_score))

    def score_batch(self, requests: list[ScoreRequest]) -> list[ScoreResponse]:
        """Score many, in order: /score_batch when the service has it, else /score calls on a thread pool."""
        if not requests:
            return []
        if self._batch_supported is not False:
            results = self._drive(self._batch(requests))
            if results is not None:
                return results
        pool = ThreadPoolExecutor(max_workers=min(self._max_concurrency, len(requests)))
        try:
            return list(pool.map(self.score, requests))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def health(self) -> bool:
        """True when GET /healthz answers 200 (bypasses the circuit breaker)."""
        try:
            return self._http.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self._http.close()

    aclose = close  # the async client's name works too

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

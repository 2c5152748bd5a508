"""Typed HTTP clients of the inference service (DESIGN §3): `POST /v1/completions`, `GET /v1/models`.

Connection errors and 5xx answers (503 while the engine loads included) are retried with exponential
backoff; a 4xx answer is the caller's mistake and raises `InferenceError` at once with the server's
message. The retry logic is written once, as a generator that yields what it needs done (send a request,
sleep); `AsyncInferenceClient` and `InferenceClient` only drive it with their own httpx transport.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from client.schemas import CompletionRequest, CompletionResponse, ModelList

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class InferenceError(Exception):
    """A failed inference call: `status_code` is the HTTP status (None when the server was unreachable)."""

    def __init__(
        self, message: str, *, status_code: int | None = None, retryable: bool | None = None
    ) -> None:
        super().__init__(message if status_code is None else f"HTTP {status_code}: {message}")
        self.message = message
        self.status_code = status_code
        # Unreachable servers and 5xx answers may succeed on a later try; 4xx answers will not.
        self.retryable = (status_code is None or status_code >= 500) if retryable is None else retryable


@dataclass(frozen=True)
class _Send:
    method: str
    path: str
    payload: dict[str, Any] | None = None


@dataclass(frozen=True)
class _Sleep:
    seconds: float


_Outcome = tuple[int, bytes] | InferenceError
_Protocol = Generator[_Send | _Sleep, _Outcome | None, T]


def _server_message(body: bytes) -> str:
    """The readable message of an error body: `{"error": {"message"}}` (OpenAI), `{"error"}`, `{"detail"}`."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body[:300].decode("utf-8", "replace") or "(empty body)"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if error is not None:
            return str(error)
        if "detail" in data:
            return str(data["detail"])
        if "message" in data:
            return str(data["message"])
    return str(data)[:300]


def _parser(model: type[M], path: str) -> Callable[[int, bytes], M]:
    def parse(status: int, body: bytes) -> M:
        if status >= 400:
            raise InferenceError(f"{path}: {_server_message(body)}", status_code=status)
        try:
            return model.model_validate_json(body)
        except ValidationError as exc:
            raise InferenceError(f"{path}: not a {model.__name__}: {exc}", status_code=status) from exc

    return parse


def _transport_error(exc: httpx.HTTPError, path: str) -> InferenceError:
    # A read timeout means the server took the request and is still generating: sending it again would
    # only double the load, so only failures to connect / broken connections are retried.
    retryable = not isinstance(exc, httpx.ReadTimeout)
    return InferenceError(f"{path}: {type(exc).__name__}: {exc}", retryable=retryable)


class _Core:
    """Retry policy shared by both clients."""

    def __init__(self, retries: int, backoff: float) -> None:
        if retries < 0 or backoff < 0:
            raise ValueError(f"retries and backoff must be >= 0, got {retries}, {backoff}")
        self.retries = retries
        self.backoff = backoff

    def call(self, send: _Send, parse: Callable[[int, bytes], T]) -> _Protocol[T]:
        """One logical call: up to 1 + retries attempts, sleeping backoff·2^k between retryable failures."""
        for attempt in range(self.retries + 1):
            if attempt:
                yield _Sleep(self.backoff * 2 ** (attempt - 1))
            outcome = yield send
            try:
                if isinstance(outcome, InferenceError):
                    raise outcome
                assert outcome is not None
                return parse(*outcome)
            except InferenceError as exc:
                if exc.retryable and attempt < self.retries:
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def complete(self, req: CompletionRequest) -> _Protocol[CompletionResponse]:
        payload = req.model_dump(mode="json", exclude_none=True)
        return self.call(
            _Send("POST", "/v1/completions", payload), _parser(CompletionResponse, "/v1/completions")
        )

    def models(self) -> _Protocol[ModelList]:
        return self.call(_Send("GET", "/v1/models"), _parser(ModelList, "/v1/models"))


class AsyncInferenceClient:
    """Async client of one inference service. Use as `async with AsyncInferenceClient(url) as client:`."""

    def __init__(
        self, base_url: str, *, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5
    ) -> None:
        self._core = _Core(retries, backoff)
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout)

    async def _send(self, send: _Send) -> _Outcome:
        try:
            response = await self._http.request(send.method, send.path, json=send.payload)
            return response.status_code, response.content
        except httpx.HTTPError as exc:
            return _transport_error(exc, send.path)

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

    async def complete(self, req: CompletionRequest) -> CompletionResponse:
        """Completions for `req`; raises InferenceError (4xx at once, others after the retries)."""
        return await self._drive(self._core.complete(req))

    async def models(self) -> ModelList:
        """The served model and its current `policy_version`."""
        return await self._drive(self._core.models())

    async def health(self) -> bool:
        """True when the service answers `GET /readyz` with 200 (engine loaded); no retries."""
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class InferenceClient:
    """Blocking client for scripts and tests; same behaviour as AsyncInferenceClient."""

    def __init__(
        self, base_url: str, *, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5
    ) -> None:
        self._core = _Core(retries, backoff)
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)

    def _send(self, send: _Send) -> _Outcome:
        try:
            response = self._http.request(send.method, send.path, json=send.payload)
            return response.status_code, response.content
        except httpx.HTTPError as exc:
            return _transport_error(exc, send.path)

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

    def complete(self, req: CompletionRequest) -> CompletionResponse:
        """Completions for `req`; raises InferenceError (4xx at once, others after the retries)."""
        return self._drive(self._core.complete(req))

    def models(self) -> ModelList:
        """The served model and its current `policy_version`."""
        return self._drive(self._core.models())

    def health(self) -> bool:
        """True when the service answers `GET /readyz` with 200 (engine loaded); no retries."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self._http.close()

    def aclose(self) -> None:
        """Alias of `close()`, so code written against either client can end it the same way."""
        self.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

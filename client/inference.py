"""Typed HTTP clients of the inference service (DESIGN §3): `POST /v1/completions`, `GET /v1/models`.

Connection errors and 5xx answers (503 while the engine loads included) are retried with exponential
backoff; a 4xx answer is the caller's mistake and raises `InferenceError` at once with the server's
message. The retry logic is the shared call protocol of `client.transport`; `AsyncInferenceClient` and
`InferenceClient` only drive it with their own httpx transport.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from client.base import AsyncHttpClient, HttpClient
from client.errors import InferenceError
from client.schemas import CompletionRequest, CompletionResponse, ModelList
from client.transport import AsyncTransport, Call, ResponseTooLarge, Send, Transport, with_retries

__all__ = ["AsyncInferenceClient", "InferenceClient", "InferenceError"]

M = TypeVar("M", bound=BaseModel)


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


def _transport_error(exc: httpx.HTTPError | ResponseTooLarge, path: str) -> InferenceError:
    # A read timeout means the server took the request and is still generating: sending it again would
    # only double the load, so only failures to connect / broken connections are retried.
    retryable = not isinstance(exc, httpx.ReadTimeout)
    return InferenceError(f"{path}: {type(exc).__name__}: {exc}", retryable=retryable)


class _Core:
    """Retry policy and calls shared by both clients."""

    def __init__(self, retries: int, backoff: float) -> None:
        if retries < 0 or backoff < 0:
            raise ValueError(f"retries and backoff must be >= 0, got {retries}, {backoff}")
        self.retries = retries
        self.backoff = backoff

    def call(self, send: Send, parse: Callable[[int, bytes], M]) -> Call[M]:
        """One logical call: up to 1 + retries attempts, sleeping backoff·2^k between retryable failures."""
        return with_retries(send, parse, retries=self.retries, backoff=self.backoff, error=InferenceError)

    def complete(self, req: CompletionRequest) -> Call[CompletionResponse]:
        payload = req.model_dump(mode="json", exclude_none=True)
        return self.call(
            Send("POST", "/v1/completions", payload), _parser(CompletionResponse, "/v1/completions")
        )

    def models(self) -> Call[ModelList]:
        return self.call(Send("GET", "/v1/models"), _parser(ModelList, "/v1/models"))


class AsyncInferenceClient(AsyncHttpClient):
    """Async client of one inference service. Use as `async with AsyncInferenceClient(url) as client:`.
    `health()` is True once `GET /readyz` answers 200 (engine loaded)."""

    _health_path = "/readyz"

    def __init__(
        self, base_url: str, *, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5
    ) -> None:
        self._core = _Core(retries, backoff)
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout)
        self._transport = AsyncTransport(self._http, _transport_error)

    async def complete(self, req: CompletionRequest) -> CompletionResponse:
        """Completions for `req`; raises InferenceError (4xx at once, others after the retries)."""
        return await self._transport.run(self._core.complete(req))

    async def models(self) -> ModelList:
        """The served model and its current `policy_version`."""
        return await self._transport.run(self._core.models())


class InferenceClient(HttpClient):
    """Blocking client for scripts and tests; same behaviour as AsyncInferenceClient."""

    _health_path = "/readyz"

    def __init__(
        self, base_url: str, *, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5
    ) -> None:
        self._core = _Core(retries, backoff)
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)
        self._transport = Transport(self._http, _transport_error)

    def complete(self, req: CompletionRequest) -> CompletionResponse:
        """Completions for `req`; raises InferenceError (4xx at once, others after the retries)."""
        return self._transport.run(self._core.complete(req))

    def models(self) -> ModelList:
        """The served model and its current `policy_version`."""
        return self._transport.run(self._core.models())

"""The retry protocol and the httpx transports that the inference and reward clients share.

A logical call (one request, retried with exponential backoff while its failures are retryable) is
written once, as a generator that yields the steps it needs done (`Send` a request, `Sleep`) and is sent
each request's outcome. `Transport` (blocking, over `httpx.Client`) and `AsyncTransport` (over
`httpx.AsyncClient`) carry the steps out: they send the request, read the body under an optional size
limit, and map what goes wrong on the wire to the client's typed error, so a call never sees an httpx
exception.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Generator
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from client.errors import InferenceError, RewardError

T = TypeVar("T")
E = TypeVar("E", InferenceError, RewardError)


@dataclass(frozen=True)
class Send:
    """Send this request; the call is sent back `(status, body)` or the client's typed error."""

    method: str
    path: str
    payload: dict[str, Any] | None = None


@dataclass(frozen=True)
class Sleep:
    """Wait this long before the next step (the backoff between attempts)."""

    seconds: float


Outcome = tuple[int, bytes] | Exception
Call = Generator[Send | Sleep, Outcome | None, T]


class ResponseTooLarge(Exception):
    """A response body (declared or read) larger than the transport's `max_bytes`."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"response larger than {limit} bytes")
        self.limit = limit


# Maps what went wrong on the wire, and the request path, to the client's typed error.
ErrorMap = Callable[[httpx.HTTPError | ResponseTooLarge, str], Exception]


def with_retries(
    send: Send, parse: Callable[[int, bytes], T], *, retries: int, backoff: float, error: type[E]
) -> Call[T]:
    """One logical call: up to 1 + retries attempts, sleeping backoff·2^k between failures that are
    retryable. A failure is an `error` returned by the transport or raised by `parse`."""
    for attempt in range(retries + 1):
        if attempt:
            yield Sleep(backoff * 2 ** (attempt - 1))
        outcome = yield send
        try:
            if isinstance(outcome, Exception):
                raise outcome
            assert outcome is not None
            return parse(*outcome)
        except error as exc:
            if exc.retryable and attempt < retries:
                continue
            raise
    raise AssertionError("unreachable")  # pragma: no cover


class _Body:
    """A response body read chunk by chunk; raises ResponseTooLarge as soon as it passes `limit`."""

    def __init__(self, response: httpx.Response, limit: int | None) -> None:
        self.limit, self.data = limit, bytearray()
        declared = response.headers.get("content-length", "")
        if limit is not None and declared.isdigit() and int(declared) > limit:
            raise ResponseTooLarge(limit)

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        if self.limit is not None and len(self.data) > self.limit:
            raise ResponseTooLarge(self.limit)


class Transport:
    """Carries out a call's steps over an `httpx.Client` (blocking)."""

    def __init__(self, http: httpx.Client, to_error: ErrorMap, *, max_bytes: int | None = None) -> None:
        self.http, self.to_error, self.max_bytes = http, to_error, max_bytes

    def send(self, send: Send) -> Outcome:
        try:
            with self.http.stream(send.method, send.path, json=send.payload) as response:
                body = _Body(response, self.max_bytes)
                for chunk in response.iter_bytes():
                    body.add(chunk)
                return response.status_code, bytes(body.data)
        except (httpx.HTTPError, ResponseTooLarge) as exc:
            return self.to_error(exc, send.path)

    def _step(self, step: Send | Sleep) -> Outcome | None:
        if isinstance(step, Sleep):
            time.sleep(step.seconds)
            return None
        return self.send(step)

    def run(self, call: Call[T]) -> T:
        """Drive `call` to its result (or its error)."""
        try:
            step = next(call)
            while True:
                step = call.send(self._step(step))
        except StopIteration as stop:
            return stop.value
        finally:
            call.close()


class AsyncTransport:
    """Carries out a call's steps over an `httpx.AsyncClient`, at most `max_concurrency` requests at once
    (None: only httpx's own connection limits)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        to_error: ErrorMap,
        *,
        max_bytes: int | None = None,
        max_concurrency: int | None = None,
    ) -> None:
        self.http, self.to_error, self.max_bytes = http, to_error, max_bytes
        self._slots = asyncio.Semaphore(max_concurrency) if max_concurrency is not None else None

    def _slot(self) -> AbstractAsyncContextManager[Any]:
        return self._slots if self._slots is not None else nullcontext()

    async def send(self, send: Send) -> Outcome:
        async with self._slot():
            try:
                async with self.http.stream(send.method, send.path, json=send.payload) as response:
                    body = _Body(response, self.max_bytes)
                    async for chunk in response.aiter_bytes():
                        body.add(chunk)
                    return response.status_code, bytes(body.data)
            except (httpx.HTTPError, ResponseTooLarge) as exc:
                return self.to_error(exc, send.path)

    async def _step(self, step: Send | Sleep) -> Outcome | None:
        if isinstance(step, Sleep):
            await asyncio.sleep(step.seconds)
            return None
        return await self.send(step)

    async def run(self, call: Call[T]) -> T:
        """Drive `call` to its result (or its error)."""
        try:
            step = next(call)
            while True:
                step = call.send(await self._step(step))
        except StopIteration as stop:
            return stop.value
        finally:
            call.close()

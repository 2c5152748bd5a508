"""The base of the HTTP clients (`client.inference`, `client.reward`): what a client of one service has
besides its calls — a health probe, closing its httpx client, use as a context manager."""

from __future__ import annotations

from typing import TypeVar

import httpx

__all__ = ["AsyncHttpClient", "HttpClient"]


C = TypeVar("C", bound="HttpClient")
A = TypeVar("A", bound="AsyncHttpClient")


class HttpClient:
    """What a blocking client of one service has besides its calls: a health probe, `close()`, `with`."""

    _http: httpx.Client
    _health_path = "/healthz"

    def health(self) -> bool:
        """True when the service answers its health route (`_health_path`) with 200; no retries, and the
        circuit breaker (if any) is bypassed."""
        try:
            return self._http.get(self._health_path).status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self._http.close()

    def aclose(self) -> None:
        """Alias of `close()`, so code written against either client can end it the same way."""
        self.close()

    def __enter__(self: C) -> C:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncHttpClient:
    """What an async client of one service has besides its calls: a health probe, `aclose()`, `async with`."""

    _http: httpx.AsyncClient
    _health_path = "/healthz"

    async def health(self) -> bool:
        """True when the service answers its health route (`_health_path`) with 200; no retries, and the
        circuit breaker (if any) is bypassed."""
        try:
            return (await self._http.get(self._health_path)).status_code == 200
        except httpx.HTTPError:
            return False

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self: A) -> A:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

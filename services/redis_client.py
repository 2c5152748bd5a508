"""Connecting to Redis and riding out its restarts (DESIGN §4), for every service that uses it.

The client from `connect_redis` retries single commands a few times on connection errors (redis-py's
`Retry`, for blips); services wrap each loop iteration in `with_retry` to ride out a restart. With
append-only persistence the consumer group and its pending entries survive a restart; if the stream/group
is gone anyway (NOGROUP), `TrajectoryQueue` recreates it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

T = TypeVar("T")
logger = logging.getLogger("services.queue")  # the Redis layer's one logger, named as before the split
TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)


class QueueUnavailable(RuntimeError):
    """Redis could not be reached after all retries."""


def redact_url(url: str) -> str:
    """The URL with any password replaced by `***` (safe to log)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def as_str(value: bytes | str) -> str:
    """A Redis reply value as text (the clients here are made with `decode_responses=False`)."""
    return value.decode() if isinstance(value, bytes) else value


async def connect_redis(
    url: str,
    *,
    attempts: int = 30,
    backoff_s: float = 0.2,
    max_backoff_s: float = 5.0,
    log: logging.Logger | None = None,
) -> aredis.Redis:
    """A client for `url` (redis:// or rediss://) once PING succeeds; exponential backoff between tries."""
    log = log or logger
    client = aredis.from_url(
        url,
        decode_responses=False,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        socket_connect_timeout=5.0,
        health_check_interval=30,
    )
    delay, last = backoff_s, None
    for attempt in range(1, attempts + 1):
        try:
            await client.ping()
            return client
        except AuthenticationError as exc:
            await client.aclose()
            raise QueueUnavailable(f"Redis at {redact_url(url)} rejected the credentials: {exc}") from exc
        except TRANSIENT as exc:
            last = exc
            log.warning("redis %s not reachable (attempt %d/%d): %s", redact_url(url), attempt, attempts, exc)
            if attempt < attempts:
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_backoff_s)
    await client.aclose()
    raise QueueUnavailable(f"Redis at {redact_url(url)} not reachable after {attempts} attempts: {last}")


async def with_retry(
    op: Callable[[], Awaitable[T]],
    *,
    attempts: int = 10,
    backoff: float = 0.2,
    max_backoff: float = 5.0,
    log: logging.Logger | None = None,
) -> T:
    """`await op()`, retrying on connection errors/timeouts with exponential backoff (rides out a restart)."""
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    delay = backoff
    for attempt in range(1, attempts + 1):
        try:
            result = await op()
            raise_if_cancelled()
            return result
        except TRANSIENT as exc:
            if attempt == attempts:
                raise QueueUnavailable(f"Redis operation failed after {attempts} attempts: {exc}") from exc
            (log or logger).warning("redis operation failed (attempt %d/%d): %s", attempt, attempts, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_backoff)
    raise AssertionError("unreachable")


def raise_if_cancelled() -> None:
    """Re-raise a cancellation that Python 3.11's `asyncio.wait_for` (used inside redis-py) swallowed
    when its inner call finished at the same moment; without this a cancelled polling loop runs on."""
    task = asyncio.current_task()
    if task is not None and getattr(task, "cancelling", lambda: 0)() > 0:
        raise asyncio.CancelledError()

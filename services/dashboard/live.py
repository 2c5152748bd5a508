"""Best-effort live extras: Redis (queue depth, accounting, learner state, metrics stream) and the
inference replicas (policy version, tokens/s). Every failure is reported in the snapshot, never raised:
the dashboard works with no Redis and no inference service at all.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import redis.asyncio as aredis
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from services.queue import TrajectoryQueue, redact_url

TOKENS_METRIC = "r2vpo_inference_generated_tokens"  # counter family name (exposed with `_total`)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500] or type(exc).__name__


class LiveSource:
    """Polls Redis and the inference replicas; keeps the latest snapshot for `refresh_s`."""

    def __init__(
        self,
        redis_url: str | None,
        run: str,
        inference_urls: list[str],
        *,
        timeout_s: float = 2.0,
        cache_s: float = 1.0,
    ) -> None:
        self.redis_url, self.run, self.timeout_s, self.cache_s = redis_url, run, timeout_s, cache_s
        self.inference_urls = [u.rstrip("/") for u in inference_urls]
        self._redis: aredis.Redis | None = None
        self._queue: TrajectoryQueue | None = None
        self._http: httpx.AsyncClient | None = None
        self._redis_error: str | None = None
        self._redis_retry_at = 0.0
        self._redis_backoff = 1.0
        self._tokens: dict[str, tuple[float, float]] = {}  # url → (time, tokens counter)
        self._snapshot: dict[str, Any] | None = None
        self._snapshot_at = 0.0
        self._lock = asyncio.Lock()
        self.errors = {"redis": 0, "inference": 0}

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        if self._redis is not None:
            await self._redis.aclose()

    # --- Redis ----------------------------------------------------------------------------------------
    def _get_queue(self) -> TrajectoryQueue:
        if self._queue is None:
            assert self.redis_url is not None
            self._redis = aredis.from_url(
                self.redis_url,
                socket_connect_timeout=self.timeout_s,
                socket_timeout=self.timeout_s,
                retry=Retry(NoBackoff(), 0),
            )
            self._queue = TrajectoryQueue(self._redis, self.run, consumer="dashboard")
        return self._queue

    async def _redis_call(self, fn: Any) -> Any:
        """`await fn(queue)` with a timeout; after a failure Redis is left alone for a growing while (so a
        dashboard without Redis does not spend every request waiting for it). Returns None on failure."""
        if self.redis_url is None:
            self._redis_error = "no redis_url configured"
            return None
        if time.monotonic() < self._redis_retry_at:
            return None
        try:
            result = await asyncio.wait_for(fn(self._get_queue()), timeout=self.timeout_s * 2)
        except Exception as exc:  # noqa: BLE001 - reported, not raised: Redis is optional here
            self.errors["redis"] += 1
            self._redis_error = _error(exc).replace(self.redis_url, redact_url(self.redis_url))
            self._redis_retry_at = time.monotonic() + self._redis_backoff
            self._redis_backoff = min(self._redis_backoff * 2, 30.0)
            return None
        self._redis_error, self._redis_backoff = None, 1.0
        return result

    async def read_metrics(self, after_id: str, count: int = 1000) -> list[tuple[str, dict]]:
        """Metrics stream entries after `after_id` ([] when Redis is unreachable)."""
        return await self._redis_call(lambda q: q.read_metrics(after_id, count)) or []

    async def _redis_snapshot(self) -> dict[str, Any]:
        async def read(q: TrajectoryQueue) -> dict[str, Any]:
            weights = await q.latest_weights()
            return {
                "accounting": await q.accounting(),
                "queue_length": await q.length(),
                "state": await q.get_state(),
                "weights": weights.model_dump(mode="json") if weights is not None else None,
            }

        data = await self._redis_call(read)
        if data is None:
            return {"ok": False, "error": self._redis_error or "unreachable (retrying)", "run": self.run}
        return {"ok": True, "error": None, "run": self.run, **data}

    # --- inference replicas ---------------------------------------------------------------------------
    async def _replica(self, url: str) -> dict[str, Any]:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.timeout_s)
        out: dict[str, Any] = {"url": url, "ok": False, "error": None, "model": None, "policy_version": None}
        out["tokens_per_s"] = None
        try:
            models = (await self._http.get(url + "/v1/models")).raise_for_status().json()
            card = (models.get("data") or [{}])[0]
            out |= {"ok": True, "model": card.get("id"), "policy_version": card.get("policy_version")}
            text = (await self._http.get(url + "/metrics")).raise_for_status().text
            tokens = next(
                (s.value for f in text_string_to_metric_families(text) if f.name == TOKENS_METRIC
                 for s in f.samples if s.name == TOKENS_METRIC + "_total"),
                None,
            )  # fmt: skip
            now = time.monotonic()
            if tokens is not None:
                last = self._tokens.get(url)
                if last is not None and now > last[0] and tokens >= last[1]:
                    out["tokens_per_s"] = (tokens - last[1]) / (now - last[0])
                self._tokens[url] = (now, tokens)
        except Exception as exc:  # noqa: BLE001 - reported per replica
            self.errors["inference"] += 1
            out["error"] = _error(exc)
        return out

    # --- snapshot -------------------------------------------------------------------------------------
    async def snapshot(self) -> dict[str, Any]:
        """Redis and inference state, at most `cache_s` old (concurrent callers share one probe)."""
        async with self._lock:
            if self._snapshot is None or time.monotonic() - self._snapshot_at >= self.cache_s:
                redis_part, replicas = await asyncio.gather(
                    self._redis_snapshot(), asyncio.gather(*(self._replica(u) for u in self.inference_urls))
                )
                self._snapshot = {"time": time.time(), "redis": redis_part, "inference": list(replicas)}
                self._snapshot_at = time.monotonic()
            return self._snapshot

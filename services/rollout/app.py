"""Rollout worker HTTP surface: health and status; the worker loop runs in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily

from services.rollout.worker import RolloutSettings, RolloutWorker

log = logging.getLogger("r2vpo.rollout")


def create_app(settings: RolloutSettings) -> FastAPI:
    worker = RolloutWorker(settings)
    stop = asyncio.Event()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await worker.start()
        task = asyncio.create_task(worker.run(stop))
        try:
            yield
        finally:
            stop.set()  # SIGTERM: the batch in flight finishes (bounded); groups go whole or not at all
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(task, timeout=30)
            with contextlib.suppress(Exception):
                await worker.close()

    app = FastAPI(title="r2vpo rollout", lifespan=lifespan)
    app.state.worker = worker

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> dict:
        return {"status": "ready"}

    registry = CollectorRegistry()
    registry.register(_StatsCollector(worker))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/status")
    async def status() -> dict:
        return {"worker_id": settings.worker_id, **worker.stats}

    return app


class _StatsCollector:
    """Exposes the worker's counters at scrape time, so the worker keeps one source of truth."""

    def __init__(self, worker: RolloutWorker) -> None:
        self.worker = worker

    def collect(self):
        stats = self.worker.stats
        for name, key, doc in (
            ("r2vpo_rollout_groups_produced", "groups_produced", "Groups pushed to the stream"),
            ("r2vpo_rollout_groups_dead_lettered", "groups_dead_lettered", "Groups sent to dead letter"),
            ("r2vpo_rollout_paused_seconds", "paused_s", "Time paused by admission control"),
            ("r2vpo_rollout_batches", "batches", "Inference batches completed"),
            ("r2vpo_rollout_batch_errors", "batch_errors", "Failed batches (retried with backoff)"),
            ("r2vpo_rollout_reward_circuit_opened", "reward_circuit_opened", "Reward circuit openings"),
            ("r2vpo_rollout_reward_circuit_closed", "reward_circuit_closed", "Reward circuit closings"),
        ):
            yield CounterMetricFamily(name, doc, value=stats[key])

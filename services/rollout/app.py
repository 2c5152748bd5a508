"""Rollout worker HTTP surface: health and status; the worker loop runs in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

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
            stop.set()  # SIGTERM: a group is pushed whole or not at all, so stopping here loses nothing
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(task, timeout=30)
            await worker.close()

    app = FastAPI(title="r2vpo rollout", lifespan=lifespan)
    app.state.worker = worker

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> dict:
        return {"status": "ready"}

    @app.get("/status")
    async def status() -> dict:
        return {"worker_id": settings.worker_id, **worker.stats}

    return app

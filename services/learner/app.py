"""Learner service HTTP surface: status, health, weights download, metrics. The work runs in the lifespan.

SIGTERM: uvicorn stops serving, the lifespan sets `stop`, the step in flight finishes and is committed
(a batch still being collected stays pending in Redis), then the process exits. If the training loop fails
(e.g. Redis gone for longer than `redis_retries` allow, or `max_consecutive_nonfinite` batches in a row not
finite) the process logs why and stops itself with SIGTERM (uvicorn re-raises it after shutdown: a non-zero
exit status), so that its supervisor (`r2vpo up`, compose, Kubernetes) restarts it from the last checkpoint
instead of leaving a live process that trains nothing. The non-finite streak is the exception: a restart
cannot fix diverged weights, so the process exits with `EXIT_DO_NOT_RESTART` (3) and `r2vpo up` ends the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.learner.service import LearnerService, LearnerSettings
from services.supervisor import EXIT_DO_NOT_RESTART
from services.weights import weights_router
from trainer.circuit import NonFiniteStreak

log = logging.getLogger("r2vpo.learner")


def create_app(settings: LearnerSettings) -> FastAPI:
    service = LearnerService(settings)
    stop = asyncio.Event()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        task = asyncio.create_task(service.run(stop))
        task.add_done_callback(_log_failure)
        app.state.task = task
        try:
            yield
        finally:
            stop.set()  # SIGTERM: finish the step in flight, commit, then exit
            try:
                await asyncio.wait_for(task, timeout=60)
            except (asyncio.CancelledError, asyncio.TimeoutError):
                log.error("learner loop did not stop within 60 s; cancelled")
            except Exception:  # noqa: BLE001 - already logged by _log_failure
                pass
            if service.queue is not None:
                with contextlib.suppress(Exception):
                    await service.queue.redis.aclose()

    app = FastAPI(title="r2vpo learner", lifespan=lifespan)
    app.state.service = service
    app.include_router(weights_router(service.store))

    @app.get("/healthz")
    async def healthz() -> dict:
        task = getattr(app.state, "task", None)
        if task is not None and task.done() and task.exception() is not None:
            return JSONResponse({"status": "error", "error": repr(task.exception())}, status_code=500)
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> dict:
        return {"status": "ready", "version": service.learner.version}

    @app.get("/status")
    async def status() -> dict:
        queue_length = await service.queue.length() if service.queue else None
        return service.status | {
            "finished": service.finished,
            "queue_length": queue_length,
            "last_metrics": service.last_metrics,
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        log.error("learner loop failed: %s: %s", type(exc).__name__, exc)
        if threading.current_thread() is not threading.main_thread():  # an embedded app, not a process
            return
        if isinstance(exc, NonFiniteStreak):  # a restart would only dead-letter the next batch as well
            log.error("not restartable: exiting with status %d", EXIT_DO_NOT_RESTART)
            logging.shutdown()
            os._exit(EXIT_DO_NOT_RESTART)  # the failed loop committed what it trained; nothing is in flight
        log.error("stopping the process so that its supervisor restarts it")
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's handler: graceful exit

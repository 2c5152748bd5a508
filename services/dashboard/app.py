"""The dashboard's HTTP surface: the page, a JSON API the page polls, health and Prometheus `/metrics`.

The page polls (every `refresh_s`) rather than holding an event stream open: `GET /api/runs` for the run
list and `GET /api/runs/{run}/metrics?after=N` for the rows it does not have yet. Polling survives
restarts, proxies and sleeping laptops without reconnection logic, and costs one small request per run.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily

from services.dashboard.data import RUN_NAME, Run, RunStore
from services.dashboard.live import LiveSource
from services.dashboard.settings import DashboardSettings

STATIC = Path(__file__).parent / "static"
PREVIEW_ROWS = 10  # rows of a response that keep their `samples_preview`
RUN_GAUGES = {  # latest value per run exported on /metrics: gauge suffix → row key
    "step": "step",
    "policy_version": "version",
    "rollouts_consumed": "rollouts_consumed",
    "reward_mean": "reward_mean",
    "accuracy": "accuracy",
    "lam": "lam_next",
    "ratio_var": "ratio_var",
    "learner_tokens_per_s": "learner_tokens_per_s",
}


SECRET_KEY = re.compile(r"password|passwd|secret|token|api_key|apikey|credential", re.IGNORECASE)
URL_PASSWORD = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/\s]*):(?P<pw>[^@/\s]+)@")


def redact(value: Any, key: str = "") -> Any:
    """A copy of a JSON value with secrets masked: values of secret-looking keys and URL passwords (a run's
    config.json may hold a `redis_url` with a password; the page shows the config to anyone who opens it)."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        if SECRET_KEY.search(key) and value:
            return "***"
        return URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", value)
    return value


def thin(rows: list[dict[str, Any]], start: int, max_points: int) -> tuple[list[dict[str, Any]], int]:
    """Rows (each tagged `_i` with its index) with every `stride`-th kept when there are more than
    `max_points`; evaluation rows (with `accuracy`) and the last row are always kept."""
    stride = max(1, math.ceil(len(rows) / max_points))
    last = len(rows) - 1
    out = [
        {**row, "_i": start + i}
        for i, row in enumerate(rows)
        if stride == 1 or i % stride == 0 or i == last or "accuracy" in row
    ]
    for row in out[:-PREVIEW_ROWS]:
        row.pop("samples_preview", None)
    return out, stride


def _route_label(path: str) -> str:
    """A bounded label for the request counter (never the raw path: no unbounded label values)."""
    if path in ("/api/runs", "/api/live"):
        return path
    parts = path.split("/")
    if len(parts) == 5 and parts[2] == "runs" and parts[4] in ("metrics", "summary", "config"):
        return "/api/runs/{run}/" + parts[4]
    return "other"


class _RunCollector:
    """Per-run gauges read from the store at scrape time."""

    def __init__(self, store: RunStore) -> None:
        self.store = store

    def collect(self):
        fams = {k: GaugeMetricFamily(f"r2vpo_dashboard_run_{k}", f"latest {v} of the run", labels=["run"])
                for k, v in RUN_GAUGES.items()}  # fmt: skip
        rows_fam = GaugeMetricFamily("r2vpo_dashboard_run_rows", "metrics rows read", labels=["run"])
        bad = GaugeMetricFamily("r2vpo_dashboard_run_malformed_lines", "lines skipped", labels=["run"])
        live = GaugeMetricFamily("r2vpo_dashboard_run_live", "1 while the run is live", labels=["run"])
        for info in self.store.runs():
            rows = self.store.metrics(info.name, max(info.rows - 200, 0))
            rows_fam.add_metric([info.name], info.rows)
            bad.add_metric([info.name], info.malformed_lines)
            live.add_metric([info.name], 1.0 if info.status == "live" else 0.0)
            for suffix, key in RUN_GAUGES.items():
                value = next((r[key] for r in reversed(rows) if isinstance(r.get(key), int | float)), None)
                if value is not None:
                    fams[suffix].add_metric([info.name], float(value))
        yield from [rows_fam, bad, live, *fams.values()]


def create_app(settings: DashboardSettings | None = None) -> FastAPI:
    settings = settings or DashboardSettings()
    run_dirs = ([settings.run_dir] if settings.run_dir else []) + list(settings.run_dirs)
    store = RunStore(
        run_dirs, settings.runs_root, redis_run=settings.run, live_window_s=settings.live_window_s
    )
    redis_url = settings.redis_url.get_secret_value() if settings.redis_url else None
    live = LiveSource(
        redis_url,
        settings.run,
        settings.inference_urls,
        timeout_s=settings.http_timeout_s,
        cache_s=min(settings.refresh_s / 2, 1.0),
    )
    registry = CollectorRegistry()
    requests = Counter(
        "r2vpo_dashboard_requests_total", "API requests by route", ["route"], registry=registry
    )
    registry.register(_RunCollector(store))
    refresh_lock = asyncio.Lock()
    last_refresh = [0.0]
    min_interval = min(settings.refresh_s / 4, 0.5)

    async def refresh() -> None:
        """Read new rows (files, then Redis for a run without a metrics file); at most every 0.5 s."""
        async with refresh_lock:
            if time.monotonic() - last_refresh[0] < min_interval:
                return
            store.refresh()
            target = store.redis_target()
            if target is not None:
                store.add_redis_rows(target[0], await live.read_metrics(target[1]))
            last_refresh[0] = time.monotonic()

    def get_run(run: str) -> Run:
        if not RUN_NAME.match(run):
            raise HTTPException(400, f"invalid run name {run[:80]!r}")
        found = store.get(run)
        if found is None:
            raise HTTPException(404, f"no run named {run!r}")
        return found

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await live.aclose()

    app = FastAPI(title="r2vpo dashboard", lifespan=lifespan)
    app.state.store, app.state.live, app.state.settings = store, live, settings
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        path = request.url.path
        if path.startswith("/api/"):
            requests.labels(_route_label(path)).inc()
        return await call_next(request)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/api/runs")
    async def runs() -> dict[str, Any]:
        await refresh()
        return {
            "runs": [info.model_dump() for info in store.runs()],
            "refresh_s": settings.refresh_s,
            "max_points": settings.max_points,
            "live_run": settings.run,
            "time": time.time(),
        }

    @app.get("/api/runs/{run}/metrics")
    async def metrics(
        run: str,
        after: int = Query(0, ge=0, description="rows the caller already has (index of the first row)"),
        max_points: int | None = Query(None, ge=10, le=100_000),
    ) -> dict[str, Any]:
        found = get_run(run)
        await refresh()
        total = len(found.rows)
        rows, stride = thin(found.rows[after:], after, max_points or settings.max_points)
        return {"run": found.name, "epoch": found.epoch, "after": after, "next": max(total, after),
                "total": total, "stride": stride, "rows": rows}  # fmt: skip

    @app.get("/api/runs/{run}/summary")
    async def summary(run: str) -> dict[str, Any]:
        found = get_run(run)
        value = found.summary.get()
        if value is None:
            raise HTTPException(404, f"run {run!r} has no summary yet (still running?)")
        return redact(value)

    @app.get("/api/runs/{run}/config")
    async def config(run: str) -> dict[str, Any]:
        found = get_run(run)
        value = found.config.get()
        if value is None:
            raise HTTPException(404, f"run {run!r} has no config.json")
        return redact(value)

    @app.get("/api/live")
    async def live_state() -> dict[str, Any]:
        return await live.snapshot()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if not STATIC.joinpath("index.html").is_file():
            return JSONResponse({"status": "not ready", "reason": "static files missing"}, status_code=503)
        return JSONResponse({"status": "ready", "runs": len(store.runs())})

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app

"""Shared fixtures: a real redis-server on a free loopback port, and FastAPI apps under real uvicorn."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from services.redis_server import RedisServer, free_port


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    """A fresh redis-server (append-only persistence on) for one test; stopped afterwards."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@contextmanager
def serve_app(app, *, port: int | None = None, ready_path: str = "/healthz") -> Iterator[str]:
    """Run `app` under uvicorn on 127.0.0.1 in a thread; yields its base URL; stops it on exit."""
    port = port or free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(base + ready_path, timeout=1).status_code < 500:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError(f"server on port {port} did not become ready")
        time.sleep(0.05)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture
def app_server():
    """`app_server(app)` → context manager yielding the base URL of the app served on a free port."""
    return serve_app


@pytest.fixture(scope="session")
def default_policy_dir():
    """The embedded default policy (warm-started once, cached under R2VPO_CACHE_DIR)."""
    from trainer.tiny import ensure_default_policy

    return ensure_default_policy(progress=False)

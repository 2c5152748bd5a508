"""The dashboard's JSON API and /metrics over real HTTP (uvicorn), on hand-written run directories; the
live extras against a real redis-server and with no Redis at all."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from services.dashboard import DashboardSettings, create_app
from services.dashboard.data import RunStore
from services.queue import TrajectoryQueue, connect_redis
from services.redis_server import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def row(step: int, **extra) -> dict:
    return {
        "step": step,
        "version": step,
        "reward_mean": 0.1 * step,
        "rollouts_consumed": 128 * step,
        "wall_s": 2.0 * step,
        "staleness_histogram": {"2": 128},
        **extra,
    }


def make_run(root: Path, name: str, rows: list[dict], *, algo: str = "r2vpo", finished: bool = True) -> Path:
    run = root / name
    run.mkdir(parents=True)
    config = {"model": "/models/tiny", "learner": {"algo": algo}, "lag": 2}
    (run / "config.json").write_text(json.dumps(config))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        (run / "summary.json").write_text(json.dumps({"algo": algo, "initial_accuracy": 0.3}))
    return run


def no_redis() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there


@pytest.fixture
def runs_root(tmp_path) -> Path:
    root = tmp_path / "runs"
    make_run(root, "r2vpo-a", [row(i) for i in range(1, 6)])
    make_run(root, "grpo-b", [row(i) for i in range(1, 4)], algo="grpo")
    (root / "not-a-run").mkdir()  # no config/metrics: ignored
    return root


def test_runs_lists_run_directories_with_facts(runs_root, app_server):
    app = create_app(DashboardSettings(runs_root=runs_root, redis_url=no_redis()))
    with app_server(app) as base:
        body = httpx.get(base + "/api/runs").json()
    runs = {r["name"]: r for r in body["runs"]}
    assert set(runs) == {"r2vpo-a", "grpo-b"}
    assert runs["r2vpo-a"]["algo"] == "r2vpo" and runs["grpo-b"]["algo"] == "grpo"
    assert runs["r2vpo-a"]["rows"] == 5 and runs["r2vpo-a"]["step"] == 5
    assert runs["r2vpo-a"]["status"] == "finished" and runs["r2vpo-a"]["lag"] == 2
    assert body["refresh_s"] == 2.0


def test_metrics_returns_rows_and_after_skips_what_the_caller_has(runs_root, app_server):
    app = create_app(DashboardSettings(runs_root=runs_root, redis_url=no_redis()))
    with app_server(app) as base:
        full = httpx.get(base + "/api/runs/r2vpo-a/metrics").json()
        tail = httpx.get(base + "/api/runs/r2vpo-a/metrics", params={"after": 3}).json()
        past_end = httpx.get(base + "/api/runs/r2vpo-a/metrics", params={"after": 99}).json()
        summary = httpx.get(base + "/api/runs/r2vpo-a/summary").json()
        config = httpx.get(base + "/api/runs/grpo-b/config").json()
    assert [r["step"] for r in full["rows"]] == [1, 2, 3, 4, 5]
    assert full["next"] == 5 and full["total"] == 5
    assert [r["step"] for r in tail["rows"]] == [4, 5] and [r["_i"] for r in tail["rows"]] == [3, 4]
    assert past_end["rows"] == []
    assert summary["initial_accuracy"] == 0.3 and config["learner"]["algo"] == "grpo"


def test_partial_last_line_waits_for_its_newline(tmp_path, app_server):
    run = make_run(tmp_path, "run", [row(1)], finished=False)
    line = json.dumps(row(2))
    with (run / "metrics.jsonl").open("a") as f:
        f.write(line[:10])  # the writer is in the middle of a line
    app = create_app(DashboardSettings(run_dir=run, redis_url=no_redis(), refresh_s=0.2))
    with app_server(app) as base:
        first = httpx.get(base + "/api/runs/run/metrics").json()
        with (run / "metrics.jsonl").open("a") as f:
            f.write(line[10:] + "\n")
        time.sleep(0.2)  # past the refresh throttle
        second = httpx.get(base + "/api/runs/run/metrics", params={"after": first["next"]}).json()
        info = httpx.get(base + "/api/runs").json()["runs"][0]
    assert [r["step"] for r in first["rows"]] == [1]
    assert [r["step"] for r in second["rows"]] == [2]
    assert info["malformed_lines"] == 0 and info["status"] == "live"


def test_malformed_lines_are_skipped_and_counted(tmp_path, app_server):
    run = make_run(tmp_path, "run", [row(1)])
    with (run / "metrics.jsonl").open("a") as f:
        f.write("{not json\n[1, 2]\n\n" + json.dumps(row(2)) + "\n")
    app = create_app(DashboardSettings(run_dir=run, redis_url=no_redis()))
    with app_server(app) as base:
        rows = httpx.get(base + "/api/runs/run/metrics").json()["rows"]
        info = httpx.get(base + "/api/runs").json()["runs"][0]
        exposition = httpx.get(base + "/metrics").text
    assert [r["step"] for r in rows] == [1, 2]
    assert info["malformed_lines"] == 2
    assert 'r2vpo_dashboard_run_malformed_lines{run="run"} 2.0' in exposition


@pytest.mark.parametrize(
    "path",
    [
        "/api/runs/../metrics",
        "/api/runs/..%2F..%2Fetc/config",
        "/api/runs/%2E%2E/summary",
        "/api/runs/.hidden/config",
        "/api/runs/r2vpo-a%2F..%2Fgrpo-b/config",
        "/api/runs/not-a-run/config",
        "/api/runs/nope/metrics",
        "/static/../data.py",
        "/static/%2E%2E/data.py",
    ],
)
def test_run_names_cannot_escape_the_configured_roots(runs_root, app_server, path):
    app = create_app(DashboardSettings(runs_root=runs_root, redis_url=no_redis()))
    with app_server(app) as base:
        resp = httpx.get(base + path)
    assert resp.status_code in (400, 404), (path, resp.status_code, resp.text[:200])
    assert "learner" not in resp.text and "import" not in resp.text


def test_metrics_endpoint_is_prometheus_text_at_exactly_that_path(runs_root, app_server):
    app = create_app(DashboardSettings(runs_root=runs_root, redis_url=no_redis()))
    with app_server(app) as base:
        httpx.get(base + "/api/runs")
        resp = httpx.get(base + "/metrics", follow_redirects=False)
        assert httpx.get(base + "/healthz").json() == {"status": "ok"}
        assert httpx.get(base + "/readyz").status_code == 200
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    assert 'r2vpo_dashboard_run_step{run="r2vpo-a"} 5.0' in resp.text
    assert 'r2vpo_dashboard_run_reward_mean{run="grpo-b"}' in resp.text
    assert 'r2vpo_dashboard_requests_total{route="/api/runs"} 1.0' in resp.text


def test_thinning_keeps_evaluation_rows_and_the_last_row(tmp_path, app_server):
    rows = [row(i, **({"accuracy": 0.5} if i % 97 == 0 else {})) for i in range(1, 1001)]
    make_run(tmp_path, "long", rows)
    app = create_app(DashboardSettings(run_dir=tmp_path / "long", redis_url=no_redis()))
    with app_server(app) as base:
        body = httpx.get(base + "/api/runs/long/metrics", params={"max_points": 100}).json()
    steps = [r["step"] for r in body["rows"]]
    assert body["stride"] == 10 and body["next"] == 1000
    assert len(steps) < 120 and steps[-1] == 1000
    assert all(s in steps for s in range(97, 1001, 97))


def test_rewritten_metrics_file_starts_a_new_epoch(tmp_path):
    run = make_run(tmp_path, "run", [row(i) for i in range(1, 4)])
    store = RunStore([run])
    assert len(store.metrics("run")) == 3 and store.runs()[0].epoch == 0
    (run / "metrics.jsonl").write_text(json.dumps(row(1)) + "\n")  # a fresh run in the same folder
    store.refresh()
    assert len(store.metrics("run")) == 1 and store.runs()[0].epoch == 1


def test_live_reports_redis_unreachable_without_failing(runs_root, app_server):
    values = {"runs_root": runs_root, "redis_url": no_redis(), "inference_urls": [no_redis()]}
    app = create_app(DashboardSettings(**values))
    with app_server(app) as base:
        live = httpx.get(base + "/api/live", timeout=10).json()
    assert live["redis"]["ok"] is False and live["redis"]["error"]
    assert live["inference"][0]["ok"] is False and live["inference"][0]["error"]


def test_live_reads_accounting_queue_and_metrics_from_redis(tmp_path, redis_url, app_server):
    async def seed() -> None:
        queue = TrajectoryQueue(await connect_redis(redis_url, attempts=3), "live", consumer="test")
        await queue.ensure_group()
        await queue.dead_letter({"x": 1}, "reward service error")
        await queue.set_state({"version": 7, "lam": 0.25, "algo": "r2vpo"})
        for i in (1, 2):
            await queue.append_metrics(row(i) | {"time": 1.0e9 + i})
        await queue.redis.aclose()

    asyncio.run(seed())
    # No run directory configured: the run lives in Redis alone.
    app = create_app(DashboardSettings(run="live", redis_url=redis_url))
    with app_server(app) as base:
        live = httpx.get(base + "/api/live").json()
        runs = httpx.get(base + "/api/runs").json()["runs"]
        rows = httpx.get(base + "/api/runs/live/metrics").json()["rows"]
    assert live["redis"]["ok"] is True
    assert live["redis"]["accounting"]["dead_lettered"] == 1 and live["redis"]["queue_length"] == 0
    assert live["redis"]["state"]["version"] == "7"
    assert [r["name"] for r in runs] == ["live"] and runs[0]["source"] == "redis"
    assert [r["step"] for r in rows] == [1, 2]


def test_config_is_served_with_secrets_masked(tmp_path, app_server):
    run = make_run(tmp_path, "up", [row(1)])
    config = {"learner": {"algo": "r2vpo"}, "redis_url": "redis://:pw@10.0.0.5:6379/0", "admin_token": "abc"}
    (run / "config.json").write_text(json.dumps(config))
    app = create_app(DashboardSettings(run_dir=run, redis_url=no_redis()))
    with app_server(app) as base:
        served = httpx.get(base + "/api/runs/up/config").json()
    assert served["redis_url"] == "redis://:***@10.0.0.5:6379/0" and served["admin_token"] == "***"
    assert served["learner"] == {"algo": "r2vpo"}

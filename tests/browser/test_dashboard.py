"""The dashboard in Debian's chromium, driven by Playwright, on REAL run directories (two short runs of the
synchronous trainer: R²VPO and GRPO, lag 2). Needs `apt-get install chromium` and `pip install playwright`
(never `playwright install`): without them these tests fail, they do not skip."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from services.dashboard import DashboardSettings, create_app
from services.redis_server import free_port
from trainer.learner import LearnerConfig
from trainer.sync import SyncTrainConfig, run_sync
from trainer.task import TaskConfig

pytestmark = [pytest.mark.browser, pytest.mark.timeout(900)]

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
ALGOS = ("r2vpo", "grpo")
# Charts with data from a finished sync run (publish_s, queue depth and inference tokens/s need the
# asynchronous services and show their empty state here).
ROW_CHARTS = ("reward-rollouts", "reward-wall", "acc-rollouts", "acc-wall", "ratio-var", "lam", "would-clip",
              "ess", "ratio-tail", "grad-norm", "kl", "entropy", "zero-var", "lag-hist", "lag-ratio",
              "lag-weight", "dropped", "tokens", "version")  # fmt: skip
DEADLINE_S = 20


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, default_policy_dir) -> Path:
    root = tmp_path_factory.mktemp("runs")
    for algo in ALGOS:
        cfg = SyncTrainConfig(
            run_dir=root / algo,
            model=default_policy_dir,
            steps=6,
            eval_every=3,
            lag=2,
            prompts_per_batch=8,
            group_size=4,
            task=TaskConfig(heldout_size=50),
            learner=LearnerConfig(algo=algo),
        )
        run_sync(cfg)
    return root


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("PyPI package `playwright` missing: pip install playwright (never `playwright install`)")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y --no-install-recommends chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def settings(**values) -> DashboardSettings:
    return DashboardSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0", refresh_s=0.5, **values)


class Page:
    """A page that records console errors, page errors, failed requests and HTTP errors."""

    def __init__(self, browser, url: str, **context) -> None:
        self.context = browser.new_context(**({"viewport": {"width": 1280, "height": 900}} | context))
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"failed: {r.url} {r.failure}"))
        self.page.on("response", lambda r: r.status >= 400 and self.problems.append(f"{r.status} {r.url}"))
        self.page.goto(url)

    def _console(self, message) -> None:
        # the pixel check below reads canvases back; chromium warns about that, not about the page
        if message.type in ("error", "warning") and "readback operations" not in message.text:
            self.problems.append(message.text)

    def wait_ready(self, chart: str = "reward-rollouts") -> None:
        self.page.wait_for_selector(f'#chart-{chart}[data-state="ready"] canvas', timeout=DEADLINE_S * 1000)

    def chart(self, chart_id: str) -> dict:
        """Size, drawn pixels and legend labels of one chart, plus the non-null points of each series."""
        return self.page.evaluate(
            """(id) => {
                const card = document.getElementById('chart-' + id);
                const canvas = card.querySelector('canvas');
                const out = {state: card.dataset.state, width: 0, height: 0, inked: 0, points: []};
                const labels = card.querySelectorAll('.u-legend .u-series .u-label');
                out.labels = [...labels].map(l => l.textContent);
                if (!canvas) return out;
                out.width = canvas.width; out.height = canvas.height;
                const px = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
                for (let i = 3; i < px.length; i += 4) if (px[i] > 0) out.inked++;
                const u = window.r2vpoDashboard.state.charts[id].u;
                out.points = u.data.slice(1).map(ys => ys.filter(v => v != null).length);
                return out;
            }""",
            chart_id,
        )

    def field(self, run: str, name: str) -> str:
        return self.page.inner_text(f'.fact-card[data-run="{run}"] [data-field="{name}"]')

    def close(self) -> None:
        self.context.close()


def test_two_runs_side_by_side_with_every_panel_drawn(browser, runs_root, app_server, tmp_path):
    with app_server(create_app(settings(runs_root=runs_root))) as base:
        page = Page(browser, base + "/")
        page.wait_ready()
        page.page.wait_for_timeout(1500)  # a few polls: nothing new may break the page
        for chart_id in ROW_CHARTS:
            info = page.chart(chart_id)
            assert info["state"] == "ready" and info["width"] > 0 and info["height"] > 0, (chart_id, info)
            assert info["inked"] > 500, (chart_id, "canvas is blank")
            for algo in ALGOS:
                assert any(label.startswith(algo) for label in info["labels"]), (chart_id, info["labels"])
        reward = page.chart("reward-rollouts")
        assert reward["labels"][1:] == ["grpo", "r2vpo"]
        assert reward["points"] == [6, 6]  # both series, every step
        budget = page.chart("var-minus-budget")  # only R²VPO applies a variance budget
        assert budget["labels"][1:] == ["r2vpo"]
        assert "Not reported by grpo" in page.page.inner_text("#chart-var-minus-budget")
        for algo in ALGOS:
            assert page.field(algo, "algo") == algo
            assert page.field(algo, "step") == "6" and page.field(algo, "lag") == "2"
            assert page.field(algo, "mode") == "sync"
            hist = page.page.inner_text(f'#chart-lag-hist .hist-summary [data-run="{algo}"]')
            assert "lag 2" in hist, hist
        assert "synchronous trainer publishes no weights" in page.page.inner_text("#chart-publish")
        assert "Redis not reachable" in page.page.inner_text("#chart-queue")
        # the samples table shows the completions of the last rows of metrics.jsonl
        rows = [json.loads(line) for line in (runs_root / "r2vpo" / "metrics.jsonl").read_text().splitlines()]
        shown = page.page.eval_on_selector_all(
            '#samples-table tbody tr[data-run="r2vpo"]', "trs => trs.map(tr => tr.cells[3].textContent)"
        )
        assert shown[:4] == [s["completion"] for s in rows[-1]["samples_preview"]]
        assert page.page.inner_text("#status") == "finished"
        page.page.screenshot(path=str(tmp_path / "dashboard-light-1280.png"), full_page=True)
        assert page.problems == []
        page.close()


def test_page_picks_up_new_rows_of_a_live_run(browser, runs_root, app_server, tmp_path):
    run = tmp_path / "live-r2vpo"
    run.mkdir()
    shutil.copy(runs_root / "r2vpo" / "config.json", run / "config.json")
    (run / "metrics.jsonl").write_text("")  # the run has started: no step yet
    rows = [json.loads(line) for line in (runs_root / "r2vpo" / "metrics.jsonl").read_text().splitlines()]
    with app_server(create_app(settings(run_dir=run))) as base:
        page = Page(browser, base + "/")
        page.page.wait_for_selector(".fact-card")
        assert "Waiting for the first step" in page.page.inner_text("#chart-reward-rollouts")
        assert page.page.inner_text("#samples-empty") == "Waiting for the first step…"
        for n, row in enumerate(rows[:3], start=1):
            with (run / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            page.page.wait_for_function(
                "(n) => document.querySelector('.fact-card [data-field=step]')?.textContent === String(n)",
                arg=n,
                timeout=DEADLINE_S * 1000,
            )
        page.wait_ready()
        assert page.chart("reward-rollouts")["points"] == [3]
        assert page.page.inner_text("#status") == "live"
        assert page.field("live-r2vpo", "rollouts") == str(rows[2]["rollouts_consumed"])
        page.page.screenshot(path=str(tmp_path / "dashboard-live.png"), full_page=True)
        assert page.problems == []
        page.close()


def test_dark_mode_at_800px_is_readable_and_not_broken(browser, runs_root, app_server, tmp_path):
    with app_server(create_app(settings(runs_root=runs_root))) as base:
        page = Page(browser, base + "/", color_scheme="dark", viewport={"width": 800, "height": 900})
        page.wait_ready()
        for chart_id in ROW_CHARTS:
            info = page.chart(chart_id)
            assert info["state"] == "ready" and info["width"] > 0 and info["inked"] > 500, (chart_id, info)
        layout = page.page.evaluate(
            """() => {
                const lum = (c) => c.match(/\\d+/g).slice(0, 3).map(Number).reduce((a, b) => a + b) / 765;
                const cards = [...document.querySelectorAll('.chart-card')];
                const rects = cards.map(c => c.getBoundingClientRect());
                return {
                    overflow: document.documentElement.scrollWidth - window.innerWidth,
                    bg: lum(getComputedStyle(document.body).backgroundColor),
                    fg: lum(getComputedStyle(document.body).color),
                    outside: rects.filter(r => r.right > window.innerWidth || r.width < 300).length,
                };
            }"""
        )
        assert layout["overflow"] <= 0, layout  # no horizontal scrolling of the page
        assert layout["bg"] < 0.2 and layout["fg"] > 0.7, layout  # dark background, light text
        assert layout["outside"] == 0, layout
        page.page.screenshot(path=str(tmp_path / "dashboard-dark-800.png"), full_page=True)
        assert page.problems == []
        page.close()


def test_unchecking_a_run_removes_it_from_every_chart(browser, runs_root, app_server):
    with app_server(create_app(settings(runs_root=runs_root))) as base:
        page = Page(browser, base + "/")
        page.wait_ready()
        page.page.uncheck('.run-picker input[data-run="grpo"]')
        deadline = time.monotonic() + DEADLINE_S
        while page.chart("reward-rollouts")["labels"][1:] != ["r2vpo"]:
            assert time.monotonic() < deadline, page.chart("reward-rollouts")
            page.page.wait_for_timeout(100)
        assert page.page.query_selector('.fact-card[data-run="grpo"]') is None
        assert page.page.query_selector('#samples-table tr[data-run="grpo"]') is None
        assert page.problems == []
        page.close()

"""Settings of the dashboard service (env prefix `R2VPO_DASHBOARD_`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.settings import ServiceSettings


class DashboardSettings(ServiceSettings, env_prefix="R2VPO_DASHBOARD_"):
    """Where the runs are and how the page refreshes.

    Runs come from run directories (`run_dir`, `run_dirs`) and/or every subdirectory of `runs_root` that
    holds a run (new ones appear while the dashboard runs). Redis (`redis_url`, namespace `run`) is an
    optional live source: queue depth, accounting and learner state, and the metrics stream of the run
    when its directory has no `metrics.jsonl` (a dashboard that does not share the learner's disk). With
    no run directory configured at all the dashboard shows that Redis run alone. Without Redis it works
    from the files and reports Redis as unreachable.
    """

    port: int = 8005
    run_dir: Path | None = Field(None, description="one run directory (config.json, metrics.jsonl, …)")
    run_dirs: list[Path] = Field(default_factory=list, description="more run directories to compare")
    runs_root: Path | None = Field(None, description="a folder whose subdirectories are runs")
    inference_urls: list[str] = Field(
        default_factory=list, description="inference base URLs; their /v1/models and /metrics are polled"
    )
    refresh_s: float = Field(2.0, ge=0.2, le=300, description="how often the page polls for new rows")
    max_points: int = Field(2000, ge=50, description="thin a run's rows to about this many per response")
    live_window_s: float = Field(
        300.0, gt=0, description="a run without a summary counts as live while updated within this window"
    )
    http_timeout_s: float = Field(2.0, gt=0, description="timeout of each Redis / inference probe")

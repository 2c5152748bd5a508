"""Prometheus counters of one reward service: scoring calls, their latency, and failures by kind."""

from __future__ import annotations

from fastapi.responses import Response

__all__ = ["RewardMetrics"]


class RewardMetrics:
    """Prometheus counters of one app, in a registry of its own (several apps may share a process)."""

    def __init__(self) -> None:
        try:
            import prometheus_client as prom
        except ImportError:  # metrics are optional for plug-in authors
            self.registry = None
            return
        self.registry = prom.CollectorRegistry()
        self.calls = prom.Counter("r2vpo_reward_calls", "Scoring function calls", registry=self.registry)
        self.errors = prom.Counter(
            "r2vpo_reward_errors",
            "Failed scoring calls and rejected requests",
            ["kind"],
            registry=self.registry,
        )
        self.latency = prom.Histogram(
            "r2vpo_reward_latency_seconds", "Time of one scoring call", registry=self.registry
        )

    def call(self, seconds: float) -> None:
        if self.registry is not None:
            self.calls.inc()
            self.latency.observe(seconds)

    def error(self, kind: str) -> None:
        if self.registry is not None:
            self.errors.labels(kind=kind).inc()

    def exposition(self) -> Response:
        if self.registry is None:
            return Response("prometheus_client is not installed\n", status_code=404, media_type="text/plain")
        import prometheus_client as prom

        return Response(prom.generate_latest(self.registry), media_type=prom.CONTENT_TYPE_LATEST)

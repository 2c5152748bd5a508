"""Prometheus metrics of the learner (and of the queue it reads), one registry per app."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class LearnerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.step = Gauge("r2vpo_learner_step", "Optimizer steps taken", registry=r)
        self.version = Gauge("r2vpo_learner_policy_version", "Policy version at the learner", registry=r)
        self.lam = Gauge("r2vpo_learner_lambda", "R²VPO dual variable λ", registry=r)
        self.ratio_var = Gauge(
            "r2vpo_learner_ratio_variance", "Variance of the policy ratio, last step", registry=r
        )
        self.loss = Gauge("r2vpo_learner_loss", "Loss of the last step", registry=r)
        self.accuracy = Gauge("r2vpo_learner_heldout_accuracy_ratio", "Held-out accuracy (0..1)", registry=r)
        self.tokens_per_s = Gauge("r2vpo_learner_tokens_per_second", "Trained tokens per second", registry=r)
        self.publish = Histogram(
            "r2vpo_learner_publish_duration_seconds", "Checkpoint + weight publication time", registry=r
        )
        self.trained = Counter("r2vpo_learner_groups_trained_total", "Groups trained", ["lag"], registry=r)
        self.dropped = Counter(
            "r2vpo_learner_groups_dropped_total", "Groups dropped as too stale", registry=r
        )
        self.nonfinite = Counter(
            "r2vpo_learner_nonfinite_updates_total",
            "Updates not applied because their inputs, log-probs, loss or gradient were NaN/inf",
            registry=r,
        )
        self.dead_lettered_groups = Counter(
            "r2vpo_learner_groups_dead_lettered_total",
            "Groups the learner sent to dead letter because their batch's update was not finite",
            registry=r,
        )
        self.queue_length = Gauge("r2vpo_queue_length", "Entries in the trajectory stream", registry=r)
        self.queue_pending = Gauge("r2vpo_queue_pending", "Delivered, unacknowledged entries", registry=r)
        self.dead_lettered = Gauge(
            "r2vpo_queue_dead_lettered", "Groups sent to dead letter (run total)", registry=r
        )

    def observe_step(self, record: dict[str, Any], lags: dict[int, int], group_size: float) -> None:
        self.step.set(record.get("step", 0))
        self.version.set(record.get("version", 0))
        for name, gauge in (
            ("lam_next", self.lam),
            ("ratio_var", self.ratio_var),
            ("loss", self.loss),
            ("learner_tokens_per_s", self.tokens_per_s),
            ("accuracy", self.accuracy),
        ):
            if record.get(name) is not None:
                gauge.set(record[name])
        for lag, samples in lags.items():
            self.trained.labels(lag=str(lag)).inc(samples / group_size)
        self.dropped.inc(record.get("groups_dropped", 0))
        self.nonfinite.inc(record.get("nonfinite_updates", 0))
        if "publish_s" in record:
            self.publish.observe(record["commit_s"])

    def observe_skipped(self, dead_lettered: int, dropped: int) -> None:
        """A batch not applied (its first update was not finite): no step, its groups dead-lettered."""
        self.nonfinite.inc()
        self.dead_lettered_groups.inc(dead_lettered)
        self.dropped.inc(dropped)

    def observe_queue(self, accounting: dict[str, int], length: int) -> None:
        self.queue_length.set(length)
        self.queue_pending.set(accounting.get("pending", 0))
        self.dead_lettered.set(accounting.get("dead_lettered", 0))

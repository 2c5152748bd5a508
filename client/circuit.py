"""The circuit breaker that guards a reward service: after enough consecutive failed calls, fail fast
instead of piling more requests on a service that is down."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Literal

from client.errors import RewardError

CircuitState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Opens after `failure_threshold` consecutive failed calls; fails fast while open; after
    `reset_after_s` it is half-open and lets one probe call through, which closes it on success.

    A failed call is one that ends (after its retries) in timeout / unreachable / 5xx / invalid; a 4xx
    answer shows the service is up, so it counts as a success here. Thread-safe.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_after_s: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or reset_after_s < 0:
            raise ValueError("failure_threshold must be >= 1 and reset_after_s >= 0")
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> CircuitState:
        with self._lock:
            return self._state()

    def _state(self) -> CircuitState:
        if self._opened_at is None:
            return "closed"
        return "half_open" if self._clock() - self._opened_at >= self.reset_after_s else "open"

    def before_call(self) -> None:
        """Admit a call or raise RewardError('circuit_open')."""
        with self._lock:
            state = self._state()
            if state == "closed":
                return
            if state == "half_open" and not self._probing:
                self._probing = True
                return
            wait = max(0.0, self.reset_after_s - (self._clock() - (self._opened_at or 0.0)))
            raise RewardError(
                "circuit_open", f"circuit open after {self._failures} failures; retry in {wait:.1f}s"
            )

    def record(self, error: RewardError | None) -> None:
        """Record the outcome of an admitted call (None: success)."""
        with self._lock:
            self._probing = False
            if error is None or error.kind == "http" and (error.status_code or 0) < 500:
                self._failures, self._opened_at = 0, None
                return
            self._failures += 1
            if self._opened_at is not None or self._failures >= self.failure_threshold:
                self._opened_at = self._clock()

    def abandon(self) -> None:
        """An admitted call was cancelled without an outcome: free the half-open probe slot."""
        with self._lock:
            self._probing = False

"""The typed errors the HTTP clients raise: `InferenceError` (inference service), `RewardError` (reward
plug-in). A failed call is always one of these, never a made-up result."""

from __future__ import annotations

from typing import Any, Literal

RewardErrorKind = Literal["timeout", "http", "invalid", "circuit_open", "unreachable"]


class InferenceError(Exception):
    """A failed inference call: `status_code` is the HTTP status (None when the server was unreachable)."""

    def __init__(
        self, message: str, *, status_code: int | None = None, retryable: bool | None = None
    ) -> None:
        super().__init__(message if status_code is None else f"HTTP {status_code}: {message}")
        self.message = message
        self.status_code = status_code
        # Unreachable servers and 5xx answers may succeed on a later try; 4xx answers will not.
        self.retryable = (status_code is None or status_code >= 500) if retryable is None else retryable


class RewardError(Exception):
    """A failed reward call. `kind` says what failed; `status_code` is set for HTTP errors."""

    def __init__(
        self, kind: RewardErrorKind, message: str, *, status_code: int | None = None, detail: Any = None
    ):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.status_code = status_code
        self.detail = detail

    @property
    def retryable(self) -> bool:
        """Timeouts, unreachable services and 5xx answers may succeed on a later try; the rest will not."""
        return self.kind in ("timeout", "unreachable") or (
            self.kind == "http" and (self.status_code or 0) >= 500
        )

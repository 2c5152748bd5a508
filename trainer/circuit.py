"""The circuit stop for non-finite updates: a run whose batches keep failing stops instead of going on.

One batch whose update is not finite is skipped (`trainer.learner`), and the run goes on: bad data passes. But
when the weights themselves have diverged, every later batch fails the same way, and a run that goes on only
throws its data away (the service dead-letters every group, the sync trainer skips every batch). So after
`limit` batches in a row were not applied, the run stops with `NonFiniteStreak`; an applied batch resets the
count, and a batch that trained nothing for another reason (every group too stale) leaves it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass


class NonFiniteStreak(ValueError):
    """`limit` consecutive batches were not applied. A ValueError, as `DeviceUnavailable` is, so that the CLI
    reports it as an error message rather than a traceback."""


@dataclass
class NonFiniteCircuit:
    limit: int  # stop at this many consecutive batches not applied (>= 1)
    streak: int = 0
    last_reason: str = ""

    def record(self, *, applied: bool, skip_reason: str | None = None) -> None:
        """One batch's outcome: applied (resets the count), not applied (`skip_reason`: counts), or neither
        (nothing trained, e.g. every group too stale: no change). `check` then stops the run at the limit."""
        if applied:
            self.streak, self.last_reason = 0, ""
        elif skip_reason is not None:
            self.streak, self.last_reason = self.streak + 1, skip_reason

    @property
    def tripped(self) -> bool:
        return self.streak >= self.limit

    def check(self) -> None:
        """Raise `NonFiniteStreak` if the count has reached the limit."""
        if self.tripped:
            raise NonFiniteStreak(
                f"{self.streak} consecutive batches were not applied because their update was not finite "
                f"(max_consecutive_nonfinite={self.limit}); the last one: {self.last_reason}. The weights "
                "or the data keep producing NaN/inf: stopping rather than discarding every later batch"
            )

    def state(self) -> dict[str, str]:
        """The count as string fields (kept in a Redis hash by the learner service, to outlive a restart)."""
        return {"nonfinite_streak": str(self.streak), "nonfinite_reason": self.last_reason}

    def restore(self, state: dict[str, str]) -> None:
        """Take the count back from `state()`'s fields (absent: none)."""
        self.streak = int(state.get("nonfinite_streak") or 0)
        self.last_reason = state.get("nonfinite_reason", "")

"""Staleness: how many policy versions old a sample is, and what the learner does about it (DESIGN §5).

lag = current learner version − version that generated the sample. Clipping baselines drop samples older
than `max_lag` (the usual rule of asynchronous trainers); R²VPO keeps them and lets the ratio reweight them,
optionally times an explicit lag weight `lag_decay ** lag`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
from pydantic import BaseModel, ConfigDict, Field


class StalenessConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_lag: int | None = Field(
        None, ge=0, description="drop samples older than this many versions; None = the algorithm's default"
    )
    lag_decay: float = Field(1.0, gt=0.0, le=1.0, description="explicit weight lag_decay**lag on advantages")


# Clipping objectives discard what their trust region cannot use; R²VPO reweights instead (no bound).
DEFAULT_MAX_LAG: dict[str, int | None] = {"r2vpo": None, "is": None}
BASELINE_MAX_LAG = 8


def effective_max_lag(algo: str, config: StalenessConfig) -> int | None:
    if config.max_lag is not None:
        return config.max_lag
    return DEFAULT_MAX_LAG.get(algo, BASELINE_MAX_LAG)


def lag_of(current_version: int, sample_version: int) -> int:
    if sample_version > current_version:
        raise ValueError(
            f"sample version {sample_version} is newer than the learner's version {current_version}"
        )
    return current_version - sample_version


def is_admissible(lag: int, max_lag: int | None) -> bool:
    return max_lag is None or lag <= max_lag


def lag_weights(lags: torch.Tensor, decay: float) -> torch.Tensor:
    """Explicit staleness weight w = decay**lag (1 everywhere when decay == 1)."""
    return torch.pow(torch.as_tensor(decay, dtype=torch.float32), lags.to(torch.float32))


def staleness_histogram(lags: Iterable[int]) -> dict[int, int]:
    """Lag in versions → number of samples, sorted by lag."""
    return dict(sorted(Counter(int(x) for x in lags).items()))

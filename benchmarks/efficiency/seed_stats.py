"""Statistics over seeds: mean, sample std and the 95% Student-t interval of the mean (no scipy needed)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

# Two-sided 95% quantiles of Student's t, by degrees of freedom (no scipy needed).
_T975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
    11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
    20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980,
}  # fmt: skip


def t975(df: int) -> float:
    """Two-sided 95% Student-t quantile for ``df`` degrees of freedom (nearest tabulated df below)."""
    if df < 1:
        return math.nan
    return _T975[max(k for k in _T975 if k <= df)] if df <= 120 else 1.960


def mean_or_none(values: Iterable[Any]) -> float | None:
    """Mean of the numeric values (others, e.g. None, are skipped); None when there are none."""
    vals = [float(v) for v in values if isinstance(v, int | float)]
    return sum(vals) / len(vals) if vals else None


def stats(values: Sequence[float]) -> dict[str, Any]:
    """mean, sample std and the 95% t-interval of the mean over seeds."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": [None, None], "values": []}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = t975(n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    ci = [mean - half, mean + half] if n > 1 else [None, None]
    return {"n": n, "mean": mean, "std": std, "ci95": ci, "values": list(values)}

"""Statistics and figures: medians, a bootstrap interval of paired ratios, and the fair-order helpers
(a rotated order per repetition, a device sync before reading the clock)."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from typing import Any


def median(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else None


def bootstrap_ci(xs: Sequence[float], *, n: int = 2000, seed: int = 0) -> list[float] | None:
    """95% percentile interval of the median of `xs` (None with fewer than three values)."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if len(xs) < 3:
        return None
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(n))
    return [meds[int(0.025 * n)], meds[int(0.975 * n) - 1]]


def figure(
    section: str,
    name: str,
    values: Sequence[float],
    baselines: Sequence[float],
    *,
    unit: str,
    what: str,
    baseline_what: str,
    better: str = "higher",
    **extra: Any,
) -> dict[str, Any]:
    """One figure: medians of value and baseline, the median of paired ratios and its interval."""
    values, baselines = list(values), list(baselines)
    paired = len(values) == len(baselines)
    if paired:
        ratios = [v / b if b else math.nan for v, b in zip(values, baselines, strict=True)]
        ratio = median(ratios)
    else:
        ratios = []
        value, baseline = median(values), median(baselines)
        ratio = value / baseline if value is not None and baseline else None
    return {
        "section": section,
        "name": name,
        "value": median(values),
        "baseline": median(baselines),
        "ratio": ratio,
        "interval": bootstrap_ci(ratios) if paired else None,
        "unit": unit,
        "what": what,
        "baseline_what": baseline_what,
        "better": better,
        "reps": len(values),
        "values": values,
        "baselines": baselines,
        "ratios": ratios,
        **extra,
    }


def rotated(items: Sequence[str], rep: int) -> list[str]:
    """`items` rotated by `rep`: each kind takes each position in turn (no fixed order bias)."""
    k = rep % len(items)
    return list(items[k:]) + list(items[:k])


def sync_device(device: str) -> None:
    """Wait for the GPU's queued work before the clock is read (nothing to wait for on the CPU)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()

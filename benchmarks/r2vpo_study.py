"""R²VPO robustness study (issue "Make R²VPO earn its claim"): variants of the objective against clipping.

Every run is the synchronous trainer (`trainer/sync.py`, what `r2vpo train --sync` runs) with the embedded
tiny policy, the regimes of `benchmarks/sample_efficiency.py` (mild: lr 1e-4, 1 update per batch; stressed:
lr 3e-4, 2 updates per batch) and a forced lag. A *variant* is an algorithm plus overrides of
`LearnerConfig` (loss options, dual settings, split gradient clipping, replay); `r2vpo` alone is the
default the learner resolves from `trainer.learner.ALGO_DEFAULTS`.

    # screen variants cheaply: 2 seeds, stressed lag 4
    python benchmarks/r2vpo_study.py run --variants r2vpo r2vpo-split grpo --regimes stressed --lags 4 \\
        --seeds 0 1 --out benchmarks/results/r2vpo_study/screen
    # the headline grid for the finalists
    python benchmarks/r2vpo_study.py run --variants r2vpo grpo dapo cispo is --regimes mild stressed \\
        --lags 0 4 8 --seeds 0 1 2 3 4 --out benchmarks/results/r2vpo_study/final
    python benchmarks/r2vpo_study.py report DIR [--plots]   # markdown table (+ PNGs) from the run dirs

A run directory that already holds `summary.json` is not run again (resumable). Each run's equivalent
command line (`r2vpo train --sync … --config VARIANT.json`) is written to `commands.txt`. The statistics
(mean and 95% t-interval over seeds, rollouts to target, AUC) come from `sample_efficiency.py`.
"""

# The code lives in the `variant_study` package beside this file, a module per job (its __init__ lists them).

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):  # the package, and `sample_efficiency` it imports as `se`
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from benchmarks.variant_study import cli  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(argv, description=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())

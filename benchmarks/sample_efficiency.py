"""Sample-efficiency benchmark: R²VPO against clipping baselines under forced staleness (issue "Benchmarks").

Every run is the synchronous trainer (`trainer/sync.py`, exactly what `r2vpo train --sync --lag K` runs) on
the same task, the same embedded tiny policy and warm start, the same seeds and the same rollout budget
(steps × prompts × group size). The grid is algorithm × lag × regime × seed:

    regimes   mild     lr 1e-4, 1 optimizer step per batch
              stressed lr 3e-4, 2 optimizer steps per batch
    lags      0 2 4 8  (SyncTrainConfig.lag: every update trains on samples that many versions old)

At lag 0 with one update per batch the ratio is ≡ 1 and every token-level objective (r2vpo, grpo, dapo,
cispo, is) has the same gradient; GSPO differs only by weighting tokens per sequence. That is expected.

Per run: rollouts to reach a target held-out accuracy (or "not reached"), final and best accuracy, the area
under the accuracy-vs-rollouts curve (trapezoid, normalised by the rollout budget, i.e. the mean accuracy
over training), R²VPO's final λ and the wall time. Per cell (algo × lag × regime): mean, std and a 95%
t-interval over seeds. A sensitivity sweep of R²VPO's budget δ and dual step size η_λ runs at one stressed
lag.

    python benchmarks/sample_efficiency.py --quick                 # smoke test, well under a minute
    python benchmarks/sample_efficiency.py --full --regimes mild stressed --out DIR   # resumable
    python benchmarks/sample_efficiency.py --report DIR/results.json                  # markdown table
    python benchmarks/sample_efficiency.py --replot DIR/results.json                  # plots again

Runs execute in a process pool (one torch thread each); every run writes its own directory under
`<out>/runs/` and a run whose `summary.json` exists is not run again, so an interrupted benchmark resumes
with the same command. Checkpoints are deleted after each run (only metrics and summaries are kept).
"""

# The code lives in the `efficiency` package beside this file, a module per job (its __init__ lists them);
# this file is the command, and keeps the names benchmarks/r2vpo_study.py uses as `se.*`.

from __future__ import annotations

import sys

from efficiency import REPO
from efficiency.cli import main
from efficiency.execution import init_worker as _init_worker
from efficiency.grid import REGIMES
from efficiency.run_metrics import binned_series, normalised_auc, rollouts_to_target
from efficiency.seed_stats import mean_or_none as _mean
from efficiency.seed_stats import stats, t975

__all__ = [
    "REGIMES",
    "_init_worker",
    "_mean",
    "binned_series",
    "main",
    "normalised_auc",
    "rollouts_to_target",
    "stats",
    "t975",
]

if str(REPO) not in sys.path:  # `python benchmarks/sample_efficiency.py` from anywhere
    sys.path.insert(0, str(REPO))

if __name__ == "__main__":
    sys.exit(main(description=__doc__))

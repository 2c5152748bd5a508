"""The sample-efficiency benchmark behind `benchmarks/sample_efficiency.py`, one job per module:

grid.py         regimes, defaults and the run specifications (algo × lag × regime × seed, the δ / η_λ sweep)
execution.py    one training run in a worker process; the resumable process pool over the specs
run_metrics.py  one run's numbers read back from its directory (rollouts to target, AUC, binned series)
seed_stats.py   mean, std and the 95% t-interval over seeds
cells.py        runs aggregated per cell over seeds; the grid and sweep cells in table order
provenance.py   machine and git facts (the trainer code the runs ran)
results.py      results.json: the collected runs and cells, and its compact text
report.py       the markdown tables
plots.py        accuracy vs rollouts, R²VPO's dynamics and its sensitivity
cli.py          flags, mode presets and the driver
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

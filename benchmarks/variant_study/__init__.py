"""The R²VPO robustness study behind `python benchmarks/r2vpo_study.py` (its docstring says what it runs):

variants.py   the variants: an algorithm plus `LearnerConfig` overrides, by name, in table order
grid.py       the regimes and the run specifications (regime × variant × lag × seed), their names and CLIs
execution.py  one run of the synchronous trainer; the resumable process pool over the specs
results.py    the runs read back from their directories, aggregated per cell over seeds
report.py     the markdown tables (and results.json)
plots.py      accuracy and the training dynamics per regime and lag
cli.py        the `run` and `report` subcommands

The statistics (mean and 95% t-interval over seeds, rollouts to target, AUC) and the base regimes come from
`benchmarks/sample_efficiency.py`, imported as `se`.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

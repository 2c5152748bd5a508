"""The benchmark's grid: regimes, defaults and the specification of one training run (algo × lag × regime ×
seed, plus the runs of R²VPO's δ / η_λ sensitivity sweep)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass

ALGOS = ("r2vpo", "grpo", "dapo", "gspo", "cispo", "is")
LAGS = (0, 2, 4, 8)
REGIMES: dict[str, dict[str, float | int]] = {
    "mild": {"lr": 1e-4, "updates_per_batch": 1},
    "stressed": {"lr": 3e-4, "updates_per_batch": 2},
}
DEFAULT_DELTA = 0.04  # DualConfig.budget default (ε² for ε = 0.2)
DEFAULT_DUAL_LR = 0.1  # DualConfig.lr default
DEFAULT_TARGET = 0.5  # held-out greedy accuracy; the warm start is at ~0.33


@dataclass(frozen=True)
class RunSpec:
    regime: str
    algo: str
    lag: int
    seed: int
    steps: int
    eval_every: int
    delta: float = DEFAULT_DELTA
    dual_lr: float = DEFAULT_DUAL_LR
    prompts_per_batch: int = 16
    group_size: int = 8

    @property
    def lr(self) -> float:
        return float(REGIMES[self.regime]["lr"])

    @property
    def updates_per_batch(self) -> int:
        return int(REGIMES[self.regime]["updates_per_batch"])

    @property
    def default_dual(self) -> bool:
        return self.delta == DEFAULT_DELTA and self.dual_lr == DEFAULT_DUAL_LR

    @property
    def name(self) -> str:
        """Run directory name; a sweep point with the default δ, η is the grid's R²VPO run (shared)."""
        dual = "" if self.algo != "r2vpo" or self.default_dual else f"-d{self.delta:g}-eta{self.dual_lr:g}"
        return f"{self.regime}-{self.algo}{dual}-lag{self.lag}-s{self.seed}"

    @property
    def rollout_budget(self) -> int:
        return self.steps * self.prompts_per_batch * self.group_size

    def cli(self) -> str:
        """The equivalent `r2vpo train` command line."""
        args = [
            "r2vpo train --sync",
            f"--algo {self.algo}",
            f"--lag {self.lag}",
            f"--lr {self.lr:g}",
            f"--updates-per-batch {self.updates_per_batch}",
            f"--seed {self.seed}",
            f"--steps {self.steps}",
            f"--eval-every {self.eval_every}",
        ]
        if self.algo == "r2vpo":
            args += [f"--var-budget {self.delta:g}", f"--dual-lr {self.dual_lr:g}"]
        return " ".join(args)


def grid_specs(args: argparse.Namespace) -> list[RunSpec]:
    """Grid runs ordered seed-major, so an interrupted benchmark has whole seeds of every cell first."""
    return [
        RunSpec(regime, algo, lag, seed, args.steps, args.eval_every)
        for regime in args.regimes
        for seed in args.seeds
        for lag in args.lags
        for algo in args.algos
    ]


def sweep_specs(args: argparse.Namespace) -> list[RunSpec]:
    """R²VPO at the sweep lag and regime: δ varied at the default η_λ, then η_λ varied at the default δ."""
    if args.no_sweep:
        return []
    points = [(d, DEFAULT_DUAL_LR) for d in args.deltas] + [(DEFAULT_DELTA, e) for e in args.dual_lrs]
    points = list(dict.fromkeys(points))
    specs = [
        RunSpec(args.sweep_regime, "r2vpo", args.sweep_lag, seed, args.steps, args.eval_every, d, e)
        for seed in args.seeds
        for d, e in points
    ]
    # the clipping reference of the sweep plot, if the grid does not already hold it
    for seed in args.seeds:
        specs.append(RunSpec(args.sweep_regime, "grpo", args.sweep_lag, seed, args.steps, args.eval_every))
    return specs


def unique(specs: Iterable[RunSpec]) -> list[RunSpec]:
    seen: dict[str, RunSpec] = {}
    for spec in specs:
        seen.setdefault(spec.name, spec)
    return list(seen.values())

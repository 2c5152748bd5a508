"""The regimes and the run specifications: regime × variant × lag × seed, each run's name (and back) and
its equivalent `r2vpo train --sync` command line."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import sample_efficiency as se

from benchmarks.variant_study.variants import VARIANTS

REGIMES: dict[str, dict[str, float | int]] = {
    **se.REGIMES,
    "stressed4": {"lr": 3e-4, "updates_per_batch": 4},
}


@dataclass(frozen=True)
class Spec:
    regime: str
    variant: str
    lag: int
    seed: int
    steps: int
    eval_every: int

    @property
    def name(self) -> str:
        return f"{self.regime}-{self.variant}-lag{self.lag}-s{self.seed}"

    @property
    def algo(self) -> str:
        return VARIANTS[self.variant][0]

    def learner(self) -> dict[str, Any]:
        regime = REGIMES[self.regime]
        overrides = VARIANTS[self.variant][1]
        return {
            **overrides,
            "algo": self.algo,
            "lr": regime["lr"],
            "updates_per_batch": regime["updates_per_batch"],
        }

    def cli(self) -> str:
        regime = REGIMES[self.regime]
        args = [
            f"r2vpo train --sync --algo {self.algo} --lr {regime['lr']:g}",
            f"--updates-per-batch {regime['updates_per_batch']} --lag {self.lag} --seed {self.seed}",
            f"--steps {self.steps} --eval-every {self.eval_every}",
        ]
        dual = VARIANTS[self.variant][1].get("dual", {})
        if "budget" in dual or "lr" in dual:  # the CLI always sets δ and η_λ from its own flags
            args.append(f"--var-budget {dual.get('budget', 0.04):g} --dual-lr {dual.get('lr', 0.1):g}")
        if VARIANTS[self.variant][1]:
            args.append(f"--config variants/{self.variant}.json")
        return " ".join(args)


def specs_from(args: argparse.Namespace) -> list[Spec]:
    return [
        Spec(regime, variant, lag, seed, args.steps, args.eval_every)
        for seed in args.seeds
        for regime in args.regimes
        for lag in args.lags
        for variant in args.variants
    ]


def parse_name(name: str) -> tuple[str, str, int, int]:
    regime, rest = name.split("-", 1)
    variant, lag_seed = rest.rsplit("-lag", 1)
    lag, seed = lag_seed.split("-s")
    return regime, variant, int(lag), int(seed)

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

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import sample_efficiency as se  # noqa: E402  (the statistics and regimes of the shared benchmark)

OUT = REPO / "benchmarks" / "results" / "r2vpo_study"
TARGET = 0.45  # held-out greedy accuracy (warm start ~0.335); the stressed regime rarely reaches 0.5

# name → (algo, LearnerConfig overrides). "r2vpo" is the resolved default; "r2vpo-plain" the DESIGN §5 form.
PLAIN: dict[str, Any] = {
    "loss_options": {
        "penalty": "ratio",
        "center": "mean",
        "var_level": "token",
        "sample_weight": "none",
        "trust_region": "behavior",
    },
    "dual": {"mode": "additive", "lr": 0.1, "ema": 0.0, "update_every": "step"},
    "grad_clip_penalty": None,
}


def _plain(**changes: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(PLAIN))
    for key, value in changes.items():
        if isinstance(value, dict):
            out[key] = {**out.get(key, {}), **value}
        else:
            out[key] = value
    return out


_DECOUPLED = {"penalty": "log_ratio", "trust_region": "proximal", "stale_weight_cap": 2.0}

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # baselines
    "grpo": ("grpo", {}),
    "dapo": ("dapo", {}),
    "cispo": ("cispo", {}),
    "gspo": ("gspo", {}),
    "is": ("is", {}),
    # R²VPO: the learner's default, and the DESIGN §5 form before this study
    "r2vpo": ("r2vpo", {}),
    "r2vpo-plain": ("r2vpo", _plain()),
    "r2vpo-eta1": ("r2vpo", _plain(dual={"lr": 1.0})),
    # scale
    "r2vpo-norm-eta1": ("r2vpo", _plain(dual={"lr": 1.0}, loss_options={"normalize_by_lambda": True})),
    "r2vpo-split-eta1": ("r2vpo", _plain(dual={"lr": 1.0}, grad_clip_penalty=0.5)),
    "r2vpo-split": ("r2vpo", _plain(grad_clip_penalty=0.5)),
    "r2vpo-norm": ("r2vpo", _plain(loss_options={"normalize_by_lambda": True})),
    # robust variance
    "r2vpo-log": ("r2vpo", _plain(loss_options={"penalty": "log_ratio"})),
    "r2vpo-trunc": ("r2vpo", _plain(loss_options={"penalty": "truncated"})),
    "r2vpo-one": ("r2vpo", _plain(loss_options={"center": "one"})),
    "r2vpo-log-eta1": ("r2vpo", _plain(dual={"lr": 1.0}, loss_options={"penalty": "log_ratio"})),
    "r2vpo-trunc-eta1": ("r2vpo", _plain(dual={"lr": 1.0}, loss_options={"penalty": "truncated"})),
    "r2vpo-one-eta1": ("r2vpo", _plain(dual={"lr": 1.0}, loss_options={"center": "one"})),
    "r2vpo-seq": ("r2vpo", _plain(loss_options={"var_level": "sequence"})),
    # the dual
    "r2vpo-mult": ("r2vpo", _plain(dual={"mode": "multiplicative", "lr": 0.1})),
    "r2vpo-ema-eta1": ("r2vpo", _plain(dual={"lr": 1.0, "ema": 0.9})),
    "r2vpo-pid": ("r2vpo", _plain(dual={"mode": "pid", "lr": 0.1, "kp": 1.0, "kd": 0.0, "ema": 0.5})),
    "r2vpo-batch": ("r2vpo", _plain(dual={"update_every": "batch"})),
    "r2vpo-ema": ("r2vpo", _plain(dual={"ema": 0.9})),
    "r2vpo-batch-eta1": ("r2vpo", _plain(dual={"lr": 1.0, "update_every": "batch"})),
    # the reuse side
    "r2vpo-chi2": ("r2vpo", _plain(loss_options={"sample_weight": "chi2"})),
    "r2vpo-chi2-split-eta1": (
        "r2vpo",
        _plain(dual={"lr": 1.0}, loss_options={"sample_weight": "chi2"}, grad_clip_penalty=0.5),
    ),
    "r2vpo-replay": ("r2vpo", _plain(replay={"capacity": 32, "max_age": 8, "groups_per_batch": 8})),
    "grpo-replay": ("grpo", {"replay": {"capacity": 32, "max_age": 8, "groups_per_batch": 8}}),
    # decoupled trust region: penalise the ratio to the batch-start weights, reweight staleness by r
    "r2vpo-prox": ("r2vpo", _plain(loss_options={"trust_region": "proximal"})),
    "r2vpo-prox-eta1": ("r2vpo", _plain(dual={"lr": 1.0}, loss_options={"trust_region": "proximal"})),
    "r2vpo-prox-chi2": (
        "r2vpo",
        _plain(loss_options={"trust_region": "proximal", "sample_weight": "chi2"}),
    ),
    "r2vpo-prox-chi2-split-eta1": (
        "r2vpo",
        _plain(
            dual={"lr": 1.0},
            loss_options={"trust_region": "proximal", "sample_weight": "chi2"},
            grad_clip_penalty=0.5,
        ),
    ),
    # decoupled, bounded: penalise Var(log q) of this batch's own drift (feasible at any lag), split clip,
    # and truncate the stale factor π_prox/π_b of the surrogate's importance weight at 2 (V-trace style)
    "r2vpo-dec": ("r2vpo", {"loss_options": _DECOUPLED}),
    "r2vpo-dec-tight": ("r2vpo", {"loss_options": _DECOUPLED, "dual": {"budget": 0.005, "lr": 1.0}}),
    "r2vpo-dec-mult": (
        "r2vpo",
        {
            "loss_options": _DECOUPLED,
            "dual": {"mode": "multiplicative", "budget": 0.005, "lr": 0.5, "update_every": "batch"},
        },
    ),
    # combinations
    "r2vpo-log-split": ("r2vpo", _plain(loss_options={"penalty": "log_ratio"}, grad_clip_penalty=0.5)),
    "r2vpo-log-split-eta1": (
        "r2vpo",
        _plain(dual={"lr": 1.0}, loss_options={"penalty": "log_ratio"}, grad_clip_penalty=0.5),
    ),
}

REGIMES: dict[str, dict[str, float | int]] = {
    **se.REGIMES,
    "stressed4": {"lr": 3e-4, "updates_per_batch": 4},
}
SERIES = (
    "lam_next",
    "ratio_var",
    "penalty_var",
    "would_clip_frac",
    "grad_norm",
    "grad_norm_surrogate",
    "grad_norm_penalty",
    "ratio_p999",
    "ess",
    "entropy",
    "reward_mean",
    "zero_var_group_frac",
)


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


def sync_config(spec: Spec, run_dir: Path) -> Any:
    from trainer.sync import SyncTrainConfig

    return SyncTrainConfig(
        run_dir=run_dir,
        steps=spec.steps,
        eval_every=spec.eval_every,
        lag=spec.lag,
        seed=spec.seed,
        learner=spec.learner(),
    )


def _init_worker() -> None:
    se._init_worker()
    os.nice(10)


def run_one(spec: Spec, run_dir: Path) -> dict[str, Any]:
    from trainer.sync import run_sync

    started = time.perf_counter()
    try:
        summary = run_sync(sync_config(spec, run_dir))
    except Exception as exc:  # a diverged run is a result
        summary = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        summary["wall_time_s"] = time.perf_counter() - started
        (run_dir / "error.json").write_text(json.dumps(summary, indent=1))
    finally:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return summary


def specs_from(args: argparse.Namespace) -> list[Spec]:
    return [
        Spec(regime, variant, lag, seed, args.steps, args.eval_every)
        for seed in args.seeds
        for regime in args.regimes
        for lag in args.lags
        for variant in args.variants
    ]


def execute(specs: list[Spec], out: Path, workers: int) -> None:
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    variants_dir = out / "variants"
    variants_dir.mkdir(exist_ok=True)
    with (out / "commands.txt").open("a") as f:
        for spec in specs:
            f.write(f"{spec.name}: {spec.cli()}\n")
    for variant in {s.variant for s in specs}:
        overrides = VARIANTS[variant][1]
        if overrides:
            (variants_dir / f"{variant}.json").write_text(json.dumps({"learner": overrides}, indent=1))
    todo = [s for s in specs if not (runs / s.name / "summary.json").is_file()]
    print(f"{len(specs)} runs, {len(todo)} to do", flush=True)
    started = time.time()
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
        futures = {pool.submit(run_one, s, runs / s.name): s for s in todo}
        for i, fut in enumerate(as_completed(futures), 1):
            spec, summary = futures[fut], fut.result()
            acc = "ERROR " + summary["error"] if "error" in summary else f"{summary['final_accuracy']:.3f}"
            elapsed = (time.time() - started) / 60
            print(f"[{time.strftime('%H:%M:%S')}] {i}/{len(todo)} {spec.name}: {acc} ({elapsed:.1f} min)")
            sys.stdout.flush()


# ------------------------------------------------------------------------------------------------------
# Collecting, tables, plots
# ------------------------------------------------------------------------------------------------------


def parse_name(name: str) -> tuple[str, str, int, int]:
    regime, rest = name.split("-", 1)
    variant, lag_seed = rest.rsplit("-lag", 1)
    lag, seed = lag_seed.split("-s")
    return regime, variant, int(lag), int(seed)


def collect(out: Path, target: float = TARGET) -> list[dict[str, Any]]:
    records = []
    for run_dir in sorted((out / "runs").iterdir()):
        regime, variant, lag, seed = parse_name(run_dir.name)
        record: dict[str, Any] = {"regime": regime, "variant": variant, "lag": lag, "seed": seed}
        if not (run_dir / "summary.json").is_file():
            record["status"] = "failed" if (run_dir / "error.json").is_file() else "missing"
            records.append(record)
            continue
        summary = json.loads((run_dir / "summary.json").read_text())
        cfg = json.loads((run_dir / "config.json").read_text())
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        curve = summary["accuracy_curve"]
        tail = [p["accuracy"] for p in curve[-3:]]
        budget = cfg["steps"] * cfg["prompts_per_batch"] * cfg["group_size"]
        record |= {
            "status": "ok",
            "final_accuracy": summary["final_accuracy"],
            "tail_accuracy": sum(tail) / len(tail),
            "auc": se.normalised_auc(curve, budget),
            "rollouts_to_target": se.rollouts_to_target(curve, target),
            "budget": budget,
            "curve": [{k: p[k] for k in ("step", "rollouts", "accuracy")} for p in curve],
            "series": {k: se.binned_series(rows, k, 50) for k in SERIES if any(k in r for r in rows)},
            "max_lam": max((r.get("lam_next", 0.0) for r in rows), default=0.0),
            "max_grad_norm_penalty": max((r.get("grad_norm_penalty", 0.0) for r in rows), default=0.0),
            "final_lam": rows[-1].get("lam_next", 0.0) if rows else 0.0,
            "penalty_share": se._mean(
                r["grad_norm_penalty"] / (r["grad_norm_penalty"] + r["grad_norm_surrogate"] + 1e-12)
                for r in rows
                if "grad_norm_penalty" in r
            ),
            "final_entropy": se._mean(r.get("entropy") for r in rows[-10:]),
            "mean_ratio_var": se._mean(r.get("ratio_var") for r in rows),
            "mean_would_clip": se._mean(r.get("would_clip_frac") for r in rows),
            "wall_time_s": summary["wall_time_s"],
        }
        records.append(record)
    return records


def cells(records: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["status"] != "missing":
            groups.setdefault((r["regime"], r["variant"], r["lag"]), []).append(r)
    out = {}
    for key, runs in groups.items():
        ok = [r for r in runs if r["status"] == "ok"]
        cell: dict[str, Any] = {"runs": len(runs), "failed": len(runs) - len(ok)}
        for metric in (
            "final_accuracy",
            "tail_accuracy",
            "auc",
            "max_lam",
            "final_lam",
            "penalty_share",
            "final_entropy",
            "mean_ratio_var",
            "mean_would_clip",
            "wall_time_s",
        ):
            cell[metric] = se.stats([r[metric] for r in ok])
        # not reaching the target counts as the full budget (a lower bound on the true number)
        hits = [r["rollouts_to_target"] for r in ok]
        cell["reached"] = sum(h is not None for h in hits)
        spent = [h if h is not None else r["budget"] for h, r in zip(hits, ok, strict=True)]
        cell["rollouts_to_target"] = se.stats(spent)
        out[key] = cell
    return out


def _ci(s: dict[str, Any], digits: int = 3, scale: float = 1.0) -> str:
    if not s["n"]:
        return "–"
    mean = s["mean"] / scale
    if s["n"] < 2:
        return f"{mean:.{digits}f} (n=1)"
    half = (s["ci95"][1] - s["mean"]) / scale
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def table(cell_map: dict[tuple, dict[str, Any]], metric: str, digits: int = 3, scale: float = 1.0) -> str:
    regimes = sorted({k[0] for k in cell_map})
    lags = sorted({k[2] for k in cell_map})
    variants = list(dict.fromkeys(k[1] for k in sorted(cell_map, key=lambda k: _order(k[1]))))
    head = "| variant | " + " | ".join(f"{r} lag {lag}" for r in regimes for lag in lags) + " |"
    lines = [head, "|" + "---|" * (1 + len(regimes) * len(lags))]
    for v in variants:
        row = [v]
        for r in regimes:
            for lag in lags:
                c = cell_map.get((r, v, lag))
                if c is None:
                    row.append("")
                    continue
                txt = _ci(c[metric], digits, scale)
                if metric == "rollouts_to_target":
                    txt += f" [{c['reached']}/{c[metric]['n']}]"
                row.append(txt)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _order(variant: str) -> tuple[int, str]:
    names = list(VARIANTS)
    return (names.index(variant) if variant in names else len(names), variant)


def report(out: Path, target: float = TARGET) -> str:
    records = collect(out, target)
    cell_map = cells(records)
    n_ok = sum(r["status"] == "ok" for r in records)
    parts = [
        f"Runs: {n_ok} ok, {sum(r['status'] == 'failed' for r in records)} failed. "
        "Mean ± half-width of the 95% t-interval over seeds (n=1: no interval).",
        "\n**Final held-out greedy accuracy**\n",
        table(cell_map, "final_accuracy"),
        "\n**Tail accuracy (mean of the last 3 evaluations)**\n",
        table(cell_map, "tail_accuracy"),
        f"\n**Rollouts to target {target} (×1000; not reached = budget) [reached/n]**\n",
        table(cell_map, "rollouts_to_target", 1, 1000.0),
        "\n**AUC (mean accuracy over training)**\n",
        table(cell_map, "auc"),
        "\n**Dynamics: final λ**\n",
        table(cell_map, "final_lam", 2),
        "\n**Dynamics: penalty share of the pre-clip gradient, mean gp / (gp + gs)**\n",
        table(cell_map, "penalty_share", 2),
        "\n**Dynamics: entropy over the last 10 batches**\n",
        table(cell_map, "final_entropy", 2),
        "\n**Dynamics: mean Var(r) (behaviour ratio)**\n",
        table(cell_map, "mean_ratio_var", 3),
    ]
    (out / "results.json").write_text(
        json.dumps(
            {
                "target": target,
                "cells": [
                    {"regime": k[0], "variant": k[1], "lag": k[2], **v} for k, v in sorted(cell_map.items())
                ],
                "runs": records,
            },
            indent=1,
        )
    )
    return "\n".join(parts)


def plots(out: Path, variants: list[str] | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in collect(out) if r["status"] == "ok"]
    made = []
    keys = sorted({(r["regime"], r["lag"]) for r in records})
    show = ("lam_next", "ratio_var", "would_clip_frac", "grad_norm_surrogate", "grad_norm_penalty", "entropy")
    for regime, lag in keys:
        runs = [r for r in records if r["regime"] == regime and r["lag"] == lag]
        names = [v for v in dict.fromkeys(r["variant"] for r in runs) if not variants or v in variants]
        names.sort(key=_order)
        fig, axes = plt.subplots(2, 4, figsize=(18, 7.5))
        panels = [("accuracy", None), *[(k, k) for k in show], ("reward_mean", "reward_mean")]
        for ax, (title, key) in zip(axes.flat, panels, strict=False):
            for i, name in enumerate(names):
                color = plt.cm.tab20(i % 20)
                group = [r for r in runs if r["variant"] == name]
                for j, r in enumerate(group):
                    label = name if j == 0 else None
                    if key is None:
                        xs = [p["step"] for p in r["curve"]]
                        ys = [p["accuracy"] for p in r["curve"]]
                    else:
                        ys = r["series"].get(key)
                        if not ys:
                            continue
                        xs = list(range(len(ys)))
                    ax.plot(xs, ys, color=color, alpha=0.75, lw=1.1, label=label)
            ax.set_title(title)
            if key and key.startswith(("grad_norm", "ratio_var")):
                ax.set_yscale("symlog", linthresh=1e-2)
            ax.set_xlabel("optimizer step" if key is None else "training (50 bins)")
        axes.flat[0].legend(fontsize=7, ncol=2)
        fig.suptitle(f"R²VPO study — {regime}, lag {lag} (one line per seed)")
        fig.tight_layout()
        path = out / f"dynamics-{regime}-lag{lag}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        made.append(path)
    return made


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) a grid of variant × regime × lag × seed")
    run.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["r2vpo", "grpo"])
    run.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=["stressed"])
    run.add_argument("--lags", nargs="+", type=int, default=[4])
    run.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    run.add_argument("--steps", type=int, default=100)
    run.add_argument("--eval-every", type=int, default=10)
    run.add_argument("--workers", type=int, default=2)
    run.add_argument("--out", type=Path, default=OUT / "screen")
    rep = sub.add_parser("report", help="tables (and --plots) from a study directory")
    rep.add_argument("out", type=Path)
    rep.add_argument("--plots", action="store_true")
    rep.add_argument("--target", type=float, default=TARGET)
    rep.add_argument("--variants", nargs="+", help="variants shown in the plots [all]")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "run":
        execute(specs_from(args), args.out, args.workers)
        print(report(args.out))
        return 0
    text = report(args.out, args.target)
    (args.out / "report.md").write_text(text + "\n")
    print(text)
    if args.plots:
        for path in plots(args.out, args.variants):
            print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

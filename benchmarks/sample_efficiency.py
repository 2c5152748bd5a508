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

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/sample_efficiency.py` from anywhere
    sys.path.insert(0, str(REPO))

ALGOS = ("r2vpo", "grpo", "dapo", "gspo", "cispo", "is")
LAGS = (0, 2, 4, 8)
REGIMES: dict[str, dict[str, float | int]] = {
    "mild": {"lr": 1e-4, "updates_per_batch": 1},
    "stressed": {"lr": 3e-4, "updates_per_batch": 2},
}
DEFAULT_DELTA = 0.04  # DualConfig.budget default (ε² for ε = 0.2)
DEFAULT_DUAL_LR = 0.1  # DualConfig.lr default
DEFAULT_TARGET = 0.5  # held-out greedy accuracy; the warm start is at ~0.33
ALGO_LABELS = {
    "r2vpo": "R²VPO",
    "grpo": "GRPO (clip 0.2)",
    "dapo": "DAPO (clip-higher)",
    "gspo": "GSPO",
    "cispo": "CISPO",
    "is": "IS (unclipped)",
}
ALGO_COLORS = {
    "r2vpo": "tab:red",
    "grpo": "tab:blue",
    "dapo": "tab:green",
    "gspo": "tab:purple",
    "cispo": "tab:orange",
    "is": "tab:gray",
}
# Per-step metrics.jsonl keys kept (binned means) for the dynamics plots.
SERIES_KEYS = (
    "lam",
    "lam_next",
    "ratio_var",
    "penalty_var",  # what R²VPO's budget constrains (Var(log r) under the log-ratio penalty)
    "ratio_max",
    "entropy",
    "grad_norm",
    "penalty_share",  # grad_norm_penalty / (grad_norm_penalty + grad_norm_surrogate), pre-clip
    "reward_mean",
)
SERIES_POINTS = 60

# Mode presets; explicit flags override them.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "algos": ["r2vpo", "grpo"],
        "lags": [0, 4],
        "seeds": [0],
        "steps": 4,
        "eval_every": 2,
        "regimes": ["mild"],
        "deltas": [DEFAULT_DELTA],
        "dual_lrs": [DEFAULT_DUAL_LR, 1.0],
        "sweep_lag": 4,
        "sweep_regime": "mild",
    },
    # Sized on the measured run time (benchmarks/README.md): one regime's grid (6 algos × 4 lags × 3 seeds
    # = 72 runs) plus the sweep in about an hour with 2 workers on 2 otherwise idle cores.
    "full": {
        "algos": list(ALGOS),
        "lags": list(LAGS),
        "seeds": [0, 1, 2],
        "steps": 150,
        "eval_every": 5,
        "regimes": ["mild"],
        "deltas": [0.01, 0.04, 0.16],
        "dual_lrs": [0.01, 0.1, 1.0],
        "sweep_lag": 4,
        "sweep_regime": "stressed",
    },
}

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


# --------------------------------------------------------------------------------------------------------
# Run specifications
# --------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------
# One run (in a worker process)
# --------------------------------------------------------------------------------------------------------


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # already set in this process
        torch.set_num_interop_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars per run
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def sync_config(spec: RunSpec, run_dir: Path, model_dir: Path | None) -> Any:
    from trainer.learner import DualConfig, LearnerConfig
    from trainer.sync import SyncTrainConfig

    return SyncTrainConfig(
        run_dir=run_dir,
        model=model_dir,
        steps=spec.steps,
        eval_every=spec.eval_every,
        lag=spec.lag,
        seed=spec.seed,
        prompts_per_batch=spec.prompts_per_batch,
        group_size=spec.group_size,
        learner=LearnerConfig(
            algo=spec.algo,
            lr=spec.lr,
            updates_per_batch=spec.updates_per_batch,
            dual=DualConfig(budget=spec.delta, lr=spec.dual_lr),
        ),
    )


def run_one(
    spec: RunSpec,
    run_dir: Path,
    model_dir: Path | None,
    keep_checkpoints: bool = False,
    code: dict | None = None,
) -> dict:
    """Run one training job; returns its summary (or {"error": ...}). Never raises."""
    _init_worker()
    from trainer.sync import run_sync

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "code.json").write_text(json.dumps(code or {}, indent=1))  # the trainer code that ran
    started = time.perf_counter()
    try:
        summary = run_sync(sync_config(spec, run_dir, model_dir))
    except Exception as exc:  # a diverged run is a result, not a crash of the benchmark
        error = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        error["wall_time_s"] = time.perf_counter() - started
        (run_dir / "error.json").write_text(json.dumps(error, indent=1))
        summary = error
    finally:
        if not keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return summary


def _compatible(stored: Any, expected: Any, default: Any) -> bool:
    """Does a stored config dump match the expected one? A key the stored dump lacks (a field added to the
    trainer since that run) matches only where the expected value is that field's plain default."""
    if isinstance(stored, dict) and isinstance(expected, dict):
        default = default if isinstance(default, dict) else {}
        for key, value in expected.items():
            if key in stored:
                if not _compatible(stored[key], value, default.get(key)):
                    return False
            elif key not in default or default[key] != value:
                return False
        return all(key in expected for key in stored)
    return stored == expected


def _check_existing(spec: RunSpec, run_dir: Path, model_dir: Path | None, code: dict, allow: bool) -> None:
    """A finished run must have the spec's configuration (else budgets or objectives would mix) and, unless
    ``allow``, the same trainer code as this invocation (resuming across a trainer change mixes versions)."""
    from trainer.learner import LearnerConfig

    stored = json.loads((run_dir / "config.json").read_text())
    expected = json.loads(sync_config(spec, run_dir, model_dir).model_dump_json())
    plain = LearnerConfig.model_construct().model_dump(mode="json")  # field defaults, no per-algo ones
    for key in ("steps", "eval_every", "lag", "seed", "prompts_per_batch", "group_size", "learner"):
        if not _compatible(stored.get(key), expected.get(key), plain if key == "learner" else None):
            raise SystemExit(
                f"{run_dir} was run with {key}={stored.get(key)!r}, this benchmark asks for "
                f"{expected.get(key)!r}: use another --out"
            )
    stamp_path = run_dir / "code.json"
    stamp = json.loads(stamp_path.read_text()) if stamp_path.is_file() else {}
    same = stamp.get("trainer_sha256") in (None, code.get("trainer_sha256")) or "reused_from" in stamp
    if not (same or allow):
        raise SystemExit(
            f"{run_dir} ran trainer/ {stamp.get('trainer_sha256')}, this checkout has "
            f"{code.get('trainer_sha256')}: use another --out, or --allow-code-change if the change cannot "
            f"alter the numbers"
        )


# --------------------------------------------------------------------------------------------------------
# Per-run and per-cell numbers
# --------------------------------------------------------------------------------------------------------


def rollouts_to_target(curve: Sequence[dict], target: float) -> int | None:
    """Rollouts consumed at the first evaluation whose held-out accuracy is ≥ target; None if never."""
    for point in curve:
        if point["accuracy"] >= target:
            return int(point["rollouts"])
    return None


def normalised_auc(curve: Sequence[dict], budget: int) -> float:
    """Trapezoid area under accuracy-vs-rollouts, divided by the rollout budget (= mean accuracy)."""
    xs = [float(p["rollouts"]) for p in curve]
    ys = [float(p["accuracy"]) for p in curve]
    area = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:], strict=False))
    return area / budget if budget else math.nan


def binned_series(rows: Sequence[dict], key: str, points: int = SERIES_POINTS) -> list[float | None]:
    """Per-step values of ``key`` averaged into at most ``points`` equal bins of steps."""
    values = [r.get(key) for r in rows]
    n = len(values)
    if n == 0:
        return []
    bins = min(points, n)
    out: list[float | None] = []
    for b in range(bins):
        chunk = [v for v in values[b * n // bins : (b + 1) * n // bins] if isinstance(v, int | float)]
        out.append(sum(chunk) / len(chunk) if chunk else None)
    return out


def run_record(spec: RunSpec, run_dir: Path, target: float) -> dict:
    """Everything results.json keeps about one run (read back from its directory)."""
    record: dict[str, Any] = {"name": spec.name, **asdict(spec), "lr": spec.lr}
    record["updates_per_batch"] = spec.updates_per_batch
    record["command"] = spec.cli()
    if not (run_dir / "summary.json").is_file():
        if not (run_dir / "error.json").is_file():
            return record | {"status": "missing"}
        error = json.loads((run_dir / "error.json").read_text())
        return record | {
            "status": "failed",
            "error": error.get("error"),
            "wall_time_s": error.get("wall_time_s"),
        }
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    for row in rows:
        if "grad_norm_penalty" in row and "grad_norm_surrogate" in row:
            both = row["grad_norm_penalty"] + row["grad_norm_surrogate"]
            row["penalty_share"] = row["grad_norm_penalty"] / both if both > 0 else 0.0
    curve = summary["accuracy_curve"]
    tail = [p["accuracy"] for p in curve[-3:]]
    learner = json.loads((run_dir / "config.json").read_text())["learner"]
    stamp = json.loads((run_dir / "code.json").read_text()) if (run_dir / "code.json").is_file() else {}
    record["code"] = {k: stamp.get(k) for k in ("git_commit", "trainer_sha256", "reused_from") if k in stamp}
    record |= {
        "status": "ok",
        "learner_config": {k: learner.get(k) for k in ("loss_options", "dual", "grad_clip", "staleness")},
        "initial_accuracy": summary["initial_accuracy"],
        "final_accuracy": summary["final_accuracy"],
        "best_accuracy": summary["best_accuracy"],
        "tail_accuracy": sum(tail) / len(tail),
        "auc": normalised_auc(curve, spec.rollout_budget),
        "rollouts_to_target": rollouts_to_target(curve, target),
        "rollouts_consumed": summary["rollouts_consumed"],
        "dropped_groups": summary.get("dropped_groups", 0),
        "final_lam": summary["lam"] if spec.algo == "r2vpo" else None,
        "max_lam": max((r.get("lam_next", 0.0) for r in rows), default=0.0) if spec.algo == "r2vpo" else None,
        "mean_ratio_var": _mean(r.get("ratio_var") for r in rows),
        "max_ratio_var": max((r["ratio_var"] for r in rows if "ratio_var" in r), default=None),
        "max_grad_norm": max((r["grad_norm"] for r in rows if "grad_norm" in r), default=None),
        "mean_penalty_share": _mean(r.get("penalty_share") for r in rows) if spec.algo == "r2vpo" else None,
        "final_entropy": _mean(r.get("entropy") for r in rows[-10:]),
        "wall_time_s": summary["wall_time_s"],
        "curve": [{k: p[k] for k in ("step", "rollouts", "accuracy")} for p in curve],
        "series": {k: binned_series(rows, k) for k in SERIES_KEYS if any(k in r for r in rows)},
        "series_steps": binned_series([{"b": r["batch"]} for r in rows], "b"),
    }
    return record


def _mean(values: Iterable[Any]) -> float | None:
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


CELL_METRICS = (
    "final_accuracy",
    "best_accuracy",
    "tail_accuracy",
    "auc",
    "final_lam",
    "max_lam",
    "mean_ratio_var",
    "max_ratio_var",
    "final_entropy",
    "mean_penalty_share",
    "wall_time_s",
)


def cell_key(record: dict) -> tuple:
    return (record["regime"], record["algo"], record["lag"], record["delta"], record["dual_lr"])


def aggregate(records: Sequence[dict]) -> dict:
    """One cell per (regime, algo, lag, δ, η_λ) over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["status"] == "missing":  # not run (yet): --no-run on a partial benchmark
            continue
        groups.setdefault(cell_key(r), []).append(r)
    cells = {}
    for key, runs in groups.items():
        regime, algo, lag, delta, dual_lr = key
        ok = [r for r in runs if r["status"] == "ok"]
        cell: dict[str, Any] = {
            "regime": regime,
            "algo": algo,
            "lag": lag,
            "delta": delta,
            "dual_lr": dual_lr,
            "seeds": sorted(r["seed"] for r in ok),
            "failed_seeds": sorted(r["seed"] for r in runs if r["status"] != "ok"),
        }
        for metric in CELL_METRICS:
            cell[metric] = stats([r[metric] for r in ok if r.get(metric) is not None])
        reached = [r["rollouts_to_target"] for r in ok if r["rollouts_to_target"] is not None]
        cell["rollouts_to_target"] = stats(reached) | {"reached": len(reached), "of": len(ok)}
        cell["curve"] = _mean_curve([r["curve"] for r in ok])
        cell["series"] = _mean_series(ok)
        name = f"{regime}-{algo}" + ("" if algo != "r2vpo" else f"-d{delta:g}-eta{dual_lr:g}") + f"-lag{lag}"
        cells[name] = cell
    return cells


def _mean_curve(curves: Sequence[Sequence[dict]]) -> dict[str, list]:
    if not curves:
        return {"step": [], "rollouts": [], "mean": [], "std": []}
    n = min(len(c) for c in curves)
    out: dict[str, list] = {"step": [], "rollouts": [], "mean": [], "std": []}
    for i in range(n):
        accs = [c[i]["accuracy"] for c in curves]
        s = stats(accs)
        out["step"].append(curves[0][i]["step"])
        out["rollouts"].append(sum(c[i]["rollouts"] for c in curves) / len(curves))
        out["mean"].append(s["mean"])
        out["std"].append(s["std"])
    return out


def _mean_series(runs: Sequence[dict]) -> dict[str, list]:
    if not runs:
        return {}
    out: dict[str, list] = {"step": runs[0]["series_steps"]}
    for key in SERIES_KEYS:
        per_run = [r["series"][key] for r in runs if key in r["series"]]
        if not per_run:
            continue
        n = min(len(s) for s in per_run)
        out[key] = [_mean(s[i] for s in per_run) for i in range(n)]
        if key == "lam_next":  # the worst seed's λ, for the dynamics plot
            out[key + "_max"] = [
                max((s[i] for s in per_run if s[i] is not None), default=None) for i in range(n)
            ]
    return out


# --------------------------------------------------------------------------------------------------------
# Machine facts
# --------------------------------------------------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout)
    except (OSError, subprocess.CalledProcessError, ValueError):
        nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    facts: dict[str, Any] = {
        "nproc": nproc,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import torch

        facts["torch"] = torch.__version__
    except ImportError:
        pass
    facts |= git_facts()
    return facts


def git_facts() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    trainer_status = git("status", "--porcelain", "--untracked-files=no", "--", "trainer")
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        # what the numbers depend on: the trainer package (its committed tree, and local edits to it)
        "git_trainer_tree": git("rev-parse", "HEAD:trainer"),
        "trainer_dirty": bool(trainer_status) if trainer_status is not None else None,
        "trainer_sha256": trainer_digest(),
    }


def trainer_digest() -> str:
    """sha256 over trainer/*.py as they are on disk (workers run the code the parent imported at start)."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "trainer").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------
# Report (markdown)
# --------------------------------------------------------------------------------------------------------


def _fmt_ci(s: dict, digits: int = 3, scale: float = 1.0) -> str:
    if not s or s.get("mean") is None:
        return "—"
    mean = s["mean"] / scale
    if s["n"] < 2 or s["ci95"][0] is None:
        return f"{mean:.{digits}f}"
    half = (s["ci95"][1] - s["mean"]) / scale
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def _fmt_target(s: dict) -> str:
    if s["of"] == 0:
        return "—"
    if s["reached"] == 0:
        return f"not reached (0/{s['of']})"
    mean = s["mean"] / 1000
    if s["n"] < 2 or s["ci95"][0] is None:
        text = f"{mean:.1f}k"
    else:
        text = f"{mean:.1f}k ± {(s['ci95'][1] - s['mean']) / 1000:.1f}k"
    return text if s["reached"] == s["of"] else f"{text} ({s['reached']}/{s['of']} reached)"


def _is_grid_cell(cell: dict) -> bool:
    return cell["algo"] != "r2vpo" or (cell["delta"] == DEFAULT_DELTA and cell["dual_lr"] == DEFAULT_DUAL_LR)


def grid_cells(results: dict) -> list[dict]:
    """Cells of the algo × lag × regime grid (sweep-only points excluded), in table order."""
    grid = results["config"]
    cells = [c for c in results["cells"].values() if _is_grid_cell(c)]
    cells = [c for c in cells if c["regime"] in grid["regimes"] and c["lag"] in grid["lags"]]
    cells = [c for c in cells if c["algo"] in grid["algos"]]
    order = {a: i for i, a in enumerate(grid["algos"])}
    regimes = {r: i for i, r in enumerate(grid["regimes"])}
    return sorted(cells, key=lambda c: (regimes[c["regime"]], c["lag"], order[c["algo"]]))


def sweep_cells(results: dict) -> list[dict]:
    cfg = results["config"]
    if cfg.get("no_sweep"):
        return []
    cells = [
        c
        for c in results["cells"].values()
        if c["algo"] == "r2vpo" and c["regime"] == cfg["sweep_regime"] and c["lag"] == cfg["sweep_lag"]
    ]
    return sorted(cells, key=lambda c: (c["delta"], c["dual_lr"]))


def retarget(results: dict, target: float) -> dict:
    """The results with rollouts-to-target recomputed for another target from the stored curves."""
    results = json.loads(json.dumps(results))
    results["config"]["target"] = target
    by_cell: dict[tuple, list[int]] = {}
    oks: dict[tuple, int] = {}
    for run in results["runs"]:
        if run["status"] != "ok":
            continue
        run["rollouts_to_target"] = rollouts_to_target(run["curve"], target)
        oks[cell_key(run)] = oks.get(cell_key(run), 0) + 1
        if run["rollouts_to_target"] is not None:
            by_cell.setdefault(cell_key(run), []).append(run["rollouts_to_target"])
    for cell in results["cells"].values():
        key = (cell["regime"], cell["algo"], cell["lag"], cell["delta"], cell["dual_lr"])
        reached = by_cell.get(key, [])
        cell["rollouts_to_target"] = stats(reached) | {"reached": len(reached), "of": oks.get(key, 0)}
    return results


def identical_lag0(results: dict) -> dict[str, Any] | None:
    """Mild regime, lag 0: do the token-level objectives (ratio ≡ 1) give the same curves per seed?"""
    token_level = ("r2vpo", "grpo", "dapo", "cispo", "is")
    runs = [
        r
        for r in results["runs"]
        if r["status"] == "ok"
        and r["lag"] == 0
        and r["updates_per_batch"] == 1
        and r["algo"] in token_level
        and (r["algo"] != "r2vpo" or (r["delta"] == DEFAULT_DELTA and r["dual_lr"] == DEFAULT_DUAL_LR))
    ]
    by_seed: dict[tuple, list[dict]] = {}
    for r in runs:
        by_seed.setdefault((r["regime"], r["seed"]), []).append(r)
    groups = [g for g in by_seed.values() if len(g) > 1]
    if not groups:
        return None
    same = [all(r["curve"] == g[0]["curve"] for r in g) for g in groups]
    max_diff = max(
        abs(a["accuracy"] - b["accuracy"])
        for g in groups
        for r in g
        for a, b in zip(r["curve"], g[0]["curve"], strict=False)
    )
    return {
        "seeds": len(groups),
        "identical": sum(same),
        "algos": sorted({r["algo"] for r in runs}),
        "max_abs_diff": max_diff,
    }


def pivot(results: dict, metric: str) -> list[str]:
    """Compact algo × lag table of one metric per regime (the headline)."""
    cfg = results["config"]
    cells = grid_cells(results)
    lines: list[str] = []
    for regime in cfg["regimes"]:
        rc = {(c["algo"], c["lag"]): c for c in cells if c["regime"] == regime}
        lags = [lag for lag in cfg["lags"] if any(k[1] == lag for k in rc)]
        if not lags:
            continue
        title = "final held-out accuracy" if metric == "final_accuracy" else f"rollouts to {cfg['target']:g}"
        settings = REGIMES[regime]
        lines += [
            "",
            f"**{regime}** (lr {settings['lr']:g}, {settings['updates_per_batch']} update(s)/batch): {title}",
            "",
            "| algo | " + " | ".join(f"lag {lag}" for lag in lags) + " |",
            "|---|" + "---|" * len(lags),
        ]
        for algo in cfg["algos"]:
            row = []
            for lag in lags:
                c = rc.get((algo, lag))
                if c is None:
                    row.append("—")
                elif metric == "final_accuracy":
                    row.append(_fmt_ci(c["final_accuracy"]))
                else:
                    row.append(_fmt_target(c["rollouts_to_target"]))
            lines.append(f"| {algo} | " + " | ".join(row) + " |")
    return lines


def _fmt_minutes(timing: dict) -> str:
    return f"{timing['total_s'] / 60:.1f} min" if timing.get("total_s") else "time unknown"


def report(results: dict) -> str:
    """Markdown: the per-cell table (a row per algo × lag × regime cell) and the sweep table."""
    cfg = results["config"]
    target = cfg["target"]
    lines = [
        f"Target held-out accuracy {target:g}; budget {cfg['steps']} steps × {cfg['prompts_per_batch']}×"
        f"{cfg['group_size']} = {cfg['steps'] * cfg['prompts_per_batch'] * cfg['group_size']:,} rollouts; "
        f"seeds {', '.join(map(str, cfg['seeds']))}; mean ± 95% t-interval half-width over seeds; "
        f"AUC = mean accuracy over the rollout budget; rollouts to target in thousands (the first "
        f"evaluation, every {cfg['eval_every']} steps, at or above the target).",
    ]
    counts = [c["final_accuracy"]["n"] for c in grid_cells(results)]
    if counts and min(counts) < len(cfg["seeds"]):
        lines[-1] += f" **Partial: cells hold {min(counts)}–{max(counts)} of {len(cfg['seeds'])} seeds.**"
    lines += pivot(results, "final_accuracy") + pivot(results, "rollouts_to_target")
    same = identical_lag0(results)
    if same:
        lines += [
            "",
            f"Lag 0, one update per batch (ratio ≡ 1): {', '.join(same['algos'])} gave identical accuracy "
            f"curves for {same['identical']} of {same['seeds']} seed(s) (largest difference between them "
            f"{same['max_abs_diff']:.3f}); GSPO differs only by weighting tokens per sequence.",
        ]
    lines += [
        "",
        "All cells:",
        "",
        "| regime | lag | algo | n | final acc | best acc | AUC | rollouts to target | final λ | wall s |",
        "|---|---:|---|---:|---|---|---|---|---|---:|",
    ]
    for c in grid_cells(results):
        lam = _fmt_ci(c["final_lam"], 3) if c["algo"] == "r2vpo" else ""
        n = f"{c['final_accuracy']['n']}" + (
            f" ({len(c['failed_seeds'])} failed)" if c["failed_seeds"] else ""
        )
        wall = c["wall_time_s"]["mean"]
        lines.append(
            f"| {c['regime']} | {c['lag']} | {c['algo']} | {n} | {_fmt_ci(c['final_accuracy'])} | "
            f"{_fmt_ci(c['best_accuracy'])} | {_fmt_ci(c['auc'])} | {_fmt_target(c['rollouts_to_target'])} | "
            f"{lam} | {'' if wall is None else f'{wall:.0f}'} |"
        )
    sweep = sweep_cells(results)
    if sweep:
        lines += [
            "",
            f"R²VPO sensitivity ({cfg['sweep_regime']} regime, lag {cfg['sweep_lag']}): δ varied at "
            f"η_λ = {DEFAULT_DUAL_LR:g}, η_λ varied at δ = {DEFAULT_DELTA:g}.",
            "",
            "| δ | η_λ | n | final acc | AUC | rollouts to target | final λ | max λ | mean Var(r) "
            "| penalty share |",
            "|---:|---:|---:|---|---|---|---|---|---|---|",
        ]
        for c in sweep:
            lines.append(
                f"| {c['delta']:g} | {c['dual_lr']:g} | {c['final_accuracy']['n']} | "
                f"{_fmt_ci(c['final_accuracy'])} | {_fmt_ci(c['auc'])} | "
                f"{_fmt_target(c['rollouts_to_target'])} | {_fmt_ci(c['final_lam'])} | "
                f"{_fmt_ci(c['max_lam'])} | {_fmt_ci(c['mean_ratio_var'], 4)} | "
                f"{_fmt_ci(c.get('mean_penalty_share') or {}, 2)} |"
            )
        ref = results["cells"].get(f"{cfg['sweep_regime']}-grpo-lag{cfg['sweep_lag']}")
        if ref:
            lines += [
                "",
                f"Reference GRPO (clip 0.2) at the same setting: final acc "
                f"{_fmt_ci(ref['final_accuracy'])}, AUC {_fmt_ci(ref['auc'])}.",
            ]
    m = results["machine"]
    ran = [i["code"] for i in results.get("invocations", []) if i.get("code") and i.get("wall_s")]
    code = ran[0] if ran else m  # the code the runs ran, else the checkout at collection time
    dirty = " (trainer/ modified)" if code.get("trainer_dirty") else ""
    lines += [
        "",
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}; machine: {m['nproc']} cores ({m['cpu_model']}); "
        f"commit {(code.get('git_commit') or 'unknown')[:12]}{dirty}; "
        f"{results['timing']['runs']} runs, {_fmt_minutes(results['timing'])} with {cfg['workers']} "
        f"workers; one run {results['timing']['run_wall_s_mean'] or 0:.0f} s on average "
        f"(max {results['timing']['run_wall_s_max'] or 0:.0f} s).",
    ]
    stamps = [r.get("code") or {} for r in results["runs"] if r["status"] == "ok"]
    versions = sorted({c["trainer_sha256"] for c in stamps if c.get("trainer_sha256")})
    reused = sum("reused_from" in c for c in stamps)
    if versions or reused:
        lines[-1] += f" trainer/ sha256 of the runs: {', '.join(versions)}" + (
            f"; {reused} runs reused from an earlier benchmark (reused.txt)." if reused else "."
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------


def make_plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    cells = grid_cells(results)
    written: list[Path] = []
    for regime in cfg["regimes"]:
        rc = [c for c in cells if c["regime"] == regime]
        if not rc:
            continue
        lags = sorted({c["lag"] for c in rc})
        fig, axes = plt.subplots(1, len(lags), figsize=(4.2 * len(lags), 3.6), sharey=True, squeeze=False)
        for ax, lag in zip(axes[0], lags, strict=True):
            for c in (c for c in rc if c["lag"] == lag):
                curve = c["curve"]
                if not curve["mean"]:
                    continue
                x = [r / 1000 for r in curve["rollouts"]]
                mean, std = curve["mean"], curve["std"]
                color = ALGO_COLORS.get(c["algo"])
                label = f"{ALGO_LABELS.get(c['algo'], c['algo'])}"
                ax.plot(x, mean, color=color, label=label, lw=1.6 if c["algo"] == "r2vpo" else 1.1)
                if len(c["seeds"]) > 1:
                    lo = [m - s for m, s in zip(mean, std, strict=True)]
                    hi = [m + s for m, s in zip(mean, std, strict=True)]
                    ax.fill_between(x, lo, hi, color=color, alpha=0.12, lw=0)
            ax.axhline(cfg["target"], color="k", ls=":", lw=0.8)
            ax.set_title(f"lag {lag}")
            ax.set_xlabel("rollouts consumed (thousands)")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("held-out greedy accuracy")
        axes[0][-1].legend(fontsize=7, loc="lower right")
        regime_cfg = REGIMES[regime]
        fig.suptitle(
            f"{regime}: lr {regime_cfg['lr']:g}, {regime_cfg['updates_per_batch']} update(s)/batch — "
            f"mean over {len(cfg['seeds'])} seed(s), band ±1 s.d., dotted: target",
            fontsize=9,
        )
        fig.tight_layout()
        path = out / f"accuracy_vs_rollouts_{regime}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
        written += _plot_dynamics(plt, results, regime, rc, lags, out)
    written += _plot_sweep(plt, results, out)
    return written


def _plot_dynamics(plt: Any, results: dict, regime: str, rc: list[dict], lags: list[int], out: Path) -> list:
    """Per lag: R²VPO's λ; the ratio variance (R²VPO, GRPO, IS) and the variance R²VPO constrains; the
    penalty's share of R²VPO's pre-clip gradient norm — the curves that show why it wins or loses."""
    if not any(c["algo"] == "r2vpo" for c in rc):
        return []
    rows = 3 if any(c["series"].get("penalty_share") for c in rc) else 2
    fig, axes = plt.subplots(
        rows, len(lags), figsize=(4.2 * len(lags), 2.8 * rows), sharex=True, squeeze=False
    )
    red = ALGO_COLORS["r2vpo"]
    for j, lag in enumerate(lags):
        by_algo = {c["algo"]: c for c in rc if c["lag"] == lag}
        r2 = by_algo.get("r2vpo")
        ax_lam, ax_var = axes[0][j], axes[1][j]
        if r2 and r2["series"].get("lam_next"):
            steps = r2["series"]["step"]
            ax_lam.plot(steps, r2["series"]["lam_next"], color=red, label="λ (mean over seeds)")
            ax_lam.plot(steps, r2["series"]["lam_next_max"], color=red, ls=":", lw=0.8, label="λ (max)")
        for algo, style in (("r2vpo", "-"), ("grpo", "--"), ("is", ":")):
            c = by_algo.get(algo)
            if c and c["series"].get("ratio_var"):
                vals = [v if v and v > 0 else None for v in c["series"]["ratio_var"]]
                label = f"Var(r) {ALGO_LABELS[algo]}"
                ax_var.plot(c["series"]["step"], vals, ls=style, color=ALGO_COLORS[algo], label=label)
        if (
            r2
            and r2["series"].get("penalty_var")
            and r2["series"]["penalty_var"] != r2["series"]["ratio_var"]
        ):
            vals = [v if v and v > 0 else None for v in r2["series"]["penalty_var"]]
            ax_var.plot(r2["series"]["step"], vals, ls="-.", color="k", lw=0.9, label="R²VPO's constrained V")
        ax_var.axhline(DEFAULT_DELTA, color="k", ls=":", lw=0.8, label="δ")
        ax_var.set_yscale("log")
        if lag > 0:  # lag 0 with one update: Var(r) ~ 1e-13 (float noise); keep the stale panels readable
            ax_var.set_ylim(bottom=1e-5)
        if rows == 3 and r2 and r2["series"].get("penalty_share"):
            axes[2][j].plot(r2["series"]["step"], r2["series"]["penalty_share"], color=red)
            axes[2][j].set_ylim(-0.02, 1.02)
            axes[2][j].grid(alpha=0.3)
        ax_lam.set_title(f"lag {lag}")
        axes[-1][j].set_xlabel("batch")
        ax_lam.grid(alpha=0.3)
        ax_var.grid(alpha=0.3)
    axes[0][0].set_ylabel("R²VPO λ")
    axes[1][0].set_ylabel("variance of the step (binned)")
    if rows == 3:
        axes[2][0].set_ylabel("R²VPO penalty share of\npre-clip grad norm gp/(gp+gs)")
    axes[0][-1].legend(fontsize=7)
    axes[1][-1].legend(fontsize=6)
    fig.suptitle(f"{regime}: dual variable, ratio variance, penalty share (means over seeds)", fontsize=9)
    fig.tight_layout()
    path = out / f"r2vpo_dynamics_{regime}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _plot_sweep(plt: Any, results: dict, out: Path) -> list:
    cfg = results["config"]
    sweep = sweep_cells(results)
    if not sweep:
        return []
    ref = results["cells"].get(f"{cfg['sweep_regime']}-grpo-lag{cfg['sweep_lag']}")
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.4))
    axes_spec = (("delta", "dual_lr", DEFAULT_DUAL_LR), ("dual_lr", "delta", DEFAULT_DELTA))
    for col, (param, fixed, other) in enumerate(axes_spec):
        pts = sorted((c for c in sweep if c[fixed] == other), key=lambda c: c[param])
        ax = axes[0][col]
        xs = [c[param] for c in pts]
        means = [c["final_accuracy"]["mean"] for c in pts]
        errs = [
            (c["final_accuracy"]["ci95"][1] - c["final_accuracy"]["mean"])
            if c["final_accuracy"]["ci95"][1] is not None
            else 0.0
            for c in pts
        ]
        ax.errorbar(xs, means, yerr=errs, color=ALGO_COLORS["r2vpo"], marker="o", capsize=3, label="R²VPO")
        for c in pts:
            seeds = c["final_accuracy"]["values"]
            ax.scatter([c[param]] * len(seeds), seeds, color=ALGO_COLORS["r2vpo"], s=8, alpha=0.4)
        if ref and ref["final_accuracy"]["mean"] is not None:
            ax.axhline(ref["final_accuracy"]["mean"], color=ALGO_COLORS["grpo"], ls="--", label="GRPO mean")
            if ref["final_accuracy"]["ci95"][0] is not None:
                ax.axhspan(*ref["final_accuracy"]["ci95"], color=ALGO_COLORS["grpo"], alpha=0.1, lw=0)
        ax.set_xscale("log")
        ax.set_xlabel("δ (variance budget)" if param == "delta" else "η_λ (dual step size)")
        ax.set_ylabel("final held-out accuracy")
        ax.set_title(f"{'η_λ' if param == 'delta' else 'δ'} = {other:g}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax_lam = axes[1][col]
        cmap = plt.get_cmap("viridis")
        for i, c in enumerate(pts):
            if c["series"].get("lam_next"):
                color = cmap(i / max(1, len(pts) - 1))
                label = f"{'δ' if param == 'delta' else 'η_λ'} = {c[param]:g}"
                ax_lam.plot(c["series"]["step"], c["series"]["lam_next"], color=color, label=label)
        ax_lam.set_xlabel("batch")
        ax_lam.set_ylabel("λ (mean over seeds)")
        ax_lam.grid(alpha=0.3)
        ax_lam.legend(fontsize=7)
    fig.suptitle(
        f"R²VPO sensitivity, {cfg['sweep_regime']} regime, lag {cfg['sweep_lag']} "
        f"(error bars: 95% t-interval over seeds; dots: seeds)",
        fontsize=9,
    )
    fig.tight_layout()
    path = out / "r2vpo_sensitivity.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


# --------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smoke test: 2 algos × 2 lags × 1 seed × 4 steps")
    mode.add_argument("--full", action="store_true", help="the full grid (default when no mode is given)")
    mode.add_argument("--report", type=Path, metavar="RESULTS_JSON", help="print the markdown table and exit")
    mode.add_argument("--replot", type=Path, metavar="RESULTS_JSON", help="redraw the plots next to it")
    p.add_argument("--algos", nargs="+", choices=ALGOS)
    p.add_argument("--lags", nargs="+", type=int)
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--regimes", nargs="+", choices=list(REGIMES))
    p.add_argument("--steps", type=int, help="learner batches per run (the rollout budget / 128)")
    p.add_argument("--eval-every", type=int, help="held-out evaluation every N batches")
    p.add_argument(
        "--target",
        type=float,
        help="held-out accuracy for rollouts-to-target [0.5]; with --report: recomputed",
    )
    p.add_argument("--deltas", nargs="+", type=float, help="R²VPO δ values of the sweep")
    p.add_argument("--dual-lrs", nargs="+", type=float, help="R²VPO η_λ values of the sweep")
    p.add_argument("--sweep-lag", type=int)
    p.add_argument("--sweep-regime", choices=list(REGIMES), help="regime of the sweep [full: stressed]")
    p.add_argument("--no-sweep", action="store_true", help="skip the δ / η_λ sensitivity sweep")
    p.add_argument("--workers", type=int, default=2, help="parallel runs (one torch thread each)")
    p.add_argument("--out", type=Path, help="output dir [default: benchmarks/results/sample_efficiency/…]")
    p.add_argument("--model", type=Path, help="policy directory [default: the embedded tiny policy]")
    p.add_argument("--no-run", action="store_true", help="only collect the runs already in --out")
    p.add_argument(
        "--allow-code-change", action="store_true", help="resume runs made with another trainer/ version"
    )
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints/ folder")
    args = p.parse_args(argv)
    if args.report or args.replot:
        return args
    args.target = DEFAULT_TARGET if args.target is None else args.target
    preset = PRESETS["quick" if args.quick else "full"]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.mode = "quick" if args.quick else "full"
    if args.out is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = REPO / "benchmarks" / "results" / "sample_efficiency" / f"{args.mode}-{stamp}"
    if args.workers < 1 or args.steps < 1 or args.eval_every < 1:
        p.error("--workers, --steps and --eval-every must be ≥ 1")
    return args


def _log(message: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {message}", flush=True)


def execute(specs: list[RunSpec], args: argparse.Namespace, model_dir: Path | None, code: dict) -> float:
    """Run the specs that have no summary.json yet; returns the wall time spent."""
    runs_dir = args.out / "runs"
    todo = []
    for spec in specs:
        run_dir = runs_dir / spec.name
        if (run_dir / "summary.json").is_file():
            _check_existing(spec, run_dir, model_dir, code, args.allow_code_change)
        else:
            todo.append(spec)
    _log(
        f"{len(specs)} runs, {len(specs) - len(todo)} already done, {len(todo)} to run "
        f"with {args.workers} worker(s) → {args.out}"
    )
    started = time.perf_counter()
    if not todo:
        return 0.0
    done = 0
    # fork (Linux) shares the parent's imported torch/transformers: workers start in well under a second
    # instead of re-importing them; the parent has run no torch computation, so no thread pool is forked.
    import trainer.sync  # noqa: F401  (imported before the fork)

    ctx = get_context("fork" if "fork" in get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx, initializer=_init_worker) as pool:
        futures = {
            pool.submit(run_one, s, runs_dir / s.name, model_dir, args.keep_checkpoints, code): s
            for s in todo
        }
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                spec = futures[future]
                summary = future.result()
                done += 1
                elapsed = time.perf_counter() - started
                eta = elapsed / done * (len(todo) - done)
                if "error" in summary:
                    what = f"FAILED {summary['error']}"
                else:
                    what = (
                        f"acc {summary['initial_accuracy']:.3f} → {summary['final_accuracy']:.3f} "
                        f"λ {summary['lam']:.3f} in {summary['wall_time_s']:.0f} s"
                    )
                _log(
                    f"{done}/{len(todo)} {spec.name}: {what} (elapsed {elapsed / 60:.1f} min, "
                    f"eta {eta / 60:.1f} min)"
                )
    return time.perf_counter() - started


def collect(specs: list[RunSpec], args: argparse.Namespace, wall_s: float, started_at: str) -> dict:
    records = [run_record(s, args.out / "runs" / s.name, args.target) for s in specs]
    keys = "mode algos lags seeds regimes steps eval_every target deltas dual_lrs sweep_lag sweep_regime"
    config = {k: getattr(args, k) for k in (*keys.split(), "no_sweep", "workers")}
    config |= {"prompts_per_batch": specs[0].prompts_per_batch, "group_size": specs[0].group_size}
    config["regime_settings"] = REGIMES
    config["model"] = str(args.model) if args.model else "embedded tiny policy (trainer/tiny.py)"
    run_walls = [r["wall_time_s"] for r in records if r.get("wall_time_s") is not None]
    cells = aggregate(records)
    for r in records:  # per-step series are kept per cell only (results.json stays small)
        r.pop("series", None)
        r.pop("series_steps", None)
    return {
        "benchmark": "sample_efficiency",
        # the command that reproduces these numbers (a --no-run re-collection gives the same results)
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv if a != "--no-run"),
        "date": _first_start(args.out) or started_at,
        "machine": machine_facts(),
        "config": config,
        "timing": {
            "runs": sum(r["status"] != "missing" for r in records),
            "runs_planned": len(records),
            "total_s": _total_wall(args.out) or wall_s,
            "run_wall_s_mean": sum(run_walls) / len(run_walls) if run_walls else None,
            "run_wall_s_max": max(run_walls, default=None),
            "note": "total_s: wall time of all invocations that ran runs into this --out "
            "(invocations.jsonl); run_wall_s: one run's training time (runs share the cores)",
        },
        "invocations": _invocations(args.out),
        "cells": cells,
        "runs": records,
    }


def _rounded(obj: Any, digits: int = 5) -> Any:
    """Floats to ``digits`` significant digits (accuracies are multiples of 1/200; the rest is noise)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_rounded(v, digits) for v in obj]
    return obj


_SCALAR = r'(?:[-+0-9.eE]+|null|true|false|"[^"\n]*")'
_SCALAR_LIST = re.compile(r"\[\s*(" + _SCALAR + r"(?:,\s*" + _SCALAR + r")*)\s*\]")
_FLAT_VALUE = r"(?:" + _SCALAR + r"|\[[^\[\]\n]*\])"
_FLAT_DICT = re.compile(
    r'\{\s*("[^"\n]+": ' + _FLAT_VALUE + r'(?:,\s*"[^"\n]+": ' + _FLAT_VALUE + r")*)\s*\}"
)


def _one_line(match: re.Match) -> str:
    body = ", ".join(part.strip() for part in match.group(1).split(",\n"))
    return match.group(0)[0] + body + match.group(0)[-1]


def dump_results(results: dict) -> str:
    """results.json text: rounded floats; lists of scalars and flat objects on one line (small to commit)."""
    text = json.dumps(_rounded(results), indent=1, ensure_ascii=False)
    return _FLAT_DICT.sub(_one_line, _SCALAR_LIST.sub(_one_line, text)) + "\n"


def _first_start(out: Path) -> str | None:
    path = out / "invocations.jsonl"
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return json.loads(lines[0])["started"] if lines else None


def _invocations(out: Path) -> list[dict]:
    path = out / "invocations.jsonl"
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    )


def _total_wall(out: Path) -> float | None:
    path = out / "invocations.jsonl"
    if not path.is_file():
        return None
    return sum(json.loads(line)["wall_s"] for line in path.read_text().splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        results = json.loads(args.report.read_text())
        if args.target is not None:
            results = retarget(results, args.target)
        print(report(results))
        return 0
    if args.replot:
        for path in make_plots(json.loads(args.replot.read_text()), args.replot.parent):
            print(path)
        return 0
    started_at = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    code = git_facts()  # before any run: the trainer code this invocation's workers run
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.model
    if model_dir is None:  # build (or find) the cached warm-started policy once, before the workers start
        from trainer.tiny import ensure_default_policy

        model_dir = ensure_default_policy(progress=False)
    # seed-major over regimes and sweep: an interrupted benchmark has the same seeds in every cell
    specs = sorted(unique(grid_specs(args) + sweep_specs(args)), key=lambda spec: spec.seed)
    wall_s = 0.0 if args.no_run else execute(specs, args, model_dir, code)
    if not args.no_run:
        with (args.out / "invocations.jsonl").open("a") as log:  # total time over resumed invocations
            entry = {"started": started_at, "wall_s": wall_s, "command": sys.argv, "code": code}
            log.write(json.dumps(entry) + "\n")
    results = collect(specs, args, wall_s, started_at)
    (args.out / "results.json").write_text(dump_results(results))
    table = report(results)
    (args.out / "report.md").write_text(table + "\n")
    plots = make_plots(results, args.out)
    _log(f"results: {args.out / 'results.json'}; plots: {', '.join(p.name for p in plots)}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

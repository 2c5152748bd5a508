"""The plots: accuracy vs rollouts per regime and lag, R²VPO's dynamics (λ, ratio variance, penalty share) and
its δ / η_λ sensitivity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from efficiency.cells import grid_cells, sweep_cells
from efficiency.grid import DEFAULT_DELTA, DEFAULT_DUAL_LR, REGIMES

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

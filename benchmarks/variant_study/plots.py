"""Accuracy and the training dynamics (λ, Var(r), would-clip fraction, gradient norms, entropy, reward), one
figure per regime and lag, one line per seed."""

from __future__ import annotations

from pathlib import Path

from benchmarks.variant_study.results import collect
from benchmarks.variant_study.variants import variant_order


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
        names.sort(key=variant_order)
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

"""The markdown report: headline algo × lag tables per regime, the table of all cells, the sensitivity sweep
and the command, machine and code that produced the numbers."""

from __future__ import annotations

from typing import Any

from efficiency.cells import grid_cells, sweep_cells
from efficiency.grid import DEFAULT_DELTA, DEFAULT_DUAL_LR, REGIMES


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

"""The markdown of a results file: the figures table, the e2e analysis, and this benchmark's own section
of benchmarks/README.md (between its markers; the rest of the file is left as it is)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

BEGIN = "<!-- system-benchmark:begin (written by benchmarks/system.py --full; edit the script) -->"
END = "<!-- system-benchmark:end -->"
HISTORY_HEADER = "| date | device | machine | load avg (1 min) | commit |"


def _fmt(x: float | None, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if unit == "s":
        return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"
    if abs(x) >= 100:
        return f"{x:,.0f}".replace(",", " ") + (f" {unit}" if unit else "")
    return f"{x:.3g}" + (f" {unit}" if unit else "")


def _fmt_ratio(f: dict[str, Any]) -> str:
    if f.get("ratio") is None:
        return "–"
    text = f"**{f['ratio']:.2f}×**"
    if f.get("interval"):
        lo, hi = f["interval"]
        text += f" [{lo:.2f}, {hi:.2f}]"
    return text


def machine_line(results: dict[str, Any]) -> str:
    m = results["machine"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    load = m.get("loadavg") or ["?"] * 3
    end = m.get("loadavg_end") or ["?"] * 3
    commit = (m.get("git_commit") or "unknown")[:12] + (" (dirty tree)" if m.get("git_dirty") else "")
    return (
        f"{results['date'][:16].replace('T', ' ')}, `--{results['mode']} --device {results['device']}`: "
        f"{m['nproc']} cores ({m.get('cpu_model')}){gpu}, load average {load[0]}/{load[1]}/{load[2]} at the "
        f"start, {end[0]}/{end[1]}/{end[2]} at the end; commit {commit}; torch {m.get('torch')}; "
        f"{results.get('seconds', 0) / 60:.1f} min"
    )


def markdown_table(results: dict[str, Any]) -> str:
    lines = [
        "| section | figure | value | baseline / floor | ratio [95% CI] | reps |",
        "|---|---|---|---|---|---|",
    ]
    for f in results["figures"]:
        what = f"{f['what']} — vs {f['baseline_what']}"
        extra = ""
        if "overhead_us_per_group" in f:
            extra = f"; overhead {f['overhead_us_per_group']:.0f} µs/group"
        lines.append(
            f"| {f['section']} | {f['name']}: {what}{extra} | {_fmt(f['value'], f['unit'])} | "
            f"{_fmt(f['baseline'], f['unit'])} | {_fmt_ratio(f)} | {f['reps']} |"
        )
    return "\n".join(lines)


def _by_name(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["name"]: f for f in results["figures"]}


HISTORY_COLUMNS = (
    ("async/sync up", "async_up_vs_sync_up"),
    ("async up/run_sync", "async_up_vs_sync_trainer"),
    ("queue/raw", "groups_per_s"),
    ("publish/floor tiny", "publish_to_serving_tiny"),
    ("publish/floor large", None),  # publish_to_serving_<large model>
    ("torch engine/generate tiny", "torch_engine_vs_generate_tiny"),
    ("R²VPO λ=0/GRPO", "r2vpo_lam0_vs_grpo"),
    ("R²VPO λ=1/GRPO", "r2vpo_lam1_vs_grpo"),
)


def history_row(results: dict[str, Any]) -> str:
    m, figs = results["machine"], _by_name(results)
    cells = [
        results["date"][:16].replace("T", " "),
        f"{results['device']} ({results['mode']})",
        f"{m['nproc']}× {m.get('cpu_model') or '?'}" + (f", {m['gpu']}" if m.get("gpu") else ""),
        str((m.get("loadavg") or ["?"])[0]),
        (m.get("git_commit") or "?")[:10] + ("+" if m.get("git_dirty") else ""),
    ]
    for _, key in HISTORY_COLUMNS:
        if key is None:
            f = next(
                (f for n, f in figs.items() if n.startswith("publish_to_serving_") and "tiny" not in n), None
            )
        else:
            f = figs.get(key)
        cells.append(f"{f['ratio']:.2f}×" if f and f.get("ratio") is not None else "–")
    return "| " + " | ".join(cells) + " |"


def analysis_text(results: dict[str, Any]) -> str:
    """The e2e figures explained from the run's own measurements (README prose)."""
    e2e = results["sections"].get("e2e", {})
    a, figs = e2e.get("analysis") or {}, _by_name(results)
    if "async_up_vs_sync_up" not in figs or not a.get("overlap_ceiling"):
        return ""
    f, lines = figs["async_up_vs_sync_up"], []
    text = (
        f"**Async vs sync on {a.get('nproc')} CPU cores: {f['ratio']:.2f}×** (peers report 1.6–2.8× on "
        f"GPUs). A lock-step step took {a['sync_step_s']:.2f} s: {a['sync_learner_part_s']:.2f} s of learner "
        f"work (train_on + checkpoint/publish/ack) and {a['sync_other_part_s']:.2f} s of everything else "
        "(generation, scoring, HTTP, Redis, waiting for the weight swap). Overlapping the two perfectly "
        f"would give at most {a['overlap_ceiling']:.2f}×, and only with idle cores to overlap into."
    )
    if a.get("async_machine_busy_cores") is not None:
        text += (
            f" There were none: the machine was busy on {a['async_machine_busy_cores']:.2f} of its "
            f"{a.get('nproc')} cores throughout (load average {results['machine']['loadavg'][0]}: other jobs "
            f"share them), and the services got {a.get('async_service_cores', 0):.2f} cores in async mode, "
            f"{a.get('sync_service_cores', 0):.2f} in sync mode."
        )
    if a.get("async_learner_s") and a.get("sync_learner_s"):
        lag = f" (mean lag {a['async_mean_lag']:.1f} versions)" if a.get("async_mean_lag") is not None else ""
        text += (
            f" In async mode the rollouts run ahead of the learner{lag}, so the learner is the bottleneck, "
            f"and its train_on took {a['async_learner_s']:.2f} s instead of {a['sync_learner_s']:.2f} s "
            "because generation now competes with it for the same cores."
        )
    text += (
        " On a GPU the sampler and the learner run on different devices and the pipeline approaches its "
        "ceiling; on 2 shared CPU cores async only wins back the serial waits of the lock-step loop."
    )
    lines.append(text)
    if "async_up_vs_sync_trainer" in figs:
        g = figs["async_up_vs_sync_trainer"]
        lines.append(
            f"The in-process synchronous trainer (`run_sync`) consumed {_fmt(g['baseline'], g['unit'])}: "
            f"async `r2vpo up` reaches {g['ratio']:.2f}× of it. With one model on one machine the services "
            "pay for HTTP, JSON, Redis and a checkpoint + weight publication after every learner step "
            f"({(a.get('sync_learner_part_s', 0) - a.get('sync_learner_s', 0)) * 1000:.0f} ms a step here) "
            "that the single process does not; the services buy fault tolerance and scale-out, not speed on "
            "2 cores."
        )
    if a.get("sync_step_to_serving_s") is not None:
        lines.append(
            f"Learner step end → inference serving the new version inside the running system: "
            f"{a['sync_step_to_serving_s'] * 1000:.0f} ms in sync mode (on the critical path of every "
            f"lock-step step), {(a.get('async_step_to_serving_s') or 0) * 1000:.0f} ms in async mode (the "
            "swap waits for the batch being sampled)."
        )
    return "\n\n".join(lines)


INTRO = (
    "`python benchmarks/system.py --full` (about ten minutes; `--quick` is the smoke test, `--device cuda` "
    "the GPU variant) measures the system's speed against its floors, every figure side by side with its "
    "baseline in the same run: repetitions interleaved, value and baseline are medians, the ratio is the "
    "median of per-repetition ratios with a 95% bootstrap interval. Timings on this shared machine are "
    "noisy; read the ratios, not the absolute numbers. Sections: e2e (rollouts/s the learner consumes, "
    "start-up excluded), queue (TrajectoryQueue vs raw stream commands), weights (step end → /v1/models "
    "serves it, vs writing + reading the bytes), engine (tokens/s vs transformers generate), learner "
    "(R²VPO vs GRPO step), memory (peak RSS per service of `r2vpo up`)."
)


def section_markdown(results: dict[str, Any], history: list[str], json_path: str) -> str:
    parts = [
        BEGIN,
        "## System",
        "",
        INTRO,
        "",
        f"Latest run: {machine_line(results)}. Results: `{json_path}`.",
        "",
        markdown_table(results),
        "",
    ]
    text = analysis_text(results)
    if text:
        parts += [text, ""]
    parts += [
        "Runs so far (ratios; publish/floor is × the write + read floor, lower is better):",
        "",
        HISTORY_HEADER + "".join(f" {name} |" for name, _ in HISTORY_COLUMNS),
        "|" + "---|" * (5 + len(HISTORY_COLUMNS)),
        *history,
        "",
        END,
    ]
    return "\n".join(parts)


def _row_key(row: str) -> tuple[str, str]:
    """(day, device) of a history row: one row per day and device, as there is one results file."""
    cells = [c.strip() for c in row.split("|")]
    return cells[1][:10], cells[2]


def update_readme(path: Path, results: dict[str, Any], json_path: str) -> None:
    """Insert or replace this benchmark's own section of `path` (between its markers); the rest of the
    file, other engineers' sections included, is left byte for byte as it is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    row = history_row(results)
    if BEGIN in text and END in text:
        before, rest = text.split(BEGIN, 1)
        old, after = rest.split(END, 1)
        history, in_history = [], False
        for line in old.splitlines():
            if line.startswith(HISTORY_HEADER):
                in_history = True
            elif in_history and line.startswith("| ") and not line.startswith("|---"):
                history.append(line)
        history = [h for h in history if _row_key(h) != _row_key(row)]
        path.write_text(before + section_markdown(results, [*history, row], json_path) + after)
    else:
        path.write_text(text.rstrip("\n") + "\n\n" + section_markdown(results, [row], json_path) + "\n")

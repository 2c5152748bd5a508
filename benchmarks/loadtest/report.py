"""What must hold, the machine facts, the markdown "Load" section and writing it into a README."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from benchmarks.host import cpu_model, git
from benchmarks.loadtest import REPO

SECTION = "## Load"


def checks(results: dict[str, Any]) -> list[str]:
    """What must hold; the list of failures (empty: all good)."""
    failed = []
    inference, queue = results.get("inference"), results.get("queue")
    if inference:
        for phase in inference["phases"]:
            if phase["errors"] or phase["ok"] == 0:
                failed.append(
                    f"inference c={phase['concurrency']}: {phase['errors']} errors {phase['first_errors']}"
                )
    if queue:
        acc = queue["accounting"]
        if queue["errors"]:
            failed.append(f"queue: {queue['errors']} errors {queue['first_errors']}")
        if queue["max_stream_len"] > queue["max_len"] + queue["producers"] - 1:
            failed.append(f"queue: stream reached {queue['max_stream_len']} > bound {queue['max_len']}")
        if acc["unaccounted"] != 0 or acc["trained_twice"] != 0 or acc["trained"] != queue["groups"]:
            failed.append(f"queue: accounting {acc}")
    return failed


def machine() -> dict[str, Any]:
    load = round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model() or platform.processor(),
        "python": platform.python_version(),
        "git_commit": git(REPO, "rev-parse", "--short", "HEAD") or "",
        "load_avg_1m_at_start": load,
    }


def _row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(results: dict[str, Any]) -> str:
    m, inf, q = results["machine"], results.get("inference"), results.get("queue")
    lines = [
        SECTION,
        "",
        f"`{results['command']}` on {m['nproc']} CPU cores ({m['cpu_model']}, 1-minute load average "
        f"{m['load_avg_1m_at_start']} at the start: the cores are shared), commit {m['git_commit']}, "
        f"{results['date']}. Loopback only, bounded in count and time; `benchmarks/load.py` rewrites this "
        "section (raw numbers: `benchmarks/results/load/results.json`).",
        "",
    ]
    if inf:
        lines += [
            f"**Inference service** (torch engine, tiny policy, {inf['torch_threads']} torch thread(s); each "
            f"request one chain_sum prompt, n={inf['n']}, max_tokens={inf['max_tokens']}; the clients run in "
            "a separate process):",
            "",
            _row(
                "clients",
                "requests ok",
                "errors",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "req/s",
                "tokens/s",
                "peak RSS MB",
            ),  # fmt: skip
            _row(*["---"] * 10),
        ]
        for p in inf["phases"]:
            lat = p["latency"]
            lines.append(_row(p["concurrency"], p["ok"], p["errors"], lat["p50_ms"], lat["p90_ms"],
                              lat["p99_ms"], lat["max_ms"], p["requests_per_s"], p["tokens_per_s"],
                              p["rss_peak_mb"]))  # fmt: skip
        rss = inf["rss_mb"]
        lines += [
            "",
            f"Server memory: {rss['warm']} MB warm, {rss['peak']} MB peak, {rss['after']} MB after.",
            "",
        ]
    if q:
        acc, push, e2e = q["accounting"], q["push_latency"], q["end_to_end_latency"]
        lines += [
            f"**Redis queue** ({q['producers']} producers pushing bursts of {q['burst']} groups of 8 × 8 "
            f"tokens, stream bound {q['max_len']}; one consumer acknowledging 16 groups after each "
            f"{q['consumer_step_ms']} ms step):",
            "",
            _row(
                "groups",
                "errors",
                "groups/s",
                "push p50 ms",
                "push p99 ms",
                "produced→acked p50 ms",
                "produced→acked p99 ms",
                "max stream length",
                "Redis peak MB",
            ),  # fmt: skip
            _row(*["---"] * 9),
            _row(
                q["groups"],
                q["errors"],
                q["groups_per_s"],
                push["p50_ms"],
                push["p99_ms"],
                e2e["p50_ms"],
                e2e["p99_ms"],
                f"{q['max_stream_len']} (bound {q['max_len']})",
                q["redis_used_memory_peak_mb"],
            ),  # fmt: skip
            "",
            f"Accounting at the end: produced {acc['produced']}, trained {acc['trained']}, trained twice "
            f"{acc['trained_twice']}, unaccounted {acc['unaccounted']}; the producers waited "
            f"{q['producer_paused_s']} s in total for room in the stream.",
            "",
        ]
    failed = results["failed_checks"]
    lines += [f"Checks: {'all passed' if not failed else '; '.join(failed)}.", ""]
    return "\n".join(lines)


def write_section(readme: Path, text: str) -> None:
    """Replace this benchmark's section (its heading up to the next `## ` heading or `<!--` marker line, which
    belongs to the section after it), else append it."""
    old = readme.read_text() if readme.exists() else ""
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION), None)
    if start is None:
        new = old + ("\n" if old and not old.endswith("\n\n") else "") + text
    else:
        later = range(start + 1, len(lines))
        end = next((i for i in later if lines[i].startswith(("## ", "<!--"))), len(lines))
        new = "".join(lines[:start]) + text + ("\n" if end < len(lines) else "") + "".join(lines[end:])
    readme.write_text(new if new.endswith("\n") else new + "\n")

"""What a restarted learner does to `metrics.jsonl` and the Redis metrics stream: cut them back to the rows
its checkpoint covers (the module doc of `services.learner.service` lists the crash windows)."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from services.queue import TrajectoryQueue

log = logging.getLogger("r2vpo.learner")


def cut_metrics_rows(path: Path, state: dict[str, Any]) -> int:
    """Cut `path` (metrics.jsonl) back to the rows the checkpoint `state` covers (none without one), with the
    checkpointed step's row restored if the crash came before it was written; returns the rows kept."""
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    keep_n, row = int(state.get("metrics_rows", 0)), state.get("metrics_row")
    kept = [line for line in lines[:keep_n] if line.endswith("\n")]
    if row is not None:
        after = lines[keep_n] if len(lines) > keep_n else ""
        written = after.endswith("\n") and same_step(_parse(after), row)
        kept.append(after if written else json.dumps(row) + "\n")
    if kept != lines:
        log.warning("metrics.jsonl: rows of rolled-back steps removed (%d -> %d)", len(lines), len(kept))
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)  # atomic: a reader sees the old file or the new one (a new epoch)
    return len(kept)


Retry = Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]  # runs one Redis call with retries


async def recover_metrics_stream(queue: TrajectoryQueue, state: dict[str, Any], retry: Retry) -> str:
    """Delete metrics-stream entries of rolled-back steps and restore the checkpointed step's entry; returns
    the id of the stream's last entry this learner owns."""
    after, row = state.get("metrics_stream_id", "0-0"), state.get("metrics_row")
    entries = await retry(lambda: queue.read_metrics(after, count=100_000))
    keep = entries[:1] if entries and row is not None and same_step(entries[0][1], row) else []
    doomed = [entry_id for entry_id, _ in entries[len(keep) :]]
    if doomed:
        log.warning("metrics stream: %d entries of rolled-back steps removed", len(doomed))
        await retry(lambda: queue.redis.xdel(queue.keys.metrics, *doomed))
    if keep:
        return keep[0][0]
    if row is not None:
        return await retry(lambda: queue.append_metrics(row))
    return after


def same_step(a: dict[str, Any] | None, b: dict[str, Any]) -> bool:
    """The same learner step (a row of metrics.jsonl or the metrics stream vs the checkpointed row)."""
    return a is not None and (a.get("step"), a.get("version")) == (b.get("step"), b.get("version"))


def _parse(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None

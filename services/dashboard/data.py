"""The dashboard's data: run directories read incrementally and tolerantly, without HTTP.

A run directory (written by `trainer.sync.run_sync`, the learner service or `r2vpo up`) holds
`config.json`, `metrics.jsonl` (one JSON object per learner step, appended as training goes) and, once
finished, `summary.json` (or the learner service's `learner_summary.json`). `RunStore` remembers the byte
offset it has read of each `metrics.jsonl`, keeps a partially written last line until its newline
arrives, and skips (and counts) lines that are not JSON objects. A file that shrinks was rewritten (a
fresh run in the same folder): its rows are read again from the start and the run's `epoch` goes up.

A run may instead take its rows from Redis (its metrics stream), fed by the app through
`add_redis_rows`; that is the only way rows enter the store other than the files.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

RUN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
MARKERS = ("metrics.jsonl", "config.json", "summary.json", "learner_summary.json")
READ_CHUNK = 8 << 20  # bytes read from one metrics file per refresh (a huge file catches up over several)


class RunInfo(BaseModel):
    """What the page lists about one run (facts from config.json, summary and the latest row)."""

    name: str
    path: str | None
    source: Literal["files", "redis"]
    status: Literal["waiting", "live", "idle", "finished"]
    rows: int
    epoch: int
    malformed_lines: int
    step: int | None = None
    version: int | None = None
    rollouts: int | None = None
    algo: str | None = None
    model: str | None = None
    task: str | None = None
    mode: str | None = None
    lag: int | None = None
    started_at: float | None = None
    updated_at: float | None = None
    summary_mtime: float | None = None
    config_mtime: float | None = None


def safe_name(raw: str) -> str:
    """A run name for a directory name: the allowed characters only, never starting with a dot."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", raw)[:128]
    return name if RUN_NAME.match(name) else ("run_" + name)[:128]


class MetricsLog:
    """The rows of one `metrics.jsonl`, read from the last byte offset on each `poll`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self.malformed = 0
        self.epoch = 0
        self.offset = 0
        self.pending = b""  # a last line whose newline has not been written yet
        self.inode: int | None = None
        self.mtime: float | None = None

    @property
    def exists(self) -> bool:
        return self.inode is not None

    def poll(self, *, final: bool = False) -> int:
        """Read what was appended since the last poll; returns the number of new rows. `final`: the run is
        finished, so a last line without a newline is complete and is parsed too."""
        try:
            st = self.path.stat()
        except OSError:
            if self.inode is not None:
                self._reset()
                self.inode = None
            return 0
        if self.inode is not None and (st.st_ino != self.inode or st.st_size < self.offset):
            self._reset()
        self.inode, self.mtime = st.st_ino, st.st_mtime
        before = len(self.rows)
        if st.st_size > self.offset:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read(min(st.st_size - self.offset, READ_CHUNK))
            self.offset += len(data)
            *lines, self.pending = (self.pending + data).split(b"\n")
            for line in lines:
                self._parse(line)
        if final and self.pending and self.offset >= st.st_size:
            self._parse(self.pending)
            self.pending = b""
        return len(self.rows) - before

    def _parse(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            self.rows.append(row)
        else:
            self.malformed += 1

    def _reset(self) -> None:
        self.rows, self.malformed, self.offset, self.pending = [], 0, 0, b""
        self.epoch += 1


class _JsonFile:
    """A small JSON file re-read when its mtime or size changes; a half-written file keeps the last good
    value (or none)."""

    def __init__(self, *paths: Path) -> None:
        self.paths = paths
        self.value: dict[str, Any] | None = None
        self.mtime: float | None = None
        self._key: tuple | None = None

    def get(self) -> dict[str, Any] | None:
        for path in self.paths:
            try:
                st = path.stat()
            except OSError:
                continue
            key = (str(path), st.st_mtime_ns, st.st_size)
            if key != self._key:
                try:
                    value = json.loads(path.read_bytes())
                except (OSError, ValueError):
                    return self.value
                if isinstance(value, dict):
                    self.value, self.mtime, self._key = value, st.st_mtime, key
            return self.value
        return None


class Run:
    """One run: its directory (may not exist yet), or Redis rows when it has no metrics file."""

    def __init__(self, name: str, path: Path | None) -> None:
        self.name, self.path = name, path
        self.log = MetricsLog(path / "metrics.jsonl") if path else None
        self.config = _JsonFile(path / "config.json") if path else _JsonFile()
        summaries = (path / "summary.json", path / "learner_summary.json") if path else ()
        self.summary = _JsonFile(*summaries)
        self.redis_rows: list[dict[str, Any]] = []
        self.redis_cursor = "0-0"

    @property
    def source(self) -> Literal["files", "redis"]:
        return "files" if self.log is not None and self.log.exists else "redis"

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.log.rows if self.source == "files" else self.redis_rows  # type: ignore[union-attr]

    @property
    def epoch(self) -> int:
        return self.log.epoch if self.source == "files" else -1  # type: ignore[union-attr]

    def poll(self) -> None:
        if self.log is not None:
            self.log.poll(final=self.summary.get() is not None)

    def info(self, live_window_s: float) -> RunInfo:
        rows, cfg, summary = self.rows, self.config.get() or {}, self.summary.get()
        last = rows[-1] if rows else {}
        learner = cfg.get("learner") if isinstance(cfg.get("learner"), dict) else {}
        task = cfg.get("task") if isinstance(cfg.get("task"), dict) else {}
        updated = self.log.mtime if self.source == "files" and self.log else last.get("time")
        if summary is not None:
            status = "finished"
        elif not rows:
            status = "waiting"
        else:
            status = "live" if updated and time.time() - updated < live_window_s else "idle"
        first = rows[0] if rows else {}
        started = None
        if _number(first.get("time")) and _number(first.get("wall_s")):
            started = first["time"] - first["wall_s"]
        elif self.config.mtime is not None:
            started = self.config.mtime
        mode = cfg.get("mode") or (summary or {}).get("mode")
        mode = mode or ("sync" if "prompts_per_batch" in cfg else None)
        return RunInfo(
            name=self.name,
            path=str(self.path) if self.path else None,
            source=self.source,
            status=status,
            rows=len(rows),
            epoch=self.epoch,
            malformed_lines=self.log.malformed if self.log and self.source == "files" else 0,
            step=_last_int(rows, "step"),
            version=_last_int(rows, "version"),
            rollouts=_last_int(rows, "rollouts_consumed"),
            algo=learner.get("algo") or (summary or {}).get("algo") or last.get("algo"),
            model=str(cfg["model"]) if cfg.get("model") else None,
            task=task.get("name"),
            mode=mode,
            lag=cfg.get("lag") if isinstance(cfg.get("lag"), int) else cfg.get("max_lag"),
            started_at=started,
            updated_at=updated,
            summary_mtime=self.summary.mtime,
            config_mtime=self.config.mtime,
        )


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _last_int(rows: list[dict[str, Any]], key: str) -> int | None:
    for row in reversed(rows[-50:]):
        if _number(row.get(key)):
            return int(row[key])
    return None


class RunStore:
    """All runs the dashboard shows. Single-threaded by design: the app calls it from its event loop."""

    def __init__(
        self,
        run_dirs: list[Path] | tuple[Path, ...] = (),
        runs_root: Path | None = None,
        *,
        redis_run: str | None = None,
        live_window_s: float = 300.0,
    ) -> None:
        """`redis_run`: the run that takes its rows from Redis while it has no metrics file (the only run
        directory, or, when none is configured, a run of that name that lives in Redis alone)."""
        self.run_dirs = [Path(p) for p in run_dirs]
        self.runs_root = Path(runs_root) if runs_root else None
        self.live_window_s = live_window_s
        self._runs: dict[str, Run] = {}
        self._paths: set[Path] = set()
        for path in self.run_dirs:
            self._add(path)
        self.redis_run: str | None = None
        if redis_run is not None and len(self.run_dirs) == 1:
            self.redis_run = next(iter(self._runs))
        elif redis_run is not None and not self.run_dirs and self.runs_root is None:
            self.redis_run = safe_name(redis_run)
            self._runs[self.redis_run] = Run(self.redis_run, None)
        self.refresh()

    def _add(self, path: Path) -> None:
        resolved = path.resolve()
        if resolved in self._paths:
            return
        base, n = safe_name(path.name or "run"), 2
        name = base
        while name in self._runs:
            name, n = f"{base}-{n}", n + 1
        self._paths.add(resolved)
        self._runs[name] = Run(name, path)

    def refresh(self) -> None:
        """Pick up new run folders under `runs_root` and new rows of every run."""
        if self.runs_root is not None and self.runs_root.is_dir():
            found = [
                p
                for p in sorted(self.runs_root.iterdir())
                if p.is_dir() and not p.name.startswith(".") and any((p / m).is_file() for m in MARKERS)
            ]
            for path in found:
                self._add(path)
        for run in self._runs.values():
            run.poll()

    def get(self, name: str) -> Run | None:
        """The run of that name, or None; only names the store itself made resolve (no paths)."""
        return self._runs.get(name) if RUN_NAME.match(name) else None

    def runs(self) -> list[RunInfo]:
        return [run.info(self.live_window_s) for run in self._runs.values()]

    def metrics(self, name: str, after: int = 0) -> list[dict[str, Any]]:
        """Rows of run `name` from index `after` on (`after` = how many rows the caller already has)."""
        run = self._require(name)
        return run.rows[max(after, 0) :]

    def summary(self, name: str) -> dict[str, Any] | None:
        return self._require(name).summary.get()

    def config(self, name: str) -> dict[str, Any] | None:
        return self._require(name).config.get()

    def _require(self, name: str) -> Run:
        run = self.get(name)
        if run is None:
            raise KeyError(name)
        return run

    # --- rows from Redis ------------------------------------------------------------------------------
    def redis_target(self) -> tuple[str, str] | None:
        """(run name, stream cursor) when a run should read its rows from Redis now."""
        run = self._runs.get(self.redis_run) if self.redis_run else None
        return (run.name, run.redis_cursor) if run is not None and run.source == "redis" else None

    def add_redis_rows(self, name: str, entries: list[tuple[str, dict[str, Any]]]) -> None:
        run = self._require(name)
        for entry_id, row in entries:
            if isinstance(row, dict):
                run.redis_rows.append(row)
            run.redis_cursor = entry_id

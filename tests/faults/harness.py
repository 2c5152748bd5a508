"""Helpers of the fault-injection tests: run `r2vpo up` (or one service) as real processes, find and kill
its children, read Redis and its append-only file, and make sure nothing is left running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis

from client.schemas import TrajectoryGroup

REPO = Path(__file__).resolve().parents[2]
FAULTS_DIR = Path(__file__).resolve().parent
RUN = "local"  # `r2vpo up`'s default run name
GROUPS_PER_STEP, GROUP_SIZE = 4, 4


def small_run_config() -> dict:
    """A few-second-per-restart pipeline: 4 groups x 4 completions per step, no periodic evaluation."""
    return {
        "groups_per_step": GROUPS_PER_STEP,
        "group_size": GROUP_SIZE,
        "eval_every": 1000,
        "task": {"heldout_size": 40},
        "dashboard": False,
        "max_restarts": 4,
        "overrides": {
            "learner": {"reclaim_idle_ms": 2000},
            "rollout": {
                "retry_backoff_s": 0.2,
                "max_backoff_s": 2.0,
                "inference_retries": 1,
                "inference_backoff_s": 0.2,
                "inference_timeout_s": 30,
            },  # fmt: skip
        },
    }


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.1) -> Any:
    """Poll until `predicate()` is truthy (exceptions count as not yet); returns its value."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - a service restarting answers with errors
            last = exc
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last!r})")


def get_json(url: str, timeout: float = 3.0) -> Any:
    response = httpx.get(url, timeout=timeout)
    response.raise_for_status()
    return response.json()


def descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def assert_no_process_left(
    before: set[int], needle: str | None = None, timeout: float = 10.0, keep: set[int] = frozenset()
) -> None:
    """No child of this test process started since `before` survives (nor any process whose command line
    holds `needle`, e.g. the run directory: services start in their own sessions); `keep`: pids that belong
    to a fixture (e.g. a redis-server the test restarted)."""

    def leftovers() -> list[psutil.Process]:
        found = [p for p in psutil.Process().children(recursive=True) if p.pid not in before | keep]
        if needle:
            for proc in psutil.process_iter(["cmdline"]):
                with_needle = needle in " ".join(proc.info["cmdline"] or [])
                if with_needle and proc.pid != os.getpid() and proc not in found:
                    found.append(proc)
        return [p for p in found if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    deadline = time.monotonic() + timeout
    while (left := leftovers()) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        cmdlines = []
        for proc in left:
            try:
                cmdlines.append(proc.cmdline())
                proc.kill()  # do not leave them running for the next test
            except psutil.Error:
                pass
        raise AssertionError(f"processes left behind: {cmdlines}")


class UpRun:
    """`r2vpo up` as a real subprocess, with its config in a JSON file; a context manager that kills
    whatever is left on exit and then asserts (psutil) that no process survived."""

    def __init__(
        self,
        run_dir: Path,
        model: Path,
        *,
        steps: int,
        config: dict[str, Any],
        redis_url: str | None = None,
        max_lag: int = 2,
        env: dict[str, str] | None = None,
        keep: Callable[[], set[int]] = set,
    ) -> None:
        self.run_dir, self.keep = run_dir, keep
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path = run_dir.parent / f"{run_dir.name}-up.json"
        config_path.write_text(json.dumps(config))
        self.command = [sys.executable, "-m", "services.cli", "up", "--config", str(config_path),
                        "--run-dir", str(run_dir), "--model", str(model), "--steps", str(steps),
                        "--mode", "async", "--max-lag", str(max_lag)]  # fmt: skip
        if redis_url:
            self.command += ["--redis-url", redis_url]
        self.env = os.environ | {"COLUMNS": "200", "PYTHONPATH": f"{FAULTS_DIR}:{REPO}"} | (env or {})
        self.process: subprocess.Popen | None = None
        self.before: set[int] = set()

    def __enter__(self) -> UpRun:
        self.before = descendants()
        self.stdout = (self.run_dir.parent / f"{self.run_dir.name}-up.out").open("wb")
        self.process = subprocess.Popen(
            self.command, cwd=REPO, env=self.env, stdout=self.stdout, stderr=subprocess.STDOUT
        )
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.stdout.close()
        assert_no_process_left(self.before, needle=str(self.run_dir), keep=self.keep())

    # --- looking at the run ------------------------------------------------------------------------------
    def output(self) -> str:
        return (self.run_dir.parent / f"{self.run_dir.name}-up.out").read_text(errors="replace")

    def service_config(self, name: str, timeout: float = 120.0) -> dict[str, Any]:
        """The JSON config `up` wrote for `name` (waits until it is written)."""
        path = self.run_dir / "services" / f"{name}.json"
        return wait_for(lambda: json.loads(path.read_text()), timeout, f"{path.name} to be written")

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.service_config(name)['port']}"

    def pid(self, name: str) -> int | None:
        """The live process serving `name` (child of `up` whose command names its config file)."""
        assert self.process is not None
        needle = str(self.run_dir / "services" / f"{name}.json")
        try:
            children = psutil.Process(self.process.pid).children()
        except psutil.NoSuchProcess:
            return None
        for child in children:
            try:
                if needle in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                    return child.pid
            except psutil.Error:
                continue
        return None

    def status(self) -> dict[str, Any]:
        return get_json(f"{self.url('learner')}/status")

    def step(self) -> int:
        try:
            return int(self.status().get("step", 0))
        except (httpx.HTTPError, ValueError):
            return -1

    def wait_step(self, at_least: int, timeout: float = 120.0) -> int:
        return wait_for(lambda: self.step() >= at_least and self.step(), timeout, f"learner step {at_least}")

    def wait_ready(self, name: str, timeout: float = 120.0, *, not_pid: int | None = None) -> int:
        """Wait until `name` is served by a live process (other than `not_pid`) that answers /readyz."""

        def ready() -> int | None:
            pid = self.pid(name)
            if pid is None or pid == not_pid:
                return None
            return pid if httpx.get(f"{self.url(name)}/readyz", timeout=2).status_code == 200 else None

        return wait_for(ready, timeout, f"{name} ready (not pid {not_pid})", poll=0.05)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        pid = self.pid(name)
        assert pid is not None, f"no live process for {name}"
        os.kill(pid, sig)
        return pid

    def wait_exit(self, timeout: float) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            tail = self.output()[-3000:]
            raise AssertionError(f"`r2vpo up` still running after {timeout:.0f} s:\n{tail}") from None

    def summary(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "summary.json").read_text())

    def metrics_rows(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]


# --- Redis and its append-only file -------------------------------------------------------------------


def keys(run: str = RUN) -> dict[str, str]:
    base = f"r2vpo:{run}:"
    names = ("trajectories", "deadletter", "weights:latest", "metrics", "trained", "dropped", "counters")
    return {name.split(":")[0]: base + name for name in names}


def aof_commands(path: Path) -> Iterator[list[bytes]]:
    """The commands of a Redis append-only file (RESP arrays); stops at a partly written last one."""
    data = path.read_bytes()
    assert not data.startswith(b"REDIS"), "AOF has an RDB preamble (rewritten): not parsed here"
    i = 0
    while i < len(data):
        try:
            assert data[i : i + 1] == b"*"
            end = data.index(b"\r\n", i)
            count, i, args = int(data[i + 1 : end]), end + 2, []
            for _ in range(count):
                assert data[i : i + 1] == b"$"
                end = data.index(b"\r\n", i)
                length = int(data[i + 1 : end])
                start = end + 2
                if start + length + 2 > len(data):
                    return
                args.append(data[start : start + length])
                i = start + length + 2
        except (ValueError, AssertionError):
            return
        yield args


def produced_groups(aof: Path, run: str = RUN) -> list[dict[str, Any]]:
    """Every trajectory entry ever added to the run's stream (deleted or not), as written: the ground
    truth of what was produced, independent of the system's own counters."""
    stream = keys(run)["trajectories"].encode()
    out = []
    for args in aof_commands(aof):
        if args[0].upper() == b"XADD" and args[1] == stream:
            fields = dict(zip(args[3::2], args[4::2], strict=True))
            out.append(json.loads(fields[b"data"]))
    return out


def announced_versions(aof: Path, run: str = RUN) -> list[int]:
    """Versions written to the `weights:latest` hash, in order (every announcement)."""
    key = keys(run)["weights"].encode()
    versions = []
    for args in aof_commands(aof):
        if args[0].upper() == b"HSET" and args[1] == key:
            fields = dict(zip(args[2::2], args[3::2], strict=True))
            versions.append(int(fields[b"version"]))
    return versions


def check_whole_groups(groups: list[dict[str, Any]], group_size: int) -> None:
    """Every stream entry is a valid trajectory group with exactly `group_size` completions."""
    assert groups, "nothing was produced"
    for raw in groups:
        group = TrajectoryGroup.model_validate(raw)
        assert len(group.completions) == group_size, (group.group_id, len(group.completions))


def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, encoding_errors="replace", socket_timeout=5)


def accounting_identity(acc: dict[str, int]) -> None:
    settled = acc["trained"] + acc["dead_lettered"] + acc["dropped"] + acc["duplicates_skipped"]
    assert acc["produced"] == settled + acc["pending"], acc
    assert acc["unaccounted"] == 0 and acc["trained_twice"] == 0, acc


def serve_command(service: str, config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", "serve", service, "--config", str(config), *args]

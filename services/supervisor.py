"""The process supervision of `r2vpo up`: each service a child process, restarted when it dies.

A child is an `r2vpo serve …` process in its own session, its output appended to its log file; on Linux it
gets SIGTERM if its parent dies (PR_SET_PDEATHSIG), so none is left behind. The supervisor starts children,
waits until each answers /readyz, restarts one that died after a backoff (0.5 s, doubling, at most
`max_restarts` times per child) and records each restart (exit code, backoff, time to ready). It stops
them in stages: rollout workers first, so that no new work starts; then the learner, which commits the
step in flight; then the rest, each with SIGTERM and a bounded wait, then SIGKILL of its process group.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

# A service exits with this when restarting it cannot help (e.g. the learner's weights went non-finite):
# the supervisor ends the run instead of restarting it.
EXIT_DO_NOT_RESTART = 3
log = logging.getLogger("r2vpo.up")  # the supervisor logs as `r2vpo up`, as before the split


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """preexec_fn: on Linux, ask the kernel to SIGTERM this child when its parent dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    name: str
    args: list[str]
    url: str
    log_path: Path
    process: subprocess.Popen | None = None
    restarts: int = 0
    env: dict[str, str] = field(default_factory=dict)
    next_start: float | None = None  # monotonic time of a scheduled restart
    waiting_ready_since: float | None = None  # restarted, not ready yet

    def start(self) -> None:
        log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.args,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=os.environ | self.env,
            start_new_session=True,  # Ctrl-C in a terminal reaches `up` only; `up` stops the children
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - single-threaded here, only calls prctl
        )
        log_file.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> None:
        """Wait for the exit; after `timeout` SIGKILL the whole process group (what the child started)."""
        if self.process is None:
            return
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s of SIGTERM: killed", self.name, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 30.0) -> None:
        self.terminate()
        self.wait(timeout)

    def ready(self, timeout: float = 2.0) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False


class Supervisor:
    """Starts children, waits for health, restarts the dead with backoff, stops everything in stages."""

    def __init__(self, max_restarts: int, *, backoff_s: float = 0.5, max_backoff_s: float = 10.0) -> None:
        self.children: list[Child] = []
        self.max_restarts = max_restarts
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.events: list[dict[str, Any]] = []  # one per restart: exit code, delay, time to ready

    def launch(self, child: Child, *, ready_timeout: float = 300.0) -> None:
        self.children.append(child)
        child.start()
        wait_healthy(child, ready_timeout)

    def launch_all(self, children: list[Child], *, ready_timeout: float = 300.0) -> None:
        """Start all at once (their imports overlap), then wait until each is ready."""
        for child in children:
            self.children.append(child)
            child.start()
        for child in children:
            wait_healthy(child, ready_timeout)

    def check(self) -> list[str]:
        """Restart children that died (after a backoff); returns the names restarted now. Raises when one
        died more than `max_restarts` times."""
        restarted, now = [], time.monotonic()
        for child in self.children:
            if child.alive():
                if child.waiting_ready_since is not None and child.ready(timeout=0.5):
                    self.events[-1 - _last_event(self.events, child.name)]["ready_s"] = round(
                        time.monotonic() - child.waiting_ready_since, 2
                    )
                    child.waiting_ready_since = None
                continue
            if child.next_start is None:
                code = child.process.returncode if child.process is not None else None
                if code == EXIT_DO_NOT_RESTART:
                    raise RuntimeError(
                        f"{child.name} stopped for a reason a restart cannot fix (exit {code}); "
                        f"see {child.log_path}"
                    )
                if child.restarts >= self.max_restarts:
                    raise RuntimeError(f"{child.name} died {child.restarts + 1} times; see {child.log_path}")
                delay = min(self.backoff_s * 2**child.restarts, self.max_backoff_s)
                log.warning("%s exited with %s; restarting in %.1f s", child.name, code, delay)
                self.events.append({"service": child.name, "exit_code": code, "backoff_s": delay,
                                    "time": time.time(), "ready_s": None})  # fmt: skip
                child.next_start = now + delay
            elif now >= child.next_start:
                child.restarts += 1
                child.next_start = None
                child.waiting_ready_since = time.monotonic()
                child.start()
                restarted.append(child.name)
        return restarted

    def stop_all(self, timeout: float = 30.0) -> dict[str, float]:
        """SIGTERM in stages (rollout workers, then the learner, then the rest), each stage in parallel
        with a bounded wait; returns each child's seconds from SIGTERM to exit."""
        stages = (
            [c for c in self.children if c.name.startswith("rollout")],
            [c for c in self.children if c.name == "learner"],
            [c for c in self.children if not c.name.startswith("rollout") and c.name != "learner"],
        )
        took: dict[str, float] = {}
        for stage in stages:
            live = [c for c in stage if c.alive()]
            started = time.monotonic()
            for child in live:
                child.terminate()
            for child in live:
                child.wait(max(0.1, timeout - (time.monotonic() - started)))
                took[child.name] = round(time.monotonic() - started, 2)
        return took


def _last_event(events: list[dict[str, Any]], name: str) -> int:
    """Offset from the end of the last event of `name`."""
    for offset, event in enumerate(reversed(events)):
        if event["service"] == name:
            return offset
    raise KeyError(name)


def wait_healthy(child: Child, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited during start-up; see {child.log_path}")
        if child.ready():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{child.name} not ready after {timeout:.0f} s; see {child.log_path}")

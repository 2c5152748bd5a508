"""Background samplers of a running `r2vpo up`: RSS, peak RSS and CPU per service, and when the inference
service first serves each policy version."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any


def _vm_hwm(pid: int) -> int | None:
    """Peak resident set size (VmHWM) of a process in bytes, Linux only."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def service_label(cmdline: list[str]) -> str | None:
    """`inference`, `rollout-0`, `redis`, … for a child of `r2vpo up` (None for anything else)."""
    if cmdline and "redis-server" in cmdline[0]:  # redis rewrites its title: "…/redis-server 127.0.0.1:…"
        return "redis"
    if "serve" in cmdline and "--config" in cmdline:
        with contextlib.suppress(IndexError):
            return Path(cmdline[cmdline.index("--config") + 1]).stem
    return None


def _maps_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


class ProcSampler(threading.Thread):
    """Samples RSS, peak RSS and CPU time of this process's service children, and machine CPU time."""

    def __init__(self, interval: float = 0.25) -> None:
        super().__init__(daemon=True, name="proc-sampler")
        self.interval = interval
        self.halt = threading.Event()
        self.samples: dict[str, list[tuple[float, int, float]]] = {}  # name → (time, rss, cpu seconds)
        self.peak_rss: dict[str, int] = {}
        self.uses_torch: dict[str, bool] = {}  # libtorch mapped into the process
        self.machine: list[tuple[float, float, float]] = []  # (time, busy cpu seconds, all cpu seconds)
        self._names: dict[tuple[int, float], str] = {}  # (pid, start time) → service name

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.halt.is_set():
            now = time.time()
            cpu = psutil.cpu_times()
            idle = cpu.idle + getattr(cpu, "iowait", 0.0)
            total = sum(cpu)
            self.machine.append((now, total - idle, total))
            for proc in me.children(recursive=True):
                try:
                    key = (proc.pid, proc.create_time())
                    if key not in self._names:  # between fork and exec a child still shows our cmdline
                        label = service_label(proc.cmdline())
                        if label is None:
                            continue
                        self._names[key] = label
                    name = self._names[key]
                    with proc.oneshot():
                        rss = proc.memory_info().rss
                        times = proc.cpu_times()
                    hwm = _vm_hwm(proc.pid) or rss
                    self.samples.setdefault(name, []).append((now, rss, times.user + times.system))
                    self.peak_rss[name] = max(self.peak_rss.get(name, 0), hwm, rss)
                    if not self.uses_torch.get(name) and len(self.samples[name]) % 8 == 1:
                        self.uses_torch[name] = _maps_torch(proc.pid)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            self.halt.wait(self.interval)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=5)

    def cores_used(self, start: float, end: float) -> dict[str, float] | None:
        """CPU seconds per wall second between `start` and `end` (nearest samples): services, machine."""

        def nearest(rows: list, t: float) -> Any:
            return min(rows, key=lambda r: abs(r[0] - t)) if rows else None

        per_service = {}
        for name, rows in self.samples.items():
            a, b = nearest(rows, start), nearest(rows, end)
            if a is not None and b is not None and b[0] > a[0]:
                per_service[name] = round((b[2] - a[2]) / (b[0] - a[0]), 3)
        a, b = nearest(self.machine, start), nearest(self.machine, end)
        if a is None or b is None or b[0] <= a[0]:
            return None
        return {
            "services": round(sum(per_service.values()), 3),
            "machine": round((b[1] - a[1]) / (b[0] - a[0]), 3),
            "per_service": per_service,
        }


class VersionPoller(threading.Thread):
    """Polls GET /v1/models and records when each policy version is first served."""

    def __init__(self, url: str, interval: float = 0.05) -> None:
        super().__init__(daemon=True, name="version-poller")
        self.url, self.interval = url.rstrip("/"), interval
        self.halt = threading.Event()
        self.seen: list[tuple[float, int]] = []

    def run(self) -> None:
        import httpx

        last = None
        with httpx.Client(timeout=2.0) as client:
            while not self.halt.is_set():
                try:
                    version = client.get(f"{self.url}/v1/models").json()["data"][0]["policy_version"]
                except Exception:  # noqa: BLE001 - not up yet, or shutting down
                    version = None
                if version is not None and version != last:
                    self.seen.append((time.time(), int(version)))
                    last = version
                self.halt.wait(self.interval)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=5)

    def first_serving(self, version: int) -> float | None:
        return next((t for t, v in self.seen if v >= version), None)

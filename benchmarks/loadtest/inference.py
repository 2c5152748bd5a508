"""The inference phase: a real `r2vpo serve inference` process on loopback, the client process run against
it with 1 and with C connections, and the server's resident memory sampled throughout."""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.loadtest import REPO, SCRIPT


class RssSampler:
    """Samples a process's resident memory every `interval` seconds in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        import psutil

        self.process, self.interval, self.peak = psutil.Process(pid), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return self.process.memory_info().rss

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.rss())
            except Exception:  # noqa: BLE001 - the process ended
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_client(url: str, args: argparse.Namespace, concurrency: int, requests: int) -> dict[str, Any]:
    command = [sys.executable, str(SCRIPT), "client", "--url", url, "--requests", str(requests),
               "--concurrency", str(concurrency), "--deadline-s", str(args.phase_s), "--n", str(args.n),
               "--max-tokens", str(args.max_tokens), "--seed", str(args.seed)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.phase_s + 120, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"client process failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def inference_load(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import httpx

    from services.redis_server import free_port

    if args.model is None:
        from trainer.tiny import ensure_default_policy

        args.model = ensure_default_policy(progress=False)
    port = free_port()
    config = workdir / "inference.json"
    config.write_text(json.dumps({"host": "127.0.0.1", "port": port, "model": str(args.model),
                                  "watch_weights": False, "admin_token": secrets.token_hex(16),
                                  "torch_threads": args.torch_threads}))  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    log = (workdir / "inference.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "inference", "--config", str(config)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"inference server did not start; see {workdir / 'inference.log'}")
            time.sleep(0.2)
        run_client(url, args, concurrency=2, requests=8)  # warm-up, not reported
        phases = []
        with RssSampler(server.pid) as rss:
            warm = rss.rss()
            for concurrency, requests in ((1, args.requests // 4), (args.concurrency, args.requests)):
                phase = run_client(url, args, concurrency, max(requests, 1))
                phase["rss_peak_mb"] = round(rss.peak / 2**20, 1)
                phases.append(phase)
            after = rss.rss()
        return {
            "model": str(args.model),
            "n": args.n,
            "max_tokens": args.max_tokens,
            "torch_threads": args.torch_threads,
            "phases": phases,
            "rss_mb": {
                "warm": round(warm / 2**20, 1),
                "peak": round(rss.peak / 2**20, 1),
                "after": round(after / 2**20, 1),
            },  # fmt: skip
        }
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()

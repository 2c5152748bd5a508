"""Load test of the inference service and of the Redis trajectory queue: loopback only, bounded in count and
in time (issue "Reliability and security").

Inference: a real `r2vpo serve inference` process (torch engine, the embedded tiny policy) on 127.0.0.1,
driven by a *separate client process* (`load.py client …`) with C concurrent connections sending
OpenAI-style completion requests (a chain_sum prompt, n completions of max_tokens tokens each). Reported:
errors (any non-200 or transport error), p50/p90/p99/max latency, requests/s and generated tokens/s, and the
server's resident memory before, at peak and after (bounded memory: no growth with the number of requests).
It runs once with 1 client (unbatched latency) and once with C clients (the engine batches concurrent ones).

Queue: a real `redis-server` on 127.0.0.1 (append-only on, as `r2vpo up` runs it), P producer tasks pushing
bursts of B trajectory groups (G = 8 completions of 8 tokens, the default shape) as fast as admission lets
them (`wait_for_room` on a stream bound of M entries), and one learner-like consumer (read 16, "train" for a
fixed time, acknowledge). Reported: errors, push latency p50/p99, end-to-end latency (produced → acked)
p50/p99, the largest stream length sampled every 2 ms against the bound, Redis's peak `used_memory`, and
the accounting identity at the end. With P producers each checking for room before pushing, the stream can
pass the bound by at most P − 1 entries (check-then-push is not atomic); that is what is checked.

    python benchmarks/load.py                        # about a minute on 2 CPU cores
    python benchmarks/load.py --quick                # a smoke run, a few seconds of load
    python benchmarks/load.py --readme benchmarks/README.md   # also write the "Load" section there

Results go to `--out` (default benchmarks/results/load/results.json). Exit code 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import os
import platform
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/load.py` from anywhere
    sys.path.insert(0, str(REPO))

SECTION = "## Load"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(round(q / 100 * len(ordered) + 0.5))))
    return ordered[rank - 1]


def summary_ms(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {}
    ms = [s * 1000 for s in seconds]
    return {
        "p50_ms": round(percentile(ms, 50), 2),
        "p90_ms": round(percentile(ms, 90), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(max(ms), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
    }


def require_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host not in LOOPBACK:
        raise SystemExit(f"refusing to load-test {host!r}: this benchmark only targets loopback addresses")


# --- the client process -------------------------------------------------------------------------------------


async def client_main(args: argparse.Namespace) -> dict[str, Any]:
    """Send up to `requests` completion requests from `concurrency` connections until `deadline_s`."""
    import httpx

    require_loopback(args.url)
    rng = random.Random(args.seed)
    digits, ops = "0123456789", "+-"
    prompts = [
        f"{rng.choice(digits)}{rng.choice(ops)}{rng.choice(digits)}{rng.choice(ops)}{rng.choice(digits)}="
        for _ in range(args.requests)
    ]
    counter = itertools.count()
    latencies: list[float] = []
    statuses: Counter = Counter()
    errors: list[str] = []
    tokens = 0
    deadline = time.monotonic() + args.deadline_s
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while (i := next(counter)) < args.requests and time.monotonic() < deadline:
            body = {"prompt": prompts[i], "n": args.n, "max_tokens": args.max_tokens, "seed": i}
            started = time.perf_counter()
            try:
                response = await http.post("/v1/completions", json=body)
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - started)
            statuses[response.status_code] += 1
            if response.status_code != 200:
                errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                continue
            choices = response.json()["choices"]
            if len(choices) != args.n:
                errors.append(f"{len(choices)} choices for n={args.n}")
            tokens += sum(len(c["token_ids"]) for c in choices)

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout_s, limits=limits) as http:
        await asyncio.gather(*(worker(http) for _ in range(args.concurrency)))
    wall = time.perf_counter() - started
    return {
        "concurrency": args.concurrency,
        "requests": len(latencies) + len(errors) - sum(1 for e in errors if e.startswith("HTTP")),
        "ok": statuses.get(200, 0),
        "statuses": {str(k): v for k, v in statuses.items()},
        "errors": len(errors),
        "first_errors": errors[:5],
        "wall_s": round(wall, 2),
        "requests_per_s": round(statuses.get(200, 0) / wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "latency": summary_ms(latencies),
    }


# --- inference load (orchestrator side) ---------------------------------------------------------------------


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
    command = [sys.executable, __file__, "client", "--url", url, "--requests", str(requests),
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


# --- queue load ---------------------------------------------------------------------------------------------


def make_group(rng: random.Random, group_size: int = 8, tokens: int = 8) -> Any:
    import uuid

    from client.schemas import Completion, TrajectoryGroup

    completions = [
        Completion(
            token_ids=[rng.randrange(32) for _ in range(tokens)],
            behavior_logprobs=[-rng.random() for _ in range(tokens)],
            reward=float(rng.random() < 0.5),
            policy_version=0,
        )  # fmt: skip
        for _ in range(group_size)
    ]
    return TrajectoryGroup(group_id=uuid.uuid4().hex, prompt_token_ids=[1, 2, 3, 4, 5, 6, 7],
                           completions=completions)  # fmt: skip


async def queue_load_async(args: argparse.Namespace, redis_url: str) -> dict[str, Any]:
    from services.queue import TrajectoryQueue, connect_redis

    total, producers, burst = args.queue_groups, args.producers, args.burst
    deadline = time.monotonic() + args.phase_s
    per_producer = [total // producers + (i < total % producers) for i in range(producers)]
    push_s: list[float] = []
    end_to_end_s: list[float] = []
    lengths: list[int] = []
    memory: list[int] = []
    errors: list[str] = []
    paused = 0.0
    done = asyncio.Event()

    async def open_queue(name: str) -> TrajectoryQueue:
        queue = TrajectoryQueue(await connect_redis(redis_url, attempts=5), "load", consumer=name,
                                max_len=args.max_len)  # fmt: skip
        await queue.ensure_group()
        return queue

    async def produce(i: int, count: int) -> None:
        nonlocal paused
        queue, rng, sent = await open_queue(f"producer-{i}"), random.Random(i), 0
        try:
            while sent < count and time.monotonic() < deadline:
                for _ in range(min(burst, count - sent)):
                    paused += await queue.wait_for_room(poll_s=0.002, timeout_s=60)
                    group = make_group(rng)
                    started = time.perf_counter()
                    await queue.push(group)
                    push_s.append(time.perf_counter() - started)
                    sent += 1
                await asyncio.sleep(rng.uniform(0, 2 * args.burst_pause_s))
        except Exception as exc:  # noqa: BLE001 - counted as an error of the run
            errors.append(f"producer {i}: {type(exc).__name__}: {exc}")
        finally:
            await queue.redis.aclose()

    async def consume() -> None:
        queue = await open_queue("consumer")
        try:
            while not (done.is_set() and await queue.length() == 0) and time.monotonic() < deadline + 30:
                batch = await queue.read(16, block_ms=50)
                if not batch:
                    continue
                await asyncio.sleep(args.step_ms / 1000)  # the "optimizer step"
                await queue.ack(batch)
                now = time.time()
                end_to_end_s.extend(now - d.group.created_at for d in batch)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"consumer: {type(exc).__name__}: {exc}")
        finally:
            await queue.redis.aclose()

    async def sample() -> None:
        queue = await open_queue("sampler")
        try:
            while not done.is_set():
                lengths.append(await queue.length())
                if len(lengths) % 25 == 0:
                    memory.append(int((await queue.redis.info("memory"))["used_memory"]))
                await asyncio.sleep(0.002)
        finally:
            await queue.redis.aclose()

    started = time.perf_counter()
    sampler, consumer = asyncio.create_task(sample()), asyncio.create_task(consume())
    await asyncio.gather(*(produce(i, n) for i, n in enumerate(per_producer)))
    done.set()
    await asyncio.gather(sampler, consumer)
    wall = time.perf_counter() - started
    checker = await open_queue("checker")
    accounting = await checker.accounting()
    await checker.redis.aclose()
    return {
        "groups": len(push_s),
        "producers": producers,
        "burst": burst,
        "max_len": args.max_len,
        "consumer_step_ms": args.step_ms,
        "errors": len(errors),
        "first_errors": errors[:5],
        "wall_s": round(wall, 2),
        "groups_per_s": round(len(push_s) / wall, 1),
        "push_latency": summary_ms(push_s),
        "end_to_end_latency": summary_ms(end_to_end_s),
        "producer_paused_s": round(paused, 2),
        "max_stream_len": max(lengths, default=0),
        "length_samples": len(lengths),
        "redis_used_memory_peak_mb": round(max(memory, default=0) / 2**20, 2),
        "accounting": accounting,
    }


def queue_load(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from services.redis_server import RedisServer

    with RedisServer(workdir / "redis", password=secrets.token_hex(8)) as server:
        return asyncio.run(queue_load_async(args, server.url))


# --- checks, report -----------------------------------------------------------------------------------------


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
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.exists() else []  # fmt: skip
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=REPO, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit = ""
    load = round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None
    return {
        "nproc": os.cpu_count(),
        "cpu_model": models[0] if models else platform.processor(),
        "python": platform.python_version(),
        "git_commit": commit,
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
    """Replace this benchmark's section (its heading up to the next `## ` heading), else append it."""
    old = readme.read_text() if readme.exists() else ""
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION), None)
    if start is None:
        new = old + ("\n" if old and not old.endswith("\n\n") else "") + text
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + text + ("\n" if end < len(lines) else "") + "".join(lines[end:])
    readme.write_text(new if new.endswith("\n") else new + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command_name")
    client = sub.add_parser("client", help="(internal) the client process")
    client.add_argument("--url", required=True)
    client.add_argument("--requests", type=int, required=True)
    client.add_argument("--concurrency", type=int, required=True)
    client.add_argument("--deadline-s", type=float, required=True)
    client.add_argument("--n", type=int, default=8)
    client.add_argument("--max-tokens", type=int, default=8)
    client.add_argument("--timeout-s", type=float, default=60.0)
    client.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few requests, few groups")
    parser.add_argument("--requests", type=int, default=400, help="requests of the concurrent phase")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--n", type=int, default=8, help="completions per request (G)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--model", type=Path, default=None, help="HF model dir [default: the tiny policy]")
    parser.add_argument("--queue-groups", type=int, default=4000)
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument("--burst", type=int, default=64)
    parser.add_argument("--burst-pause-s", type=float, default=0.05)
    parser.add_argument("--max-len", type=int, default=256, help="stream bound")
    parser.add_argument("--step-ms", type=float, default=60.0, help="consumer's simulated step per 16 groups")
    parser.add_argument("--phase-s", type=float, default=60.0, help="time bound of each phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", choices=["inference", "queue"], action="append", default=[])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "load" / "results.json")
    parser.add_argument("--readme", type=Path, default=None, help="write the Load section into this file")
    args = parser.parse_args(argv)
    if args.command_name == "client":
        print(json.dumps(asyncio.run(client_main(args))))
        return 0
    if args.quick:
        args.requests, args.queue_groups, args.max_len, args.phase_s = 32, 300, 64, 20.0
    results: dict[str, Any] = {
        "benchmark": "load",
        "command": "python benchmarks/load.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
    }
    with tempfile.TemporaryDirectory(prefix="r2vpo-load-") as tmp:
        if "inference" not in args.skip:
            results["inference"] = inference_load(args, Path(tmp))
        if "queue" not in args.skip:
            results["queue"] = queue_load(args, Path(tmp))
    results["failed_checks"] = checks(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    text = markdown(results)
    print(text)
    if args.readme:
        write_section(args.readme, text)
    return 1 if results["failed_checks"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""The client process (`load.py client …`): completion requests from concurrent connections, loopback only."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

from benchmarks.loadtest.latency import summary_ms

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def require_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host not in LOOPBACK:
        raise SystemExit(f"refusing to load-test {host!r}: this benchmark only targets loopback addresses")


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

"""The queue phase: P producers pushing bursts of trajectory groups under the stream bound, one learner-like
consumer, a sampler of the stream length and Redis memory, all on a real redis-server."""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import time
from pathlib import Path
from typing import Any

from benchmarks.loadtest.latency import summary_ms


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

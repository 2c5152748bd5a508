"""queue: groups/s through TrajectoryQueue vs raw stream commands on the same redis-server."""

from __future__ import annotations

import asyncio
import random
import secrets
import time
import uuid
from typing import Any

from .config import log
from .context import Context
from .measure import figure, median, rotated


def realistic_group(group_size: int = 8, tokens: int = 10, prompt_tokens: int = 8) -> Any:
    """A trajectory group shaped like the default task's: G completions of `tokens` ids with log-probs."""
    from client.schemas import Completion, TrajectoryGroup

    rng = random.Random(0)
    completions = [
        Completion(
            token_ids=[rng.randrange(4, 99) for _ in range(tokens)],
            behavior_logprobs=[-rng.random() * 3 for _ in range(tokens)],
            reward=float(rng.random() < 0.5),
            policy_version=7,
            text="".join(chr(rng.randrange(48, 58)) for _ in range(tokens - 1)),
            finish_reason="stop",
        )
        for _ in range(group_size)
    ]
    return TrajectoryGroup(
        group_id=uuid.uuid4().hex, run="bench", task="chain_sum", problem_id="p123", prompt="4-1-7=",
        prompt_token_ids=[1] + [rng.randrange(4, 99) for _ in range(prompt_tokens - 1)],
        completions=completions, generation_s=0.05, scoring_s=0.01,
    )  # fmt: skip


async def _queue_path(redis: Any, run: str, groups: list, per_read: int) -> dict[str, float]:
    from services.queue import TrajectoryQueue

    queue = TrajectoryQueue(redis, run, consumer="bench", max_len=len(groups) + 1)
    await queue.ensure_group()
    started = time.perf_counter()
    for group in groups:  # one XADD per group, as a rollout worker pushes them
        await queue.push(group)
    pushed = time.perf_counter()
    done = 0
    while done < len(groups):  # read a learner step's worth, then settle it, as the learner does
        deliveries = await queue.read(per_read, block_ms=200)
        await queue.ack(deliveries)
        done += len(deliveries)
    finished = time.perf_counter()
    await redis.delete(*[getattr(queue.keys, k) for k in ("trajectories", "trained", "counters")])
    return {"push_s": pushed - started, "consume_s": finished - pushed, "total_s": finished - started}


async def _raw_path(redis: Any, stream: str, payload: bytes, n: int, per_read: int, pipelined: bool) -> dict:
    from services.queue import _entries  # parses the XREADGROUP reply whatever its RESP shape

    await redis.xgroup_create(stream, "g", id="0", mkstream=True)
    started = time.perf_counter()
    if pipelined:
        for start in range(0, n, 64):
            async with redis.pipeline(transaction=False) as pipe:
                for _ in range(min(64, n - start)):
                    pipe.xadd(stream, {"data": payload})
                await pipe.execute()
    else:
        for _ in range(n):
            await redis.xadd(stream, {"data": payload})
    pushed = time.perf_counter()
    done = 0
    while done < n:
        reply = await redis.xreadgroup("g", "c", {stream: ">"}, count=per_read, block=200)
        ids = [entry_id for entry_id, _ in _entries(reply)]
        if ids:
            await redis.xack(stream, "g", *ids)
        done += len(ids)
    finished = time.perf_counter()
    await redis.delete(stream)
    return {"push_s": pushed - started, "consume_s": finished - pushed, "total_s": finished - started}


def bench_queue(ctx: Context) -> dict[str, Any]:
    return asyncio.run(_bench_queue(ctx))


async def _bench_queue(ctx: Context) -> dict[str, Any]:
    from services.queue import connect_redis
    from services.redis_server import RedisServer

    sizes = ctx.sizes
    n, per_read = sizes["queue_groups"], 16  # the learner reads groups_per_step = 16 at a time
    template = realistic_group()
    payload = template.model_dump_json().encode()
    server = RedisServer(
        ctx.scratch / "redis-queue", password=secrets.token_hex(8)
    ).start()  # as `up` runs it
    redis = await connect_redis(server.url)
    kinds = ("queue", "raw_pipelined", "raw_serial")
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    try:
        for rep in range(sizes["queue_reps"]):
            groups = [template.model_copy(update={"group_id": uuid.uuid4().hex}) for _ in range(n)]
            for kind in rotated(kinds, rep):
                if kind == "queue":
                    r = await _queue_path(redis, f"bench{rep}", groups, per_read)
                else:
                    r = await _raw_path(
                        redis, f"raw:{rep}:{kind}", payload, n, per_read, kind == "raw_pipelined"
                    )
                r["groups_per_s"] = n / r["total_s"]
                runs[kind].append(r)
            log(f"queue rep {rep}: " + ", ".join(f"{k} {runs[k][-1]['groups_per_s']:.0f}/s" for k in kinds))
    finally:
        await redis.aclose()
        server.stop()
    rate = {k: [r["groups_per_s"] for r in runs[k]] for k in kinds}
    us = {k: [1e6 / x for x in rate[k]] for k in kinds}
    overhead = median([a - b for a, b in zip(us["queue"], us["raw_pipelined"], strict=True)])
    fig = figure(
        "queue", "groups_per_s", rate["queue"], rate["raw_pipelined"], unit="groups/s",
        what=f"TrajectoryQueue push (one per group) + read ({per_read}) + ack, G=8 × 10 tokens, "
        f"{len(payload)} B of JSON",
        baseline_what="raw XADD (pipelined, 64 per round trip) + XREADGROUP + XACK of the same bytes",
        overhead_us_per_group=overhead,
    )  # fmt: skip
    serial = figure(
        "queue", "groups_per_s_vs_unpipelined", rate["queue"], rate["raw_serial"], unit="groups/s",
        what="TrajectoryQueue push + read + ack (as above)",
        baseline_what="raw XADD one round trip each (the queue's call pattern) + XREADGROUP + XACK",
        overhead_us_per_group=median([a - b for a, b in zip(us["queue"], us["raw_serial"], strict=True)]),
    )  # fmt: skip
    details = {
        "payload_bytes": len(payload),
        "groups": n,
        "per_read": per_read,
        "us_per_group": {k: median(us[k]) for k in kinds},
        "push_us_per_group": {k: median([1e6 * r["push_s"] / n for r in runs[k]]) for k in kinds},
        "consume_us_per_group": {k: median([1e6 * r["consume_s"] / n for r in runs[k]]) for k in kinds},
    }
    return {"figures": [fig, serial], "details": details, "runs": runs}

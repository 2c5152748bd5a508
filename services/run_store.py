"""The run's Redis state besides the trajectory stream (DESIGN §4): its key names, weight announcements,
the capped metrics stream and the state hash. `TrajectoryQueue` (services/queue.py) builds on it."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import redis.asyncio as aredis

from client.schemas import WeightsAnnouncement
from services.redis_client import TRANSIENT, as_str, logger, raise_if_cancelled


@dataclass(frozen=True)
class RedisKeys:
    """All Redis keys of one run (DESIGN §4)."""

    run: str
    trajectories: str = field(init=False)  # stream, consumer group `learners`
    deadletter: str = field(init=False)  # stream of rejected groups, with the reason
    weights_channel: str = field(init=False)  # pub/sub: wakes weight watchers
    weights_latest: str = field(init=False)  # hash: the latest announcement (source of truth)
    metrics: str = field(init=False)  # capped stream of step metrics
    state: str = field(init=False)  # hash: learner version, λ, …
    trained: str = field(init=False)  # set of trained group ids
    dropped: str = field(init=False)  # set of group ids the learner chose not to train
    dead_lettered: str = field(init=False)  # set of group ids dead-lettered from the stream (not trainable)
    counters: str = field(init=False)  # hash: produced, trained, dead_lettered, dropped, …

    def __post_init__(self) -> None:
        suffixes = {"weights_channel": "weights", "weights_latest": "weights:latest"}
        for name in ("trajectories", "deadletter", "weights_channel", "weights_latest", "metrics", "state",
                     "trained", "dropped", "dead_lettered", "counters"):  # fmt: skip
            object.__setattr__(self, name, f"r2vpo:{self.run}:{suffixes.get(name, name)}")


class RunStore:
    """Weight announcements, metrics and state of one run, over a client from `connect_redis`."""

    def __init__(self, redis: aredis.Redis, run: str) -> None:
        self.redis, self.keys = redis, RedisKeys(run)

    # --- weights --------------------------------------------------------------------------------------
    async def announce(self, a: WeightsAnnouncement) -> None:
        """Write the announcement to the `weights:latest` hash (source of truth), then PUBLISH to wake
        watchers."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.weights_latest, mapping=a.model_dump(mode="json"))
            pipe.publish(self.keys.weights_channel, a.model_dump_json())
            await pipe.execute()

    async def latest_weights(self) -> WeightsAnnouncement | None:
        raw = await self.redis.hgetall(self.keys.weights_latest)
        if not raw:
            return None
        return WeightsAnnouncement.model_validate({as_str(k): as_str(v) for k, v in raw.items()})

    async def watch_weights(
        self, poll_s: float = 1.0, *, after_version: int = -1
    ) -> AsyncIterator[WeightsAnnouncement]:
        """Yield each newer announcement once, ascending (read from the hash; pub/sub only wakes us, and
        we also poll every `poll_s` in case a message was missed). Use with `contextlib.aclosing`."""
        last, pubsub, subscribed = after_version, self.redis.pubsub(), False
        try:
            while True:
                try:
                    if not subscribed:
                        await pubsub.subscribe(self.keys.weights_channel)
                        subscribed = True
                    latest = await self.latest_weights()
                    raise_if_cancelled()
                    if latest is not None and latest.version > last:
                        last = latest.version
                        yield latest
                        continue
                    await pubsub.get_message(ignore_subscribe_messages=True, timeout=poll_s)
                    raise_if_cancelled()
                except TRANSIENT as exc:
                    logger.warning("weights watch lost redis: %s", exc)
                    subscribed = False
                    await pubsub.reset()
                    await asyncio.sleep(poll_s)
        finally:
            await pubsub.aclose()

    # --- metrics & state ------------------------------------------------------------------------------
    async def append_metrics(self, record: dict, maxlen: int = 10_000) -> str:
        """Append one metrics record (JSON; non-finite floats become null) to the capped metrics stream."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        data = json.dumps(clean, default=str)
        entry_id = await self.redis.xadd(self.keys.metrics, {"data": data}, maxlen=maxlen, approximate=True)
        return as_str(entry_id)

    async def read_metrics(self, after_id: str = "0-0", count: int = 1000) -> list[tuple[str, dict]]:
        """Metrics records with ids strictly after `after_id`, oldest first."""
        rows = await self.redis.xrange(self.keys.metrics, min=f"({after_id}", max="+", count=count)
        return [(as_str(i), json.loads(f[b"data"])) for i, f in rows]

    async def set_state(self, mapping: dict) -> None:
        await self.redis.hset(self.keys.state, mapping={k: str(v) for k, v in mapping.items()})

    async def get_state(self) -> dict[str, str]:
        return {as_str(k): as_str(v) for k, v in (await self.redis.hgetall(self.keys.state)).items()}

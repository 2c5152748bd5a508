"""The run's trajectory queue (DESIGN §4): one Redis stream with a consumer group, and its dead letters.

Every key is namespaced per run (`r2vpo:{run}:…`). Delivery is at-least-once (a consumer group on one
stream); the training *effect* is exactly-once: an entry is acked and deleted only after the optimizer step
that used it, in the same atomic step that adds its group id to the trained set, and a group id that is
already trained is skipped on delivery. Entries of a dead learner are reclaimed with XAUTOCLAIM.

Accounting identity, computable from Redis alone (see `TrajectoryQueue.accounting`):
    produced = trained + dead_lettered + dropped + duplicates_skipped + pending
where each stream entry is counted once by the step that XACKs it (XACK's reply decides, so two learners
settling the same entry count it once). `duplicates_skipped` is 0 unless a producer pushed a group twice.
A delivered group that must never be trained (its update was not finite) is dead-lettered from the stream
(`dead_letter_deliveries`) and its id kept in the dead-lettered set, next to the trained and dropped sets.

Alongside (and re-exported here, where callers import them from): connecting and retrying in
`services.redis_client`; key names, weight announcements, metrics and state in `services.run_store`,
which `TrajectoryQueue` extends. If the stream/group is gone (NOGROUP), it is recreated.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aredis
from pydantic import ValidationError
from redis.exceptions import ResponseError

from client.schemas import TrajectoryGroup
from services.redis_client import (
    TRANSIENT,
    QueueUnavailable,
    as_str,
    connect_redis,
    raise_if_cancelled,
    redact_url,
    with_retry,
)
from services.run_store import RedisKeys, RunStore

__all__ = [
    "TRANSIENT",
    "Delivery",
    "QueueUnavailable",
    "RedisKeys",
    "RunStore",
    "TrajectoryQueue",
    "connect_redis",
    "redact_url",
    "with_retry",
]

T = TypeVar("T")

# Atomic settle of stream entries (a script rather than MULTI/EXEC so the counters can follow what XACK
# and SADD actually returned). KEYS: stream, counters, set. ARGV: group, entry counter, repeat counter,
# extra counter ('' = none), n ids, ids..., set members...
_SETTLE = """
local n = tonumber(ARGV[5])
local acked = 0
if n > 0 then
  acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 6, 5 + n))
  redis.call('XDEL', KEYS[1], unpack(ARGV, 6, 5 + n))
end
local repeated = 0
for i = 6 + n, #ARGV do
  if redis.call('SADD', KEYS[3], ARGV[i]) == 0 then repeated = repeated + 1 end
end
if acked > 0 then redis.call('HINCRBY', KEYS[2], ARGV[2], acked) end
if acked > 0 and ARGV[4] ~= '' then redis.call('HINCRBY', KEYS[2], ARGV[4], acked) end
if repeated > 0 and ARGV[3] ~= '' then redis.call('HINCRBY', KEYS[2], ARGV[3], repeated) end
return {acked, repeated}
"""

# Atomic, idempotent dead-lettering of delivered entries: each entry whose XACK succeeds gets its group id in
# the dead-lettered set, a record in the dead-letter stream and one `dead_lettered` count; an entry already
# acked (a retry after a lost reply, or another consumer settled it) gets nothing. KEYS: stream, counters,
# dead-lettered set, dead-letter stream. ARGV: group, reason, time, then (entry id, group id, data) triples.
_DEAD_LETTER = """
local settled = 0
for i = 4, #ARGV, 3 do
  local entry, gid = ARGV[i], ARGV[i + 1]
  if redis.call('XACK', KEYS[1], ARGV[1], entry) > 0 then
    if gid ~= '' then redis.call('SADD', KEYS[3], gid) end
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', '10000', '*', 'reason', ARGV[2], 'group_id', gid,
               'data', ARGV[i + 2], 'entry_id', entry, 'time', ARGV[3])
    settled = settled + 1
  end
  redis.call('XDEL', KEYS[1], entry)
end
if settled > 0 then redis.call('HINCRBY', KEYS[2], 'dead_lettered', settled) end
return settled
"""


@dataclass
class Delivery:
    """One validated trajectory group handed to a learner; `deliveries` counts redeliveries too."""

    entry_id: str
    group: TrajectoryGroup
    deliveries: int


def _entries(reply: Any) -> list[tuple[Any, Any]]:
    """Entries of an XREADGROUP reply, whatever shape redis-py gives (RESP2 list or RESP3/unified dict)."""
    if not reply:
        return []
    out: list[tuple[Any, Any]] = []
    for entries in reply.values() if isinstance(reply, dict) else [e for _, e in reply]:
        for item in entries or []:
            nested = bool(item) and isinstance(item[0], list | tuple)  # RESP3 legacy: one more list level
            out.extend(item if nested else [item] if item else [])
    return out


class TrajectoryQueue(RunStore):
    """The run's trajectory stream, plus (from `RunStore`) its weights, metrics and state; one instance per
    process (named consumer)."""

    def __init__(
        self,
        redis: aredis.Redis,
        run: str,
        *,
        consumer: str,
        group_name: str = "learners",
        max_len: int = 1024,
    ) -> None:
        super().__init__(redis, run)
        self.consumer = consumer
        self.group_name, self.max_len = group_name, max_len
        self._settle_script = redis.register_script(_SETTLE)
        self._dead_letter_script = redis.register_script(_DEAD_LETTER)
        self._inflight: set[str] = set()  # entries delivered to this consumer and not yet settled
        self._claim_cursor = "0-0"

    # --- producers ------------------------------------------------------------------------------------
    async def push(self, group: TrajectoryGroup) -> str:
        """Append one group as one entry (field `data` = JSON). Bounded by `wait_for_room`, never trimmed."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.keys.trajectories, {"data": group.model_dump_json().encode()})
            pipe.hincrby(self.keys.counters, "produced", 1)
            entry_id, _ = await pipe.execute()
        return as_str(entry_id)

    async def length(self) -> int:
        return int(await self.redis.xlen(self.keys.trajectories))

    async def wait_for_room(self, *, poll_s: float = 0.05, timeout_s: float | None = None) -> float:
        """Block while the stream holds `max_len` entries or more; returns the seconds paused."""
        start = time.monotonic()
        while await self.length() >= self.max_len:
            raise_if_cancelled()
            if timeout_s is not None and time.monotonic() - start >= timeout_s:
                raise TimeoutError(f"trajectory stream still full ({self.max_len}) after {timeout_s} s")
            await asyncio.sleep(poll_s)
        return time.monotonic() - start

    async def dead_letter(
        self, payload: dict | str | bytes, reason: str, *, group_id: str | None = None, produced: bool = True
    ) -> None:
        """Record a group that never reached the stream (e.g. scoring failed) with the reason.

        `produced=True` (default) counts it as produced *and* dead-lettered, keeping the accounting
        identity; `produced=False` only writes the record (a note, no counters)."""
        data = payload if isinstance(payload, str | bytes) else json.dumps(payload, default=str)
        record = {"reason": reason, "group_id": group_id or "", "data": data, "time": repr(time.time())}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.keys.deadletter, record, maxlen=10_000, approximate=True)
            if produced:
                pipe.hincrby(self.keys.counters, "produced", 1)
                pipe.hincrby(self.keys.counters, "dead_lettered", 1)
            await pipe.execute()

    # --- consumers ------------------------------------------------------------------------------------
    async def ensure_group(self) -> None:
        """Create the consumer group (and stream) from the start of the stream; no-op if it exists."""
        try:
            await self.redis.xgroup_create(self.keys.trajectories, self.group_name, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _grouped(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group()
            return await call()

    async def pending_count(self) -> int:
        """Entries delivered to some consumer and not yet acked."""
        try:
            return int((await self.redis.xpending(self.keys.trajectories, self.group_name))["pending"])
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                return 0
            raise

    async def read(self, count: int, block_ms: int = 1000) -> list[Delivery]:
        """Up to `count` new groups for this consumer (validated, deduplicated); `block_ms<=0`: no wait."""
        streams = {self.keys.trajectories: ">"}
        block = block_ms if block_ms > 0 else None
        reply = await self._grouped(
            lambda: self.redis.xreadgroup(self.group_name, self.consumer, streams, count=count, block=block)
        )
        return await self._admit(_entries(reply), {})

    async def reclaim(self, min_idle_ms: int, count: int = 64) -> list[Delivery]:
        """Take over entries idle longer than `min_idle_ms` (a dead consumer's) with XAUTOCLAIM."""
        reply = await self._grouped(
            lambda: self.redis.xautoclaim(
                self.keys.trajectories, self.group_name, self.consumer, min_idle_ms, self._claim_cursor, count
            )
        )
        self._claim_cursor = as_str(reply[0])  # redis 7 adds reply[2] (deleted ids, already out of the PEL)
        entries = [(i, f) for i, f in reply[1] if as_str(i or b"") not in self._inflight]
        if any(i is None for i, _ in entries):  # redis 6.2: deleted entries stay pending, ids hidden
            await self._ack_deleted_pending()
        entries = [(i, f) for i, f in entries if i is not None]
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id, _ in entries:
                pipe.xpending_range(self.keys.trajectories, self.group_name, entry_id, entry_id, 1)
            info = await pipe.execute()
        counts = {
            as_str(i): int(p[0]["times_delivered"]) if p else 1
            for (i, _), p in zip(entries, info, strict=True)
        }
        return await self._admit(entries, counts)

    async def _ack_deleted_pending(self) -> None:
        pel = await self.redis.xpending_range(
            self.keys.trajectories, self.group_name, "-", "+", 1000, consumername=self.consumer
        )
        for row in pel:
            if not await self.redis.xrange(self.keys.trajectories, row["message_id"], row["message_id"]):
                await self.redis.xack(self.keys.trajectories, self.group_name, row["message_id"])

    async def _admit(self, entries: list[tuple[Any, Any]], counts: dict[str, int]) -> list[Delivery]:
        """Validate and deduplicate raw entries; invalid ones are dead-lettered, duplicates skipped."""
        valid: list[Delivery] = []
        for raw_id, fields in entries:
            entry_id, data = as_str(raw_id), (fields or {}).get(b"data") or (fields or {}).get("data")
            try:
                if data is None:
                    raise ValueError("entry has no 'data' field")
                group = TrajectoryGroup.model_validate_json(data)
            except (ValidationError, ValueError) as exc:
                reason = f"invalid trajectory group: {exc}"[:2000]
                await self._dead_letter([(entry_id, "", data or b"")], reason)  # no group id to keep
                continue
            valid.append(Delivery(entry_id, group, counts.get(entry_id, 1)))
        if not valid:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for d in valid:
                for key in (self.keys.trained, self.keys.dropped, self.keys.dead_lettered):
                    pipe.sismember(key, d.group.group_id)
            flags = await pipe.execute()
        fresh, seen, dups = [], set(), []
        for k, d in enumerate(valid):
            if any(flags[3 * k : 3 * k + 3]) or d.group.group_id in seen:
                dups.append(d.entry_id)
            else:
                seen.add(d.group.group_id)
                fresh.append(d)
        if dups:
            await self._settle(dups, [], self.keys.trained, "duplicates_skipped")
        self._inflight.update(d.entry_id for d in fresh)
        return fresh

    async def _settle(
        self, entry_ids: Sequence[str], members: Sequence[str], set_key: str, field: str, repeat: str = "",
        extra: str = "",
    ) -> tuple[int, int]:  # fmt: skip
        keys = [self.keys.trajectories, self.keys.counters, set_key]
        args = [self.group_name, field, repeat, extra, len(entry_ids), *entry_ids, *members]
        acked, repeated = await self._settle_script(keys=keys, args=args)
        self._inflight.difference_update(entry_ids)
        return int(acked), int(repeated)

    async def ack(
        self,
        deliveries_or_entry_ids: Sequence[Delivery] | Sequence[str],
        group_ids: Sequence[str] | None = None,
    ) -> int:
        """After the optimizer step that used them is committed: atomically add the group ids to the trained
        set, XACK + XDEL the entries, count `trained` (entries acked) and `trained_twice` (ids already in the
        set). `group_ids` defaults to the deliveries' groups. Returns the number of entries acked."""
        items = list(deliveries_or_entry_ids)
        ids = [d.entry_id if isinstance(d, Delivery) else d for d in items]
        if group_ids is None:
            group_ids = [d.group.group_id for d in items if isinstance(d, Delivery)]
        acked, _ = await self._settle(ids, list(group_ids), self.keys.trained, "trained", "trained_twice")
        return acked

    async def drop(self, deliveries: Sequence[Delivery], reason: str) -> int:
        """Settle groups the learner chose not to train (e.g. too stale): ack + delete their entries, add
        them to the `dropped` set, count `dropped` and `dropped:{reason}`. Returns entries acked."""
        ids, gids = [d.entry_id for d in deliveries], [d.group.group_id for d in deliveries]
        acked, _ = await self._settle(ids, gids, self.keys.dropped, "dropped", "", f"dropped:{reason}")
        return acked

    async def dead_letter_deliveries(self, deliveries: Sequence[Delivery], reason: str) -> int:
        """Settle delivered groups that must never be trained (e.g. their update was not finite), in one
        atomic step: for each entry that this XACK acknowledges, add its group id to the `dead_lettered` set
        (a later copy is skipped as a duplicate), write a dead-letter record (reason, group id, group JSON,
        entry id) and count `dead_lettered`; XDEL the entries. Idempotent: an entry already acknowledged (a
        retry after a lost reply, or another learner settled it) changes nothing, so each entry is counted
        once. Returns the entries dead-lettered by this call."""
        items = [(d.entry_id, d.group.group_id, d.group.model_dump_json()) for d in deliveries]
        return await self._dead_letter(items, reason) if items else 0

    async def _dead_letter(self, items: Sequence[tuple[str, str, Any]], reason: str) -> int:
        """Run `_DEAD_LETTER` on (entry id, group id, data) triples; returns the entries it settled."""
        args: list[Any] = [self.group_name, reason, repr(time.time())]
        for item in items:
            args += item
        keys = [self.keys.trajectories, self.keys.counters, self.keys.dead_lettered, self.keys.deadletter]
        settled = await self._dead_letter_script(keys=keys, args=args)
        self._inflight.difference_update(entry_id for entry_id, _, _ in items)
        return int(settled)

    async def trained_ids(self) -> set[str]:
        return {as_str(m) for m in await self.redis.smembers(self.keys.trained)}

    async def accounting(self) -> dict[str, int]:
        """Run accounting; `unaccounted` = produced − (trained + dead_lettered + dropped + duplicates
        + pending) is 0 when every produced group is accounted for."""
        raw = await self.redis.hgetall(self.keys.counters)
        c = {as_str(k): int(v) for k, v in raw.items()}
        names = ("produced", "trained", "dead_lettered", "dropped", "duplicates_skipped", "trained_twice")
        out = {name: c.get(name, 0) for name in names}
        out["pending"] = await self.length()
        out["trained_groups"] = int(await self.redis.scard(self.keys.trained))
        settled = sum(
            out[k] for k in ("trained", "dead_lettered", "dropped", "duplicates_skipped", "pending")
        )
        out["unaccounted"] = out["produced"] - settled
        return out

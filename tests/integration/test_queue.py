"""The Redis queue against a real redis-server: delivery, reclaim, dead letters, backpressure, weights,
accounting and a server restart."""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing

import pytest

from client.schemas import Completion, TrajectoryGroup, WeightsAnnouncement
from services.queue import QueueUnavailable, TrajectoryQueue, connect_redis, with_retry
from services.redis_server import RedisServer, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
SHA = "ab" * 32


def run(coro, timeout: float = 30.0):
    """Run one async test body, bounded."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def make_group(group_id: str, *, version: int = 0) -> TrajectoryGroup:
    completion = Completion(
        token_ids=[5, 6], behavior_logprobs=[-0.5, -1.0], reward=1.0, policy_version=version
    )
    return TrajectoryGroup(group_id=group_id, prompt_token_ids=[1, 2, 3], completions=[completion])


async def open_queue(url: str, consumer: str = "A", **kwargs) -> TrajectoryQueue:
    redis = await connect_redis(url, attempts=5, backoff_s=0.05)
    queue = TrajectoryQueue(redis, "t", consumer=consumer, **kwargs)
    await queue.ensure_group()
    return queue


def test_push_read_ack_round_trip_removes_entry_and_marks_trained(redis_url):
    async def body():
        q = await open_queue(redis_url)
        entry_id = await q.push(make_group("g1"))
        assert await q.length() == 1
        (delivery,) = await q.read(10, block_ms=100)
        assert (delivery.entry_id, delivery.group.group_id, delivery.deliveries) == (entry_id, "g1", 1)
        assert delivery.group == make_group("g1").model_copy(update={"created_at": delivery.group.created_at})
        assert await q.pending_count() == 1
        assert await q.ack([delivery]) == 1
        assert (await q.length(), await q.pending_count()) == (0, 0)
        assert await q.trained_ids() == {"g1"}
        assert await q.read(10, block_ms=50) == []
        await q.ensure_group()  # idempotent (BUSYGROUP ignored)
        await q.redis.aclose()

    run(body())


def test_group_pushed_twice_is_trained_once(redis_url):
    async def body():
        q = await open_queue(redis_url)
        await q.push(make_group("g1"))
        await q.ack(await q.read(10, block_ms=100))
        await q.push(make_group("g1"))  # at-least-once producer retried
        await q.push(make_group("g2"))
        await q.push(make_group("g2"))  # duplicate inside one batch
        delivered = await q.read(10, block_ms=100)
        assert [d.group.group_id for d in delivered] == ["g2"]
        await q.ack(delivered)
        acc = await q.accounting()
        assert acc["duplicates_skipped"] == 2 and acc["trained"] == 2 and acc["trained_twice"] == 0
        assert acc["pending"] == 0 and acc["unaccounted"] == 0
        await q.redis.aclose()

    run(body())


def test_dead_consumer_entries_are_reclaimed_and_trained_exactly_once(redis_url):
    async def body():
        a = await open_queue(redis_url, "A")
        b = await open_queue(redis_url, "B")
        ids = [f"g{i}" for i in range(20)]
        for gid in ids:
            await a.push(make_group(gid))
        held_by_dead = await a.read(10, block_ms=100)  # A "dies" holding these: never acks
        assert len(held_by_dead) == 10
        own = await b.read(100, block_ms=100)
        assert len(own) == 10
        await asyncio.sleep(0.1)
        reclaimed = await b.reclaim(min_idle_ms=50)
        assert {d.entry_id for d in reclaimed} == {d.entry_id for d in held_by_dead}  # not B's own in-flight
        assert all(d.deliveries == 2 for d in reclaimed)
        await b.ack(own)
        await b.ack(reclaimed)
        assert await b.trained_ids() == set(ids)
        acc = await b.accounting()
        assert (acc["trained"], acc["trained_twice"], acc["pending"], acc["unaccounted"]) == (20, 0, 0, 0)
        assert await b.pending_count() == 0
        assert await a.ack(held_by_dead) == 0  # the dead consumer coming back late changes nothing
        assert (await b.accounting())["trained"] == 20
        await a.redis.aclose()
        await b.redis.aclose()

    run(body())


def test_invalid_payloads_go_to_dead_letter_and_are_never_returned(redis_url):
    async def body():
        q = await open_queue(redis_url)
        good = make_group("ok").model_dump(mode="json")
        mismatched = json.loads(json.dumps(good)) | {"group_id": "mismatch"}
        mismatched["completions"][0]["behavior_logprobs"] = [-0.5]
        nan = json.loads(json.dumps(good)) | {"group_id": "nan"}
        nan["completions"][0]["behavior_logprobs"] = [float("nan"), -1.0]
        stream = q.keys.trajectories
        await q.redis.xadd(stream, {"data": b"\xff\x00 not json"})
        await q.redis.xadd(stream, {"data": json.dumps(mismatched)})
        await q.redis.xadd(stream, {"data": json.dumps(nan)})  # json.dumps writes NaN
        await q.redis.xadd(stream, {"other": b"no data field"})
        await q.push(make_group("ok"))
        delivered = await q.read(10, block_ms=100)
        assert [d.group.group_id for d in delivered] == ["ok"]
        letters = await q.redis.xrange(q.keys.deadletter)
        reasons = [f[b"reason"].decode() for _, f in letters]
        assert len(reasons) == 4 and all(r.startswith("invalid trajectory group") for r in reasons)
        assert "behavior_logprobs" in reasons[1] and "data" in reasons[3]
        assert letters[0][1][b"data"] == b"\xff\x00 not json"
        assert await q.length() == 1 and await q.pending_count() == 1  # only the good one is left
        assert (await q.accounting())["dead_lettered"] == 4
        await q.redis.aclose()

    run(body())


def test_backpressure_keeps_stream_within_bound(redis_url):
    async def body():
        producer = await open_queue(redis_url, "P", max_len=5)
        consumer = await open_queue(redis_url, "C", max_len=5)
        observed: list[int] = []
        paused: list[float] = []
        done = asyncio.Event()

        async def produce():
            for i in range(20):
                paused.append(await producer.wait_for_room(poll_s=0.005, timeout_s=20))
                await producer.push(make_group(f"g{i}"))
            done.set()

        async def sample():
            while not done.is_set():
                observed.append(await consumer.length())
                await asyncio.sleep(0.002)

        async def drain():
            trained = 0
            while trained < 20:
                batch = await consumer.read(2, block_ms=50)
                await asyncio.sleep(0.03)  # a slow learner
                trained += await consumer.ack(batch)

        await asyncio.gather(produce(), sample(), drain())
        assert max(observed) <= 5 and len(observed) > 10
        assert sum(paused) > 0
        assert (await consumer.accounting())["trained"] == 20
        with pytest.raises(TimeoutError):
            for i in range(6):
                await producer.push(make_group(f"x{i}"))
            await producer.wait_for_room(poll_s=0.005, timeout_s=0.05)
        await producer.redis.aclose()
        await consumer.redis.aclose()

    run(body())


def test_accounting_identity_holds_after_mixed_scenario(redis_url):
    async def body():
        q = await open_queue(redis_url)
        for i in range(7):
            await q.push(make_group(f"g{i}"))
        await q.push(make_group("g0"))  # duplicate
        bad = Completion.model_construct(
            token_ids=[1, 2], behavior_logprobs=[-1.0], reward=0.0, policy_version=0
        )
        await q.push(make_group("bad").model_copy(update={"completions": [bad]}))  # invalid on the wire
        await q.dead_letter({"group_id": "unscored"}, "reward service failed", group_id="unscored")
        delivered = await q.read(20, block_ms=100)
        assert len(delivered) == 7
        await q.ack(delivered[:4])
        await q.drop(delivered[4:5], reason="stale")
        acc = await q.accounting()
        assert acc == acc | {"produced": 10, "trained": 4, "dead_lettered": 2, "dropped": 1, "pending": 2}
        assert acc["duplicates_skipped"] == 1 and acc["unaccounted"] == 0
        settled = acc["trained"] + acc["dead_lettered"] + acc["dropped"] + acc["duplicates_skipped"]
        assert acc["produced"] == settled + acc["pending"]
        counters = await q.redis.hgetall(q.keys.counters)
        assert counters[b"dropped:stale"] == b"1"
        await q.push(make_group(delivered[4].group.group_id))  # a dropped group is not trained later
        assert await q.read(10, block_ms=50) == []
        await q.ack(delivered[:1])  # a lost reply's retry: the set says "already trained"
        assert (await q.accounting())["trained_twice"] == 1
        await q.redis.aclose()

    run(body())


def test_weights_watcher_sees_versions_in_order_via_pubsub_and_hash(redis_url):
    async def body():
        q = await open_queue(redis_url)
        assert await q.latest_weights() is None
        seen: list[int] = []
        got = asyncio.Condition()

        async def watch(poll_s: float):
            async with aclosing(q.watch_weights(poll_s=poll_s)) as updates:
                async for a in updates:
                    async with got:
                        seen.append(a.version)
                        got.notify_all()

        async def wait_for(n: int):
            async with got:
                await got.wait_for(lambda: len(seen) >= n)

        def ann(v: int) -> WeightsAnnouncement:
            return WeightsAnnouncement(version=v, uri=f"file:///w/v{v}", sha256=SHA, bytes=10 + v)

        # A long poll: only pub/sub can wake the watcher before the test's timeout.
        watcher = asyncio.create_task(watch(poll_s=600))
        await asyncio.sleep(0.1)
        await q.announce(ann(1))
        await wait_for(1)
        await q.announce(ann(2))
        await wait_for(2)
        await q.announce(ann(1))  # an older version is never yielded
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        assert seen == [1, 2]
        # A missed message: the hash changes without a PUBLISH; the poll finds it.
        seen.clear()
        watcher = asyncio.create_task(watch(poll_s=0.05))
        await wait_for(1)  # the current latest, at start
        v3 = ann(3)
        await q.redis.hset(q.keys.weights_latest, mapping=v3.model_dump(mode="json"))
        await wait_for(2)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        assert seen == [1, 3]
        assert await q.latest_weights() == v3
        await q.redis.aclose()

    run(body())


def test_metrics_and_state_round_trip(redis_url):
    async def body():
        q = await open_queue(redis_url)
        first = await q.append_metrics({"step": 1, "loss": 0.5, "bad": float("nan")})
        await q.append_metrics({"step": 2, "loss": 0.25})
        rows = await q.read_metrics()
        assert [r for _, r in rows] == [{"step": 1, "loss": 0.5, "bad": None}, {"step": 2, "loss": 0.25}]
        assert [r["step"] for _, r in await q.read_metrics(after_id=first)] == [2]
        await q.set_state({"version": 3, "lam": 0.1})
        assert await q.get_state() == {"version": "3", "lam": "0.1"}
        await q.redis.aclose()

    run(body())


def test_acknowledged_and_pending_data_survive_redis_restart(redis_server: RedisServer):
    async def body():
        q = await open_queue(redis_server.url, "A")
        for i in range(5):
            await q.push(make_group(f"g{i}"))
        held = await q.read(3, block_ms=100)
        await q.ack(held[:2])
        await asyncio.to_thread(redis_server.stop)
        during_outage = asyncio.create_task(
            with_retry(q.accounting, attempts=50, backoff=0.05, max_backoff=0.2)
        )
        await asyncio.sleep(0.5)
        await asyncio.to_thread(redis_server.start)  # same port, same append-only data dir
        acc = await during_outage
        assert (acc["produced"], acc["trained"], acc["pending"]) == (5, 2, 3)
        assert await q.trained_ids() == {"g0", "g1"}
        assert await q.pending_count() == 1  # A's unacked entry is still pending
        b = await open_queue(redis_server.url, "B")
        reclaimed = await b.reclaim(min_idle_ms=0)
        assert [d.group.group_id for d in reclaimed] == ["g2"]
        rest = await b.read(10, block_ms=100)
        await b.ack(reclaimed + rest)
        assert await b.trained_ids() == {f"g{i}" for i in range(5)}
        assert (await b.accounting())["unaccounted"] == 0
        await q.redis.aclose()
        await b.redis.aclose()

    run(body())


def test_missing_group_is_recreated_on_read(redis_url):
    async def body():
        q = await open_queue(redis_url)
        await q.redis.delete(q.keys.trajectories)  # e.g. a server that lost its data
        await q.push(make_group("g1"))
        assert [d.group.group_id for d in await q.read(10, block_ms=100)] == ["g1"]
        await q.redis.aclose()

    run(body())


def test_connect_waits_for_redis_to_come_back(redis_server: RedisServer):
    async def body():
        redis_server.stop()
        connecting = asyncio.create_task(
            connect_redis(redis_server.url, attempts=100, backoff_s=0.05, max_backoff_s=0.2)
        )
        await asyncio.sleep(1.0)
        assert not connecting.done()
        await asyncio.to_thread(redis_server.start)
        client = await connecting
        assert await client.ping()
        await client.aclose()

    run(body())


def test_connect_gives_up_with_a_message_that_hides_the_password():
    async def body():
        url = f"redis://user:s3cret@127.0.0.1:{free_port()}/0"
        with pytest.raises(QueueUnavailable) as info:
            await connect_redis(url, attempts=2, backoff_s=0.01)
        assert "127.0.0.1" in str(info.value) and "s3cret" not in str(info.value)

    run(body())


def test_wrong_password_is_reported_without_retrying(tmp_path):
    async def body(url: str):
        with pytest.raises(QueueUnavailable, match="credentials") as info:
            await connect_redis(url.replace("pw-right", "pw-wrong"), attempts=50, backoff_s=1.0)
        assert "pw-wrong" not in str(info.value)

    with RedisServer(tmp_path / "redis", password="pw-right") as server:
        run(body(server.url), timeout=20)

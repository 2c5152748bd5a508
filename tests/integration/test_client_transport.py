"""The plumbing the HTTP clients share, over real HTTP on loopback: the retry protocol's steps, the response
size limit while streaming, the async concurrency limit, and the circuit breaker's half-open probe."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from client.errors import InferenceError, RewardError
from client.plugin import ScoringError, create_reward_app
from client.reward import AsyncRewardClient, CircuitBreaker, transport_error
from client.schemas import ScoreRequest
from client.transport import AsyncTransport, Send, Sleep, Transport, with_retries

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

REQUEST = ScoreRequest(id="r-1", prompt="2 + 2 =", completion="4", metadata={"answer": "4"})


def test_retry_protocol_backs_off_doubling_and_gives_up_after_the_retries():
    send = Send("POST", "/score", {})
    call = with_retries(send, lambda status, body: body, retries=2, backoff=0.1, error=RewardError)
    timeout = RewardError("timeout", "slow")
    assert next(call) == send
    assert call.send(timeout) == Sleep(0.1)
    assert call.send(None) == send
    assert call.send(timeout) == Sleep(0.2)
    assert call.send(None) == send
    with pytest.raises(RewardError) as err:
        call.send(timeout)
    assert err.value is timeout


def test_retry_protocol_returns_the_parsed_body_and_does_not_retry_what_is_not_retryable():
    ok = with_retries(
        Send("GET", "/x"), lambda status, body: (status, body), retries=3, backoff=1, error=RewardError
    )
    assert next(ok) == Send("GET", "/x")
    with pytest.raises(StopIteration) as stop:
        ok.send((200, b"{}"))
    assert stop.value.value == (200, b"{}")

    def parse(status: int, body: bytes) -> bytes:
        raise InferenceError("bad request", status_code=status)

    four_xx = with_retries(Send("GET", "/x"), parse, retries=3, backoff=1, error=InferenceError)
    next(four_xx)
    with pytest.raises(InferenceError, match="HTTP 400"):
        four_xx.send((400, b""))
    read_timeout = with_retries(Send("GET", "/x"), parse, retries=3, backoff=1, error=InferenceError)
    next(read_timeout)
    with pytest.raises(InferenceError, match="still generating"):
        read_timeout.send(InferenceError("still generating", retryable=False))


def streaming_app(chunks: int, chunk_bytes: int) -> FastAPI:
    """`GET /stream` answers `chunks` chunks of `chunk_bytes` bytes with no content-length (chunked)."""
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def body():
            for _ in range(chunks):
                yield b"x" * chunk_bytes

        return StreamingResponse(body(), media_type="application/octet-stream")

    return app


def test_response_size_limit_holds_for_chunked_bodies_in_both_transports(app_server):
    with app_server(streaming_app(chunks=10, chunk_bytes=500)) as url, httpx.Client(base_url=url) as http:
        assert Transport(http, transport_error, max_bytes=5000).send(Send("GET", "/stream")) == (
            200,
            b"x" * 5000,
        )
        error = Transport(http, transport_error, max_bytes=4999).send(Send("GET", "/stream"))
        assert isinstance(error, RewardError) and error.kind == "invalid"
        assert "larger than 4999 bytes" in error.message

        async def run() -> object:
            async with httpx.AsyncClient(base_url=url) as ahttp:
                return await AsyncTransport(ahttp, transport_error, max_bytes=1200).send(
                    Send("GET", "/stream")
                )

        error = asyncio.run(run())
        assert isinstance(error, RewardError) and error.kind == "invalid"


def test_async_transport_keeps_at_most_max_concurrency_requests_in_flight(app_server):
    app, in_flight, peak = FastAPI(), [0], [0]

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/slow")
    async def slow() -> dict[str, int]:
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        await asyncio.sleep(0.1)
        in_flight[0] -= 1
        return {"ok": 1}

    async def run(url: str) -> list[object]:
        async with httpx.AsyncClient(base_url=url) as http:
            transport = AsyncTransport(http, transport_error, max_concurrency=2)
            return await asyncio.gather(*(transport.send(Send("GET", "/slow")) for _ in range(8)))

    with app_server(app) as url:
        outcomes = asyncio.run(run(url))
    assert [status for status, _ in outcomes] == [200] * 8
    assert peak[0] == 2


class Switchable:
    """A scoring function that fails, answers slowly, hangs, or rejects the request, as the test sets it."""

    def __init__(self) -> None:
        self.mode, self.calls = "fail", 0
        self.__name__ = "switchable"

    async def __call__(self, prompt: str, completion: str, metadata: dict) -> float:
        self.calls += 1
        if self.mode == "fail":
            raise RuntimeError("scorer is broken")
        if self.mode == "reject":
            raise ScoringError(422, "bad_request", "cannot score this request")
        await asyncio.sleep(0.4 if self.mode == "slow" else 1.0)  # "hang": longer than the client waits
        return 1.0


async def open_circuit(client: AsyncRewardClient, fn: Switchable) -> None:
    """One failed call (the threshold is 1), then wait until the circuit is half-open."""
    fn.mode = "fail"
    with pytest.raises(RewardError, match="HTTP 500"):
        await client.score(REQUEST)
    assert client.circuit.state == "open"
    await asyncio.sleep(client.circuit.reset_after_s + 0.05)
    assert client.circuit.state == "half_open"


def test_half_open_circuit_lets_one_probe_through_and_fails_the_rest_fast(app_server):
    fn, circuit = Switchable(), CircuitBreaker(failure_threshold=1, reset_after_s=0.2)

    async def probe_and_another(url: str) -> tuple[float, RewardError]:
        async with AsyncRewardClient(url, retries=0, circuit=circuit) as client:
            await open_circuit(client, fn)
            fn.mode = "slow"
            probe = asyncio.ensure_future(client.score(REQUEST))
            await asyncio.sleep(0.1)  # the probe is in flight
            with pytest.raises(RewardError) as err:
                await client.score(REQUEST)
            return (await probe).reward, err.value

    with app_server(create_reward_app(fn, timeout_s=60)) as url:
        reward, refused = asyncio.run(probe_and_another(url))
    assert reward == 1.0 and refused.kind == "circuit_open"
    assert circuit.state == "closed" and fn.calls == 2  # the refused call never reached the service


def test_cancelled_probe_frees_the_half_open_slot(app_server):
    fn, circuit = Switchable(), CircuitBreaker(failure_threshold=1, reset_after_s=0.2)

    async def cancel_a_probe_then_probe_again(url: str) -> float:
        async with AsyncRewardClient(url, retries=0, circuit=circuit) as client:
            await open_circuit(client, fn)
            fn.mode = "hang"
            probe = asyncio.ensure_future(client.score(REQUEST))
            await asyncio.sleep(0.1)
            probe.cancel()
            with pytest.raises(asyncio.CancelledError):
                await probe
            assert circuit.state == "half_open"  # no outcome was counted
            fn.mode = "slow"
            return (await client.score(REQUEST)).reward  # admitted: the slot was freed

    with app_server(create_reward_app(fn, timeout_s=60)) as url:
        assert asyncio.run(cancel_a_probe_then_probe_again(url)) == 1.0
    assert circuit.state == "closed"


def test_4xx_answers_count_as_a_live_service_and_keep_the_circuit_closed(app_server):
    fn, circuit = Switchable(), CircuitBreaker(failure_threshold=2, reset_after_s=60)
    fn.mode = "reject"

    async def reject_three_times(url: str) -> list[int | None]:
        codes = []
        async with AsyncRewardClient(url, retries=2, circuit=circuit) as client:
            for _ in range(3):
                with pytest.raises(RewardError) as err:
                    await client.score(REQUEST)
                codes.append(err.value.status_code)
        return codes

    with app_server(create_reward_app(fn)) as url:
        assert asyncio.run(reject_three_times(url)) == [422, 422, 422]
    assert circuit.state == "closed" and fn.calls == 3  # not retried either

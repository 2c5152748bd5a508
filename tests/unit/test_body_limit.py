"""`client.body_limit.BodyLimit`, the one request-size limit of the reward SDK's app and the inference
service, driven as a bare ASGI app: what reaches the app, what is read of an oversized body, what answers."""

from __future__ import annotations

import asyncio

from starlette.responses import PlainTextResponse, Response

from client.body_limit import BodyLimit


class Peer:
    """The server side of one request: hands out `chunks` as body messages, records what is sent back."""

    def __init__(self, chunks: list[bytes], declared: int | None = None) -> None:
        self.chunks, self.reads, self.sent = chunks, 0, []
        headers = [] if declared is None else [(b"content-length", str(declared).encode())]
        self.scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}

    async def receive(self) -> dict:
        self.reads += 1
        if self.reads > len(self.chunks):
            return {"type": "http.disconnect"}
        return {
            "type": "http.request",
            "body": self.chunks[self.reads - 1],
            "more_body": self.reads < len(self.chunks),
        }

    async def send(self, message: dict) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return next(m["status"] for m in self.sent if m["type"] == "http.response.start")


def run(peer: Peer, *, max_bytes: int, drain_factor: int) -> tuple[list[bytes], int]:
    """Serve one request through the limit; returns (bodies the app saw, rejections)."""
    seen: list[bytes] = []
    rejected = [0]

    async def app(scope: dict, receive, send) -> None:  # noqa: ANN001 - ASGI
        seen.append((await receive())["body"])
        await PlainTextResponse("ok")(scope, receive, send)

    def reject() -> Response:
        rejected[0] += 1
        return PlainTextResponse("too large", status_code=413)

    limit = BodyLimit(app, max_bytes=max_bytes, reject=reject, drain_factor=drain_factor)
    asyncio.run(limit(peer.scope, peer.receive, peer.send))
    return seen, rejected[0]


def test_body_within_the_limit_reaches_the_app_whole_in_one_message():
    peer = Peer([b"ab", b"cd", b"ef"])
    assert run(peer, max_bytes=6, drain_factor=0) == ([b"abcdef"], 0)
    assert peer.status == 200


def test_declared_oversized_body_is_rejected_unread_without_draining():
    peer = Peer([b"x" * 10] * 5, declared=50)
    assert run(peer, max_bytes=20, drain_factor=0) == ([], 1)
    assert (peer.status, peer.reads) == (413, 0)


def test_streamed_oversized_body_stops_at_the_limit_without_draining():
    peer = Peer([b"x" * 10] * 10)
    assert run(peer, max_bytes=25, drain_factor=0) == ([], 1)
    assert (peer.status, peer.reads) == (413, 3)  # the chunk that crossed 25 bytes is the last one read


def test_oversized_body_is_drained_up_to_its_cap_then_answered():
    whole = Peer([b"x" * 10] * 10, declared=100)  # 100 bytes, under the 4 × 25 cap: all of it is read
    assert run(whole, max_bytes=25, drain_factor=4) == ([], 1)
    assert (whole.status, whole.reads) == (413, 10)
    capped = Peer([b"x" * 10] * 30)  # 300 bytes: reading stops at the cap of 100
    assert run(capped, max_bytes=25, drain_factor=4) == ([], 1)
    assert (capped.status, capped.reads) == (413, 10)
